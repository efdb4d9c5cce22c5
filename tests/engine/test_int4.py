"""QUANTIZE: int4 weights through PyTorch's int4 CPU kernel, either the GGUF file's own blocks
(`gguf`, the default model's default) or a float model quantised at load (`int4`). The blocks are the
file's weights; each kernel gives a row the same bits whatever rows are beside it; and greedy
speculative == standard == Hugging Face generate() on the same int4 weights, at batch 1 and 8, with
seeded sampling equal too."""

from __future__ import annotations

import contextlib
import copy
import functools
import logging

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, quants

from bench.int4_layers import compare
from config.settings import DEFAULT_HEADS, DEFAULT_MODEL
from engine.decode import Engine
from engine.int4 import (
    GROUP,
    KERNEL_DTYPE,
    TREE_ATTENTION_ROWS,
    Int4Error,
    Int4Linear,
    Int4Llama,
    blocks_of,
    file_blocks,
    native_extension,
    quantize,
)
from engine.kv_cache import KVCache, step_mask
from engine.messages import Request, SamplingParams
from engine.tree import ROOT, preset
from load_medusa_from_hf import ModelError, ModelSource, heads_tree, int4_model, load_medusa_model

QUESTIONS = ["What is the capital of France?", "Write a Python function that reverses a string.",
             "Give me three tips for better sleep.", "Explain photosynthesis in simple terms.",
             "List four uses of a paperclip.", "Rewrite this more politely: send me the report now.",
             "What is 17 times 3?", "Compare cats and dogs as pets."]


def reconstructed(parts, dtype=np.float32) -> np.ndarray:
    """The weight the kernel computes with: sum over parts of (q - 8) s + z, s and z in bf16 as it keeps them."""
    def kept(a):
        return np.repeat(torch.from_numpy(a).to(KERNEL_DTYPE).float().numpy(), GROUP, axis=1)

    return sum((p.q.astype(np.int32) - 8) * kept(p.scales) + kept(p.zeros) for p in parts)


@pytest.mark.parametrize("kind", ["Q4_0", "Q4_1", "Q8_0"])
def test_the_blocks_are_the_files_weights(kind):
    """The nibbles are the file's; only the fp16 scales (and Q4_1's m + 8 d) are rounded, to bf16."""
    w = np.random.default_rng(0).standard_normal((64, 128)).astype(np.float32)
    qtype = GGMLQuantizationType[kind]
    data = quants.quantize(w, qtype)
    exact = quants.dequantize(data, qtype)
    parts = file_blocks(kind, data, 64)
    unrounded = sum((p.q.astype(np.int32) - 8) * np.repeat(p.scales, GROUP, axis=1) + np.repeat(p.zeros, GROUP, axis=1)
                    for p in parts)
    np.testing.assert_allclose(unrounded, exact, rtol=0, atol=1e-6 * np.abs(exact).max())  # the blocks as read
    ours = reconstructed(parts)
    bound = sum(np.abs(p.q.astype(np.int32) - 8) * np.repeat(np.abs(p.scales), GROUP, axis=1) + np.repeat(np.abs(p.zeros), GROUP, axis=1)
                for p in parts) * 2**-8  # bf16 keeps 8 bits: half a step is 2^-9 of each scale and zero
    assert np.all(np.abs(ours - exact) <= bound + 1e-6)
    x = torch.randn(5, 128)
    expected = x.to(KERNEL_DTYPE).float() @ torch.from_numpy(ours).float().T  # the kernel takes bf16 activations
    torch.testing.assert_close(Int4Linear(parts)(x), expected, rtol=1e-2, atol=2e-2)


def test_quantising_a_float_weight_stays_within_half_a_step():
    w = torch.randn(48, 96)
    b = quantize(w)
    step = np.repeat(b.scales, GROUP, axis=1)
    assert b.q.min() >= 0 and b.q.max() <= 15
    assert np.all(np.abs(reconstructed([b]) - w.numpy()) <= 0.5 * step + 1e-5)


@pytest.mark.parametrize("parts", ["one", "two halves (Q8_0)"])
def test_a_rows_result_does_not_depend_on_the_rows_beside_it(parts):
    """At the row counts the engine sends (batch x tokens verified, up to 16 x 64), bitwise."""
    torch.manual_seed(0)
    if parts == "one":
        linear = Int4Linear([quantize(torch.randn(192, 576))])
    else:
        data = quants.quantize(np.random.default_rng(1).standard_normal((192, 576)).astype(np.float32),
                               GGMLQuantizationType.Q8_0)
        linear = Int4Linear(file_blocks("Q8_0", data, 192))
    x = torch.randn(1024, 576)
    alone = torch.cat([linear(x[i : i + 1]) for i in range(len(x))])
    for rows in (2, 3, 4, 5, 8, 16, 17, 64, 80, 1024):
        assert torch.equal(linear(x[:rows]), alone[:rows]), rows


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
    assert isinstance(model.runner, Int4Llama) and "quantised at load to int4" in model.weights
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
    RoPE round differently, and bf16 projections let such bits grow)."""
    model, tokenizer = default_int4
    assert model.weights == ("GGUF SmolLM2-135M-Instruct.Q4_1.gguf (Q4_1 x210, F32 x61, Q8_0 x1): its own 4-bit "
                             "blocks in PyTorch's int4 CPU kernel, embeddings and norms in float32; its decoder "
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
        assert (hf.argmax(-1) == ours.argmax(-1)).float().mean() >= 0.9 and (hf - ours).abs().max() < 1.0
    assert sum(s.decode_tokens for s in speculative) > sum(s.decode_steps for s in speculative)
    assert tokenizer.decode(standard[0].tokens, skip_special_tokens=True) == "The capital of France is Paris."


def tree_step(kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(tree mask [T, T], depths [T]) for each attention branch: one token per sequence (SDPA), a
    root with two children (matmuls), and a chain longer than TREE_ATTENTION_ROWS (SDPA again)."""
    if kind == "tree":
        return torch.tensor([[1, 0, 0], [1, 1, 0], [1, 0, 1]], dtype=torch.bool), torch.tensor([0, 1, 1])
    t = 1 if kind == "one token" else TREE_ATTENTION_ROWS + 6
    return torch.tril(torch.ones(t, t, dtype=torch.bool)), torch.arange(t)


@pytest.mark.parametrize("kind", ["one token", "tree", "long chain"])
def test_the_c_layers_give_the_python_layers_bits(default_int4, kind):
    """int4_layers.cpp makes Int4Layer.forward's ATen calls in C++: the same logits and the same cache,
    bit for bit, for a step of two sequences with different cached lengths, in slots 1 and 2 of three,
    through each branch of attention()."""
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


def test_without_a_compiler_the_python_layers_run_and_the_log_says_so(monkeypatch, caplog):
    from torch.utils import cpp_extension

    def no_compiler(*args, **kwargs):
        raise OSError("g++: not found")

    monkeypatch.setattr(cpp_extension, "load", no_compiler)
    with caplog.at_level(logging.WARNING, logger="medusa.engine"):
        assert native_extension.__wrapped__() is None  # the cached build aside
    assert "the int4 layers run in Python (slower)" in caplog.text and "g++: not found" in caplog.text


def test_the_layers_benchmark_times_both_and_restores_the_c_layers(default_int4):
    model, _ = default_int4
    native = model.runner.native
    [row] = compare(model, shapes=[(8, 2, 3)], reps=1, inner=1)
    assert (row["L"], row["B"], row["T"]) == (8, 2, 3) and row["C++"] > 0 and row["Python"] > 0
    assert model.runner.native is native


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
