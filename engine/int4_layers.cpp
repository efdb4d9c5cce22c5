// The int4 path's native code (engine/int4.py): its matrix multiplication, and the decoder layers of
// Int4Llama, the same calls in the same order as Int4Layer.forward.
//
// The matrix multiplication: GGUF weights (Q4_0 / Q4_1 / Q8_0 blocks of 32) times activations that
// are quantised per block of 32 to 8 bits, as llama.cpp does (its Q8_0 / Q8_1): the dot product of a
// weight block with an activation block is an exact int32 (AVX-512 VNNI's vpdpbusd: 64 products an
// instruction; AVX-512BW alone: vpmaddubsw and vpmaddwd, the same integers), and
// each column then sums over the blocks in order in fp32, acc = fma(d_w d_x, dot, acc) (and, for Q4,
// acc = fma(m_w, d_x sum(q_x), acc)). Every output is that same sequence of operations whatever the
// other rows are, so a row's result does not depend on them (speculative == standard by construction,
// bitwise), and each loop (VNNI, AVX-512BW, portable) computes the same bits (tests/engine/test_int4.py).
// Weights are read once per pass of up to kRowTile rows: at one row a step is bound by memory (~0.6
// bytes a weight), each further row adds its integer dot products.
//
// Attention (visible_attention): each query over its visible keys only, in one fixed order, in fp32;
// see there.
//
// The layers: at batch 1 a step of 30 small layers makes ~1,000 ATen calls; from Python each pays
// its interpreter cost too. Here each pays dispatch only.

#include <ATen/Parallel.h>
#include <immintrin.h>
#include <torch/extension.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

namespace {

using at::Tensor;

constexpr int64_t kBlock = 32;  // weights per GGUF block, activations per scale
constexpr int64_t kCols = 16;   // output columns interleaved per group
constexpr int64_t kRowTile = 4; // rows computed per pass over a group's weights

enum Kind : int64_t { kQ4 = 4, kQ8 = 8 };  // Q4: w = d q + m, q in 0..15; Q8: w = d q, q in -128..127

inline bool has_avx512() {  // the attention's vector loop
  static const bool yes = __builtin_cpu_supports("avx512f");
  return yes;
}

inline bool has_avx512bw() {  // the matrix multiplication's vector loop (and the activations' quantisation)
  static const bool yes = has_avx512() && __builtin_cpu_supports("avx512bw");
  return yes;
}

inline bool has_vnni() {  // ... with vpdpbusd for its dots
  static const bool yes = has_avx512bw() && __builtin_cpu_supports("avx512vnni");
  return yes;
}

// The loop a matrix multiplication runs: the best this CPU has, or (to compare their bits) one below it.
enum Loop : int64_t { kBest = 0, kNoVnni = 1, kPortable = 2 };

// x [M, K] quantised per block of 32 as llama.cpp quantises activations (Q8_0 / Q8_1): d = max|x| / 127,
// q = round-to-nearest-even(x / d), with sum(q) and d * sum(q) kept per block.
struct Activations {
  int64_t rows, k, blocks;
  std::vector<int8_t> q;
  std::vector<float> d, s;
  std::vector<int32_t> sum;

  Activations(const at::Tensor& x, bool vectorised)
      : rows(x.size(0)), k(x.size(1)), blocks(x.size(1) / kBlock), q(rows * k), d(rows * blocks), s(rows * blocks),
        sum(rows * blocks) {
    const float* p = x.data_ptr<float>();
    for (int64_t i = 0; i < rows * blocks; ++i) {
      vectorised ? quantise_avx512(p + i * kBlock, i) : quantise(p + i * kBlock, i);
    }
  }

  void keep(int64_t i, float scale, int32_t total) {
    d[i] = scale;
    sum[i] = total;
    s[i] = scale * static_cast<float>(total);
  }

  void quantise(const float* v, int64_t i) {
    float amax = 0.f;
    for (int64_t j = 0; j < kBlock; ++j) amax = std::max(amax, std::fabs(v[j]));
    const float scale = amax / 127.f, inverse = scale != 0.f ? 1.f / scale : 0.f;
    int32_t total = 0;
    for (int64_t j = 0; j < kBlock; ++j) {
      const float r = std::nearbyint(v[j] * inverse);  // the default rounding: to nearest, ties to even
      q[i * kBlock + j] = static_cast<int8_t>(std::min(127.f, std::max(-127.f, r)));
      total += q[i * kBlock + j];
    }
    keep(i, scale, total);
  }

