"""A GGUF file's own 4-bit weights, served on the CPU through PyTorch's int4 kernel
(`aten._weight_int4pack_mm_for_cpu`), with a lean Llama forward around them.

The kernel computes, per group of 32 inputs, w = (q - 8) * s + z for 4-bit q, so GGUF blocks map
onto it exactly, block for group:
* Q4_1 (32 nibbles q, an fp16 scale d and minimum m; w = d q + m): s = d, z = m + 8 d;
* Q4_0 (nibbles q, an fp16 scale d; w = d (q - 8)): s = d, z = 0;
* Q8_0 (int8 q, an fp16 scale d; w = d q): two 4-bit halves, q = 16 hi + lo with hi in [-8, 7] and
  lo in [0, 15]: the hi half with s = 16 d, z = 0, the lo half with s = d, z = 8 d, summed.
No weight is re-quantised: the nibbles are the file's. The kernel takes its scales, zeros and input
in bf16 (its vectorised path; fp16 input ran 45x slower here), so the file's fp16 scales are rounded
to bf16 once and activations enter in bf16 (llama.cpp, for its part, quantises activations to 8
bits); the kernel accumulates in fp32. A row's result does not depend on the other rows, so
verifying a tree gives each node what a step of it alone would (speculative == standard by
construction, bitwise).

The forward (Int4Llama) takes the HF model's own embedding, norms and rotary embedding, and replaces
its projections with the int4 ones, fused per layer: q, k and v in one matrix, gate and up in one.
Its decoder layers run in C++ (int4_layers.cpp: the same ATen calls as Int4Layer.forward, without
Python's cost per call), compiled on first use into torch's extension cache; where no C++ compiler
is found they run in Python, and the log says so.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from transformers.modeling_utils import slice_logits_to_keep

from engine.kv_cache import CacheWriter

log = logging.getLogger("medusa.engine")

GROUP = 32  # weights per GGUF block: the kernel's group size
# The kernel's input, scales and zeros: bf16, its vectorised path (here fp16 input ran 45x slower, fp32 40x).
KERNEL_DTYPE = torch.bfloat16
SUPPORTED = ("Q4_0", "Q4_1", "Q8_0")


@dataclass(frozen=True)
class Blocks:
    """A [N, K] weight as 4-bit values q [N, K] (0..15) with scales and zeros [N, K/32]: w = (q - 8) s + z."""

    q: np.ndarray
    scales: np.ndarray
    zeros: np.ndarray

    def rows(self, index: np.ndarray) -> Blocks:
        return Blocks(self.q[index], self.scales[index], self.zeros[index])

    @staticmethod
    def stack(parts: list[Blocks]) -> Blocks:
        """The rows of several weights, one after the other (fused q/k/v, gate/up)."""
        return Blocks(*(np.concatenate([getattr(p, f) for p in parts]) for f in ("q", "scales", "zeros")))


@dataclass(frozen=True)
class Int4Matrix:
    """A weight as the kernel takes it: packed nibbles (its own tiled layout) and scales and zeros [K/32, N, 2]."""

    packed: torch.Tensor
    scales_zeros: torch.Tensor

    @classmethod
    def of(cls, b: Blocks) -> Int4Matrix:
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(torch.from_numpy(b.q.astype(np.int32)), 1)
        sz = torch.from_numpy(np.stack([b.scales, b.zeros], axis=-1).astype(np.float32))  # [N, K/32, 2]
        return cls(packed, sz.transpose(0, 1).contiguous().to(KERNEL_DTYPE))

    @property
    def out_features(self) -> int:
        return self.scales_zeros.shape[1]

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        """x [M, K] (bf16) -> [M, N] (bf16)."""
        return torch.ops.aten._weight_int4pack_mm_for_cpu(x, self.packed, GROUP, self.scales_zeros)


def quantize(weight: torch.Tensor) -> Blocks:
    """A float [N, K] weight quantised to 4 bits in groups of 32, asymmetric (QUANTIZE=int4): per group
    the step s = (max - min) / 15 and q = round((w - min) / s), so w ~ s q + min = (q - 8) s + z with
    z = min + 8 s. s and z are rounded to bf16 first (the kernel keeps them so), and q is chosen for them."""
    n, k = weight.shape
    w = weight.detach().float().reshape(n, k // GROUP, GROUP)
    lo, hi = w.amin(-1), w.amax(-1)
    s = ((hi - lo) / 15).clamp(min=2**-14).to(KERNEL_DTYPE).float()
    z = (lo + 8 * s).to(KERNEL_DTYPE).float()
    q = ((w - (z - 8 * s)[..., None]) / s[..., None]).round().clamp(0, 15)
    return Blocks(q.reshape(n, k).to(torch.int32).numpy(), s.numpy(), z.numpy())


def nibbles(qs: np.ndarray) -> np.ndarray:
    """[N, blocks, 16] bytes -> [N, blocks * 32] nibbles: byte j holds element j (low) and j + 16 (high)."""
    return np.concatenate([qs & 0x0F, qs >> 4], axis=-1).reshape(qs.shape[0], -1)


def file_blocks(kind: str, data: np.ndarray, rows: int) -> list[Blocks]:
    """A GGUF tensor's raw blocks (uint8 [N, bytes]) as 4-bit weights whose sum is the tensor."""
    blocks = data.reshape(rows, -1, {"Q4_0": 18, "Q4_1": 20, "Q8_0": 34}[kind])
    d = blocks[..., :2].copy().view(np.float16)[..., 0].astype(np.float32)  # [N, blocks]
    if kind == "Q4_1":
        m = blocks[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float32)
        return [Blocks(nibbles(blocks[..., 4:]), d, m + 8 * d)]
    if kind == "Q4_0":
        return [Blocks(nibbles(blocks[..., 2:]), d, np.zeros_like(d))]
    q8 = blocks[..., 2:].copy().view(np.int8).astype(np.int32).reshape(rows, -1)  # [N, K]
    hi, lo = q8 >> 4, q8 & 0x0F  # q = 16 hi + lo
    return [Blocks(hi + 8, 16 * d, np.zeros_like(d)), Blocks(lo, d, 8 * d)]


