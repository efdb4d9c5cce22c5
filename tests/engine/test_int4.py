"""QUANTIZE: int4 weights through the project's int4 kernel (engine/int4_layers.cpp), either the GGUF
file's own blocks (`gguf`, the default model's default) or a float model quantised at load (`int4`).
The kernel computes with the file's weights exactly and 8-bit activations; its AVX-512 loop gives the
portable loop's bits; a row's result does not depend on the rows beside it; and greedy speculative ==
standard == Hugging Face generate() on the same int4 weights, at batch 1 and 8, with seeded sampling
equal too."""

from __future__ import annotations

import contextlib
import copy
import functools
import logging

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, quants

from bench import int4_kernel
from bench.int4_layers import compare
from config.settings import DEFAULT_HEADS, DEFAULT_MODEL
from engine.decode import Engine
from engine.int4 import (
    GROUP,
    Blocks,
    Int4Error,
    Int4Linear,
    Int4Llama,
    attention,
    blocks_of,
    kernel,
    native_extension,
    quantize,
)
from engine.kv_cache import KVCache, step_mask
from engine.messages import Request, SamplingParams
from engine.tree import ROOT, preset
from load_medusa_from_hf import ModelError, ModelSource, heads_tree, int4_model, load_medusa_model

QUESTIONS = ["What is 2 + 2?", "Write a Python function that reverses a string.",
             "Give me three tips for better sleep.", "Explain photosynthesis in simple terms.",
             "List four uses of a paperclip.", "Rewrite this more politely: send me the report now.",
             "What is 17 times 3?", "Compare cats and dogs as pets."]
KINDS = ["Q4_0", "Q4_1", "Q8_0"]


def file_linear(kind: str, n: int, k: int, seed: int = 0) -> tuple[Int4Linear, np.ndarray]:
    """An Int4Linear over gguf-quantised random weights, and those weights dequantised (fp32)."""
    w = np.random.default_rng(seed).standard_normal((n, k)).astype(np.float32)
    blocks = Blocks(kind, quants.quantize(w, GGMLQuantizationType[kind]).reshape(n, -1))
    return Int4Linear(blocks), blocks.dequantize()


def quantised_activations(x: torch.Tensor) -> np.ndarray:
    """x as the kernel quantises it, in float64: per block of 32, d = max|x| / 127, q = round(x / d)."""
    blocks = x.double().numpy().reshape(len(x), -1, GROUP)
    d = (np.abs(blocks).max(-1, keepdims=True).astype(np.float32) / np.float32(127)).astype(np.float64)
    q = np.clip(np.rint(blocks.astype(np.float32) * (1 / d.astype(np.float32))), -127, 127)
    return (q * d).reshape(x.shape)


@pytest.mark.parametrize("kind", KINDS)
def test_the_kernel_computes_with_the_files_weights_and_8_bit_activations(kind):
    """y = x8 W^T with W exactly the file's dequantised weights (gguf.quants) and x8 the activations
    quantised per block of 32 (as llama.cpp does): only fp32 accumulation rounds, over 40 columns (a
    partial group of 16 too) and 96 inputs."""
    linear, w = file_linear(kind, 40, 96)
    x = torch.randn(5, 96)
    expected = quantised_activations(x) @ w.astype(np.float64).T
    np.testing.assert_allclose(linear(x).double().numpy(), expected, rtol=0, atol=1e-5 * np.abs(expected).max())
    exact = x.double().numpy() @ w.astype(np.float64).T  # the 8-bit activations' own error is ~1%
    assert np.abs(linear(x).double().numpy() - exact).max() < 0.05 * np.abs(exact).max()


@pytest.mark.parametrize("loop", ["best", "avx512bw"])
@pytest.mark.parametrize("kind", KINDS)
def test_each_vectorised_loop_gives_the_portable_loops_bits(kind, loop):
    """The VNNI loop and the AVX-512BW one (its dots by vpmaddubsw, Q8_0's weights a nibble at a time)."""
    if not (kernel().has_vnni() if loop == "best" else kernel().has_avx512bw()):
        pytest.skip(f"this CPU has no {'AVX-512 VNNI' if loop == 'best' else 'AVX-512BW'}")
    linear, _ = file_linear(kind, 48, 1536)
    x = torch.randn(7, 1536) * torch.logspace(-3, 2, 1536)  # blocks of very different scales
    linear.loop = loop
    fast = linear(x)
    linear.loop = "portable"
    assert torch.equal(linear(x), fast)