  // round(a * inverse) to nearest, ties to even (as nearbyint), within +-127
  __attribute__((target("avx512f"))) static __m512i ints(__m512 a, __m512 inverse, __m512 bound) {
    const __m512 r = _mm512_roundscale_ps(_mm512_mul_ps(a, inverse), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    return _mm512_cvtps_epi32(_mm512_min_ps(bound, _mm512_max_ps(_mm512_sub_ps(_mm512_setzero_ps(), bound), r)));
  }

  __attribute__((target("avx512f,avx512bw"))) void quantise_avx512(const float* v, int64_t i) {
    const __m512 lo = _mm512_loadu_ps(v), hi = _mm512_loadu_ps(v + 16);
    const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(lo), _mm512_abs_ps(hi)));
    const float scale = amax / 127.f, inverse = scale != 0.f ? 1.f / scale : 0.f;
    const __m512 bound = _mm512_set1_ps(127.f), inv = _mm512_set1_ps(inverse);
    const __m512i a = ints(lo, inv, bound), b = ints(hi, inv, bound);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(q.data() + i * kBlock), _mm512_cvtepi32_epi8(a));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(q.data() + i * kBlock + 16), _mm512_cvtepi32_epi8(b));
    keep(i, scale, _mm512_reduce_add_epi32(_mm512_add_epi32(a, b)));
  }
};

inline float half(uint16_t h) { return c10::detail::fp16_ieee_to_fp32_value(h); }

// One group of 16 columns, every row, the reference arithmetic: per column, over the blocks in
// order, acc = fma(d_w d_x, dot, acc), then for Q4 acc = fma(m_w, d_x sum(q_x), acc); the dot exact in int32.
template <Kind kind>
void group_portable(const Activations& a, const uint8_t* w, const uint16_t* dw, const uint16_t* mw, float* y,
                    int64_t ldy, int64_t cols) {
  const int64_t nb = a.blocks;
  for (int64_t r = 0; r < a.rows; ++r) {
    for (int64_t c = 0; c < cols; ++c) {
      float acc = 0.f;
      for (int64_t b = 0; b < nb; ++b) {
        int32_t dot = kind == kQ8 ? -128 * a.sum[r * nb + b] : 0;
        for (int64_t g = 0; g < 8; ++g) {
          for (int64_t j = 0; j < 4; ++j) {
            int32_t wq;
            if constexpr (kind == kQ4) {
              wq = (w[(b * 4 + g % 4) * 64 + c * 4 + j] >> (g < 4 ? 0 : 4)) & 15;
            } else {
              wq = w[(b * 8 + g) * 64 + c * 4 + j];
            }
            dot += wq * a.q[r * a.k + b * kBlock + g * 4 + j];
          }
        }
        const float scale = half(dw[b * kCols + c]) * a.d[r * nb + b];
        acc = std::fma(scale, static_cast<float>(dot), acc);
        if constexpr (kind == kQ4) acc = std::fma(half(mw[b * kCols + c]), a.s[r * nb + b], acc);
      }
      y[r * ldy + c] = acc;
    }
  }
}

using Int32Alias = int32_t __attribute__((may_alias));

// acc + in each 32-bit lane the four products of its u8 weights w and the s8 activations x[0..3]. With VNNI
// that is one vpdpbusd, written as an instruction so that this loop is compiled for AVX-512BW alone and the
// version without VNNI runs where it is missing; without it vpmaddubsw then vpmaddwd give the same exact
// integers, since the weights here have at most 4 bits (2 x 15 x 127 never saturates an int16 pair sum).
template <bool vnni>
__attribute__((target("avx512f,avx512bw"), always_inline)) inline __m512i dot4(__m512i acc, __m512i w,
                                                                               const int8_t* x) {
  if constexpr (vnni) {
    asm("vpdpbusd %2%{1to16%}, %1, %0" : "+v"(acc) : "v"(w), "m"(*reinterpret_cast<const Int32Alias*>(x)));
    return acc;
  } else {
    const __m512i pairs = _mm512_maddubs_epi16(w, _mm512_set1_epi32(*reinterpret_cast<const Int32Alias*>(x)));
    return _mm512_add_epi32(acc, _mm512_madd_epi16(pairs, _mm512_set1_epi16(1)));
  }
}

