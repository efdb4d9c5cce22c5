"""Adaptive speculation: before each step, the tree that maximises expected tokens per second for the
running batch, chosen from a nested family (the full tree's most likely nodes, from all of them
down to none: root only).

    expected tokens per second(tree) = (speculative seqs x (1 + sum of P(node accepted) over the
                                        tree's nodes) + standard seqs) / step seconds(batch, nodes)

P(node accepted) is counted online (accepted / offered, started from a prior, older steps weighing
less), and a tree smaller than the whole one verifies the next bigger one on a share of its steps
where that one could pay (exploration: without it, once root only wins nothing can change its mind),
and no more of the time than EXPLORE_SHARE.
The step's seconds come from a cost table the engine measures on its own hardware (calibration.py),
cached to a file keyed by model, device, dtype and tree. A verify step is nearly free while the
hardware is under-used and costly once the batch fills it: the tree shrinks as the batch grows, down
to no speculation."""

from __future__ import annotations

import bisect
import json
import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path

from engine.sampling import Accepted
from engine.tree import ROOT, Tree, build_tree

log = logging.getLogger(__name__)
PRIOR_WEIGHT = 8.0  # the prior counts as this many offers of each node
DECAY = 0.99  # each step a node is verified in weighs its older evidence by this (~100 steps' memory)
EXPLORE_EVERY = 16  # a tree smaller than the whole one verifies the next bigger one on every 16th step, if it
# could pay at all (were its nodes always accepted), ...
EXPLORE_SHARE = 0.02  # ... or less often where that step costs more: exploring takes at most 2% of the time
MARGIN = 1.05  # a bigger tree is chosen over a smaller one when it promises at least 5% more tokens per second:
# the table is timed in an idle engine, and serving, a bigger step loses more to what shares the machine


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
        self.accepted = {p: PRIOR_WEIGHT * prior(p) for p in tree.paths}  # ... and was accepted in
        self.family = nested_family(tree)
        self.in_use: Tree = self.family[-1]  # the last step's tree for speculative sequences
        self._step_seconds: dict[int, list[float]] = {}  # batch size -> predicted seconds per family tree
        self._since_explored = 0  # speculative steps since a bigger tree than the best was verified

    def probability(self, path: tuple[int, ...]) -> float:
        return self.accepted[path] / self.offered[path]

    def expected_tokens(self, tree: Tree) -> float:
        """Tokens a speculative sequence emits per step with this tree: the root's plus each node's
        chance of being on the accepted path."""
        return 1.0 + sum(self.probability(p) for p in tree.paths)

    def choose(self, speculative: int, standard: int) -> Tree:
        """The family's tree with the most expected tokens per second for this batch, a smaller one
        where a bigger one's lead is under MARGIN."""
        if speculative == 0:
            return ROOT
        batch = speculative + standard
        if batch not in self._step_seconds:
            self._step_seconds[batch] = [self.costs.predict(batch, t.num_nodes) for t in self.family]
        rates = [(speculative * self.expected_tokens(t) + standard) / seconds
                 for t, seconds in zip(self.family, self._step_seconds[batch])]
        best = 0
        for i, rate in enumerate(rates):
            if rate > MARGIN * rates[best]:
                best = i
        self._since_explored += 1
        if best + 1 < len(self.family) and self._since_explored >= EXPLORE_EVERY:
            bigger, (now, seconds) = self.family[best + 1], self._step_seconds[batch][best : best + 2]
            could_pay = (speculative * (1 + bigger.depth) + standard) / seconds > rates[best]  # were all accepted
            if could_pay and self._since_explored * EXPLORE_SHARE >= seconds / now - 1:  # and it is its turn
                best, self._since_explored = best + 1, 0
        self.in_use = self.family[best]
        return self.in_use

    def record(self, trees: list[Tree], accepted: Accepted) -> None:
        """Count, for each sequence that verified a tree, which of its nodes were accepted."""
        verified = {id(t): t for t in trees if t.num_nodes > 1}
        if not verified:
            return
        counts, nodes = accepted.count.tolist(), accepted.nodes.tolist()
        for tree in verified.values():
            n = sum(t is tree for t in trees)
            for p in tree.paths:  # the evidence so far decays toward the prior, then this step's adds
                self.offered[p] = PRIOR_WEIGHT + DECAY * (self.offered[p] - PRIOR_WEIGHT) + n
                self.accepted[p] = PRIOR_WEIGHT * prior(p) + DECAY * (self.accepted[p] - PRIOR_WEIGHT * prior(p))
        for tree, count, path_nodes in zip(trees, counts, nodes):
            for node in path_nodes[1:count]:  # [root, accepted nodes..., padding]
                self.accepted[tree.paths[node - 1]] += 1
