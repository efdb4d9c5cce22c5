"""Medusa trees ("medusa choices"): presets and the frozen buffers built from a list of paths.

A path [a, b, c] is head 0's rank-a token, then head 1's rank-b token, then head 2's rank-c token,
under the root (the base model's own next token, implicit). Node 0 is the root; the other nodes
follow the paths sorted by (depth, path), as in Medusa's `generate_medusa_buffers`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch

PRESETS_FILE = Path(__file__).with_name("medusa_trees.json")

Paths = tuple[tuple[int, ...], ...]


@dataclass(frozen=True, eq=False)
class Tree:
    """Buffers for one tree, built once. N = nodes including the root, P = leaf paths, D = depth + 1."""

    name: str
    paths: Paths  # sorted; node i + 1 is paths[i]
    mask: torch.Tensor  # [N, N] bool: node i sees node j (its ancestors and itself)
    depths: torch.Tensor  # [N] long: 0 for the root; position = current length + depth
    heads: torch.Tensor  # [N] long: head proposing the node (depth - 1; 0 for the root, unused)
    ranks: torch.Tensor  # [N] long: rank of the node's token in that head's top-k (0 for the root)
    retrieve: torch.Tensor  # [P, D] long: node indices of each root-to-leaf path, padded with -1

    @property
    def num_nodes(self) -> int:
        return len(self.paths) + 1

    @property
    def depth(self) -> int:
        return self.retrieve.shape[1] - 1

    @property
    def topk(self) -> int:
        """How many ranked tokens each head must propose."""
        return int(self.ranks.max()) + 1 if self.paths else 0

    def describe(self) -> dict:
        return {"name": self.name, "nodes": self.num_nodes, "depth": self.depth}


def build_tree(paths: list[list[int]] | Paths, name: str = "custom") -> Tree:
    """Validate a list of paths and build its buffers."""
    ordered: Paths = tuple(sorted({tuple(int(r) for r in p) for p in paths}, key=lambda p: (len(p), p)))
    if len(ordered) != len(paths):
        raise ValueError(f"tree {name!r} repeats a path")
    index = {(): 0} | {p: i + 1 for i, p in enumerate(ordered)}
    for p in ordered:
        if not p or min(p) < 0:
            raise ValueError(f"tree {name!r}: path {list(p)} must be non-empty with ranks >= 0")
        if p[:-1] not in index:
            raise ValueError(f"tree {name!r}: path {list(p)} has no parent {list(p[:-1])}")
    n = len(ordered) + 1
    mask = torch.eye(n, dtype=torch.bool)
    mask[:, 0] = True
    for p, i in index.items():
        for k in range(1, len(p)):
            mask[i, index[p[:k]]] = True
    leaves = [p for p in ordered if not any(q[: len(p)] == p and len(q) > len(p) for q in ordered)]
    depth = max((len(p) for p in ordered), default=0)
    retrieve = torch.full((max(len(leaves), 1), depth + 1), -1, dtype=torch.long)
    retrieve[:, 0] = 0
    for row, leaf in enumerate(leaves):
        for k in range(1, len(leaf) + 1):
            retrieve[row, k] = index[leaf[:k]]
    return Tree(
        name=name,
        paths=ordered,
        mask=mask,
        depths=torch.tensor([0] + [len(p) for p in ordered]),
        heads=torch.tensor([0] + [len(p) - 1 for p in ordered]),
        ranks=torch.tensor([0] + [p[-1] for p in ordered]),
        retrieve=retrieve,
    )


def _builtin_presets() -> dict[str, list[list[int]]]:
    published = {k: v for k, v in json.loads(PRESETS_FILE.read_text()).items() if not k.startswith("_")}
    nested = published["mc_sim_7b_63"]  # built greedily: every prefix of it is itself a tree
    return {
        "root": [],  # standard decoding: the root alone
        **{f"chain{d}": [[0] * k for k in range(1, d + 1)] for d in range(1, 5)},
        "tree7": nested[:7],
        "tree15": nested[:15],
        "tree31": nested[:31],
        **published,
    }


PRESETS: dict[str, list[list[int]]] = _builtin_presets()


@lru_cache(maxsize=None)
def preset(name: str) -> Tree:
    if name not in PRESETS:
        raise ValueError(f"unknown tree preset {name!r}; known: {', '.join(PRESETS)}")
    return build_tree(PRESETS[name], name)


def load_tree(spec: str) -> Tree:
    """A preset name, or a JSON file holding a list of paths (or {"name":…, "paths": […]})."""
    path = Path(spec)
    if spec in PRESETS or path.suffix != ".json":
        return preset(spec)
    data = json.loads(path.read_text())
    if isinstance(data, dict):
        return build_tree(data["paths"], data.get("name", path.stem))
    return build_tree(data, path.stem)


ROOT = preset("root")


@dataclass(frozen=True, eq=False)
class StepTrees:
    """The trees of one step's sequences, padded to a common shape and stacked. B = sequences."""

    mask: torch.Tensor  # [B, T, T] bool; padding nodes see only themselves
    depths: torch.Tensor  # [B, T]
    heads: torch.Tensor  # [B, T]
    ranks: torch.Tensor  # [B, T]
    retrieve: torch.Tensor  # [B, P, D]; padding paths are the root alone
    depth: int  # the deepest tree's: the heads this step drafts with
    topk: int  # the most ranked tokens a head must propose
    chains: bool  # every tree is one path with its nodes in order: accepted nodes stay where they were written

    @property
    def num_nodes(self) -> int:
        return self.mask.shape[-1]


@lru_cache(maxsize=256)
def stack_trees(trees: tuple[Tree, ...], device: torch.device) -> StepTrees:
    """Pad each tree to the largest and stack them (cached: a batch's mix of trees rarely changes)."""
    t = max(tr.num_nodes for tr in trees)
    p = max(tr.retrieve.shape[0] for tr in trees)
    d = max(tr.retrieve.shape[1] for tr in trees)
    mask = torch.eye(t, dtype=torch.bool).repeat(len(trees), 1, 1)
    depths, heads, ranks = (torch.zeros(len(trees), t, dtype=torch.long) for _ in range(3))
    retrieve = torch.full((len(trees), p, d), -1, dtype=torch.long)
    retrieve[:, :, 0] = 0
    for b, tr in enumerate(trees):
        n, (tp, td) = tr.num_nodes, tr.retrieve.shape
        mask[b, :n, :n] = tr.mask
        depths[b, :n], heads[b, :n], ranks[b, :n] = tr.depths, tr.heads, tr.ranks
        retrieve[b, :tp, :td] = tr.retrieve
    return StepTrees(*(x.to(device) for x in (mask, depths, heads, ranks, retrieve)),
                     depth=max(tr.depth for tr in trees), topk=max(tr.topk for tr in trees),
                     chains=all(tr.num_nodes == tr.depth + 1 for tr in trees))  # one node a level: nodes in depth order
