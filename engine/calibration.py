"""The step cost table that adaptive.py chooses trees by: measured once on this hardware, for this
model, device, dtype and tree, by timing the engine's own decode steps, and cached to a file."""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import statistics
import time
from pathlib import Path

import torch

from engine.adaptive import CostTable
from engine.decode import Engine
from engine.messages import Request
from engine.tree import Tree

log = logging.getLogger(__name__)

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

