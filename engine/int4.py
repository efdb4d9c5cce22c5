"""A GGUF file's own 4-bit weights, served on the CPU through this project's int4 kernel
(int4_layers.cpp), with a lean Llama forward around them.

The kernel takes the file's blocks of 32 weights as they are, in a layout of its own (pack): Q4_1 (4-bit
q, an fp16 scale d and minimum m: w = d q + m), Q4_0 (w = d (q - 8), served as Q4_1 with m = -8 d,
exactly) and Q8_0 (int8 q: w = d q). No weight is re-quantised and no scale rounded. Activations are
quantised to 8 bits per block of 32 inside the kernel, as llama.cpp quantises them for the same
blocks (its Q8_0 / Q8_1), so that a block's dot product is an exact integer (AVX-512 VNNI, or
AVX-512BW where VNNI is missing); each output
then sums over the blocks in order in fp32. A row's result does not depend on the other rows, so
verifying a tree gives each node what a step of it alone would (speculative == standard by
construction, bitwise). Without AVX-512 a portable loop computes the same bits, slower.

The forward (Int4Llama) takes the HF model's own embedding, norms and rotary embedding, and replaces
its projections with the int4 ones, fused per layer: q, k and v in one matrix, gate and up in one.
Its decoder layers run in C++ (int4_layers.cpp: the same ATen calls as Int4Layer.forward, without
Python's cost per call). The kernel and the layers are compiled on first use into torch's extension
cache; without a C++ compiler the int4 path cannot run (QUANTIZE=auto then serves fp32) and the log
says so.
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

GROUP = 32  # weights per GGUF block
COLUMNS = 16  # output columns the kernel interleaves (a vector lane each)
BLOCK_BYTES = {"Q4_0": 18, "Q4_1": 20, "Q8_0": 34}
SUPPORTED = tuple(BLOCK_BYTES)
Q4, Q8 = 4, 8  # the kernel's two kinds (int4_layers.cpp Kind)


@dataclass(frozen=True)
class Blocks:
    """A [N, K] weight as a GGUF file stores it: `data`, uint8 [N, K/32 * block bytes], row by row."""

    kind: str
    data: np.ndarray

    def rows(self, index: np.ndarray) -> Blocks:
        return Blocks(self.kind, self.data[index])

    @staticmethod
    def stack(parts: list[Blocks]) -> Blocks:
        """The rows of several weights, one after the other (fused q/k/v, gate/up)."""
        kinds = {p.kind for p in parts}
        if len(kinds) > 1:
            raise Int4Error(f"weights fused into one matrix must share a GGUF type; these are {sorted(kinds)}")
        return Blocks(parts[0].kind, np.concatenate([p.data for p in parts]))

    def dequantize(self) -> np.ndarray:
        """The weight in fp32, as gguf.quants dequantises it (what the kernel computes with)."""
        from gguf import GGMLQuantizationType, quants

        return quants.dequantize(self.data, GGMLQuantizationType[self.kind]).reshape(len(self.data), -1)


@dataclass(frozen=True)
class Packed:
    """A weight in the kernel's layout: per group of 16 output columns and block of 32 inputs, the
    columns' quantised values interleaved 4 inputs at a time (uint8 [N/16, K/32, 4 or 8, 64]: Q4 two
    nibbles a byte, Q8 q + 128), their d and (Q4) m in fp16 [N/16, K/32, 16]; N padded to 16 with zeros."""

    packed: torch.Tensor
    d: torch.Tensor
    m: torch.Tensor
    kind: int
    out_features: int

    @classmethod
    def of(cls, b: Blocks) -> Packed:
        n = len(b.data)
        blocks = b.data.reshape(n, -1, BLOCK_BYTES[b.kind])
        d = blocks[..., :2].copy().view(np.float16)[..., 0]  # [N, K/32]
        if b.kind == "Q8_0":
            q = (blocks[..., 2:].copy().view(np.int8).astype(np.int16) + 128).astype(np.uint8)  # [N, K/32, 32]
            m = np.zeros_like(d)
        else:
            qs = blocks[..., 4:] if b.kind == "Q4_1" else blocks[..., 2:]
            q = np.concatenate([qs & 0x0F, qs >> 4], axis=-1)  # byte j holds element j (low) and j + 16 (high)
            if b.kind == "Q4_1":
                m = blocks[..., 2:4].copy().view(np.float16)[..., 0]
            else:
                m = (-8 * d.astype(np.float32)).astype(np.float16)  # exact: a power of two times d
                if not np.isfinite(m).all():
                    raise Int4Error("a Q4_0 scale is too large for the kernel (8 d overflows fp16)")
        groups = -(-n // COLUMNS)
        pad = groups * COLUMNS - n
        if pad:
            q = np.concatenate([q, np.full((pad, *q.shape[1:]), 128 if b.kind == "Q8_0" else 0, np.uint8)])
            d, m = (np.concatenate([a, np.zeros((pad, a.shape[1]), np.float16)]) for a in (d, m))
        nb = q.shape[1]
        q = q.reshape(groups, COLUMNS, nb, 8, 4).transpose(0, 2, 3, 1, 4)  # [G, K/32, 4 inputs' group, column, 4]
        if b.kind != "Q8_0":
            q = q[:, :, :4] | (q[:, :, 4:] << 4)  # groups g and g + 4 in one byte's low and high nibble

        def by_group(a: np.ndarray) -> torch.Tensor:
            return torch.from_numpy(np.ascontiguousarray(a.reshape(groups, COLUMNS, nb).transpose(0, 2, 1)))

        return cls(torch.from_numpy(np.ascontiguousarray(q).reshape(groups, nb, -1, 64)), by_group(d),
                   by_group(m) if b.kind != "Q8_0" else torch.empty(0, dtype=torch.float16),
                   Q8 if b.kind == "Q8_0" else Q4, n)

    def first(self, n: int) -> Packed:
        """The first n output columns (n a multiple of 16): a view."""
        if n % COLUMNS:
            raise ValueError(f"the first {n} columns of a packed weight: a multiple of {COLUMNS} only")
        g = n // COLUMNS
        return Packed(self.packed[:g], self.d[:g], self.m[:g] if self.kind == Q4 else self.m, self.kind, n)

    @property
    def native(self) -> tuple:
        """What int4_layers.cpp's Layers.add takes for it."""
        return self.packed, self.d, self.m, self.kind, self.out_features


