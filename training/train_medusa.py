"""Training Medusa heads on a frozen base model (Medusa-1 recipe).

Loss = sum over heads of 0.8^k * CE(head k's logits at t, token t+2+k); AdamW with a cosine
schedule. Self-distillation trains on the base model's own greedy continuations, which is exactly
what greedy verification accepts.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import random
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm
from transformers import PreTrainedModel

from load_medusa_from_hf import load_medusa_model, save_medusa_heads
from medusa_model import HeadsConfig, MedusaHeads, MedusaModel
from training.corpus import collect, held_out_by_hash, source_roots, split

HEAD_DECAY = 0.8
IGNORE = -100  # a position a head has no target at (cross_entropy's ignore_index)


def head_targets(input_ids: torch.Tensor, num_heads: int, valid: torch.Tensor | None = None) -> torch.Tensor:
    """input_ids [B, T], valid [B, T] bool -> [B, T, K]: head k's target at t, token t+2+k, where both
    t and t+2+k are valid; IGNORE elsewhere."""
    valid = torch.ones_like(input_ids, dtype=torch.bool) if valid is None else valid
    targets = torch.full((*input_ids.shape, num_heads), IGNORE, dtype=torch.long, device=input_ids.device)
    for k in range(num_heads):
        shift = k + 2
        keep = valid[:, shift:] & valid[:, :-shift]
        targets[:, :-shift, k] = torch.where(keep, input_ids[:, shift:], IGNORE)
    return targets


def root_tokens(input_ids: torch.Tensor) -> torch.Tensor:
    """input_ids [B, T] -> [B, T]: the token t+1 at each t (what heads reading the root token take;
    0 at the last position, which has no head targets)."""
    return torch.cat([input_ids[:, 1:], input_ids.new_zeros(input_ids.shape[0], 1)], dim=1)


def medusa_loss(head_logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, list[float]]:
    """head_logits [..., K, V'], targets [..., K] (rows of the heads' vocabulary, IGNORE: none) ->
    (sum over heads of 0.8^k CE, each head's CE)."""
    total, per_head = head_logits.new_zeros(()), []
    for k in range(head_logits.shape[-2]):
        ce = F.cross_entropy(head_logits[..., k, :].reshape(-1, head_logits.shape[-1]), targets[..., k].reshape(-1),
                             ignore_index=IGNORE)
        total = total + HEAD_DECAY**k * ce
        per_head.append(ce.item())
    return total, per_head


@torch.no_grad()
def greedy_continuations(
    model: PreTrainedModel, prompts: list[list[int]], max_new_tokens: int, batch_size: int = 64, pad_id: int = 0
) -> list[list[int]]:
    """Prompt + the base model's greedy continuation for each prompt (self-distillation data).
    Prompts are left-padded into batches; the padding is removed from the result."""
    out = []
    for i in range(0, len(prompts), batch_size):
        chunk = prompts[i : i + batch_size]
        width = max(len(p) for p in chunk)
        ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in chunk], device=model.device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in chunk], device=model.device)
        seqs = model.generate(
            ids,
            attention_mask=mask,
            do_sample=False,
            max_new_tokens=max_new_tokens,
            min_new_tokens=max_new_tokens,
            pad_token_id=pad_id,
        )
        out += [seq[width - len(p) :].tolist() for p, seq in zip(chunk, seqs)]
    return out