def test_quantising_a_float_weight_stays_within_half_a_step():
    """QUANTIZE=int4: gguf's own Q4_1 quantiser (llama.cpp's rounding; d and m kept in fp16 add a little)."""
    w = torch.randn(48, 96)
    b = quantize(w)
    assert b.kind == "Q4_1"
    d = b.data.reshape(48, 3, 20)[..., :2].copy().view(np.float16)[..., 0].astype(np.float32)
    assert np.all(np.abs(b.dequantize() - w.numpy()) <= 0.51 * np.repeat(d, GROUP, axis=1))


@pytest.mark.parametrize("kind", KINDS)
def test_a_rows_result_does_not_depend_on_the_rows_beside_it(kind):
    """At the row counts the engine sends (batch x tokens verified, up to 16 x 64), bitwise."""
    torch.manual_seed(0)
    linear, _ = file_linear(kind, 192, 576, seed=1)
    x = torch.randn(1024, 576)
    alone = torch.cat([linear(x[i : i + 1]) for i in range(len(x))])
    for rows in (2, 3, 4, 5, 8, 16, 17, 64, 80, 1024):
        assert torch.equal(linear(x[:rows]), alone[:rows]), rows


def attention_case(t: int = 5, cached: int = 37, seed: int = 0):
    """q [2, 9, t, 64], keys and values [2, 3, cached + t + 3, 64] with a tree's mask: query i sees the
    `cached` committed keys, then the tree slots of its path (node i's parent is (i - 1) // 2)."""
    g = torch.Generator().manual_seed(seed)
    slots = cached + t + 3
    q, k, v = (torch.randn(2, h, n, 64, generator=g) for h, n in ((9, t), (3, slots), (3, slots)))
    visible = torch.zeros(t, slots, dtype=torch.bool)
    visible[:, :cached] = True
    for i in range(t):
        node = i
        while True:
            visible[i, cached + node] = True
            if node == 0:
                break
            node = (node - 1) // 2
    mask = torch.zeros(2, 1, t, slots).masked_fill(~visible, torch.finfo(torch.float32).min)
    return q, k, v, mask, visible


def test_attention_is_softmax_attention_over_the_visible_keys():
    q, k, v, mask, _ = attention_case()
    ours = attention(q, k, v, mask, 0.125)
    reference = torch.nn.functional.scaled_dot_product_attention(q.double(), k.double(), v.double(),
                                                                 attn_mask=mask.double(), scale=0.125, enable_gqa=True)
    torch.testing.assert_close(ours.double(), reference.transpose(1, 2), rtol=0, atol=1e-5)


def test_a_querys_attention_depends_only_on_its_visible_keys_in_order():
    """A tree node gives the bits of the standard step that decodes the same token: the same keys in
    the same order, but contiguous, in other slots, with no hidden slots between them."""
    q, k, v, mask, visible = attention_case()
    tree = attention(q, k, v, mask, 0.125)
    for i in range(q.shape[2]):
        slots = visible[i].nonzero()[:, 0]
        alone = attention(q[:, :, i : i + 1], k[:, :, slots], v[:, :, slots], torch.zeros(2, 1, 1, len(slots)), 0.125)
        assert torch.equal(tree[:, i : i + 1], alone), i


def test_the_vectorised_attention_gives_the_portable_bits():
    q, k, v, mask, _ = attention_case(t=9, cached=300)
    assert torch.equal(kernel().attention(q, k, v, mask, 0.125, False), kernel().attention(q, k, v, mask, 0.125, True))


def test_the_kernels_norm_and_rope_are_llamas():
    """rms_norm and rotate: one loop each in int4_layers.cpp, for what HF Llama computes (up to rounding)."""
    x, w = torch.randn(3, 5, 576), torch.randn(576)
    expected = torch.nn.functional.rms_norm(x.double(), (576,), w.double(), 1e-5)
    torch.testing.assert_close(kernel().rms_norm(x, w, 1e-5).double(), expected, rtol=1e-6, atol=1e-5)
    q = torch.randn(2, 4, 3, 64).transpose(1, 2)  # [B, heads, T, D], not contiguous
    cos, sin = torch.randn(2, 1, 4, 64), torch.randn(2, 1, 4, 64)
    expected = q.double() * cos.double() + q.double().roll(32, dims=-1) * sin.double()
    torch.testing.assert_close(kernel().rotate(q, cos, sin).double(), expected, rtol=1e-6, atol=1e-5)


