// The decoder layers of engine/int4.py's Int4Llama, the same ATen calls in the same order, in C++.
//
// Why: at batch 1 the int4 matrix multiplications of a step take ~4.6 ms and the eager Python
// around them ~13 ms (some 6,000 operator calls, nested ones counted, each paying Python and
// dispatch). Here each call pays dispatch only. The kernels, their inputs and their order are
// Int4Layer.forward's, so the results are the Python forward's, bit for bit (tests/engine/test_int4.py
// compares the two).

#include <torch/extension.h>

#include <vector>

namespace {

using at::Tensor;
using at::indexing::Slice;

constexpr int64_t kGroup = 32;  // engine/int4.py GROUP
constexpr int64_t kTreeAttentionRows = 64;  // engine/int4.py TREE_ATTENTION_ROWS

// Int4Linear: fp32 in and out, bf16 into the kernel; several parts (Q8_0's two halves) summed.
struct Linear {
  std::vector<Tensor> packed, scales_zeros;

  Tensor operator()(const Tensor& x) const {
    auto flat = x.reshape({-1, x.size(-1)}).to(at::kBFloat16);
    auto y = at::_weight_int4pack_mm_for_cpu(flat, packed[0], kGroup, scales_zeros[0]).to(at::kFloat);
    for (size_t i = 1; i < packed.size(); ++i) {
      y += at::_weight_int4pack_mm_for_cpu(flat, packed[i], kGroup, scales_zeros[i]).to(at::kFloat);
    }
    auto shape = x.sizes().vec();
    shape.back() = y.size(1);
    return y.view(shape);
  }
};

Linear linear_of(const std::vector<std::pair<Tensor, Tensor>>& parts) {
  Linear out;
  for (const auto& [packed, sz] : parts) {
    out.packed.push_back(packed);
    out.scales_zeros.push_back(sz);
  }
  return out;
}

struct Layer {
  Tensor norm0, norm1;
  Linear qkv, o, gate_up, down;
};

// HF Llama's RoPE with the sign of rotate_half folded into sin (engine/int4.py rotate).
Tensor rotate(const Tensor& x, const Tensor& cos, const Tensor& sin) {
  return at::addcmul(x * cos, at::roll(x, {x.size(-1) / 2}, {-1}), sin);
}

class Layers {
 public:
  Layers(int64_t heads, int64_t kv_heads, int64_t head_dim, int64_t intermediate, double eps, double scale)
      : heads_(heads), kv_heads_(kv_heads), head_dim_(head_dim), intermediate_(intermediate), eps_(eps),
        scale_(scale) {}

  using Parts = std::vector<std::pair<Tensor, Tensor>>;

  void add(Tensor norm0, Tensor norm1, const Parts& qkv, const Parts& o, const Parts& gate_up, const Parts& down) {
    layers_.push_back({std::move(norm0), std::move(norm1), linear_of(qkv), linear_of(o), linear_of(gate_up),
                       linear_of(down)});
  }

  // x [B, T, W]; cos/sin [B, 1, T, D]; mask [B, 1, T, S] float64; the cache [L, slots, Hkv, C, D], the
  // batch in slots [row0, row1), this step's keys written at positions [B, T], S = kv_len keys read.
  Tensor forward(Tensor x, const Tensor& cos, const Tensor& sin, const Tensor& mask, const Tensor& cache_k,
                 const Tensor& cache_v, int64_t row0, int64_t row1, const Tensor& batch_index,
                 const Tensor& positions, int64_t kv_len) const {
    const int64_t b = x.size(0), t = x.size(1), width = x.size(2), d = head_dim_;
    for (size_t i = 0; i < layers_.size(); ++i) {
      const Layer& layer = layers_[i];
      auto qkv = layer.qkv(at::rms_norm(x, {width}, layer.norm0, eps_));
      qkv = qkv.view({b, t, heads_ + 2 * kv_heads_, d}).transpose(1, 2);
      auto qk = rotate(qkv.slice(1, 0, heads_ + kv_heads_), cos, sin);
      auto q = qk.slice(1, 0, heads_), k = qk.slice(1, heads_, heads_ + kv_heads_);
      auto v = qkv.slice(1, heads_ + kv_heads_);
      auto keys = cache_k.select(0, static_cast<int64_t>(i)).slice(0, row0, row1);  // [B, Hkv, C, D]
      auto values = cache_v.select(0, static_cast<int64_t>(i)).slice(0, row0, row1);
      keys.index_put_({batch_index, Slice(), positions}, k.transpose(1, 2));
      values.index_put_({batch_index, Slice(), positions}, v.transpose(1, 2));
      auto attn = attention(q, keys.slice(2, 0, kv_len), values.slice(2, 0, kv_len), mask);
      x = x + layer.o(attn.transpose(1, 2).reshape({b, t, heads_ * d}));
      auto gate_up = layer.gate_up(at::rms_norm(x, {width}, layer.norm1, eps_)).split(intermediate_, -1);
      x = x + layer.down(at::silu(gate_up[0]) * gate_up[1]);
    }
    return x;
  }

 private:
  // engine/int4.py attention(), call for call: float64; SDPA for one token per sequence or a prompt,
  // matmuls and a softmax for a tree of up to kTreeAttentionRows tokens.
  Tensor attention(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& mask) const {
    const int64_t b = q.size(0), t = q.size(2), d = q.size(3), keys = k.size(2), group = heads_ / kv_heads_;
    if (t == 1 || t > kTreeAttentionRows) {
      return at::scaled_dot_product_attention(q.to(at::kDouble), k.to(at::kDouble), v.to(at::kDouble), mask, 0.0,
                                              false, scale_, true)
          .to(at::kFloat);
    }
    auto queries = q.to(at::kDouble).reshape({b, kv_heads_, group * t, d});  // each kv head's query heads
    auto scores = at::matmul(queries, k.to(at::kDouble).transpose(-1, -2)).mul_(scale_);
    scores = scores.view({b, kv_heads_, group, t, keys}).add_(mask.unsqueeze(1));
    auto probs = at::softmax(scores, -1).view({b, kv_heads_, group * t, keys});
    return at::matmul(probs, v.to(at::kDouble)).view({b, heads_, t, d}).to(at::kFloat);
  }

  int64_t heads_, kv_heads_, head_dim_, intermediate_;
  double eps_, scale_;
  std::vector<Layer> layers_;
};

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  pybind11::class_<Layers>(m, "Layers")
      .def(pybind11::init<int64_t, int64_t, int64_t, int64_t, double, double>())
      .def("add", &Layers::add)
      .def("forward", &Layers::forward, pybind11::call_guard<pybind11::gil_scoped_release>());
}
