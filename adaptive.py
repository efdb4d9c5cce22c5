"""Adaptive speculation: before each step, the tree that maximises expected tokens per second for the
running batch, chosen from a nested family (the full tree's most likely nodes, from all of them
down to none: root only).

    expected tokens per second(tree) = (speculative seqs x (1 + sum of P(node accepted) over the
                                        tree's nodes) + standard seqs) / step seconds(batch, nodes)

P(node accepted) is counted online (accepted / offered, started from a prior); the step's seconds
come from a cost table the engine measures on its own hardware (`calibrate`), cached to a file keyed
by model, device, dtype and tree. A verify step is nearly free while the hardware is under-used and
costly once the batch fills it: the tree shrinks as the batch grows, down to no speculation."""

from __future__ import annotations

import bisect
import hashlib
import itertools
import json
import logging
import os
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from engine import Engine
from sampling import Accepted
from sequence import Request
from tree import ROOT, Tree, build_tree

log = logging.getLogger(__name__)
PRIOR_WEIGHT = 8.0  # the prior counts as this many offers of each node


@dataclass(frozen=True)
class CostTable:
    """Measured seconds of one decode step by running sequences (rows) and tokens verified per
    sequence (columns); linear in between, flat beyond the ends."""

    batch_sizes: tuple[int, ...]
    tokens: tuple[int, ...]
    seconds: tuple[tuple[float, ...], ...]  # [len(batch_sizes)][len(tokens)]

    def predict(self, batch: int, tokens: int) -> float:
        rows = [_interpolate(self.tokens, row, tokens) for row in self.seconds]
        return _interpolate(self.batch_sizes, rows, batch)

    def __post_init__(self):
        for axis in (self.batch_sizes, self.tokens):
            if not axis or list(axis) != sorted(set(axis)) or axis[0] < 1:
                raise ValueError(f"cost table: {list(axis)} must be increasing whole numbers >= 1")
        if len(self.seconds) != len(self.batch_sizes) or any(len(r) != len(self.tokens) for r in self.seconds):
            raise ValueError("cost table: seconds must have a row per batch size and a column per token count")
        if not all(s > 0 for row in self.seconds for s in row):
            raise ValueError("cost table: every step must take more than 0 seconds")

    @classmethod
    def load(cls, path: str | Path) -> CostTable:
        data = json.loads(Path(path).read_text())
        return cls(tuple(data["batch_sizes"]), tuple(data["tokens"]), tuple(map(tuple, data["seconds"])))

    def save(self, path: Path) -> None:
        """Written whole or not at all (a temporary file renamed): a server starting beside this one
        never reads half a table."""
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(f".{os.getpid()}.tmp")
        partial.write_text(json.dumps(asdict(self), indent=1))
        os.replace(partial, path)


def _interpolate(xs: tuple[int, ...], ys, x: float) -> float:
    if x <= xs[0]:
        return ys[0]
    if x >= xs[-1]:
        return ys[-1]
    i = bisect.bisect_right(xs, x)
    (x0, x1), (y0, y1) = xs[i - 1 : i + 1], ys[i - 1 : i + 1]
    return y0 + (y1 - y0) * (x - x0) / (x1 - x0)


def prior(path: tuple[int, ...]) -> float:
    """A guess of P(node accepted) before any step: 0.5 / (rank + 1) per level of its path."""
    p = 1.0
    for rank in path:
        p *= 0.5 / (rank + 1)
    return p


def nested_family(tree: Tree) -> list[Tree]:
    """Root only, then the tree's 1, 2, 4, 8, ... most likely nodes (by the prior, parents first, so
    that each is a tree), then the whole tree."""
    order = sorted(tree.paths, key=lambda p: (-prior(p), len(p), p))
    sizes = [2**i for i in range(len(order).bit_length()) if 2**i < len(order)]
    return [ROOT] + [build_tree(order[:k], f"{tree.name}/{k + 1}") for k in sizes] + [tree]