def test_an_unsupported_gguf_type_is_a_clear_error():
    data = quants.quantize(np.ones((32, 64), dtype=np.float32), GGMLQuantizationType.Q5_0)

    class Tensor:
        name, tensor_type = "blk.0.attn_q.weight", GGMLQuantizationType.Q5_0

    Tensor.data = data
    with pytest.raises(Int4Error, match=r"blk.0.attn_q.weight is Q5_0; QUANTIZE=gguf serves Q4_0, Q4_1, Q8_0"):
        blocks_of(Tensor, torch.ones(32, 64))


def test_how_quantize_resolves():
    gguf = ModelSource("/m", "m.gguf", (("Q4_1", 210), ("F32", 61), ("Q8_0", 1)))
    k_quants = ModelSource("/m", "k.gguf", (("Q4_K", 200), ("F32", 61)))
    folder = ModelSource("/m")
    assert gguf.quantize_mode("auto", "cpu") == "gguf"
    assert k_quants.quantize_mode("auto", "cpu") == "none" and folder.quantize_mode("auto", "cpu") == "none"
    assert gguf.quantize_mode("auto", "cuda") == "none"  # not measured on CUDA: float there
    assert gguf.quantize_mode("auto", "cpu", tp_size=2) == "none"  # the int4 forward is one process
    assert folder.quantize_mode("int4", "cpu") == "int4" and gguf.quantize_mode("none", "cpu") == "none"
    with pytest.raises(ModelError, match="not a GGUF file"):
        folder.quantize_mode("gguf", "cpu")
    with pytest.raises(ModelError, match="int4 CPU kernel; on cuda use QUANTIZE=none"):
        gguf.quantize_mode("gguf", "cuda")


# ---- the engine on int4 weights --------------------------------------------------------------------


def hf_greedy(model, prompt: list[int], new: int, eos: int | None) -> list[int]:
    """HF generate() on the model whose projections int4_model swapped to the served weights."""
    ids = torch.tensor([prompt])
    config = copy.deepcopy(model.generation_config)
    config.update(eos_token_id=[] if eos is None else eos, do_sample=False, max_new_tokens=new, pad_token_id=0)
    out = model.generate(ids, attention_mask=torch.ones_like(ids), generation_config=config)[0, len(prompt) :]
    out = out.tolist()
    return out[: out.index(eos)] if eos in out else out


@pytest.fixture(scope="module")
def toy_int4(toy):
    """The toy model (float) quantised at load: QUANTIZE=int4."""
    model, tokenizer = toy
    served = int4_model(copy.deepcopy(model.model), model.heads, ModelSource("toy"), "int4", torch.float32)
    return served, tokenizer


def test_a_float_model_quantised_at_load_decodes_exactly(toy_int4, prompts):
    model, tokenizer = toy_int4
    assert isinstance(model.runner, Int4Llama) and "quantised at load to Q4_1" in model.weights
    requests = [Request(str(i), p, max_new_tokens=24) for i, p in enumerate(prompts)]
    standard = Engine(model, tokenizer, tree=ROOT, max_batch_size=8, eos_token_ids=[]).generate(requests)
    speculative = Engine(model, tokenizer, tree=preset("mc_sim_7b_63"), max_batch_size=8,
                         eos_token_ids=[]).generate(requests)
    for p, std, spec in zip(prompts, standard, speculative):
        assert spec.tokens == std.tokens == hf_greedy(model.model, p, 24, None)
    assert sum(s.decode_tokens for s in speculative) > sum(s.decode_steps for s in speculative)


@pytest.fixture(scope="module")
def default_int4():
    """The default model as `python app.py` serves it on the CPU: the GGUF file's own blocks."""
    return load_medusa_model(DEFAULT_MODEL, str(DEFAULT_HEADS), quantize="gguf")


def chat(tokenizer, question: str) -> list[int]:
    return list(tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                              tokenize=True, return_dict=True)["input_ids"])