class Int4Linear(nn.Module):
    """y = x W^T for W given as GGUF blocks; fp32 in and out. `loop`: the kernel's loop, the best this
    CPU has ("best": AVX-512 VNNI, else AVX-512BW, else portable) or one below it ("avx512bw",
    "portable": the same bits, to compare them)."""

    LOOPS = {"best": 0, "avx512bw": 1, "portable": 2}

    def __init__(self, blocks: Blocks | Packed):
        super().__init__()
        self.weight = blocks if isinstance(blocks, Packed) else Packed.of(blocks)
        self.out_features = self.weight.out_features
        self.loop = "best"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        y = kernel().matmul(x.reshape(-1, x.shape[-1]).float(), w.packed, w.d, w.m, w.kind, w.out_features,
                            self.LOOPS[self.loop])
        return y.view(*x.shape[:-1], self.out_features)


def quantize(weight: torch.Tensor, kind: str = "Q4_1") -> Blocks:
    """A float [N, K] weight quantised to GGUF blocks by gguf's own quantiser (llama.cpp's rounding;
    QUANTIZE=int4: Q4_1, per block of 32 d = (max - min) / 15, m = min)."""
    from gguf import GGMLQuantizationType, quants

    w = weight.detach().float().numpy()
    return Blocks(kind, quants.quantize(w, GGMLQuantizationType[kind]).reshape(len(w), -1))


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


def file_weights(path: Path, model) -> dict[str, Blocks]:
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