class Int4Linear(nn.Module):
    """y = x W^T for W the sum of `parts` (one for Q4_0/Q4_1, two for Q8_0); fp32 in and out (bf16 inside)."""

    def __init__(self, parts: list[Blocks]):
        super().__init__()
        self.matrices = [Int4Matrix.of(p) for p in parts]
        self.out_features = self.matrices[0].out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1]).to(KERNEL_DTYPE)
        y = self.matrices[0].matmul(flat).float()
        for m in self.matrices[1:]:
            y += m.matmul(flat).float()
        return y.view(*x.shape[:-1], self.out_features)


# ---- the model's weights as 4-bit blocks -------------------------------------------------------------

PROJECTIONS = {  # GGUF name in block i -> the HF module's path in layer i
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
LM_HEAD = "lm_head.weight"


class Int4Error(ValueError):
    """Weights that the int4 path cannot serve (a GGUF type the kernel cannot take, or a shape)."""


def projection_names(config) -> list[str]:
    return [f"model.layers.{i}.{module}.weight" for i in range(config.num_hidden_layers)
            for module in PROJECTIONS.values()]


def file_supports(types: Iterable[str]) -> bool:
    """Whether a GGUF file with tensors of these types can be served as it is (norms are F32)."""
    return all(t in SUPPORTED or t == "F32" for t in types)


def file_weights(path: Path, model) -> dict[str, list[Blocks]]:
    """QUANTIZE=gguf: every projection of `model` (the HF model transformers built from the same file)
    and its lm_head, as the file's own blocks, keyed by the HF parameter name. Row order is the
    model's: llama.cpp's converter permuted q and k for its RoPE and transformers undid it, so each
    tensor's rows are matched to the model's dequantised rows, which must all be found."""
    import gguf

    tensors = {t.name: t for t in gguf.GGUFReader(path).tensors}
    params = dict(model.named_parameters())
    out = {}
    for i in range(model.config.num_hidden_layers):
        for short, module in PROJECTIONS.items():
            name = f"model.layers.{i}.{module}.weight"
            out[name] = blocks_of(tensors[f"blk.{i}.{short}.weight"], params[name])
    head = tensors.get("output.weight", tensors["token_embd.weight"])  # tied embeddings: the lm_head is the table
    out[LM_HEAD] = blocks_of(head, model.get_output_embeddings().weight)
    return out


def float_weights(model) -> dict[str, list[Blocks]]:
    """QUANTIZE=int4: every projection and the lm_head of a float model, quantised (see quantize)."""
    params = dict(model.named_parameters())
    for name in projection_names(model.config):
        if params[name].shape[1] % GROUP:
            raise Int4Error(f"{name} has {params[name].shape[1]} inputs, not a multiple of {GROUP}")
    out = {name: [quantize(params[name])] for name in projection_names(model.config)}
    out[LM_HEAD] = [quantize(model.get_output_embeddings().weight)]
    return out


def blocks_of(tensor, weight: torch.Tensor) -> list[Blocks]:
    from gguf.quants import dequantize

    kind = tensor.tensor_type.name
    if kind not in SUPPORTED:
        raise Int4Error(f"{tensor.name} is {kind}; QUANTIZE=gguf serves {', '.join(SUPPORTED)} (QUANTIZE=int4 "
                        "quantises the dequantised weights instead, QUANTIZE=none serves them as they are)")
    rows = weight.shape[0]
    parts = file_blocks(kind, np.asarray(tensor.data), rows)
    order = row_order(dequantize(tensor.data, tensor.tensor_type).reshape(rows, -1), weight)
    return parts if order is None else [p.rows(order) for p in parts]


def row_order(file_rows: np.ndarray, weight: torch.Tensor) -> np.ndarray | None:
    """The index of each of the model's rows among the file's (None: the same order)."""
    ours = weight.detach().float().numpy()
    if np.array_equal(file_rows, ours):
        return None
    where = {row.tobytes(): i for i, row in enumerate(file_rows)}
    try:
        return np.array([where[row.tobytes()] for row in ours])
    except KeyError:
        raise Int4Error("a weight of the GGUF file differs from the model built from it") from None


def swap_linears(model, weights: dict[str, list[Blocks]]) -> None:
    """Replace the HF model's projections and lm_head by Int4Linear over the same blocks, one module
    each, in place: HF's own forward (and generate()) then computes with exactly the served weights,
    the reference the engine is compared with, and the float copies are freed."""
    for name in [*projection_names(model.config), LM_HEAD]:
        parent, _, attr = name.removesuffix(".weight").rpartition(".")
        setattr(model.get_submodule(parent), attr, Int4Linear(weights[name]))


# ---- the forward --------------------------------------------------------------------------------------


class Int4Layer(nn.Module):
    """One decoder layer: RMSNorm, fused q/k/v, RoPE, SDPA over the cache, o; RMSNorm, fused gate/up, down."""

    def __init__(self, hf_layer, weights: dict[str, list[Blocks]], prefix: str, config):
        super().__init__()

        def fused(*names: str) -> Int4Linear:
            parts = [weights[f"{prefix}.{n}.weight"] for n in names]
            return Int4Linear([Blocks.stack([p[i] for p in parts]) for i in range(len(parts[0]))])

        self.norms = hf_layer.input_layernorm.weight, hf_layer.post_attention_layernorm.weight
        self.eps = config.rms_norm_eps
        self.qkv = fused("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
        self.o = fused("self_attn.o_proj")
        self.gate_up = fused("mlp.gate_proj", "mlp.up_proj")
        self.down = fused("mlp.down_proj")
        self.heads, self.kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        self.intermediate = config.intermediate_size
        self.layer_idx = hf_layer.self_attn.layer_idx

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], mask: torch.Tensor, cache
                ) -> torch.Tensor:
        b, t, width = x.shape
        d = self.head_dim
        qkv = self.qkv(F.rms_norm(x, (width,), self.norms[0], self.eps))  # [B, T, (H + 2 Hkv) D]
        qkv = qkv.view(b, t, self.heads + 2 * self.kv_heads, d).transpose(1, 2)  # [B, H + 2 Hkv, T, D]
        qk = rotate(qkv[:, : self.heads + self.kv_heads], *rope)
        q, k = qk.split([self.heads, self.kv_heads], dim=1)
        k, v = cache.update(k, qkv[:, self.heads + self.kv_heads :], self.layer_idx)
        attn = attention(q, k, v, mask, d**-0.5)
        x = x + self.o(attn.transpose(1, 2).reshape(b, t, self.heads * d))
        gate, up = self.gate_up(F.rms_norm(x, (width,), self.norms[1], self.eps)).split(self.intermediate, dim=-1)
        return x + self.down(F.silu(gate) * up)