@functools.cache
def default_prompts(tokenizer) -> list[list[int]]:
    return [chat(tokenizer, q) for q in QUESTIONS]


def test_the_default_model_on_its_own_blocks(default_int4):
    """Greedy speculative == standard; each token is the argmax of the int4 forward over the whole
    sequence without the engine's cache (teacher-forced, another path through the same weights); and
    HF's own forward on the same int4 matrices gives nearly the same logits (its attention, norms and
    RoPE round differently, and where such a bit moves an activation across an 8-bit step the
    difference grows)."""
    model, tokenizer = default_int4
    assert model.weights == ("GGUF SmolLM2-135M-Instruct.Q4_1.gguf (Q4_1 x210, F32 x61, Q8_0 x1): its own blocks "
                             "in the int4 kernel (8-bit activations), embeddings and norms in float32; its decoder "
                             "layers in C++")
    prompts = default_prompts(tokenizer)[:3]
    requests = [Request(str(i), p, max_new_tokens=32) for i, p in enumerate(prompts)]
    speculative = Engine(model, tokenizer, tree=heads_tree(str(DEFAULT_HEADS)), max_batch_size=3).generate(requests)
    standard = Engine(model, tokenizer, tree=ROOT, max_batch_size=3).generate(requests)
    for p, spec, std in zip(prompts, speculative, standard):
        assert spec.tokens == std.tokens
        ids = torch.tensor([p + std.tokens])
        ours = model.runner(ids).logits[0, len(p) - 1 : -1]
        assert ours.argmax(-1).tolist() == std.tokens
        hf = model.model(ids).logits[0, len(p) - 1 : -1]
        assert (hf.argmax(-1) == ours.argmax(-1)).float().mean() >= 0.9 and (hf - ours).abs().max() < 3.0
    assert sum(s.decode_tokens for s in speculative) > sum(s.decode_steps for s in speculative)
    assert tokenizer.decode(standard[0].tokens, skip_special_tokens=True) == "The answer is 4."  # golden


