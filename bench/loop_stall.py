"""How long small, hostile bodies hold the HTTP process's event loop: while each attack body is sent
a few times, a probe asks GET /health every 10 ms and keeps its slowest answer (and the attack's
own answer time). Prints a table and JSON.

    python -m bench.loop_stall                   # starts `python app.py` on a free port
    python -m bench.loop_stall --url http://127.0.0.1:8000
"""

from __future__ import annotations

import argparse
import json
import threading
import time

import httpx

from bench.loadgen import local_server

ATTACKS = {  # name: the body, as bytes (each under the default MAX_BODY_BYTES)
    "160k empty prompts": json.dumps({"prompt": [""] * 160_000}).encode(),
    "300k numeric stops": json.dumps({"prompt": "x", "stop": [1] * 300_000}).encode(),
    "a body of 100k objects": json.dumps([{}] * 100_000).encode(),
    "a prompt of 100k objects": json.dumps({"prompt": [{}] * 100_000}).encode(),
    "130k negative token ids": json.dumps({"prompt": [-1] * 130_000}).encode(),
    "51k emoji": json.dumps({"prompt": "\N{GRINNING FACE}" * 51_000}, ensure_ascii=False).encode(),
}


class HealthProbe:
    """GET /health every `interval` s on a thread of its own; `worst` is the slowest answer seen."""

    def __init__(self, url: str, interval: float = 0.01):
        self.url, self.interval, self.worst, self.answers = url, interval, 0.0, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> HealthProbe:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        with httpx.Client(base_url=self.url, timeout=30) as c:
            while not self._stop.is_set():
                start = time.perf_counter()
                assert c.get("/health").status_code == 200
                self.worst = max(self.worst, time.perf_counter() - start)
                self.answers += 1
                self._stop.wait(self.interval)


def attack(url: str, body: bytes, repeats: int = 3) -> dict:
    """Send `body` `repeats` times under a health probe: its statuses, slowest answer, worst probe."""
    statuses, slowest, last = [], 0.0, None
    with HealthProbe(url) as probe, httpx.Client(base_url=url, timeout=60) as c:
        while probe.answers < 2:  # the probe is running
            time.sleep(0.01)
        for _ in range(repeats):
            start = time.perf_counter()
            last = c.post("/v1/completions", content=body, headers={"content-type": "application/json"})
            statuses.append(last.status_code)
            slowest = max(slowest, time.perf_counter() - start)
        seen = probe.answers
        while probe.answers < seen + 2:  # a probe that was waiting for the loop has answered
            time.sleep(0.01)
    return {"statuses": statuses, "answer_ms": round(1e3 * slowest, 1), "worst_health_ms": round(1e3 * probe.worst, 1),
            "probes": probe.answers, "last": last}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", help="a running server (default: start one)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    def run(url: str) -> dict:
        with httpx.Client(base_url=url) as c:
            c.post("/v1/completions", json={"prompt": "x", "max_tokens": 1})  # warm
        return {name: attack(url, body, args.repeats) for name, body in ATTACKS.items()}

    if args.url:
        results = run(args.url)
    else:
        with local_server() as url:
            results = run(url)
    print(f"{'attack':26} {'bytes':>8} {'statuses':>16} {'answer ms':>10} {'worst /health ms':>17}")
    for name, r in results.items():
        print(f"{name:26} {len(ATTACKS[name]):8} {str(r['statuses']):>16} {r['answer_ms']:10} {r['worst_health_ms']:17}")
    print(json.dumps({name: {k: v for k, v in r.items() if k != "last"} for name, r in results.items()}))


if __name__ == "__main__":
    main()