def float_weights(model) -> dict[str, Blocks]:
    """QUANTIZE=int4: every projection and the lm_head of a float model, quantised (see quantize)."""
    params = dict(model.named_parameters())
    for name in projection_names(model.config):
        if params[name].shape[1] % GROUP:
            raise Int4Error(f"{name} has {params[name].shape[1]} inputs, not a multiple of {GROUP}")
    out = {name: quantize(params[name]) for name in projection_names(model.config)}
    out[LM_HEAD] = quantize(model.get_output_embeddings().weight)
    return out


def blocks_of(tensor, weight: torch.Tensor) -> Blocks:
    kind = tensor.tensor_type.name
    if kind not in SUPPORTED:
        raise Int4Error(f"{tensor.name} is {kind}; QUANTIZE=gguf serves {', '.join(SUPPORTED)} (QUANTIZE=int4 "
                        "quantises the dequantised weights instead, QUANTIZE=none serves them as they are)")
    blocks = Blocks(kind, np.asarray(tensor.data).reshape(weight.shape[0], -1))
    order = row_order(blocks.dequantize(), weight)
    return blocks if order is None else blocks.rows(order)


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


def swap_linears(model, weights: dict[str, Blocks]) -> None:
    """Replace the HF model's projections and lm_head by Int4Linear over the same blocks, one module
    each, in place: HF's own forward (and generate()) then computes with exactly the served weights,
    the reference the engine is compared with, and the float copies are freed."""
    for name in [*projection_names(model.config), LM_HEAD]:
        parent, _, attr = name.removesuffix(".weight").rpartition(".")
        setattr(model.get_submodule(parent), attr, Int4Linear(weights[name]))


class Int8Drafts(nn.Module):
    """The Medusa heads' own matrices (each residual block's W, and R_k for heads reading the root
    token) as Q8_0 blocks through the kernel, in place of fp32 matrix-vector products: a step's drafts
    read 1.4 MB instead of 5.3 MB per head. Drafts only propose tokens that verification then checks,
    so their rounding changes what is proposed, never what is emitted. forward: the heads' drafts
    [..., K, H] before the projection (MedusaHeads.forward with no lm_head)."""

    def __init__(self, heads):
        super().__init__()

        def q8(weight: torch.Tensor) -> Int4Linear:
            return Int4Linear(quantize(weight, "Q8_0"))

        self.blocks = [[(q8(block.linear.weight), block.linear.bias.detach()) for block in head] for head in heads]
        self.roots = None  # by head count k: R_1 .. R_k as one [k H, H] matrix (the first rows of all K's)
        if heads.config.reads_root_token:
            every, size = q8(heads.root.flatten(0, 1)), heads.root.shape[1]
            self.roots = {k: Int4Linear(every.weight.first(k * size)) if size % COLUMNS == 0 else every
                          for k in range(1, len(heads) + 1)}

    def forward(self, hidden: torch.Tensor, root: torch.Tensor | None = None, count: int | None = None
                ) -> torch.Tensor:
        """`count`: the first heads only (a shallow tree's step drafts with no more)."""
        heads = self.blocks[:count]
        reads = None
        if self.roots is not None:  # [..., K, H]: R_k e(t+1), in one pass of the kernel
            reads = self.roots[len(heads)](root).unflatten(-1, (-1, hidden.shape[-1]))
        drafts = []
        for i, blocks in enumerate(heads):
            x = hidden if reads is None else hidden + reads[..., i, :]
            for linear, bias in blocks:
                x = x + F.silu(linear(x) + bias)
            drafts.append(x)
        return torch.stack(drafts, dim=-2)


# ---- the forward --------------------------------------------------------------------------------------


