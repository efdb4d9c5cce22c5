"""The int4 kernel (engine/int4_layers.cpp) against PyTorch's `_weight_int4pack_mm_for_cpu`, which the
int4 path used before: every projection of the default model (30 layers' fused q/k/v, o, gate/up and
down, and the lm_head), one pass each, by rows M, the two interleaved in one process so that the
machine's drift hits both alike. Median ms of a pass.

PyTorch's kernel takes bf16 activations and bf16 scales, and a Q8_0 matrix (the lm_head) as two int4
halves (two passes); ours takes the file's blocks and quantises the activations to 8 bits.

    python -m bench.int4_kernel
    python -m bench.int4_kernel --rows 1,2,3,4,8,16 --reps 9 --threads 2
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch
from gguf import GGMLQuantizationType, quants

from engine.int4 import Blocks, Int4Linear

# SmolLM2-135M: (out, in) of each layer's fused projections, and the lm_head
LAYER = ((960, 576), (576, 576), (3072, 576), (576, 1536))
LM_HEAD = (49152, 576)


def ours(shapes: list[tuple[int, int, str]], seed: int = 0) -> list[Int4Linear]:
    rng = np.random.default_rng(seed)
    out = []
    for n, k, kind in shapes:
        w = rng.standard_normal((n, k)).astype(np.float32) * 0.05
        out.append(Int4Linear(Blocks(kind, quants.quantize(w, GGMLQuantizationType[kind]).reshape(n, -1))))
    return out


def aten(shapes: list[tuple[int, int, str]]) -> list[list[tuple[torch.Tensor, torch.Tensor]]]:
    """Per matrix, its int4 halves as PyTorch's kernel takes them (random: the time does not depend on the values)."""
    out = []
    for n, k, kind in shapes:
        halves = []
        for _ in range(2 if kind == "Q8_0" else 1):
            q = torch.randint(0, 16, (n, k), dtype=torch.int32)
            packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)
            halves.append((packed, torch.randn(k // 32, n, 2).to(torch.bfloat16)))
        out.append(halves)
    return out


def aten_pass(matrices, x: dict[int, torch.Tensor]) -> None:
    for halves in matrices:
        k = halves[0][1].shape[0] * 32
        flat = x[k].to(torch.bfloat16)
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(flat, halves[0][0], 32, halves[0][1]).float()
        for packed, scales in halves[1:]:
            y += torch.ops.aten._weight_int4pack_mm_for_cpu(flat, packed, 32, scales).float()


@torch.inference_mode()
def compare(rows: list[int], reps: int = 9, layers: int = 30) -> list[dict]:
    shapes = [(n, k, "Q4_1") for _ in range(layers) for n, k in LAYER] + [(*LM_HEAD, "Q8_0")]
    kernel, theirs = ours(shapes), aten(shapes)
    table = []
    for m in rows:
        x = {k: torch.randn(m, k) for k in (576, 1536)}
        times = {"ours": [], "aten": []}
        for _ in range(reps):
            start = time.perf_counter()
            for linear, (_, k, _) in zip(kernel, shapes):
                linear(x[k])
            times["ours"].append(time.perf_counter() - start)
            start = time.perf_counter()
            aten_pass(theirs, x)
            times["aten"].append(time.perf_counter() - start)
        ms = {name: 1e3 * statistics.median(t) for name, t in times.items()}
        table.append({"rows": m, **ms, "ratio": ms["aten"] / ms["ours"]})
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=lambda s: [int(r) for r in s.split(",")], default=[1, 2, 3, 4, 8, 16, 64])
    parser.add_argument("--reps", type=int, default=9)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"{args.threads} threads, median of {args.reps} passes each, interleaved\n")
    print("| rows | this kernel ms | aten int4 ms | aten / this |\n| --- | --- | --- | --- |")
    for r in compare(args.rows, args.reps):
        print(f"| {r['rows']} | {r['ours']:.2f} | {r['aten']:.2f} | {r['ratio']:.2f} |")


if __name__ == "__main__":
    main()
