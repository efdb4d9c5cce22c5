"""Choose the Medusa tree for a model on this machine, from measurements:

1. acceptance: on greedy continuations of held-out prompts, the rank of each true next token in
   each head's distribution, jointly over the heads; P(node) = the share of positions where every
   head on the node's path ranks the true token exactly as the path says. Tokens per step of a tree
   = what greedy verification would emit, walking each continuation step by step (a step at t
   accepts the longest path of the tree that the ranks at t spell, emits it plus the bonus token,
   and the next step starts after them). This is lower than 1 + the sum of P over the nodes, the
   average over all positions: steps land more often where the heads are wrong.
2. cost: the engine's step time at batch 1 with trees of each size (median of alternating rounds).

Trees are grown greedily (always the most probable node whose parent is in), so each is a prefix of
the next; the one with the most expected tokens per second wins and is written as
`medusa_choices.json` into the heads folder, its default tree.

    python -m bench.tune_tree --model models/pycoder-4m --heads models/pycoder-4m/medusa
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import torch

from bench.bench_engine import step_times
from engine.tree import ROOT, build_tree
from load_medusa_from_hf import TREE_FILE, load_medusa_model, resolve_dtype
from training.corpus import held_out_arguments, held_out_prompts, model_held_out
from training.train_medusa import distilled, greedy_continuations

MAX_RANK = 10  # ranks beyond this are never in a tree
SIZES = (1, 2, 3, 4, 5, 6, 8, 10, 12, 16, 20, 24, 32, 48, 63)


@torch.no_grad()
def joint_ranks(model, rows: list[list[int]], starts: list[int]) -> list[torch.Tensor]:
    """Per row of token ids, [positions, K]: the rank (capped at MAX_RANK) of token t+2+k in head k's
    logits at t, over the positions t from starts[i] (the prompt's last token) on, while every head's
    target exists. A token outside the heads' vocabulary ranks MAX_RANK: they cannot propose it."""
    K, out = model.num_heads, []
    for row, start in zip(rows, starts):
        ids = torch.tensor([row], device=model.device)
        _, hidden = model.forward(ids, logits_to_keep=1)
        t = torch.arange(start, len(row) - 1 - K, device=ids.device)
        logits = model.head_logits(hidden[0, t], ids[0, t + 1])  # [P, K, V']; the root token t+1
        target = model.heads.rows_of(torch.stack([ids[0, t + 2 + k] for k in range(K)], dim=1))  # [P, K]
        target_logit = logits.gather(-1, target.clamp(min=0)[..., None])  # [P, K, 1]
        rank = (logits > target_logit).sum(-1).clamp(max=MAX_RANK)
        out.append(torch.where(target < 0, MAX_RANK, rank).cpu())
    return out


def tokens_per_step(ranks: list[torch.Tensor], paths: list[tuple[int, ...]]) -> float:
    """Tokens per step that greedy verification with the tree of `paths` emits on the continuations
    whose joint ranks are `ranks` (per continuation, [positions, K], from the prompt's last token on)."""
    tree, tokens, steps = set(paths), 0, 0
    for row in (r.tolist() for r in ranks):
        t = 0
        while t < len(row):
            depth = 0
            while depth < len(row[t]) and tuple(row[t][: depth + 1]) in tree:
                depth += 1
            tokens, steps, t = tokens + depth + 1, steps + 1, t + depth + 1
    return tokens / steps


def path_probability(ranks: torch.Tensor, path: tuple[int, ...]) -> float:
    hit = torch.ones(len(ranks), dtype=torch.bool)
    for depth, rank in enumerate(path):
        hit &= ranks[:, depth] == rank
    return hit.float().mean().item()


def grow_tree(ranks: torch.Tensor, max_nodes: int) -> list[tuple[tuple[int, ...], float]]:
    """Nodes in the order a greedy search adds them: (path, P(accepted))."""
    K = ranks.shape[1]
    frontier = {(r,): path_probability(ranks, (r,)) for r in range(MAX_RANK)}
    order = []
    while frontier and len(order) < max_nodes:
        path = max(frontier, key=lambda p: (frontier[p], -len(p)))
        order.append((path, frontier.pop(path)))
        if len(path) < K:
            frontier.update({path + (r,): path_probability(ranks, path + (r,)) for r in range(MAX_RANK)})
    return order


def held_out_rows(args, model, tokenizer) -> tuple[list[list[int]], list[int]]:
    """Held-out greedy continuations and where each is scored from: --distilled's held-out answers, or
    continuations of prompts from the bundled model's held-out files."""
    if args.distilled:
        rows, starts = distilled(args.distilled, held_out=True)
        return [r[: s + 1 + args.new_tokens] for r, s in zip(rows, starts)][: args.prompts], starts[: args.prompts]
    prompts = held_out_prompts(tokenizer, model_held_out(args.model), args.prompts, args.prompt_tokens)
    return greedy_continuations(model.model, prompts, args.new_tokens), [args.prompt_tokens - 1] * len(prompts)


def main() -> None:
    parser = held_out_arguments(__doc__.splitlines()[0], prompts=64)
    parser.add_argument("--distilled", type=Path, help="held-out rows of a training/distill.py file (chat answers)")
    parser.add_argument("--steps", type=int, default=40, help="timed steps per tree size and round")
    parser.add_argument("--rounds", type=int, default=3, help="the step time of a size is the median of its rounds")
    args = parser.parse_args()

    model, tokenizer = load_medusa_model(args.model, args.heads, dtype=resolve_dtype(args.dtype), quantize=args.quantize)
    rows, starts = held_out_rows(args, model, tokenizer)
    prompts = [r[: s + 1] for r, s in zip(rows, starts)]
    per_sequence = joint_ranks(model, rows, starts)
    ranks = torch.cat(per_sequence)
    order = grow_tree(ranks, max(SIZES))
    print(f"{len(ranks)} positions; head top-1: {[round((ranks[:, k] == 0).float().mean().item(), 3) for k in range(ranks.shape[1])]}")

    trees = [ROOT] + [build_tree([p for p, _ in order[:n]], f"tuned{n}") for n in SIZES]
    times = [[] for _ in trees]
    for _ in range(args.rounds):  # sizes alternate within each round, so drift hits all of them
        for tree, t in zip(trees, times):
            t.append(1e3 * step_times(model, tokenizer, prompts[0], 1, tree, args.steps))
    rows = []
    for n, t in zip((0, *SIZES), times):
        expected = tokens_per_step(per_sequence, [p for p, _ in order[:n]])
        ms = statistics.median(t)
        rows.append({"nodes": n, "tokens_per_step": expected, "step_ms": ms, "tokens_per_s": 1e3 * expected / ms})
    print(f"{'nodes':>5} {'E[tokens/step]':>15} {'step ms':>8} {'E[tokens/s]':>12} {'vs root':>8}")
    for r in rows:
        print(f"{r['nodes']:>5} {r['tokens_per_step']:>15.2f} {r['step_ms']:>8.2f} {r['tokens_per_s']:>12.1f} "
              f"{r['tokens_per_s'] / rows[0]['tokens_per_s']:>8.2f}")
    best = max(rows[1:], key=lambda r: r["tokens_per_s"])
    paths = [list(p) for p, _ in order[: best["nodes"]]]
    out = Path(args.heads) / TREE_FILE
    name = Path(args.model).name.removesuffix(".gguf")
    out.write_text(json.dumps({"name": f"{name}-{best['nodes']}", "paths": paths}) + "\n")
    report = {"positions": len(ranks), "order": [[list(p), round(q, 4)] for p, q in order], "sizes": rows, "chosen": best}
    (Path(args.heads) / "tree_tuning.json").write_text(json.dumps(report, indent=1) + "\n")
    print(f"chose {best['nodes']} nodes -> {out}")


if __name__ == "__main__":
    main()