// The same arithmetic with AVX-512: a lane per column, dot4 for the dots. Q8 weights (8 bits) go to the
// loop without VNNI as their two nibbles, dot = dot(low) + 16 dot(high): the same integer.
template <Kind kind, int R, bool vnni>
__attribute__((target("avx512f,avx512bw"))) void group_avx512(const Activations& a, int64_t r0, const uint8_t* w,
                                                              const uint16_t* dw, const uint16_t* mw, float* y,
                                                              int64_t ldy, int64_t cols) {
  constexpr bool nibbles = kind == kQ4 || !vnni;  // weights the dots take 4 bits at a time
  const int64_t nb = a.blocks;
  const __m512i low = _mm512_set1_epi8(0x0F);
  __m512 acc[R];
#pragma GCC unroll 4
  for (int r = 0; r < R; ++r) acc[r] = _mm512_setzero_ps();
  for (int64_t b = 0; b < nb; ++b) {
    __m512i wv[8], high[8];  // high: a Q8 weight's upper nibble, for the loop without VNNI
    if constexpr (kind == kQ4) {
#pragma GCC unroll 4
      for (int p = 0; p < 4; ++p) {
        const __m512i v = _mm512_loadu_si512(w + (b * 4 + p) * 64);
        wv[p] = _mm512_and_si512(v, low);
        wv[p + 4] = _mm512_and_si512(_mm512_srli_epi16(v, 4), low);
      }
    } else {
#pragma GCC unroll 8
      for (int g = 0; g < 8; ++g) {
        wv[g] = _mm512_loadu_si512(w + (b * 8 + g) * 64);
        if constexpr (nibbles) {
          high[g] = _mm512_and_si512(_mm512_srli_epi16(wv[g], 4), low);
          wv[g] = _mm512_and_si512(wv[g], low);
        }
      }
    }
    const __m512 d = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(dw + b * kCols)));
    __m512 m = _mm512_setzero_ps();
    if constexpr (kind == kQ4) m = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(mw + b * kCols)));
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r) {
      const int64_t row = r0 + r, at = row * nb + b;
      const int8_t* xq = a.q.data() + row * a.k + b * kBlock;
      // two chains of dots (integer sums: the order does not change them)
      __m512i even = kind == kQ8 ? _mm512_set1_epi32(-128 * a.sum[at]) : _mm512_setzero_si512();
      __m512i odd = _mm512_setzero_si512();
#pragma GCC unroll 4
      for (int g = 0; g < 8; g += 2) {
        even = dot4<vnni>(even, wv[g], xq + g * 4);
        odd = dot4<vnni>(odd, wv[g + 1], xq + g * 4 + 4);
      }
      __m512i dot = _mm512_add_epi32(even, odd);
      if constexpr (kind == kQ8 && nibbles) {
        __m512i upper = _mm512_setzero_si512();
#pragma GCC unroll 8
        for (int g = 0; g < 8; ++g) upper = dot4<false>(upper, high[g], xq + g * 4);
        dot = _mm512_add_epi32(dot, _mm512_slli_epi32(upper, 4));
      }
      const __m512 scale = _mm512_mul_ps(d, _mm512_set1_ps(a.d[at]));
      acc[r] = _mm512_fmadd_ps(scale, _mm512_cvtepi32_ps(dot), acc[r]);
      if constexpr (kind == kQ4) acc[r] = _mm512_fmadd_ps(m, _mm512_set1_ps(a.s[at]), acc[r]);
    }
  }
  const __mmask16 keep = static_cast<__mmask16>((1u << cols) - 1);
#pragma GCC unroll 4
  for (int r = 0; r < R; ++r) _mm512_mask_storeu_ps(y + (r0 + r) * ldy, keep, acc[r]);
}

template <Kind kind, bool vnni>
void group_fast(const Activations& a, const uint8_t* w, const uint16_t* dw, const uint16_t* mw, float* y, int64_t ldy,
                int64_t cols) {
  static_assert(kRowTile == 4);
  int64_t r = 0;
  for (; r + kRowTile <= a.rows; r += kRowTile) group_avx512<kind, kRowTile, vnni>(a, r, w, dw, mw, y, ldy, cols);
  switch (a.rows - r) {
    case 3: group_avx512<kind, 3, vnni>(a, r, w, dw, mw, y, ldy, cols); break;
    case 2: group_avx512<kind, 2, vnni>(a, r, w, dw, mw, y, ldy, cols); break;
    case 1: group_avx512<kind, 1, vnni>(a, r, w, dw, mw, y, ldy, cols); break;
  }
}

using Group = void (*)(const Activations&, const uint8_t*, const uint16_t*, const uint16_t*, float*, int64_t, int64_t);

template <Kind kind>
Group group_loop(Loop loop) {
  if (loop == kBest && has_vnni()) return group_fast<kind, true>;
  if (loop != kPortable && has_avx512bw()) return group_fast<kind, false>;
  return group_portable<kind>;
}

