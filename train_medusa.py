"""Training Medusa heads on a frozen base model (Medusa-1 recipe).

Loss = sum over heads of 0.8^k * CE(head k's logits at t, token t+2+k); AdamW with a cosine
schedule. Self-distillation trains on the base model's own greedy continuations, which is exactly
what greedy verification accepts.
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import math
import random
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from load_medusa_from_hf import save_medusa_heads
from medusa_model import HeadsConfig, MedusaHeads, MedusaModel

HEAD_DECAY = 0.8


def medusa_loss(head_logits: torch.Tensor, input_ids: torch.Tensor, valid: torch.Tensor | None = None):
    """head_logits [B, T, K, V], input_ids [B, T], valid [B, T] bool -> (loss, per-head CE list)."""
    valid = torch.ones_like(input_ids, dtype=torch.bool) if valid is None else valid
    total, per_head = head_logits.new_zeros(()), []
    for k in range(head_logits.shape[2]):
        shift = k + 2
        keep = valid[:, shift:] & valid[:, :-shift]
        ce = F.cross_entropy(head_logits[:, :-shift, k][keep], input_ids[:, shift:][keep])
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
    """Trains `model.heads`; the base model stays frozen."""

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

    def hidden(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        with torch.no_grad():
            return self.model.forward(input_ids, attention_mask=attention_mask, logits_to_keep=1)[1]

    def step(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, valid: torch.Tensor | None = None
    ) -> list[float]:
        """One optimiser step on a batch [B, T]; `valid` [B, T] marks the positions scored (default:
        the attention mask). Returns each head's CE."""
        if valid is None and attention_mask is not None:
            valid = attention_mask.bool()
        return self.fit(self.hidden(input_ids, attention_mask), input_ids, valid)

    def fit(self, hidden: torch.Tensor, input_ids: torch.Tensor, valid: torch.Tensor | None = None) -> list[float]:
        """One optimiser step from the base model's hidden states [B, T, H] (computed once when the
        same data is seen many times: the base is frozen)."""
        self.model.heads.train()
        loss, per_head = medusa_loss(self.model.head_logits(hidden), input_ids, valid)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.scheduler.step()
        self.model.heads.eval()
        return per_head

    @torch.no_grad()
    def accuracy(self, input_ids: torch.Tensor, k: int = 1, valid: torch.Tensor | None = None) -> list[float]:
        """Each head's top-k accuracy at predicting token t+2+head on `input_ids` [B, T], over the
        positions where both t and t+2+head are `valid` [B, T] (default: all)."""
        logits = self.model.head_logits(self.hidden(input_ids))  # [B, T, K, V]
        top = logits.topk(k, dim=-1).indices  # [B, T, K, k]
        valid = torch.ones_like(input_ids, dtype=torch.bool) if valid is None else valid
        acc = []
        for head in range(logits.shape[2]):
            shift = head + 2
            hit = (top[:, :-shift, head] == input_ids[:, shift:, None]).any(-1)
            acc.append(hit[valid[:, shift:] & valid[:, :-shift]].float().mean().item())
        return acc


# ----------------------------------------------------------------------------- command line

DOC_SUFFIXES = (".py", ".txt", ".md", ".rst")


def held_out_by_hash(name: str, percent: float) -> bool:
    """A document is held out when sha256(name) mod 100 < percent: stable across machines and runs."""
    digest = hashlib.sha256(name.encode()).digest()
    return int.from_bytes(digest[:8], "big") % 100 < percent


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


