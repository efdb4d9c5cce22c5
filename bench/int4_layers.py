"""The int4 forward with its decoder layers in C++ (engine/int4_layers.cpp) against the same layers in
Python (Int4Layer.forward), interleaved in one process so that the machine's drift hits both alike:
median ms of one forward by cached length L, batch B and tokens per sequence T.

    python -m bench.int4_layers                    # the default model, its GGUF blocks
    python -m bench.int4_layers --reps 5 --threads 1
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time

import torch

from config.settings import DEFAULT_HEADS, DEFAULT_MODEL
from engine.kv_cache import KVCache, step_mask
from load_medusa_from_hf import load_medusa_model

SHAPES = ((100, 1, 1), (100, 1, 3), (400, 1, 1), (100, 8, 1))  # (L, B, T)


@torch.inference_mode()
def compare(model, shapes=SHAPES, reps: int = 20, inner: int = 5) -> list[dict]:
    """Per shape: median ms of a forward with the C++ layers and with the Python layers."""
    runner, config, rows = model.runner, model.config, []
    if runner.native is None:
        raise SystemExit("the C++ layers were not built (see the log)")
    head_dim = runner.layers[0].head_dim
    for length, batch, tokens in shapes:
        ids = torch.randint(0, config.vocab_size, (batch, tokens))
        positions = length + torch.arange(tokens).expand(batch, tokens)
        tree = torch.tril(torch.ones(tokens, tokens, dtype=torch.bool)).expand(batch, tokens, tokens)
        mask = step_mask(torch.full((batch,), length), positions, tree, length + tokens, torch.float32)
        cache = KVCache(config.num_hidden_layers, batch, config.num_key_value_heads, length + tokens, head_dim,
                        torch.float32, "cpu")
        times = {"C++": [], "Python": []}
        for _ in range(reps):
            for name, layers in (("C++", contextlib.nullcontext), ("Python", runner.python_layers)):
                with layers():
                    for _ in range(inner):
                        start = time.perf_counter()
                        runner(ids, attention_mask=mask, position_ids=positions,
                               cache=cache.writer(slice(0, batch), positions, length + tokens))
                        times[name].append(time.perf_counter() - start)
        ms = {name: 1e3 * statistics.median(t) for name, t in times.items()}
        rows.append({"L": length, "B": batch, "T": tokens, **ms, "ratio": ms["Python"] / ms["C++"]})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--heads", default=str(DEFAULT_HEADS))
    parser.add_argument("--reps", type=int, default=20, help="alternations; 5 forwards of each per alternation")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, _ = load_medusa_model(args.model, args.heads, quantize="gguf")
    print(f"{model.weights}\n{args.threads} threads, median of {args.reps * 5} forwards each, interleaved\n")
    print("| L | B | T | C++ ms | Python ms | Python / C++ |\n| --- | --- | --- | --- | --- | --- |")
    for r in compare(model, reps=args.reps):
        print(f"| {r['L']} | {r['B']} | {r['T']} | {r['C++']:.1f} | {r['Python']:.1f} | {r['ratio']:.2f} |")


if __name__ == "__main__":
    main()