TREE_ATTENTION_ROWS = 64  # tokens per sequence up to which a step of several computes attention by matmuls


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float) -> torch.Tensor:
    """Attention in float64, the result back in float32. A tree's node and the standard step that would
    decode the same token see the same keys, but a sibling's keys sit one cache slot further on (a
    masked slot between): fp32 sums over keys in SIMD lanes, so their association, and the last bit,
    changes with the slot, and the bf16 projections after it turn such bits into other tokens now and
    then. In float64 those differences stay far below what the fp32 result keeps.

    One token per sequence (standard decoding): SDPA. Several, up to TREE_ATTENTION_ROWS (a tree):
    two matmuls and a softmax, each kv head's query heads in one matrix, which ran 15% faster per
    forward than SDPA at 3 tokens and 3-6% slower at 1 (an interleaved A/B of the forward, one run);
    both in float64, they gave the same logits in every shape compared. Longer (a prompt): SDPA, which
    does not hold the whole score matrix."""
    b, heads, t, d = q.shape
    if t == 1 or t > TREE_ATTENTION_ROWS:
        return F.scaled_dot_product_attention(q.double(), k.double(), v.double(), attn_mask=mask, scale=scale,
                                              enable_gqa=True).float()
    kv_heads, keys = k.shape[1], k.shape[2]
    group = heads // kv_heads
    scores = torch.matmul(q.double().reshape(b, kv_heads, group * t, d), k.double().transpose(-1, -2)).mul_(scale)
    scores = scores.view(b, kv_heads, group, t, keys).add_(mask.unsqueeze(1))
    probs = torch.softmax(scores, -1).view(b, kv_heads, group * t, keys)
    return torch.matmul(probs, v.double()).view(b, heads, t, d).float()


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """HF Llama's RoPE (halves rotated, not interleaved pairs) on x [B, heads, T, D], cos/sin [B, 1, T, D]
    with the sign of rotate_half folded into sin."""
    return torch.addcmul(x * cos, x.roll(x.shape[-1] // 2, dims=-1), sin)


NATIVE_SOURCE = Path(__file__).with_name("int4_layers.cpp")


@functools.cache
def native_extension():
    """int4_layers.cpp as a Python module, built once per source version (about 30 s on 2 cores) into
    torch's extension cache (TORCH_EXTENSIONS_DIR); None where it cannot be built."""
    from torch.utils import cpp_extension

    try:
        return cpp_extension.load(name="medusa_int4_layers", sources=[str(NATIVE_SOURCE)], extra_cflags=["-O2"])
    except (OSError, RuntimeError, ImportError) as e:  # no compiler, or a failed build
        log.warning("the int4 layers run in Python (slower): the C++ ones could not be built: %s", e)
        return None


def native_layers(layers: list[Int4Layer]):
    """The layers' weights handed to int4_layers.cpp's Layers, or None without it."""
    extension = native_extension()
    if extension is None:
        return None
    first = layers[0]
    native = extension.Layers(first.heads, first.kv_heads, first.head_dim, first.intermediate, first.eps,
                              first.head_dim**-0.5)

    def parts(linear: Int4Linear) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return [(m.packed, m.scales_zeros) for m in linear.matrices]

    for layer in layers:
        native.add(*layer.norms, parts(layer.qkv), parts(layer.o), parts(layer.gate_up), parts(layer.down))
    return native


class Int4Llama(nn.Module):
    """A drop-in for the HF Llama forward the engine calls (MedusaModel.runner), over int4 weights;
    the embedding, norms and rotary frequencies are the HF model's own, in its float dtype. `native`:
    the layers in C++ when they can be built (the engine's forwards; a forward without a cache runs
    the Python layers)."""

    def __init__(self, hf_model, weights: dict[str, list[Blocks]]):
        super().__init__()
        inner = hf_model.model
        self.embed, self.final_norm, self.rotary = inner.embed_tokens, inner.norm, inner.rotary_emb
        self.layers = nn.ModuleList(Int4Layer(layer, weights, f"model.layers.{i}", hf_model.config)
                                    for i, layer in enumerate(inner.layers))
        self.lm_head = Int4Linear(weights[LM_HEAD])
        self.native = native_layers(list(self.layers))

    @contextlib.contextmanager
    def python_layers(self):
        """Within the block, every forward runs the Python layers (to compare them with the C++ ones)."""
        native, self.native = self.native, None
        try:
            yield
        finally:
            self.native = native

    def forward(self, input_ids, attention_mask=None, position_ids=None, cache=None, logits_to_keep=0, **_
                ) -> SimpleNamespace:
        """The engine's forward (its KV cache, a 4-D additive mask [B, 1, T, S], explicit positions),
        or, without a cache, a causal forward over whole sequences (an optional [B, T] padding mask)."""
        x = self.embed(input_ids)  # [B, T, H]
        b, t = input_ids.shape
        if position_ids is None:
            position_ids = torch.arange(t, device=x.device).expand(b, t)
        if cache is None:
            attention_mask, cache = causal_mask(attention_mask, b, t, x.dtype), NoCache()
        if attention_mask.dtype != torch.float64:
            attention_mask = attention_mask.double()  # see attention()
        cos, sin = self.rotary(x, position_ids)  # [B, T, D]
        half = cos.shape[-1] // 2
        sin = torch.cat([-sin[..., :half], sin[..., half:]], dim=-1)
        rope = cos[:, None], sin[:, None]
        if self.native is not None and isinstance(cache, CacheWriter) and cache.rows.step is None:
            x = self.native.forward(x, *rope, attention_mask, cache.cache.k, cache.cache.v, cache.rows.start or 0,
                                    cache.rows.stop, cache.batch_index, cache.positions, cache.kv_len)
        else:
            for layer in self.layers:
                x = layer(x, rope, attention_mask, cache)
        hidden = F.rms_norm(x, (x.shape[-1],), self.final_norm.weight, self.final_norm.variance_epsilon)
        return SimpleNamespace(logits=self.lm_head(slice_logits_to_keep(hidden, logits_to_keep)), hidden_states=(hidden,))


class NoCache:
    """A forward over whole sequences: keys and values are this forward's own."""

    def update(self, key, value, layer_idx, *args, **kwargs):
        return key, value


def causal_mask(padding: torch.Tensor | None, b: int, t: int, dtype: torch.dtype) -> torch.Tensor:
    """[B, 1, T, T] additive: each position sees itself and the positions before it that are not padding."""
    arange = torch.arange(t)
    visible = (arange[:, None] >= arange[None, :]).expand(b, 1, t, t)
    if padding is not None:
        visible = visible & padding.bool()[:, None, None, :]
    return torch.zeros(b, 1, t, t, dtype=dtype).masked_fill(~visible, torch.finfo(dtype).min)
