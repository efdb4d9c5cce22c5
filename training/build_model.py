"""Build the bundled model from scratch: corpus -> tokenizer -> LlamaForCausalLM -> HF folder.

    python -m training.build_model --out models/pycoder-4m --minutes 90

Stages cache their output under --work (tokenizer, token arrays, checkpoints), so an interrupted run
resumes where it stopped. Heads are trained afterwards with training/train_medusa.py and the tree chosen with
bench/tune_tree.py. Every field of Shape and Schedule is a flag (--hidden-size 384, --batch 64);
bench/device_build.sh runs it on a GPU machine with this machine's corpus (packed by
training/corpus.py) and the shape of the bigger model.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from training.corpus import HELD_OUT_PERCENT, collect, encode, source_roots, split
from training.toy_model import train_tokenizer

TOKENIZER_SAMPLE_EVERY = 4  # the tokenizer learns its merges from every 4th training file


@dataclass(frozen=True)
class Shape:
    vocab_size: int = 4096
    hidden_size: int = 256
    intermediate_size: int = 688
    layers: int = 4
    heads: int = 4
    kv_heads: int = 4
    context: int = 512

    def config(self, tokenizer: PreTrainedTokenizerFast) -> LlamaConfig:
        return LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_hidden_layers=self.layers,
            num_attention_heads=self.heads,
            num_key_value_heads=self.kv_heads,
            max_position_embeddings=self.context,
            tie_word_embeddings=True,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )


@dataclass(frozen=True)
class Schedule:
    batch: int = 16
    seq_len: int = 256
    lr: float = 2e-3
    min_lr_ratio: float = 0.1
    warmup: int = 200
    weight_decay: float = 0.1
    eval_every: int = 250
    seed: int = 0

    def lr_at(self, step: int, total: int) -> float:
        if step < self.warmup:
            return self.lr * (step + 1) / self.warmup
        progress = min(1.0, (step - self.warmup) / max(1, total - self.warmup))
        return self.lr * (self.min_lr_ratio + (1 - self.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def prepare_data(work: Path, vocab_size: int, sources: Path | None = None, max_files: int | None = None) -> dict:
    """Tokenizer and the two token arrays, built once into `work` (from the first `max_files` training
    files and a few held-out ones only, for a smoke run)."""
    if (work / "corpus.json").exists():
        return json.loads((work / "corpus.json").read_text())
    train, held_out = split(collect(source_roots(sources)))
    if max_files:
        train, held_out = train[:max_files], held_out[: max(1, max_files // 10)]
    tokenizer = train_tokenizer([f.text for f in train[::TOKENIZER_SAMPLE_EVERY]], vocab_size)
    tokenizer.save_pretrained(work / "tokenizer")
    np.save(work / "train.npy", encode(tokenizer, train))
    np.save(work / "held_out.npy", encode(tokenizer, held_out))
    info = {
        "files": {"train": len(train), "held_out": len(held_out)},
        "chars": {"train": sum(len(f.text) for f in train), "held_out": sum(len(f.text) for f in held_out)},
        "tokens": {"train": int(np.load(work / "train.npy").size), "held_out": int(np.load(work / "held_out.npy").size)},
        "held_out_rule": f"sha256(root/path) mod 100 < {HELD_OUT_PERCENT}",
        "held_out_files": [f.name for f in held_out],
    }
    (work / "corpus.json").write_text(json.dumps(info, indent=1))
    return info


def windows(data: np.ndarray, starts: np.ndarray, seq_len: int) -> torch.Tensor:
    return torch.from_numpy(np.stack([data[s : s + seq_len] for s in starts]).astype(np.int64))


@torch.no_grad()
def held_out_loss(model: LlamaForCausalLM, data: np.ndarray, seq_len: int, count: int = 64) -> float:
    """Mean next-token loss (nats) over `count` evenly spaced held-out windows, in fp32."""
    model.eval()
    starts = np.linspace(0, len(data) - seq_len - 1, count).astype(np.int64)
    device = next(model.parameters()).device
    losses = [model(x[None], labels=x[None]).loss.item() for x in windows(data, starts, seq_len).to(device)]
    model.train()
    return float(np.mean(losses))


def train(work: Path, shape: Shape, sched: Schedule, steps: int | None, minutes: float, device: torch.device,
          compile_model: bool = True) -> tuple[LlamaForCausalLM, dict]:
    tokenizer = AutoTokenizer.from_pretrained(work / "tokenizer")
    train_ids, held_ids = np.load(work / "train.npy"), np.load(work / "held_out.npy")
    torch.manual_seed(sched.seed)
    model = LlamaForCausalLM(shape.config(tokenizer)).to(device)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": sched.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=sched.lr, betas=(0.9, 0.95), fused=device.type == "cuda",
    )
    ckpt, log_path, start, elapsed, log = work / "checkpoint.pt", work / "train_log.jsonl", 0, 0.0, []
    if ckpt.exists():
        state = torch.load(ckpt, weights_only=False, map_location=device)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        start, elapsed = state["step"], state["elapsed"]
        steps = state["steps"] if steps is None else steps  # a larger --steps extends the run
        log = [json.loads(line) for line in log_path.read_text().splitlines()]
    rng = np.random.default_rng(sched.seed)
    rng.integers(0, len(train_ids) - sched.seq_len, (start, sched.batch))  # replay the draws already used
    model.train()
    forward = torch.compile(model) if compile_model else model  # about 1.35x faster on CPU after a ~40 s compile
    bar = tqdm(total=steps, initial=start, desc="pretrain")
    step = start
    while steps is None or step < steps:
        t0 = time.perf_counter()
        for group in opt.param_groups:
            group["lr"] = sched.lr_at(step, steps or 10**9)
        x = windows(train_ids, rng.integers(0, len(train_ids) - sched.seq_len, sched.batch), sched.seq_len).to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = forward(x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        elapsed += time.perf_counter() - t0
        if step == start + 10:
            warm = (step, elapsed)  # compilation is over
        if steps is None and step == start + 60:  # fix the step count from the measured speed
            per_step = (elapsed - warm[1]) / (step - warm[0])
            steps = step + int((minutes * 60 - elapsed) / per_step)
            bar.total = steps
        bar.update()
        bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
        if step % sched.eval_every == 0 or step == steps:
            entry = {"step": step, "train_loss": loss.item(), "held_out_loss": held_out_loss(model, held_ids, sched.seq_len),
                     "elapsed_s": round(elapsed), "lr": opt.param_groups[0]["lr"]}
            log.append(entry)
            tqdm.write(json.dumps(entry))
            log_path.write_text("".join(json.dumps(e) + "\n" for e in log))
            torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "step": step, "elapsed": elapsed,
                        "steps": steps}, ckpt)
    bar.close()
    return model.float().cpu().eval(), {"steps": steps, "tokens_seen": steps * sched.batch * sched.seq_len,
                          "train_seconds": round(elapsed), "log": log}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--work", type=Path, default=Path("artifacts/build_model"))
    parser.add_argument("--steps", type=int, help="optimiser steps (default: as many as fit in --minutes)")
    parser.add_argument("--minutes", type=float, default=90.0)
    parser.add_argument("--sources", type=Path, help="a corpus packed by training/corpus.py, unpacked (default: "
                                                    "this Python's own sources)")
    parser.add_argument("--max-files", type=int, help="use only the first files of the corpus (smoke runs)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--save-dtype", default="float32", choices=["float32", "bfloat16"])
    for cls in (Shape, Schedule):
        for f in fields(cls):
            parser.add_argument("--" + f.name.replace("_", "-"), type=type(f.default), default=f.default)
    args = parser.parse_args()
    shape, sched = (cls(**{f.name: getattr(args, f.name) for f in fields(cls)}) for cls in (Shape, Schedule))
    args.work.mkdir(parents=True, exist_ok=True)
    corpus = prepare_data(args.work, shape.vocab_size, args.sources, args.max_files)
    model, run = train(args.work, shape, sched, args.steps, args.minutes, torch.device(args.device), args.compile)
    args.out.mkdir(parents=True, exist_ok=True)
    model.to(getattr(torch, args.save_dtype)).save_pretrained(args.out, max_shard_size="10MB")
    AutoTokenizer.from_pretrained(args.work / "tokenizer").save_pretrained(args.out)
    report = {"shape": asdict(shape), "schedule": asdict(sched), "corpus": corpus, **run,
              "held_out_loss": run["log"][-1]["held_out_loss"], "hardware": _hardware(args.device)}
    (args.out / "training.json").write_text(json.dumps(report, indent=1))


def _hardware(device: str) -> str:
    import platform

    if device.startswith("cuda"):
        return f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}"
    return f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}"


if __name__ == "__main__":
    main()