// x [M, K] fp32 times a weight in engine/int4.py Packed's layout, n columns: y [M, n] fp32.
inline at::Tensor matmul(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& d, const at::Tensor& m,
                         int64_t kind, int64_t n, int64_t loop) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.size(1) % kBlock == 0, "x must be [M, K] float32");
  TORCH_CHECK(loop >= kBest && loop <= kPortable, "loop must be 0 (best), 1 (no VNNI) or 2 (portable)");
  const auto xc = x.contiguous();
  const Activations a(xc, loop != kPortable && has_avx512bw());
  const Group group = kind == kQ4 ? group_loop<kQ4>(static_cast<Loop>(loop)) : group_loop<kQ8>(static_cast<Loop>(loop));
  const int64_t groups = packed.size(0), per_group = packed.stride(0);
  TORCH_CHECK(packed.size(1) == a.blocks, "the weight has ", packed.size(1) * kBlock, " inputs, x has ", a.k);
  auto y = at::empty({a.rows, n}, x.options());
  const uint8_t* w = packed.data_ptr<uint8_t>();
  const auto* dw = reinterpret_cast<const uint16_t*>(d.data_ptr<at::Half>());
  const auto* mw = kind == kQ4 ? reinterpret_cast<const uint16_t*>(m.data_ptr<at::Half>()) : nullptr;
  float* out = y.data_ptr<float>();
  const int64_t scales_per_group = a.blocks * kCols;
  at::parallel_for(0, groups, 1, [&](int64_t g0, int64_t g1) {
    for (int64_t g = g0; g < g1; ++g) {
      const int64_t cols = std::min(kCols, n - g * kCols);
      const uint8_t* wg = w + g * per_group;
      const uint16_t* dg = dw + g * scales_per_group;
      const uint16_t* mg = mw ? mw + g * scales_per_group : nullptr;
      float* yg = out + g * kCols;
      group(a, wg, dg, mg, yg, n, cols);
    }
  });
  return y;
}


// ---- attention over the visible keys, in one fixed order ---------------------------------------------
//
// A query's result is computed from its visible keys alone (mask 0; the others are skipped, not
// added as zeros), taken in slot order, the n-th visible key in the same lane and the same place of
// every sum whatever its slot: a tree node whose keys are the committed prefix and its path gets the
// bits a standard step over the same tokens gets, though its keys sit in other slots. Scores, the
// softmax and the weighted sum of values in fp32, with an exp of our own (the same polynomial in both
// loops), so the portable loop gives the AVX-512 loop's bits.

constexpr int64_t kLanes = 16;
constexpr int64_t kMaxHeadDim = 256;

// exp(x) for x <= 0: x = n ln2 + r, |r| <= ln2 / 2, exp(r) by a degree-6 polynomial (Horner, fma),
// scaled by 2^n; 0 below -87 (where exp(x) < 2^-125).
constexpr float kLog2e = 1.44269504088896341f, kLn2Hi = 0.693359375f, kLn2Lo = -2.12194440e-4f;
constexpr float kExpPoly[7] = {1.f, 1.f, 0.5f, 0.166666672f, 4.16666716e-2f, 8.33336077e-3f, 1.38833153e-3f};
constexpr float kExpFloor = -87.f;

inline float exp_portable(float x) {
  if (x < kExpFloor) return 0.f;
  const float n = std::nearbyint(x * kLog2e);
  const float r = std::fma(n, -kLn2Lo, std::fma(n, -kLn2Hi, x));
  float p = kExpPoly[6];
  for (int i = 5; i >= 0; --i) p = std::fma(p, r, kExpPoly[i]);
  return std::ldexp(p, static_cast<int>(n));
}

__attribute__((target("avx512f"))) inline __m512 exp_avx512(__m512 x) {
  const __mmask16 live = _mm512_cmp_ps_mask(x, _mm512_set1_ps(kExpFloor), _CMP_GE_OQ);
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(kLog2e)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 r = _mm512_fmadd_ps(n, _mm512_set1_ps(-kLn2Lo), _mm512_fmadd_ps(n, _mm512_set1_ps(-kLn2Hi), x));
  __m512 p = _mm512_set1_ps(kExpPoly[6]);
  for (int i = 5; i >= 0; --i) p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(kExpPoly[i]));
  return _mm512_maskz_mov_ps(live, _mm512_scalef_ps(p, n));
}

// The horizontal sum both loops use: lanes i and i + 8, then + 4, + 2, + 1.
inline float tree_sum(const float* lanes) {
  float s8[8], s4[4];
  for (int i = 0; i < 8; ++i) s8[i] = lanes[i] + lanes[i + 8];
  for (int i = 0; i < 4; ++i) s4[i] = s8[i] + s8[i + 4];
  const float s2a = s4[0] + s4[2], s2b = s4[1] + s4[3];
  return s2a + s2b;
}

