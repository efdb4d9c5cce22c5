"""Soak test: mixed streaming and non-streaming completions at moderate concurrency for a while;
prints requests served, errors (any non-200, in-band error or stream without [DONE]), the server's
RSS at the start and the end, and latency percentiles.

    python -m scripts.soak                      # starts `python app.py` on a free port, 10 minutes
    python -m scripts.soak --minutes 1 --concurrency 4
    python -m scripts.soak --url http://host:8000 --minutes 10   # a running server (RSS not read)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil

PROMPTS = ["def read_config(path):", "import numpy as np\n", "class Stack:\n    def __init__(self):",
           "for i in range(10):\n    print(", "def parse_args(argv=None):\n    parser = argparse.",
           "import os\nimport sys\n\n", "    def __repr__(self):\n        return"]


def start_server(root: Path) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([sys.executable, "app.py", "--port", str(port), "--log-level", "warning"], cwd=root)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and server.poll() is None:
        try:
            if httpx.get(url + "/health").status_code == 200:
                return server, url
        except httpx.ConnectError:
            pass
        time.sleep(0.2)
    server.kill()
    raise SystemExit("the server did not become ready")


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
        async with client.stream("POST", "/v1/completions", json=body) as r:
            if r.status_code != 200:
                return False, time.perf_counter() - start, f"HTTP {r.status_code}"
            data = [line[6:] async for line in r.aiter_lines() if line.startswith("data: ")]
        if data[-1:] != ["[DONE]"] or any("error" in json.loads(d) for d in data[:-1]):
            return False, time.perf_counter() - start, f"stream ended with {data[-2:]}"
        return True, time.perf_counter() - start, ""
    except httpx.HTTPError as e:
        return False, time.perf_counter() - start, repr(e)


async def soak(url: str, minutes: float, concurrency: int, pid: int | None, seed: int) -> dict:
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

    async def sample_rss() -> None:
        while time.monotonic() < end:
            rss.append(psutil.Process(pid).memory_info().rss / 2**20)
            await asyncio.sleep(15)

    async with httpx.AsyncClient(base_url=url, timeout=120) as client:  # warm-up, not counted
        await asyncio.gather(*(one(client, random.Random(i)) for i in range(concurrency)))
    tasks = [worker(i) for i in range(concurrency)] + ([sample_rss()] if pid else [])
    await asyncio.gather(*tasks)
    if pid:
        rss.append(psutil.Process(pid).memory_info().rss / 2**20)
    q = statistics.quantiles(latencies, n=100)
    return {"minutes": minutes, "concurrency": concurrency, "requests": len(latencies), "errors": len(errors),
            "first_errors": errors[:5], "latency_s": {"p50": round(q[49], 3), "p90": round(q[89], 3),
                                                     "p99": round(q[98], 3), "max": round(max(latencies), 3)},
            "rss_mb": {"start": round(rss[0], 1), "end": round(rss[-1], 1), "max": round(max(rss), 1),
                       "growth_percent": round(100 * (rss[-1] / rss[0] - 1), 1)} if rss else None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", help="a running server (default: start one with the bundled model)")
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    server, url = (None, args.url) if args.url else start_server(Path(__file__).resolve().parent.parent)
    try:
        result = asyncio.run(soak(url, args.minutes, args.concurrency, server and server.pid, args.seed))
    finally:
        if server is not None:
            server.terminate()
            server.wait(timeout=60)
    print(json.dumps(result, indent=1))
    if result["errors"]:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
