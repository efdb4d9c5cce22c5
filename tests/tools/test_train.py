"""The Medusa-1 loss and the head trainer."""

from __future__ import annotations

import json

import pytest
import torch

from bench.compare_heads import main as compare_heads
from load_medusa_from_hf import load_medusa_model
from medusa_model import HeadsConfig, MedusaHeads, MedusaModel
from training.corpus import held_out_by_hash
from training.toy_model import stdlib_texts
from training.train_medusa import (
    IGNORE,
    MedusaTrainer,
    frequent_tokens,
    greedy_continuations,
    head_targets,
    main,
    medusa_loss,
)


def test_head_k_is_scored_against_the_token_two_plus_k_ahead():
    ids = torch.tensor([[5, 1, 7, 3, 0, 6, 2, 4]])
    perfect = torch.full((1, 8, 3, 8), -20.0)
    for t in range(8):
        for k in range(3):
            if t + 2 + k < 8:
                perfect[0, t, k, ids[0, t + 2 + k]] = 20.0
    loss, per_head = medusa_loss(perfect, head_targets(ids, 3))
    assert loss.item() < 1e-6 and max(per_head) < 1e-6
    shifted_loss, _ = medusa_loss(perfect.roll(1, dims=1), head_targets(ids, 3))  # each head one position late
    assert shifted_loss.item() > 10


def test_padding_is_not_scored():
    ids = torch.tensor([[1, 2, 3, 4, 0, 0]])
    valid = torch.tensor([[True, True, True, True, False, False]])
    logits = torch.zeros(1, 6, 1, 5)
    logits[0, 0, 0, 3] = logits[0, 1, 0, 4] = 30.0  # right at the valid positions only
    targets = head_targets(ids, 1, valid)
    assert targets[0, :, 0].tolist() == [3, 4, IGNORE, IGNORE, IGNORE, IGNORE]
    loss, _ = medusa_loss(logits, targets)
    assert loss.item() < 1e-6


@pytest.mark.parametrize("reads_root", [False, True], ids=["plain", "reading-the-root-token"])
def test_trainer_lowers_the_loss_and_reports_accuracy(toy, prompts, reads_root):
    model, _ = toy
    cfg = model.config
    fresh = MedusaHeads(HeadsConfig(2, reads_root_token=reads_root), cfg.hidden_size, cfg.vocab_size)
    fresh.init_lm_heads(model.lm_head)
    student = MedusaModel(model.model, fresh)
    data = torch.tensor([s[:40] for s in greedy_continuations(model.model, [p[:3] for p in prompts], 37)])
    trainer = MedusaTrainer(student, total_steps=40, lr=1e-2)
    first = trainer.step(data)
    for _ in range(39):
        last = trainer.step(data)
    assert all(b < a / 2 for a, b in zip(first, last))
    top1, top5 = trainer.accuracy(data, k=1), trainer.accuracy(data, k=5)
    assert len(top1) == 2 and all(0.5 < a <= b <= 1 for a, b in zip(top1, top5))
    assert not any(p.requires_grad for p in model.model.parameters())  # the base stays frozen
    if reads_root:  # the root projection learned something (it starts at zero)
        assert fresh.root.abs().sum() > 0


def test_command_line_trains_heads_the_loader_reads(toy, tmp_path):
    model, tokenizer = toy
    model.model.save_pretrained(tmp_path / "base")
    tokenizer.save_pretrained(tmp_path / "base")
    docs = tmp_path / "docs"
    docs.mkdir()
    for i, text in enumerate(stdlib_texts(30)):
        (docs / f"doc{i}.py").write_text(text)
    assert any(held_out_by_hash(f"doc{i}.py", 10) for i in range(30))
    argv = ["--model", str(tmp_path / "base"), "--out", str(tmp_path / "heads"), "--data", str(docs),
            "--held-out-percent", "10", "--heads", "2", "--shared-lm-head", "--self-distill", "--sequences", "32",
            "--eval-sequences", "8", "--seq-len", "32", "--prompt-tokens", "8", "--steps", "30", "--batch", "128",
            "--lr", "1e-2", "--warmup", "0", "--device", "cpu"]
    main(argv)
    report = json.loads((tmp_path / "heads" / "training.json").read_text())
    assert all(last < first for first, last in zip(report["first_loss"], report["last_loss"]))
    assert all(0 <= a <= b <= 1 for a, b in zip(report["held_out"]["top1"], report["held_out"]["top5"]))
    served, _ = load_medusa_model(str(tmp_path / "base"), str(tmp_path / "heads"), deepspeed=False)
    assert served.num_heads == 2 and served.heads.config.shares_lm_head