// tree_sum of 16 vectors at once, the same additions in the same pairs: lanes i and i + 8 of two vectors
// side by side (shuffle_f32x4), then i + 4, + 2, + 1; key n's sum ends in lane (n % 4) * 4 + n / 4,
// and the last permutation puts it in lane n.
__attribute__((target("avx512f"))) inline __m512 tree_sums_avx512(const __m512* a) {
  constexpr int kLow8 = _MM_SHUFFLE(1, 0, 1, 0), kHigh8 = _MM_SHUFFLE(3, 2, 3, 2);
  constexpr int kEven = _MM_SHUFFLE(2, 0, 2, 0), kOdd = _MM_SHUFFLE(3, 1, 3, 1);
  __m512 v[8], w[4], u[2];
  for (int p = 0; p < 8; ++p) {
    v[p] = _mm512_add_ps(_mm512_shuffle_f32x4(a[2 * p], a[2 * p + 1], kLow8),
                         _mm512_shuffle_f32x4(a[2 * p], a[2 * p + 1], kHigh8));
  }
  for (int p = 0; p < 4; ++p) {
    w[p] = _mm512_add_ps(_mm512_shuffle_f32x4(v[2 * p], v[2 * p + 1], kEven),
                         _mm512_shuffle_f32x4(v[2 * p], v[2 * p + 1], kOdd));
  }
  for (int p = 0; p < 2; ++p) {
    u[p] = _mm512_add_ps(_mm512_shuffle_ps(w[2 * p], w[2 * p + 1], kLow8),
                         _mm512_shuffle_ps(w[2 * p], w[2 * p + 1], kHigh8));
  }
  const __m512 r = _mm512_add_ps(_mm512_shuffle_ps(u[0], u[1], kEven), _mm512_shuffle_ps(u[0], u[1], kOdd));
  return _mm512_permutexvar_ps(_mm512_set_epi32(15, 11, 7, 3, 14, 10, 6, 2, 13, 9, 5, 1, 12, 8, 4, 0), r);
}

__attribute__((target("avx512f"))) inline float tree_sum_avx512(__m512 v) {
  alignas(64) float lanes[kLanes];
  _mm512_store_ps(lanes, v);
  return tree_sum(lanes);
}

// One query: out[D] = softmax(scale q.k_j over the visible j) . v_j; keys, values: rows of D at their strides.
// dot(q, k): lane l sums q[c*16 + l] k[c*16 + l] over the chunks c by fma, then tree_sum.
void attend_portable(const float* q, const float* keys, const float* values, int64_t key_stride, int64_t value_stride,
                     const int32_t* visible, int64_t count, int64_t d, float scale, float* scores, float* out) {
  const int64_t chunks = d / kLanes;
  for (int64_t n = 0; n < count; ++n) {
    const float* k = keys + visible[n] * key_stride;
    float lanes[kLanes];
    for (int64_t l = 0; l < kLanes; ++l) {
      float acc = q[l] * k[l];
      for (int64_t c = 1; c < chunks; ++c) acc = std::fma(q[c * kLanes + l], k[c * kLanes + l], acc);
      lanes[l] = acc;
    }
    scores[n] = tree_sum(lanes) * scale;
  }
  float top = -INFINITY;
  for (int64_t n = 0; n < count; ++n) top = std::max(top, scores[n]);
  float sums[kLanes] = {};
  for (int64_t n = 0; n < count; ++n) {
    scores[n] = exp_portable(scores[n] - top);
    sums[n % kLanes] += scores[n];
  }
  const float total = tree_sum(sums);
  for (int64_t i = 0; i < d; ++i) out[i] = 0.f;
  for (int64_t n = 0; n < count; ++n) {
    const float* v = values + visible[n] * value_stride;
    for (int64_t i = 0; i < d; ++i) out[i] = std::fma(scores[n], v[i], out[i]);
  }
  for (int64_t i = 0; i < d; ++i) out[i] = count ? out[i] / total : 0.f;
}