class Int4Layer(nn.Module):
    """One decoder layer: RMSNorm, fused q/k/v, RoPE, attention over the cache, o; RMSNorm, fused gate/up, down."""

    def __init__(self, hf_layer, weights: dict[str, Blocks], prefix: str, config):
        super().__init__()

        def fused(*names: str) -> Int4Linear:
            return Int4Linear(Blocks.stack([weights[f"{prefix}.{n}.weight"] for n in names]))

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
        b, t, _ = x.shape
        d = self.head_dim
        qkv = self.qkv(kernel().rms_norm(x, self.norms[0], self.eps))  # [B, T, (H + 2 Hkv) D]
        qkv = qkv.view(b, t, self.heads + 2 * self.kv_heads, d).transpose(1, 2)  # [B, H + 2 Hkv, T, D]
        qk = rotate(qkv[:, : self.heads + self.kv_heads], *rope)
        q, k = qk.split([self.heads, self.kv_heads], dim=1)
        k, v = cache.update(k, qkv[:, self.heads + self.kv_heads :], self.layer_idx)
        attn = attention(q, k, v, mask, d**-0.5)  # [B, T, H, D]
        x = x + self.o(attn.reshape(b, t, self.heads * d))
        gate, up = self.gate_up(kernel().rms_norm(x, self.norms[1], self.eps)).split(self.intermediate, dim=-1)
        return x + self.down(F.silu(gate) * up)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float) -> torch.Tensor:
    """q [B, H, T, D] over keys and values [B, Hkv, S, D] -> [B, T, H, D], fp32, the kernel's
    (int4_layers.cpp): each query from its visible keys alone (mask 0), in slot order, the n-th
    visible key in the same place of every sum whatever its slot. A tree node sees the committed prefix
    and its path; the standard step that decodes the same token sees the same keys, in other slots (a
    sibling's sits one slot further on, a masked slot between): in SIMD sums over all slots their
    association, and so the last bit, would change with the slot, and 8-bit activations turn such bits
    into other tokens now and then. Over the visible keys in a fixed order the bits are the same by
    construction: a tree step, a standard step and a prompt's forward over the same tokens agree."""
    return kernel().attention(q, k, v, mask, scale, False)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """HF Llama's RoPE (halves rotated, not interleaved pairs) on x [B, heads, T, D], cos/sin [B, 1, T, D]
    with the sign of rotate_half folded into sin; the kernel's loop (the C++ layers' own)."""
    return kernel().rotate(x, cos, sin)


NATIVE_SOURCE = Path(__file__).with_name("int4_layers.cpp")
NATIVE_FLAGS = ["-O2", "-fopenmp", "-ffp-contract=off"]  # OpenMP: ATen's parallel_for; no contraction into fma


@functools.cache
def native_extension():
    """int4_layers.cpp as a Python module, built once per source version (about 40 s on 2 cores) into
    torch's extension cache (TORCH_EXTENSIONS_DIR); None where it cannot be built."""
    from torch.utils import cpp_extension

    try:
        return cpp_extension.load(name="medusa_int4", sources=[str(NATIVE_SOURCE)], extra_cflags=NATIVE_FLAGS,
                                  extra_ldflags=["-fopenmp"])
    except (OSError, RuntimeError, ImportError) as e:  # no compiler, or a failed build
        log.warning("the int4 kernel could not be built (QUANTIZE=auto serves fp32 instead): %s", e)
        return None


def kernel():
    """The built extension, or an Int4Error that says why int4 weights cannot be served."""
    extension = native_extension()
    if extension is None:
        raise Int4Error("QUANTIZE=gguf and int4 need the int4 kernel, which is built at first use with a C++ "
                        "compiler (g++) and ninja; it could not be built (see the log). QUANTIZE=none serves fp32")
    return extension


def native_layers(layers: list[Int4Layer]):
    """The layers' weights handed to int4_layers.cpp's Layers."""
    first = layers[0]
    native = kernel().Layers(first.heads, first.kv_heads, first.head_dim, first.intermediate, first.eps,
                             first.head_dim**-0.5)
    for layer in layers:
        native.add(*layer.norms, *(linear.weight.native for linear in (layer.qkv, layer.o, layer.gate_up, layer.down)))
    return native


class Int4Llama(nn.Module):
    """A drop-in for the HF Llama forward the engine calls (MedusaModel.runner), over int4 weights;
    the embedding, norms and rotary frequencies are the HF model's own, in its float dtype. `native`:
    the layers in C++ (the engine's forwards; a forward without a cache runs the Python layers)."""

    def __init__(self, hf_model, weights: dict[str, Blocks]):
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
        hidden = kernel().rms_norm(x, self.final_norm.weight, self.final_norm.variance_epsilon)
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
