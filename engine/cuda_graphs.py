"""The decode/verify forward captured as CUDA graphs: one graph per static shape (rows, tokens per
row, key length), captured on first use, replayed after. An eager step of a 7B model on an H200 is
bound by launching its ~1,000 kernels (36 ms against a 3.2 ms weight-read floor); a replay launches
them all at once (6.75 ms: docs/gpu.md).

The engine makes those shapes few (Engine._verify rounds rows and key length up to buckets:
batch_bucket, kv_bucket) and the forward free of host synchronisation, so that the same code runs
eagerly on the CPU.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

BATCH_BUCKETS = (1, 2, 4, 8)  # then multiples of 8, as vLLM pads its captured batch sizes
KV_BLOCK = 128  # key lengths are rounded up to a multiple of this


def batch_bucket(n: int, limit: int) -> int:
    """Rows a step of n sequences runs with: the smallest bucket >= n, at most `limit` (the slots)."""
    bucket = next((b for b in BATCH_BUCKETS if b >= n), -(-n // 8) * 8)
    return min(bucket, limit)


def kv_bucket(n: int, limit: int) -> int:
    """Keys a step reads per row when the longest row needs n: n rounded up to KV_BLOCK, at most `limit`."""
    return min(-(-n // KV_BLOCK) * KV_BLOCK, limit)


class StepGraphs:
    """Graphs of one function of tensors, keyed by the caller's static shape; each call copies its
    inputs into the graph's own input buffers and replays it. The outputs live in a memory pool that
    every graph shares: they are valid until the next call."""

    def __init__(self) -> None:
        self.pool = torch.cuda.graph_pool_handle()
        self.graphs: dict[tuple, tuple[list[torch.Tensor], torch.cuda.CUDAGraph, tuple]] = {}

    def __len__(self) -> int:
        return len(self.graphs)

    def run(self, key: tuple, fn: Callable[..., tuple], *inputs: torch.Tensor) -> tuple:
        if key not in self.graphs:
            self.graphs[key] = self._capture(fn, inputs)
        buffers, graph, outputs = self.graphs[key]
        for buffer, x in zip(buffers, inputs):
            buffer.copy_(x)
        graph.replay()
        return outputs

    def _capture(self, fn: Callable[..., tuple], inputs: tuple[torch.Tensor, ...]):
        buffers = [x.clone() for x in inputs]
        side = torch.cuda.Stream()  # warm-up off the capturing stream (lazy initialisations, cuBLAS workspaces)
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                fn(*buffers)  # the same writes into the KV cache as the replay's: same inputs
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            outputs = fn(*buffers)
        return buffers, graph, outputs