// The AVX-512 loop, for a head dim of kChunks x 16 known when compiled (0: d / 16 at run time). With it
// known the loops unroll and the query and the accumulators stay in registers; without, each fma's
// accumulator goes through memory. The same operations in the same order either way: the same bits.
template <int kChunks>
__attribute__((target("avx512f"))) void attend_avx512(const float* q, const float* keys, const float* values,
                                                      int64_t key_stride, int64_t value_stride, const int32_t* visible,
                                                      int64_t count, int64_t d, float scale, float* scores,
                                                      float* out) {
  const int64_t chunks = kChunks > 0 ? kChunks : d / kLanes;
  __m512 qv[kChunks > 0 ? kChunks : kMaxHeadDim / kLanes];
#pragma GCC unroll 16
  for (int64_t c = 0; c < chunks; ++c) qv[c] = _mm512_loadu_ps(q + c * kLanes);
  for (int64_t n0 = 0; n0 < count; n0 += kLanes) {  // 16 keys at a time, each key's sum in its own vector
    const int64_t here = std::min(kLanes, count - n0);
    __m512 acc[kLanes];
#pragma GCC unroll 16
    for (int64_t n = 0; n < kLanes; ++n) {
      acc[n] = _mm512_setzero_ps();
      if (n >= here) continue;
      const float* k = keys + visible[n0 + n] * key_stride;
      acc[n] = _mm512_mul_ps(qv[0], _mm512_loadu_ps(k));
#pragma GCC unroll 16
      for (int64_t c = 1; c < chunks; ++c) acc[n] = _mm512_fmadd_ps(qv[c], _mm512_loadu_ps(k + c * kLanes), acc[n]);
    }
    const __mmask16 live = here == kLanes ? 0xFFFF : static_cast<__mmask16>((1u << here) - 1);
    _mm512_mask_storeu_ps(scores + n0, live, _mm512_mul_ps(tree_sums_avx512(acc), _mm512_set1_ps(scale)));
  }
  float top = -INFINITY;
  for (int64_t n = 0; n < count; ++n) top = std::max(top, scores[n]);
  __m512 sums = _mm512_setzero_ps();
  for (int64_t n = 0; n < count; n += kLanes) {
    const __mmask16 live = count - n >= kLanes ? 0xFFFF : static_cast<__mmask16>((1u << (count - n)) - 1);
    const __m512 p = exp_avx512(_mm512_sub_ps(_mm512_maskz_loadu_ps(live, scores + n), _mm512_set1_ps(top)));
    _mm512_mask_storeu_ps(scores + n, live, p);
    sums = _mm512_add_ps(sums, _mm512_maskz_mov_ps(live, p));
  }
  const float total = tree_sum_avx512(sums);
  __m512 acc[kChunks > 0 ? kChunks : kMaxHeadDim / kLanes];
#pragma GCC unroll 16
  for (int64_t c = 0; c < chunks; ++c) acc[c] = _mm512_setzero_ps();
  for (int64_t n = 0; n < count; ++n) {
    const float* v = values + visible[n] * value_stride;
    const __m512 p = _mm512_set1_ps(scores[n]);
#pragma GCC unroll 16
    for (int64_t c = 0; c < chunks; ++c) acc[c] = _mm512_fmadd_ps(p, _mm512_loadu_ps(v + c * kLanes), acc[c]);
  }
  const __m512 z = _mm512_set1_ps(total);
#pragma GCC unroll 16
  for (int64_t c = 0; c < chunks; ++c) {
    _mm512_storeu_ps(out + c * kLanes, count ? _mm512_div_ps(acc[c], z) : _mm512_setzero_ps());
  }
}

using Attend = void (*)(const float*, const float*, const float*, int64_t, int64_t, const int32_t*, int64_t, int64_t,
                        float, float*, float*);

// The loop for a head dim: the portable one, or the AVX-512 one compiled for it (64 and 128: Llama's usual).
inline Attend attend_loop(int64_t d, bool fast) {
  if (!fast) return attend_portable;
  return d == 64 ? attend_avx512<4> : d == 128 ? attend_avx512<8> : attend_avx512<0>;
}

// Which keys each query sees: for row r = (b, t) of a mask [B, 1, T, S], the slots j with mask 0, in
// order (computed once per forward; every layer shares the mask).
struct Visible {
  int64_t rows = 0, keys = 0;
  std::vector<int32_t> index;
  std::vector<int64_t> start;  // row r's slots: index[start[r], start[r + 1])

  explicit Visible(const Tensor& mask_in) {
    const auto mask = mask_in.to(at::kFloat).contiguous();
    rows = mask.size(0) * mask.size(2);
    keys = mask.size(3);
    const float* m = mask.data_ptr<float>();
    start.push_back(0);
    for (int64_t r = 0; r < rows; ++r) {
      for (int64_t j = 0; j < keys; ++j) {
        if (m[r * keys + j] == 0.f) index.push_back(static_cast<int32_t>(j));
      }
      start.push_back(static_cast<int64_t>(index.size()));
    }
  }
};

// q [B, H, T, D]; keys, values [B, Hkv, S', D] (S' >= S, rows contiguous in D). Returns [B, T, H, D].
inline Tensor visible_attention(const Tensor& q_in, const Tensor& keys, const Tensor& values, const Visible& seen,
                                double scale, bool portable) {
  const auto q = q_in.contiguous();
  const int64_t b = q.size(0), heads = q.size(1), t = q.size(2), d = q.size(3);
  const int64_t kv_heads = keys.size(1), group = heads / kv_heads;
  TORCH_CHECK(d % kLanes == 0 && d <= kMaxHeadDim, "head dim ", d, " is not a multiple of 16 up to 256");
  TORCH_CHECK(keys.stride(3) == 1 && values.stride(3) == 1 && keys.size(2) >= seen.keys && seen.rows == b * t,
              "keys and values: [B, Hkv, S, D] rows contiguous in D");
  auto out = at::empty({b, t, heads, d}, q.options());
  const float* qp = q.data_ptr<float>();
  const float* kp = keys.data_ptr<float>();
  const float* vp = values.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const Attend attend = attend_loop(d, !portable && has_avx512());
  at::parallel_for(0, b * t * heads, 1, [&](int64_t i0, int64_t i1) {
    std::vector<float> scores(seen.keys);
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t r = i / heads, h = i % heads, bi = r / t, ti = r % t, kvh = h / group;
      const float* qh = qp + ((bi * heads + h) * t + ti) * d;
      const float* kh = kp + bi * keys.stride(0) + kvh * keys.stride(1);
      const float* vh = vp + bi * values.stride(0) + kvh * values.stride(1);
      const int32_t* visible = seen.index.data() + seen.start[r];
      const int64_t count = seen.start[r + 1] - seen.start[r];
      attend(qh, kh, vh, keys.stride(2), values.stride(2), visible, count, d, static_cast<float>(scale), scores.data(),
             op + ((bi * t + ti) * heads + h) * d);
    }
  });
  return out;
}

