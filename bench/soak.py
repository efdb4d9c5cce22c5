"""Soak test: mixed streaming and non-streaming completions at moderate concurrency for a while;
prints requests served, errors (any non-200, in-band error or stream without [DONE]), the server's
RSS at the start and the end, and latency percentiles.

    python -m bench.soak                      # starts `python app.py` on a free port, 10 minutes
    python -m bench.soak --minutes 1 --concurrency 4
    python -m bench.soak --url http://host:8000 --minutes 10   # a running server
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import statistics
import time

import httpx

from bench.loadgen import local_server, server_rss_mb, stream_completion
from config.settings import DEFAULT_HEADS, DEFAULT_MODEL

PROMPTS = ["def read_config(path):", "import numpy as np\n", "class Stack:\n    def __init__(self):",
           "for i in range(10):\n    print(", "def parse_args(argv=None):\n    parser = argparse.",
           "import os\nimport sys\n\n", "    def __repr__(self):\n        return"]


async def one(client: httpx.AsyncClient, rng: random.Random) -> tuple[bool, float, str]:
    """(succeeded, seconds, why not) of one random request."""
    body = {"prompt": rng.choice(PROMPTS), "max_tokens": rng.randint(8, 64), "temperature": rng.choice([0, 0.8]),
            "stream": rng.random() < 0.5}
    start = time.perf_counter()
    try:
        if not body["stream"]:
            r = await client.post("/v1/completions", json=body)
            ok = r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1
            return ok, time.perf_counter() - start, "" if ok else f"HTTP {r.status_code}: {r.text[:200]}"
        t = await stream_completion(client, body)
        return t.ok and t.output_tokens >= 1, t.end, t.error or ("" if t.output_tokens else "no tokens")
    except httpx.HTTPError as e:
        return False, time.perf_counter() - start, repr(e)


async def soak(url: str, minutes: float, concurrency: int, seed: int) -> dict:
    end = time.monotonic() + 60 * minutes
    latencies, errors, rss = [], [], []

    async def worker(i: int) -> None:
        rng = random.Random(seed * 1000 + i)
        async with httpx.AsyncClient(base_url=url, timeout=120) as client:
            while time.monotonic() < end:
                ok, seconds, why = await one(client, rng)
                latencies.append(seconds)
                if not ok:
                    errors.append(why)

    async def sample_rss(client: httpx.AsyncClient) -> None:
        while time.monotonic() < end:
            if (mb := await server_rss_mb(client)) is not None:
                rss.append(mb)
            await asyncio.sleep(min(15.0, max(0.0, end - time.monotonic())))

    async with httpx.AsyncClient(base_url=url, timeout=120) as client:
        await asyncio.gather(*(one(client, random.Random(i)) for i in range(concurrency)))  # warm-up, not counted
        await asyncio.gather(*(worker(i) for i in range(concurrency)), sample_rss(client))
        if (mb := await server_rss_mb(client)) is not None:
            rss.append(mb)
    q = statistics.quantiles(latencies, n=100, method="inclusive")
    return {"minutes": minutes, "concurrency": concurrency, "requests": len(latencies), "errors": len(errors),
            "first_errors": errors[:5], "latency_s": {"p50": round(q[49], 3), "p90": round(q[89], 3),
                                                     "p99": round(q[98], 3), "max": round(max(latencies), 3)},
            "rss_mb": {"start": round(rss[0], 1), "end": round(rss[-1], 1), "max": round(max(rss), 1),
                       "growth_percent": round(100 * (rss[-1] / rss[0] - 1), 1)} if rss else None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", help="a running server (default: start one)")
    parser.add_argument("--model", default=DEFAULT_MODEL, help="the model of the started server")
    parser.add_argument("--heads", default=str(DEFAULT_HEADS))
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    flags = ["--model-name", args.model, "--medusa-heads", args.heads]
    with contextlib.nullcontext(args.url.rstrip("/")) if args.url else local_server(*flags) as url:
        result = asyncio.run(soak(url, args.minutes, args.concurrency, args.seed))
    print(json.dumps(result, indent=1))
    if result["errors"]:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