class MedusaTrainer:
    """Trains `model.heads`; the base model stays frozen, so its hidden states can be computed once
    (hidden, positions) and the heads trained on them for many epochs (fit)."""

    def __init__(self, model: MedusaModel, total_steps: int, lr: float = 1e-3, warmup_steps: int = 0):
        self.model = model
        model.model.requires_grad_(False)
        params = [p for p in model.heads.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)

        def schedule(step: int) -> float:
            if step < warmup_steps:
                return (step + 1) / warmup_steps
            progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
            return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, schedule)

    @torch.no_grad()
    def hidden(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """The base model's last hidden states [B, T, H] (after the final norm: what the heads read)."""
        return self.model.forward(input_ids, attention_mask=attention_mask, logits_to_keep=1)[1]

    def step(self, input_ids: torch.Tensor, valid: torch.Tensor | None = None) -> list[float]:
        """One optimiser step on sequences [B, T], scoring the `valid` [B, T] positions (default: all)."""
        return self.fit(self.hidden(input_ids), head_targets(input_ids, self.model.num_heads, valid),
                        root_tokens(input_ids))

    def fit(self, hidden: torch.Tensor, targets: torch.Tensor, roots: torch.Tensor | None = None) -> list[float]:
        """One optimiser step from hidden states [..., H], their targets [..., K] (token ids, IGNORE:
        none) and their root tokens [...] (token t+1). Returns each head's CE."""
        self.model.heads.train()
        loss, per_head = medusa_loss(self.model.head_logits(hidden, roots), self.rows(targets))
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.scheduler.step()
        self.model.heads.eval()
        return per_head

    def rows(self, targets: torch.Tensor) -> torch.Tensor:
        """Token ids -> rows of the heads' (maybe truncated) vocabulary; IGNORE stays, and so does a
        token outside the vocabulary (the heads cannot propose it)."""
        rows = self.model.heads.rows_of(targets.clamp(min=0), missing=IGNORE)
        return torch.where(targets == IGNORE, IGNORE, rows)

    @torch.no_grad()
    def accuracy(self, input_ids: torch.Tensor, k: int = 1, valid: torch.Tensor | None = None) -> list[float]:
        """Each head's top-k accuracy at predicting token t+2+head on `input_ids` [B, T], over the
        positions where both t and t+2+head are `valid` [B, T] (default: all)."""
        return self.position_accuracy(self.hidden(input_ids), head_targets(input_ids, self.model.num_heads, valid), k,
                                      root_tokens(input_ids))

    @torch.no_grad()
    def position_accuracy(self, hidden: torch.Tensor, targets: torch.Tensor, k: int = 1,
                          roots: torch.Tensor | None = None) -> list[float]:
        """Each head's top-k accuracy over hidden states [..., H], targets [..., K] (IGNORE: skipped)
        and root tokens [...]."""
        top = self.model.head_topk(hidden, k, roots)  # [..., K, k] token ids
        hit = (top == targets[..., None]).any(-1)  # [..., K]
        scored = targets != IGNORE
        return [hit[..., h][scored[..., h]].float().mean().item() for h in range(targets.shape[-1])]


def positions(trainer: MedusaTrainer, rows: list[list[int]], starts: list[int], batch: int = 16
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The training positions of token sequences: row i is scored from position starts[i] on (where
    its continuation begins). Returns (hidden [N, H], targets [N, K] token ids, root tokens [N]): the
    base model runs once over the rows, right-padded in batches of similar lengths."""
    K, device = trainer.model.num_heads, trainer.model.device
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]))
    hidden, targets, roots = [], [], []
    for i in range(0, len(order), batch):
        chunk = [rows[j] for j in order[i : i + batch]]
        width = max(map(len, chunk))
        ids = torch.tensor([r + [0] * (width - len(r)) for r in chunk], device=device)
        lengths = torch.tensor([len(r) for r in chunk], device=device)
        arange = torch.arange(width, device=device)
        valid = arange < lengths[:, None]
        valid &= arange >= torch.tensor([starts[j] for j in order[i : i + batch]], device=device)[:, None]
        h = trainer.hidden(ids, attention_mask=(arange < lengths[:, None]).long())
        t = head_targets(ids, K, valid)
        keep = valid & (t[..., 0] != IGNORE)  # positions with at least head 0's target
        hidden.append(h[keep].float().cpu())
        targets.append(t[keep].cpu())
        roots.append(root_tokens(ids)[keep].cpu())
    return torch.cat(hidden), torch.cat(targets), torch.cat(roots)


def fit_positions(trainer: MedusaTrainer, hidden: torch.Tensor, targets: torch.Tensor, roots: torch.Tensor,
                  steps: int, batch: int, seed: int) -> list[list[float]]:
    """`steps` optimiser steps on random batches of positions; each step's per-head CE."""
    g = torch.Generator().manual_seed(seed)
    device, dtype = trainer.model.device, trainer.model.dtype
    losses, bar = [], tqdm(range(steps), desc="heads", mininterval=30)
    for _ in bar:
        pick = torch.randint(0, len(hidden), (batch,), generator=g)
        losses.append(trainer.fit(hidden[pick].to(device, dtype), targets[pick].to(device), roots[pick].to(device)))
        bar.set_postfix(ce=" ".join(f"{c:.2f}" for c in losses[-1]), refresh=False)
    return losses


def frequent_tokens(targets: torch.Tensor, size: int, always: list[int]) -> torch.Tensor:
    """The `size` most frequent target tokens (and `always`), sorted by id: a truncated vocabulary."""
    counts = torch.bincount(targets[targets != IGNORE].flatten())
    counts[always] = counts.max() + 1
    return counts.topk(min(size, int((counts > 0).sum()))).indices.sort().values


# ----------------------------------------------------------------------------- command line

DOC_SUFFIXES = (".py", ".txt", ".md", ".rst")


def read_documents(paths: list[str], held_out_percent: float) -> tuple[list[str], list[str]]:
    """(train, held-out) texts from files and folders (their *.py, *.txt, *.md, *.rst, recursively)."""
    train, held = [], []
    for root in map(Path, paths):
        files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.suffix in DOC_SUFFIXES)
        for file in files:
            text = file.read_text(encoding="utf-8", errors="replace")
            name = file.relative_to(root).as_posix() if root.is_dir() else file.name
            (held if held_out_by_hash(name, held_out_percent) else train).append(text)
    if not train or not held:
        raise SystemExit(f"need documents on both sides of the split: {len(train)} train, {len(held)} held out")
    return train, held


def windows(tokenizer, texts: list[str], count: int, length: int, seed: int) -> torch.Tensor:
    """`count` windows [count, length] of token ids, each BOS then the text from the start of a
    random line (documents drawn in proportion to their length; only the drawn text is tokenised)."""
    rng = random.Random(seed)
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    need, rows, cumulative = length - len(bos), [], list(itertools.accumulate(len(t) for t in texts))
    while len(rows) < count:
        text = rng.choices(texts, cum_weights=cumulative)[0]
        start = text.rfind("\n", 0, rng.randrange(len(text))) + 1
        ids = tokenizer(text[start : start + 16 * need], add_special_tokens=False)["input_ids"][:need]
        if len(ids) == need:
            rows.append(bos + ids)
    return torch.tensor(rows)


def build_data(model, tokenizer, texts: list[str], args, count: int, seed: int) -> tuple[list[list[int]], list[int]]:
    """Training or evaluation rows of token ids, and where each is scored from. With
    self-distillation: a short prompt from the text, then the base model's greedy continuation, and
    only the continuation is scored."""
    if not args.self_distill:
        return windows(tokenizer, texts, count, args.seq_len, seed).tolist(), [0] * count
    prompts = windows(tokenizer, texts, count, args.prompt_tokens, seed).tolist()
    new = args.seq_len - args.prompt_tokens
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    rows = greedy_continuations(model, prompts, new, batch_size=args.generate_batch, pad_id=pad)
    return rows, [args.prompt_tokens - 1] * count


def distilled(file: Path, held_out: bool) -> tuple[list[list[int]], list[int]]:
    """The rows of a training/distill.py file on one side of its split: prompt + greedy answer, scored
    from the prompt's last token (whose hidden state the heads read for the answer's second token)."""
    rows = [json.loads(line) for line in file.read_text().splitlines() if line.strip()]
    rows = [r for r in rows if r["held_out"] == held_out and r["answer_ids"]]
    return [r["prompt_ids"] + r["answer_ids"] for r in rows], [len(r["prompt_ids"]) - 1 for r in rows]


def evaluate(trainer: MedusaTrainer, hidden: torch.Tensor, targets: torch.Tensor, roots: torch.Tensor,
             batch: int = 4096) -> dict:
    """Each head's top-1 and top-5 accuracy over held-out positions."""
    out = {}
    for k in (1, 5):
        hits = [0.0] * targets.shape[1]
        for i in range(0, len(hidden), batch):
            h = hidden[i : i + batch].to(trainer.model.device, trainer.model.dtype)
            t = targets[i : i + batch].to(trainer.model.device)
            r = roots[i : i + batch].to(trainer.model.device)
            scored = (t != IGNORE).sum(0).tolist()
            hits = [a + acc * n for a, acc, n in zip(hits, trainer.position_accuracy(h, t, k, r), scored)]
        out[f"top{k}"] = [round(a / n, 4) for a, n in zip(hits, (targets != IGNORE).sum(0).tolist())]
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Train Medusa heads on a frozen causal LM (Medusa-1 recipe).")
    parser.add_argument("--model", required=True, help="the base model: a folder, Hub id or GGUF file (as MODEL_NAME)")
    parser.add_argument("--out", type=Path, required=True, help="folder for the heads (FasterDecoding layout)")
    parser.add_argument("--data", nargs="+", help="text files or folders")
    parser.add_argument("--python-sources", nargs="?", const="installed", metavar="FOLDER",
                        help="train on the installed Python sources (or a packed corpus unpacked in FOLDER), "
                             "split as the bundled model's corpus")
    parser.add_argument("--distilled", type=Path, help="a training/distill.py file: chat prompts and greedy answers")
    parser.add_argument("--held-out-percent", type=float, default=2.0)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--layers", type=int, default=1, help="residual blocks per head")
    parser.add_argument("--shared-lm-head", action="store_true", help='"version 2": heads reuse the base lm_head')
    parser.add_argument("--truncated-vocab", type=int, help="heads draft over the N most frequent target tokens")
    parser.add_argument("--root-token", action="store_true", help="heads also read the root token (t+1)")
    parser.add_argument("--quantize", default="none", choices=["auto", "gguf", "int4", "none"],
                        help="the base weights whose hidden states the heads learn (as QUANTIZE)")
    parser.add_argument("--self-distill", action="store_true", help="train on the base model's greedy continuations")
    parser.add_argument("--sequences", type=int, default=2048, help="training sequences")
    parser.add_argument("--eval-sequences", type=int, default=128)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--prompt-tokens", type=int, default=16, help="with --self-distill: prompt length")
    parser.add_argument("--generate-batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--batch", type=int, default=1024, help="positions per optimiser step")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--warmup", type=int, default=50)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--positions-cache", type=Path, help="keep the base model's hidden states of the data in "
                        "this file (read back if it exists: the same data, heads and model)")
    args = parser.parse_args(argv)
    if sum(map(bool, (args.data, args.python_sources, args.distilled))) != 1:
        parser.error("give exactly one of --data, --python-sources and --distilled")

    start = time.perf_counter()
    torch.manual_seed(args.seed)
    model, tokenizer = load_medusa_model(args.model, device=args.device, dtype=getattr(torch, args.dtype),
                                         deepspeed=False, quantize=args.quantize)
    cfg = model.config
    config = HeadsConfig(args.heads, args.layers, args.shared_lm_head, args.truncated_vocab, args.root_token)
    model.heads = MedusaHeads(config, cfg.hidden_size, cfg.vocab_size).to(args.device, model.dtype)
    trainer = MedusaTrainer(model, total_steps=args.steps, lr=args.lr, warmup_steps=args.warmup)
    if args.positions_cache and args.positions_cache.exists():  # the base is frozen: its hidden states keep
        (hidden, targets, roots), held = torch.load(args.positions_cache)
    else:
        train_rows, held_rows = rows_of(args, model, tokenizer)
        hidden, targets, roots = positions(trainer, *train_rows)
        held = positions(trainer, *held_rows)
        if args.positions_cache:
            args.positions_cache.parent.mkdir(parents=True, exist_ok=True)
            torch.save(((hidden, targets, roots), held), args.positions_cache)
    token_map = None
    if args.truncated_vocab:
        eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
        token_map = frequent_tokens(targets, args.truncated_vocab, eos)
        if len(token_map) < args.truncated_vocab:
            raise SystemExit(f"--truncated-vocab {args.truncated_vocab}: the training targets hold only "
                             f"{len(token_map)} distinct tokens; ask for at most that many")
    model.heads.init_lm_heads(model.lm_head, token_map)
    losses = fit_positions(trainer, hidden, targets, roots, args.steps, args.batch, args.seed)
    report = {
        "base_model": args.model,
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "positions": {"train": len(hidden), "held_out": len(held[0])},
        "first_loss": losses[0],
        "last_loss": [round(sum(col) / len(col), 4) for col in zip(*losses[-20:])],
        "held_out": evaluate(trainer, *held),
        "seconds": round(time.perf_counter() - start),
        "hardware": f"{args.device}, {torch.get_num_threads()} CPU threads, torch {torch.__version__}",
    }
    if token_map is not None:
        covered = torch.isin(targets[targets != IGNORE], token_map).float().mean().item()
        report["truncated_vocab_coverage"] = round(covered, 4)  # of the training targets
    save_medusa_heads(model.heads, args.out, base_model=args.model)
    (args.out / "training.json").write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps({k: report[k] for k in ("positions", "last_loss", "held_out", "seconds")}))


def rows_of(args, model: MedusaModel, tokenizer) -> tuple[tuple[list[list[int]], list[int]], ...]:
    """(train, held-out) rows and where each is scored from: --distilled's, or from --python-sources'
    or --data's texts."""
    if args.distilled:
        return distilled(args.distilled, False), distilled(args.distilled, True)
    if args.python_sources:

        folder = None if args.python_sources == "installed" else Path(args.python_sources)
        train_docs, held_docs = ([f.text for f in part] for part in split(collect(source_roots(folder))))
    else:
        train_docs, held_docs = read_documents(args.data, args.held_out_percent)
    return (build_data(model.model, tokenizer, train_docs, args, args.sequences, args.seed),
            build_data(model.model, tokenizer, held_docs, args, args.eval_sequences, args.seed + 1))


if __name__ == "__main__":
    main()
