"""Where the adaptive tree would shrink on a GPU, projected from two measurements: the small code
model's heads' acceptance per tree node (counted here, decoding held-out prompts with the whole tree) and the
H200's step costs of a 7B-shaped model (docs/gpu_figures_h200.json: root, 11-, 16- and 64-node
verifies at batch 1 and 32, linear in between). Prints the tree the chooser takes at each batch size
and the expected speed-up over standard decoding.

    python -m bench.adaptive_projection
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from config.settings import SMALL_MODEL
from engine.adaptive import CostTable, TreeChooser
from engine.decode import Engine
from engine.messages import Request
from load_medusa_from_hf import heads_tree, load_medusa_model
from training.corpus import held_out_prompts, model_held_out

ROOT_DIR = Path(__file__).resolve().parent.parent
STEPS = {"root": 1, "bundled": 11, "tree15": 16, "mc_sim_7b_63": 64}  # gpu_figures' trees: tokens verified


def counted_acceptance(max_tokens: int, count: int = 32) -> TreeChooser:
    """A chooser whose counts come from decoding `count` held-out prompts of the small code model's
    corpus (32 tokens each) with its whole tree."""
    model, tokenizer = load_medusa_model(str(SMALL_MODEL), str(SMALL_MODEL / "medusa"))
    tree = heads_tree(str(SMALL_MODEL / "medusa"))
    engine = Engine(model, tokenizer, tree=tree, max_batch_size=8, eos_token_ids=[])
    engine.chooser = TreeChooser(tree, CostTable((1,), (1,), ((1.0,),)))  # flat: always the whole tree
    prompts = held_out_prompts(tokenizer, model_held_out(SMALL_MODEL), count, 32)
    engine.generate([Request(str(i), p, max_tokens) for i, p in enumerate(prompts)])
    return engine.chooser


def h200_costs(figures: dict) -> CostTable:
    steps = figures["step_ms"]
    return CostTable((1, 32), tuple(STEPS.values()),
                     tuple(tuple(steps[f"{name}@{b}"] / 1e3 for name in STEPS) for b in (1, 32)))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--figures", type=Path, default=ROOT_DIR / "docs" / "gpu_figures_h200.json")
    parser.add_argument("--max-tokens", type=int, default=64)
    args = parser.parse_args(argv)
    counted = counted_acceptance(args.max_tokens)
    chooser = TreeChooser(counted.tree, h200_costs(json.loads(args.figures.read_text())))
    chooser.offered, chooser.accepted = counted.offered, counted.accepted
    print("| batch | tree nodes chosen | expected tokens/step | step vs root | speculative / standard |")
    print("| ---: | ---: | ---: | ---: | ---: |")
    for b in (1, 2, 4, 8, 16, 24, 32):
        tree = chooser.choose(b, 0)
        cost = chooser.costs.predict(b, tree.num_nodes) / chooser.costs.predict(b, 1)
        tokens = chooser.expected_tokens(tree)
        print(f"| {b} | {tree.num_nodes} | {tokens:.2f} | {cost:.2f} | {tokens / cost:.2f}x |")


if __name__ == "__main__":
    main()