// engine/int4.py attention(): q [B, H, T, D] -> [B, T, H, D].
inline Tensor attention(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& mask, double scale,
                        bool portable) {
  return visible_attention(q, k, v, Visible(mask), scale, portable);
}

// Int4Linear: y [.., N] = x [.., K] W^T.
struct Linear {
  Tensor packed, d, m;
  int64_t kind, out;

  Tensor operator()(const Tensor& x) const {
    auto y = matmul(x.reshape({-1, x.size(-1)}), packed, d, m, kind, out, kBest);
    auto shape = x.sizes().vec();
    shape.back() = out;
    return y.view(shape);
  }
};

struct Layer {
  Tensor norm0, norm1;
  Linear qkv, o, gate_up, down;
};

// ---- the small per-row operations: one loop each instead of several ATen calls ------------------------

// RMSNorm of each row of x [.., W]: x / sqrt(mean(x^2) + eps) * w, the squares summed in 16 lanes
// (element i in lane i mod 16), then tree_sum.
inline Tensor rms_norm(const Tensor& x_in, const Tensor& weight_in, double eps) {
  const auto x = x_in.contiguous();
  const auto weight = weight_in.contiguous();
  const int64_t width = x.size(-1), rows = x.numel() / width;
  TORCH_CHECK(x.scalar_type() == at::kFloat && width % kLanes == 0, "rms_norm: float32 rows of a multiple of 16");
  auto y = at::empty_like(x);
  const float *xp = x.data_ptr<float>(), *wp = weight.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  const float e = static_cast<float>(eps), n = static_cast<float>(width);
  at::parallel_for(0, rows, 16, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const float* v = xp + r * width;
      float lanes[kLanes] = {};
      for (int64_t i = 0; i < width; i += kLanes) {
        for (int64_t l = 0; l < kLanes; ++l) lanes[l] += v[i + l] * v[i + l];
      }
      const float inverse = 1.f / std::sqrt(tree_sum(lanes) / n + e);
      for (int64_t i = 0; i < width; ++i) yp[r * width + i] = v[i] * inverse * wp[i];
    }
  });
  return y;
}

// HF Llama's RoPE (halves rotated, not interleaved pairs) on x [B, S, T, D] (any strides): x cos +
// rotate_half(x) sin, with the sign of rotate_half folded into sin [B, 1, T, D]. Returns it contiguous.
inline Tensor rotate(const Tensor& x, const Tensor& cos_in, const Tensor& sin_in) {
  const auto cos = cos_in.contiguous(), sin = sin_in.contiguous();
  const int64_t b = x.size(0), heads = x.size(1), t = x.size(2), d = x.size(3), half = d / 2;
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.stride(3) == 1, "rotate: float32, rows contiguous in D");
  auto y = at::empty({b, heads, t, d}, x.options());
  const float *xp = x.data_ptr<float>(), *cp = cos.data_ptr<float>(), *sp = sin.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  for (int64_t bi = 0; bi < b; ++bi) {
    for (int64_t h = 0; h < heads; ++h) {
      for (int64_t ti = 0; ti < t; ++ti) {
        const float* v = xp + bi * x.stride(0) + h * x.stride(1) + ti * x.stride(2);
        const float *c = cp + (bi * t + ti) * d, *s = sp + (bi * t + ti) * d;
        float* out = yp + ((bi * heads + h) * t + ti) * d;
        // the two halves apart (partner i + half, then i - half): loops without a modulo vectorise
        for (int64_t i = 0; i < half; ++i) out[i] = v[i] * c[i] + v[i + half] * s[i];
        for (int64_t i = half; i < d; ++i) out[i] = v[i] * c[i] + v[i - half] * s[i];
      }
    }
  }
  return y;
}