def tree_step(kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(tree mask [T, T], depths [T]) for each attention branch: one token per sequence (SDPA), a
    root with two children, and a chain of 70 (a prompt's forward)."""
    if kind == "tree":
        return torch.tensor([[1, 0, 0], [1, 1, 0], [1, 0, 1]], dtype=torch.bool), torch.tensor([0, 1, 1])
    t = 1 if kind == "one token" else 70
    return torch.tril(torch.ones(t, t, dtype=torch.bool)), torch.arange(t)


def test_the_heads_draft_in_q8_nearly_as_in_float(default_int4):
    """int4.Int8Drafts: the heads' matrices in Q8_0 through the kernel. Drafts only propose (what
    verification accepts is exact either way), so close is enough: nearly the same top-1 tokens."""
    model, _ = default_int4
    torch.manual_seed(0)
    hidden = torch.randn(64, model.config.hidden_size) * 3
    root = model.model.get_input_embeddings()(torch.randint(0, model.config.vocab_size, (64,)))
    with torch.inference_mode():
        ours = model.drafts(hidden, root)
        floats = model.heads(hidden, None, root)
        assert (ours - floats).norm() < 0.02 * floats.norm()
        same = model.head_projection(ours).argmax(-1) == model.head_projection(floats).argmax(-1)
    assert same.float().mean() > 0.9


def test_a_shallow_trees_step_drafts_with_its_first_heads_only(default_int4):
    """A tree k deep drafts with heads 1..k alone (MedusaModel.head_logits's count): the same logits
    as those heads' rows of all K, in Q8_0 through the kernel and in float."""
    model, _ = default_int4
    torch.manual_seed(0)
    hidden = torch.randn(3, model.config.hidden_size) * 3
    roots = torch.randint(0, model.config.vocab_size, (3,))
    with torch.inference_mode():
        every = model.head_logits(hidden, roots)
        root = model.model.get_input_embeddings()(roots)
        floats = model.heads(hidden, None, root)
        for count in range(1, model.num_heads):
            assert torch.equal(model.head_logits(hidden, roots, count), every[:, :count])
            assert torch.equal(model.heads(hidden, None, root, count), floats[:, :count])


@pytest.mark.parametrize("kind", ["one token", "tree", "long chain"])
def test_the_c_layers_give_the_python_layers_bits(default_int4, kind):
    """int4_layers.cpp makes Int4Layer.forward's ATen calls in C++: the same logits and the same cache,
    bit for bit, for a step of two sequences with different cached lengths, in slots 1 and 2 of three."""
    model, _ = default_int4
    runner, config = model.runner, model.config
    assert runner.native is not None, "the C++ layers were not built (see the log)"
    torch.manual_seed(0)
    tree, depths = tree_step(kind)
    t, capacity = len(depths), len(depths) + 16
    lengths = torch.tensor([5, 9])
    write = lengths[:, None] + torch.arange(t)
    mask = step_mask(lengths, write, tree.expand(2, t, t), 9 + t, torch.float32)
    ids = torch.randint(0, config.vocab_size, (2, t))
    shape = (config.num_hidden_layers, 3, config.num_key_value_heads, capacity, runner.layers[0].head_dim)
    start = torch.randn(shape)
    results = []
    for layers in (contextlib.nullcontext, runner.python_layers):
        cache = KVCache(*shape, torch.float32, "cpu")
        cache.k.copy_(start), cache.v.copy_(-start)
        with layers(), torch.inference_mode():
            logits = runner(ids, attention_mask=mask, position_ids=lengths[:, None] + depths,
                            cache=cache.writer(slice(1, 3), write, 9 + t)).logits
        results.append((logits, cache.k, cache.v))
    for a, b in zip(*results):
        assert torch.equal(a, b)


def test_without_a_compiler_int4_is_a_clear_error_and_auto_serves_fp32(monkeypatch, caplog):
    from torch.utils import cpp_extension

    import engine.int4
    import load_medusa_from_hf

    def no_compiler(*args, **kwargs):
        raise OSError("g++: not found")

    monkeypatch.setattr(cpp_extension, "load", no_compiler)
    with caplog.at_level(logging.WARNING, logger="medusa.engine"):
        assert native_extension.__wrapped__() is None  # the cached build aside
    assert "the int4 kernel could not be built (QUANTIZE=auto serves fp32 instead)" in caplog.text
    assert "g++: not found" in caplog.text
    unbuilt = native_extension.__wrapped__
    monkeypatch.setattr(engine.int4, "native_extension", unbuilt)
    monkeypatch.setattr(load_medusa_from_hf, "native_extension", unbuilt)
    gguf = ModelSource("/m", "m.gguf", (("Q4_1", 210), ("F32", 61), ("Q8_0", 1)))
    assert gguf.quantize_mode("auto", "cpu") == "none"
    with pytest.raises(ModelError, match="need the int4 kernel, which is built at first use with a C\\+\\+ compiler"):
        gguf.quantize_mode("gguf", "cpu")


def test_the_layers_benchmark_times_both_and_restores_the_c_layers(default_int4):
    model, _ = default_int4
    native = model.runner.native
    [row] = compare(model, shapes=[(8, 2, 3)], reps=1, inner=1)
    assert (row["L"], row["B"], row["T"]) == (8, 2, 3) and row["C++"] > 0 and row["Python"] > 0
    assert model.runner.native is native


def test_the_kernel_benchmark_times_both_kernels():
    [one, two] = int4_kernel.compare([1, 2], reps=1, layers=1)
    assert (one["rows"], two["rows"]) == (1, 2) and all(r["ours"] > 0 and r["aten"] > 0 for r in (one, two))


def test_batch_1_and_8_and_seeded_sampling_agree_on_the_default_model(default_int4):
    model, tokenizer = default_int4
    prompts = default_prompts(tokenizer)
    tree = heads_tree(str(DEFAULT_HEADS))
    for sampling in (SamplingParams(), SamplingParams(temperature=0.8, top_p=0.95, seed=7)):
        requests = [Request(str(i), p, max_new_tokens=20, ignore_eos=True, sampling=sampling)
                    for i, p in enumerate(prompts)]
        alone = [Engine(model, tokenizer, tree=ROOT, max_batch_size=1).generate([r])[0].tokens for r in requests]
        standard = Engine(model, tokenizer, tree=ROOT, max_batch_size=8).generate(requests)
        speculative = Engine(model, tokenizer, tree=tree, max_batch_size=8).generate(requests)
        assert [s.tokens for s in standard] == alone == [s.tokens for s in speculative], sampling
