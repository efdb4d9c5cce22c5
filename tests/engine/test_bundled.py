"""The bundled model: its files, loading it offline as users do, an exact-text golden answer, and
speculative == standard == Hugging Face greedy on it."""

from __future__ import annotations

import json

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

from config.settings import SMALL_MODEL
from engine.decode import Engine
from engine.messages import Request
from engine.tree import ROOT
from load_medusa_from_hf import heads_tree, inspect_heads, resolve_folder

HEADS = SMALL_MODEL / "medusa"
GOLDEN_PROMPT = "def read_config(path):"
GOLDEN_TEXT = (  # the engine's greedy answer, 48 tokens, recorded once when the model was built
    '\n    """\n    This function is a read-only config file with the given path.\n    """\n    path = path.split(".")[0]'
    '\n    if path.endswith("."):\n        return path\n    return path\n\n\ndef'
)


def test_files_fit_the_repository_limits():
    files = [f for f in SMALL_MODEL.rglob("*") if f.is_file()]
    assert max(f.stat().st_size for f in files) <= 15 * 2**20
    assert sum(f.stat().st_size for f in files) <= 40 * 2**20
    assert (SMALL_MODEL / "README.md").exists()  # the model card


def test_loads_offline_with_the_auto_classes():
    model = AutoModelForCausalLM.from_pretrained(SMALL_MODEL)
    tokenizer = AutoTokenizer.from_pretrained(SMALL_MODEL)
    assert isinstance(model, LlamaForCausalLM)
    assert tokenizer("x")["input_ids"][0] == tokenizer.bos_token_id == model.config.bos_token_id
    info, _ = inspect_heads(resolve_folder(str(HEADS)))
    assert info.config.num_heads == 4 and info.config.shares_lm_head
    tree = heads_tree(str(HEADS))
    assert tree is not None and 1 < tree.num_nodes <= 64 and tree.depth <= 4
    report = json.loads((HEADS / "training.json").read_text())
    assert len(report["held_out"]["top1"]) == 4


def generate(bundled, prompts: list[list[int]], tree, max_new_tokens=64, batch=1):
    model, tokenizer = bundled
    engine = Engine(model, tokenizer, tree=tree, max_batch_size=batch)
    return engine.generate([Request(str(i), p, max_new_tokens=max_new_tokens) for i, p in enumerate(prompts)])


def test_golden_text(bundled):
    _, tokenizer = bundled
    [seq] = generate(bundled, [tokenizer(GOLDEN_PROMPT)["input_ids"]], heads_tree(str(HEADS)), 48)
    assert tokenizer.decode(seq.tokens) == GOLDEN_TEXT


def test_speculative_equals_standard_equals_hf(bundled):
    model, tokenizer = bundled
    prompts = [tokenizer(p)["input_ids"] for p in [GOLDEN_PROMPT, "import numpy as np", "class Node:\n    def __init__(self):"]]
    spec = generate(bundled, prompts, heads_tree(str(HEADS)), batch=3)
    std = generate(bundled, prompts, ROOT, batch=3)
    assert [s.tokens for s in spec] == [s.tokens for s in std]
    for prompt, seq in zip(prompts, std):
        ids = torch.tensor([prompt])
        ref = model.model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=64,
                                   pad_token_id=tokenizer.pad_token_id)[0, len(prompt):].tolist()
        eos = tokenizer.eos_token_id
        assert seq.tokens == (ref[: ref.index(eos)] if eos in ref else ref)
    assert sum(s.decode_tokens for s in spec) / sum(s.decode_steps for s in spec) > 1.5
