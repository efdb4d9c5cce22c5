"""Self-distillation data for Medusa heads: the base model's own greedy answers to chat prompts
(training/chat_prompts.py), each rendered with the model's chat template and answered by the engine
the service runs (standard decoding, continuous batching). Greedy answers are exactly what greedy
verification accepts, so heads trained on them match the model that is served.

    python -m training.distill --out work/smollm2/answers.jsonl            # the default model
    python -m training.distill --out FILE --model DIR --limit 8 --max-new-tokens 16   # a tiny run

One JSON line per prompt (kind, subject, held_out, prompt_ids, answer_ids: the answer with its
end-of-turn token when it ended by itself); a run that stops resumes where it left off. With
--self-prompts N, the model first writes N questions of its own (one per subject), which join the
prompts.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import time
from collections import Counter
from pathlib import Path

import torch
from tqdm import tqdm

from config.settings import DEFAULT_MODEL
from engine.decode import Engine
from engine.messages import Request
from engine.tree import ROOT
from load_medusa_from_hf import load_medusa_model, resolve_model
from training.chat_prompts import CONCEPTS, ChatPrompt, chat_prompts

SELF_PROMPT = ("Write one question that a curious person might ask an AI assistant about {}. "
               "Reply with the question only.")


def chat_ids(tokenizer, text: str) -> list[int]:
    """The prompt as the service's chat route renders it: the model's template, one user turn."""
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                             tokenize=True, return_dict=True)
    return list(rendered["input_ids"])


def answer(engine: Engine, prompts: list[list[int]], max_new_tokens: int) -> list[tuple[list[int], str]]:
    """(greedy answer ids, finish reason) per prompt; an answer that ended by itself keeps its EOS."""
    eos = min(engine.eos_token_ids) if engine.eos_token_ids else None
    requests = [Request(str(i), p, max_new_tokens=max_new_tokens, speculative=False) for i, p in enumerate(prompts)]
    out = []
    for seq in engine.generate(requests):
        ended = seq.finish_reason == "stop" and eos is not None
        out.append((seq.tokens + ([eos] if ended else []), seq.finish_reason))
    return out


def self_prompts(engine: Engine, tokenizer, count: int) -> list[ChatPrompt]:
    """Questions the model writes for itself, one per subject (the first line of its answer)."""
    subjects = CONCEPTS[:count]
    answers = answer(engine, [chat_ids(tokenizer, SELF_PROMPT.format(s)) for s in subjects], 48)
    out = []
    for subject, (ids, _) in zip(subjects, answers):
        text = tokenizer.decode(ids, skip_special_tokens=True).strip().split("\n")[0].strip().strip('"')
        if text.endswith("?") and len(text) > 12:
            out.append(ChatPrompt("self", subject, text))
    return out


def summary(answers: Path, model: str, max_new_tokens: int, seconds: float) -> dict:
    """What a model card says of the data: the GGUF file, and prompts and answer tokens by side."""
    rows = [json.loads(line) for line in answers.read_text().splitlines() if line.strip()]
    sides = {side: [r for r in rows if r["held_out"] == side] for side in (False, True)}
    source = resolve_model(model)
    out = {"prompts": len(rows), "prompts_by_kind": dict(Counter(r["kind"] for r in rows).most_common()),
           "train_prompts": len(sides[False]), "held_prompts": len(sides[True]),
           "train_tokens": sum(len(r["answer_ids"]) for r in sides[False]),
           "held_tokens": sum(len(r["answer_ids"]) for r in sides[True]),
           "max_new_tokens": max_new_tokens, "seconds": round(seconds)}
    if source.gguf_file:
        path = Path(source.name) / source.gguf_file
        out["gguf"] = {"file": source.gguf_file, "bytes": path.stat().st_size,
                       "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
                       "types": ", ".join(f"{t} x{n}" for t, n in source.gguf_types)}
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="the JSON-lines file (appended to: resumable)")
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--batch", type=int, default=16, help="sequences decoded together")
    parser.add_argument("--chunk", type=int, default=64, help="prompts written to --out at a time")
    parser.add_argument("--self-prompts", type=int, default=0, help="questions the model writes for itself first")
    parser.add_argument("--limit", type=int, help="only the first N prompts (a smoke run)")
    parser.add_argument("--held-out-only", action="store_true", help="only the held-out prompts (to evaluate heads "
                        "and tune trees on the weights served now, without distilling training data)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--quantize", default="auto", choices=["auto", "gguf", "int4", "none"],
                        help="the weights answered with (auto: what the service serves, the GGUF's int4 on the CPU)")
    parser.add_argument("--summary", type=Path, help="write what the model card says of the data here (JSON)")
    parser.add_argument("--seconds", type=float, default=0.0, help="with --summary: generation seconds of earlier "
                        "runs of this file, added to this run's")
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    model, tokenizer = load_medusa_model(args.model, deepspeed=False, quantize=args.quantize)
    engine = Engine(model, tokenizer, tree=ROOT, max_batch_size=args.batch, max_context=2048)
    prompts = chat_prompts()
    if args.self_prompts:
        prompts += self_prompts(engine, tokenizer, args.self_prompts)
    if args.held_out_only:
        prompts = [p for p in prompts if p.held_out]
    prompts = prompts[: args.limit]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    done = set()
    if args.out.exists():
        done = {json.loads(line)["text"] for line in args.out.read_text().splitlines() if line.strip()}
    # in an order mixed by hash, so that a run stopped early has every kind of prompt
    todo = sorted((p for p in prompts if p.text not in done), key=lambda p: hashlib.sha256(p.text.encode()).digest())
    start, tokens = time.perf_counter(), 0
    with args.out.open("a") as f, tqdm(total=len(todo), desc="answers", mininterval=30) as bar:
        for i in range(0, len(todo), args.chunk):
            chunk = todo[i : i + args.chunk]
            ids = [chat_ids(tokenizer, p.text) for p in chunk]
            for p, prompt_ids, (answer_ids, finish) in zip(chunk, ids, answer(engine, ids, args.max_new_tokens)):
                row = {"kind": p.kind, "subject": p.subject, "text": p.text, "held_out": p.held_out,
                       "prompt_ids": prompt_ids, "answer_ids": answer_ids, "finish": finish}
                f.write(json.dumps(row) + "\n")
                tokens += len(answer_ids)
            f.flush()
            bar.update(len(chunk))
            bar.set_postfix(tokens_per_s=f"{tokens / (time.perf_counter() - start):.0f}", refresh=False)
    seconds = time.perf_counter() - start
    print(json.dumps({"prompts": len(prompts), "answered_now": len(todo), "tokens_now": tokens, "seconds": round(seconds)}))
    if args.summary:
        report = summary(args.out, args.model, args.max_new_tokens, args.seconds + (seconds if todo else 0))
        args.summary.write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