class TreeChooser:
    """The nested family of a tree, the acceptance counts of its nodes, and the choice per step."""

    def __init__(self, tree: Tree, costs: CostTable):
        self.tree, self.costs = tree, costs
        self.offered = {p: PRIOR_WEIGHT for p in tree.paths}  # per node (its path): steps it was verified in
        self.accepted = {p: PRIOR_WEIGHT * prior(p) for p in tree.paths}
        self.family = nested_family(tree)
        self.in_use: Tree = self.family[-1]  # the last step's tree for speculative sequences
        self._step_seconds: dict[int, list[float]] = {}  # batch size -> predicted seconds per family tree

    def probability(self, path: tuple[int, ...]) -> float:
        return self.accepted[path] / self.offered[path]

    def expected_tokens(self, tree: Tree) -> float:
        """Tokens a speculative sequence emits per step with this tree: the root's plus each node's
        chance of being on the accepted path."""
        return 1.0 + sum(self.probability(p) for p in tree.paths)

    def choose(self, speculative: int, standard: int) -> Tree:
        """The family's tree with the most expected tokens per second for this batch."""
        if speculative == 0:
            return ROOT
        batch = speculative + standard
        if batch not in self._step_seconds:
            self._step_seconds[batch] = [self.costs.predict(batch, t.num_nodes) for t in self.family]
        rates = [(speculative * self.expected_tokens(t) + standard) / seconds
                 for t, seconds in zip(self.family, self._step_seconds[batch])]
        self.in_use = self.family[rates.index(max(rates))]
        return self.in_use

    def record(self, trees: list[Tree], accepted: Accepted) -> None:
        """Count, for each sequence that verified a tree, which of its nodes were accepted."""
        verified = {id(t): t for t in trees if t.num_nodes > 1}
        if not verified:
            return
        counts, nodes = accepted.count.tolist(), accepted.nodes.tolist()
        for tree in verified.values():
            n = sum(t is tree for t in trees)
            for p in tree.paths:
                self.offered[p] += n
        for tree, count, path_nodes in zip(trees, counts, nodes):
            for node in path_nodes[1:count]:  # [root, accepted nodes..., padding]
                self.accepted[tree.paths[node - 1]] += 1


# ---- the cost table: measured once per model, device, dtype and tree ----------------------------------


def calibrate(engine: Engine, family: list[Tree], steps: int = 8) -> CostTable:
    """Seconds of one decode step for each batch size (powers of 2 up to the engine's maximum, and
    it) and each tree of the family: the median of `steps` timed steps after an untimed one, on a
    batch of that many 8-token prompts (a new one when the sequences would outgrow the context)."""
    top = engine.max_batch_size
    sizes = sorted({top} | {2**i for i in range(top.bit_length()) if 2**i < top})
    prompt = [i % engine.model.config.vocab_size for i in range(1, 9)]
    room = engine.max_context - len(prompt) - 1  # tokens a sequence may still take after its first
    if room < 2 * (family[-1].depth + 1):
        raise ValueError(f"a context of {engine.max_context} tokens is too short to time the tree's steps; "
                         "set COST_TABLE or ADAPTIVE_TREE=false")
    steps = min(steps, room // (family[-1].depth + 1) - 1)
    sync = torch.cuda.synchronize if engine.model.device.type == "cuda" else (lambda: None)
    seconds = []
    for b in sizes:
        batch, row = None, []
        for tree in family:
            if batch is None or max(batch.host_lengths) + (steps + 1) * (tree.depth + 1) > engine.max_context - 1:
                batch = None  # free the old cache before allocating the new one
                batch = engine.new_batch()
                engine.admit(batch, [Request(f"calibrate-{i}", prompt, engine.max_context - len(prompt),
                                             ignore_eos=True) for i in range(b)])
            batch.trees = [tree] * b
            times = []
            for _ in range(steps + 1):
                sync()
                start = time.perf_counter()
                engine.step(batch)
                sync()
                times.append(time.perf_counter() - start)
            row.append(statistics.median(times[1:]))
        seconds.append(row)
    return CostTable(tuple(sizes), tuple(t.num_nodes for t in family), non_decreasing(seconds))


def non_decreasing(seconds: list[list[float]]) -> tuple[tuple[float, ...], ...]:
    """Rows (batch sizes) x columns (tokens) raised so that more tokens or more sequences never cost
    less: a noisy machine can time a bigger step as cheaper."""
    rows = [list(itertools.accumulate(row, max)) for row in seconds]
    for above, below in zip(rows, rows[1:]):
        below[:] = [max(a, b) for a, b in zip(above, below)]
    return tuple(map(tuple, rows))


def cost_table(engine: Engine, family: list[Tree], key: dict, cache_dir: Path) -> CostTable:
    """The cached table for `key` (model, device, dtype, tree, ...), measured and saved if missing."""
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    path = cache_dir / f"costs-{digest}.json"
    if path.exists():
        log.info("step costs from %s", path)
        return CostTable.load(path)
    start = time.perf_counter()
    table = calibrate(engine, family)
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        path.with_suffix(".key.json").write_text(json.dumps(key, indent=1, sort_keys=True))
        table.save(path)
        log.info("step costs measured in %.1f s, saved to %s", time.perf_counter() - start, path)
    except OSError as e:  # a read-only cache costs a measurement at each start, nothing more
        log.warning("step costs measured in %.1f s; not cached (%s)", time.perf_counter() - start, e)
    return table