def build_data(model, tokenizer, texts: list[str], args, count: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Training or evaluation sequences [N, L] and the positions to score [N, L]. With
    self-distillation: a short prompt from the text, then the base model's greedy continuation, and
    only the continuation is scored."""
    if not args.self_distill:
        data = windows(tokenizer, texts, count, args.seq_len, seed)
        return data, torch.ones_like(data, dtype=torch.bool)
    prompts = windows(tokenizer, texts, count, args.prompt_tokens, seed).tolist()
    new = args.seq_len - args.prompt_tokens
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    data = torch.tensor(greedy_continuations(model, prompts, new, batch_size=args.generate_batch, pad_id=pad))
    valid = torch.arange(data.shape[1]) >= args.prompt_tokens - 1
    return data, valid.expand_as(data).clone()


def evaluate(trainer: MedusaTrainer, data: torch.Tensor, valid: torch.Tensor, batch: int) -> dict:
    """Each head's top-1 and top-5 accuracy over the scored positions."""
    hits = {1: [], 5: []}
    for i in range(0, len(data), batch):
        for k in hits:
            hits[k].append(trainer.accuracy(data[i : i + batch].to(trainer.model.device), k, valid[i : i + batch]))
    return {f"top{k}": [round(sum(col) / len(col), 4) for col in zip(*rows)] for k, rows in hits.items()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Train Medusa heads on a frozen causal LM (Medusa-1 recipe).")
    parser.add_argument("--model", required=True, help="Hugging Face folder or Hub id of the base model")
    parser.add_argument("--out", type=Path, required=True, help="folder for the heads (FasterDecoding layout)")
    parser.add_argument("--data", nargs="+", help="text files or folders")
    parser.add_argument("--python-sources", nargs="?", const="installed", metavar="FOLDER",
                        help="train on the installed Python sources (or a packed corpus unpacked in FOLDER), "
                             "split as the bundled model's corpus")
    parser.add_argument("--held-out-percent", type=float, default=2.0)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--layers", type=int, default=1, help="residual blocks per head")
    parser.add_argument("--shared-lm-head", action="store_true", help='"version 2": heads reuse the base lm_head')
    parser.add_argument("--self-distill", action="store_true", help="train on the base model's greedy continuations")
    parser.add_argument("--sequences", type=int, default=2048, help="training sequences")
    parser.add_argument("--eval-sequences", type=int, default=128)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--prompt-tokens", type=int, default=16, help="with --self-distill: prompt length")
    parser.add_argument("--generate-batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--warmup", type=int, default=50)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if bool(args.data) == bool(args.python_sources):
        parser.error("give exactly one of --data and --python-sources")

    start = time.perf_counter()
    torch.manual_seed(args.seed)
    dtype = getattr(torch, args.dtype)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    base = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype).to(args.device).eval()
    if args.python_sources:
        from scripts.corpus import collect, source_roots, split

        folder = None if args.python_sources == "installed" else Path(args.python_sources)
        train_docs, held_docs = ([f.text for f in part] for part in split(collect(source_roots(folder))))
    else:
        train_docs, held_docs = read_documents(args.data, args.held_out_percent)
    cfg = base.config
    heads = MedusaHeads(HeadsConfig(args.heads, args.layers, args.shared_lm_head), cfg.hidden_size, cfg.vocab_size)
    heads.init_lm_heads(base.get_output_embeddings())
    model = MedusaModel(base, heads.to(args.device, dtype))

    data, valid = build_data(base, tokenizer, train_docs, args, args.sequences, args.seed)
    test, test_valid = build_data(base, tokenizer, held_docs, args, args.eval_sequences, args.seed + 1)
    trainer = MedusaTrainer(model, total_steps=args.steps, lr=args.lr, warmup_steps=args.warmup)
    g = torch.Generator().manual_seed(args.seed)
    losses, bar = [], tqdm(range(args.steps), desc="heads")
    for _ in bar:
        pick = torch.randint(0, len(data), (args.batch,), generator=g)
        ce = trainer.step(data[pick].to(args.device), valid=valid[pick].to(args.device))
        losses.append(ce)
        bar.set_postfix(ce=" ".join(f"{c:.2f}" for c in ce), refresh=False)
    report = {
        "base_model": args.model,
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "first_loss": losses[0],
        "last_loss": [round(sum(col) / len(col), 4) for col in zip(*losses[-20:])],
        "held_out": evaluate(trainer, test, test_valid, args.batch),
        "seconds": round(time.perf_counter() - start),
        "hardware": f"{args.device}, {torch.get_num_threads()} CPU threads, torch {torch.__version__}",
    }
    save_medusa_heads(heads, args.out, base_model=args.model)
    (args.out / "training.json").write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps({k: report[k] for k in ("last_loss", "held_out", "seconds")}))


if __name__ == "__main__":
    main()
