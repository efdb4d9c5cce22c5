"""bench/tune_tree.py predicts a tree's tokens per step from the heads' ranks on greedy
continuations; the engine, decoding the same prompts with that tree, must emit what it predicts."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from bench.tune_tree import joint_ranks, path_probability, tokens_per_step
from engine.decode import Engine
from engine.messages import Request
from engine.tree import preset
from medusa_model import MedusaHeads, MedusaModel
from training.toy_model import stdlib_texts
from training.train_medusa import greedy_continuations

PROMPT, NEW = 16, 96


def reading_the_root_token(model: MedusaModel) -> MedusaModel:
    """The model's heads, reading the root token through a random projection (so it changes their ranks)."""
    config = dataclasses.replace(model.heads.config, reads_root_token=True)
    heads = MedusaHeads(config, model.config.hidden_size, model.config.vocab_size)
    heads.load_state_dict(model.heads.state_dict(), strict=False)
    torch.manual_seed(0)
    heads.root.data.normal_(std=0.3 / model.config.hidden_size**0.5)
    return MedusaModel(model.model, heads.eval())


@pytest.mark.parametrize("reads_root", [False, True], ids=["plain", "reading-the-root-token"])
def test_predicted_tokens_per_step_is_what_the_engine_emits(toy, reads_root):
    model, tokenizer = toy
    model = reading_the_root_token(model) if reads_root else model
    ids = tokenizer(stdlib_texts(60)[-1])["input_ids"]
    prompts = [ids[:1] + ids[200 + 60 * i : 200 + 60 * i + PROMPT - 1] for i in range(8)]
    ranks = joint_ranks(model, greedy_continuations(model.model, prompts, NEW), [PROMPT - 1] * len(prompts))
    for name in ("chain3", "tree15"):
        tree = preset(name)
        engine = Engine(model, tokenizer, tree=tree, max_batch_size=8, eos_token_ids=[])
        # the engine's last steps run past the ranks' end (the heads' targets stop K tokens early)
        seqs = engine.generate([Request(str(i), p, max_new_tokens=NEW - 5) for i, p in enumerate(prompts)])
        measured = sum(s.decode_tokens for s in seqs) / sum(s.decode_steps for s in seqs)
        predicted = tokens_per_step(ranks, list(tree.paths))
        position_average = 1 + sum(path_probability(torch.cat(ranks), p) for p in tree.paths)
        print(f"{name}: engine {measured:.3f}, predicted {predicted:.3f}, average over positions {position_average:.3f}")
        assert abs(predicted - measured) < 0.03 * measured
        assert predicted < position_average