// cache [slots, Hkv, C, D] (one layer, the batch's slots first): cache[b, :, positions[b, t]] = x[b, :, t].
inline void write_cache(const Tensor& cache, const Tensor& x, const Tensor& positions_in) {
  const auto positions = positions_in.to(at::kLong).contiguous();
  const int64_t b = x.size(0), heads = x.size(1), t = x.size(2), d = x.size(3);
  TORCH_CHECK(cache.stride(3) == 1 && x.stride(3) == 1, "write_cache: rows contiguous in D");
  const int64_t* pp = positions.data_ptr<int64_t>();
  const float* xp = x.data_ptr<float>();
  float* cp = cache.data_ptr<float>();
  for (int64_t bi = 0; bi < b; ++bi) {
    for (int64_t ti = 0; ti < t; ++ti) {
      const int64_t p = pp[bi * t + ti];
      TORCH_CHECK(p >= 0 && p < cache.size(2), "a cache position out of range");
      for (int64_t h = 0; h < heads; ++h) {
        std::memcpy(cp + bi * cache.stride(0) + h * cache.stride(1) + p * cache.stride(2),
                    xp + bi * x.stride(0) + h * x.stride(1) + ti * x.stride(2), d * sizeof(float));
      }
    }
  }
}

class Layers {
 public:
  Layers(int64_t heads, int64_t kv_heads, int64_t head_dim, int64_t intermediate, double eps, double scale)
      : heads_(heads), kv_heads_(kv_heads), head_dim_(head_dim), intermediate_(intermediate), eps_(eps),
        scale_(scale) {}

  using Weight = std::tuple<Tensor, Tensor, Tensor, int64_t, int64_t>;  // Int4Linear.native

  void add(Tensor norm0, Tensor norm1, const Weight& qkv, const Weight& o, const Weight& gate_up, const Weight& down) {
    auto linear = [](const Weight& w) {
      return Linear{std::get<0>(w), std::get<1>(w), std::get<2>(w), std::get<3>(w), std::get<4>(w)};
    };
    layers_.push_back({std::move(norm0), std::move(norm1), linear(qkv), linear(o), linear(gate_up), linear(down)});
  }

  // x [B, T, W]; cos/sin [B, 1, T, D]; mask [B, 1, T, S] additive (0: visible); the cache [L, slots, Hkv, C, D], the
  // batch in slots [row0, row1), this step's keys written at positions [B, T], S = kv_len keys read.
  Tensor forward(Tensor x, const Tensor& cos, const Tensor& sin, const Tensor& mask, const Tensor& cache_k,
                 const Tensor& cache_v, int64_t row0, int64_t row1, const Tensor& batch_index,
                 const Tensor& positions, int64_t kv_len) const {
    const int64_t b = x.size(0), t = x.size(1), d = head_dim_;
    const Visible seen(mask);
    for (size_t i = 0; i < layers_.size(); ++i) {
      const Layer& layer = layers_[i];
      auto qkv = layer.qkv(rms_norm(x, layer.norm0, eps_));
      qkv = qkv.view({b, t, heads_ + 2 * kv_heads_, d}).transpose(1, 2);
      auto qk = rotate(qkv.slice(1, 0, heads_ + kv_heads_), cos, sin);
      auto q = qk.slice(1, 0, heads_), k = qk.slice(1, heads_, heads_ + kv_heads_);
      auto v = qkv.slice(1, heads_ + kv_heads_);
      auto keys = cache_k.select(0, static_cast<int64_t>(i)).slice(0, row0, row1);  // [B, Hkv, C, D]
      auto values = cache_v.select(0, static_cast<int64_t>(i)).slice(0, row0, row1);
      write_cache(keys, k, positions);
      write_cache(values, v, positions);
      auto attn = visible_attention(q, keys, values, seen, scale_, false);  // [B, T, H, D]
      x = x + layer.o(attn.reshape({b, t, heads_ * d}));
      auto gate_up = layer.gate_up(rms_norm(x, layer.norm1, eps_)).split(intermediate_, -1);
      x = x + layer.down(at::silu(gate_up[0]) * gate_up[1]);
    }
    return x;
  }

 private:
  int64_t heads_, kv_heads_, head_dim_, intermediate_;
  double eps_, scale_;
  std::vector<Layer> layers_;
};

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("matmul", &matmul, pybind11::call_guard<pybind11::gil_scoped_release>());
  m.def("has_vnni", &has_vnni);
  m.def("has_avx512bw", &has_avx512bw);
  m.def("attention", &attention, pybind11::call_guard<pybind11::gil_scoped_release>());
  m.def("rms_norm", &rms_norm, pybind11::call_guard<pybind11::gil_scoped_release>());
  m.def("rotate", &rotate, pybind11::call_guard<pybind11::gil_scoped_release>());
  pybind11::class_<Layers>(m, "Layers")
      .def(pybind11::init<int64_t, int64_t, int64_t, int64_t, double, double>())
      .def("add", &Layers::add)
      .def("forward", &Layers::forward, pybind11::call_guard<pybind11::gil_scoped_release>());
}