def test_heads_over_a_truncated_vocabulary_train_and_propose_token_ids(toy, prompts):
    """The heads' projection keeps the rows of the most frequent target tokens; targets outside it
    are not scored; proposals come back as token ids."""
    model, _ = toy
    cfg = model.config
    data = torch.tensor([s[:40] for s in greedy_continuations(model.model, [p[:3] for p in prompts], 37)])
    targets = head_targets(data, 2)
    token_map = frequent_tokens(targets, 24, always=[0])
    assert len(token_map) == 24 and 0 in token_map.tolist() and token_map.tolist() == sorted(token_map.tolist())
    heads = MedusaHeads(HeadsConfig(2, shares_lm_head=True, truncated_vocab_size=24), cfg.hidden_size, cfg.vocab_size)
    heads.init_lm_heads(model.lm_head, token_map)
    student = MedusaModel(model.model, heads)
    assert student.head_logits(torch.zeros(3, cfg.hidden_size)).shape == (3, 2, 24)
    trainer = MedusaTrainer(student, total_steps=40, lr=1e-2)
    outside = ~torch.isin(targets, token_map) & (targets != IGNORE)
    assert (trainer.rows(targets)[outside] == IGNORE).all()
    first = trainer.step(data)
    for _ in range(39):
        last = trainer.step(data)
    assert all(b < a for a, b in zip(first, last))
    proposed = student.head_topk(trainer.hidden(data), 3)  # [N, T, 2, 3] token ids
    assert torch.isin(proposed, token_map).all()
    assert all(0.3 < a for a in trainer.accuracy(data, k=3))


def test_command_line_trains_on_distilled_chat_answers(toy, tmp_path):
    """The rows training/distill.py writes: prompt + answer, scored from the prompt's last token, split
    by its held_out field; with a truncated vocabulary that the loader reads back."""
    model, tokenizer = toy
    model.model.save_pretrained(tmp_path / "base")
    tokenizer.save_pretrained(tmp_path / "base")
    continuations = greedy_continuations(model.model, [[1, 40 + i, 50 + i] for i in range(12)], 29)
    rows = [{"held_out": i % 4 == 0, "prompt_ids": c[:3], "answer_ids": c[3:]} for i, c in enumerate(continuations)]
    (tmp_path / "answers.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    argv = ["--model", str(tmp_path / "base"), "--out", str(tmp_path / "heads"), "--distilled",
            str(tmp_path / "answers.jsonl"), "--heads", "2", "--shared-lm-head", "--truncated-vocab", "32",
            "--steps", "20", "--batch", "64", "--lr", "1e-2", "--warmup", "0", "--device", "cpu", "--root-token",
            "--positions-cache", str(tmp_path / "positions.pt")]
    main(argv)
    main(argv)  # the second run reads the hidden states, targets and root tokens back from the cache
    report = json.loads((tmp_path / "heads" / "training.json").read_text())
    per_row = 32 - 2 - 2  # from the prompt's last token (2) to the last with a target for head 0
    assert report["positions"] == {"train": 9 * per_row, "held_out": 3 * per_row}
    assert 0 < report["truncated_vocab_coverage"] <= 1
    served, _ = load_medusa_model(str(tmp_path / "base"), str(tmp_path / "heads"), deepspeed=False)
    assert served.heads.config.truncated_vocab_size == 32 and len(served.heads.token_map) == 32
    assert served.heads.config.reads_root_token and served.heads.root.abs().sum() > 0
    too_many = argv[: argv.index("--truncated-vocab") + 1] + ["100000"] + argv[argv.index("--truncated-vocab") + 2 :]
    with pytest.raises(SystemExit, match="hold only [0-9]+ distinct tokens"):
        main(too_many)
    compare_heads(["--model", str(tmp_path / "base"), "--heads", str(tmp_path / "heads"), "--distilled",
                   str(tmp_path / "answers.jsonl"), "--quantize", "none", "--against", f"again={tmp_path / 'heads'}"])
    first, again = json.loads((tmp_path / "heads" / "heads_comparison.json").read_text())["heads"]
    assert first["positions"] == 3 * (per_row - 1)  # scored while every head has a target
    assert first["top1"] == again["top1"]
    expected = list(first["tokens_per_step"].values())
    assert expected == list(again["tokens_per_step"].values()) and all(1 <= e <= 3 for e in expected)  # 2 heads
