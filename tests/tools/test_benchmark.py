"""benchmark.py: its figures from hand-made timings, and a whole run on a tiny configuration through
the path a user takes (the service started by the benchmark, streaming clients, CSVs, plot)."""

from __future__ import annotations

import asyncio
import csv
import json
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from bench.loadgen import Timed, stream_completion
from benchmark import Phase, phase_stats, summarize, table
from config.settings import SMALL_MODEL

ROOT = Path(__file__).resolve().parents[2]


def timed(chunks: list[float], end: float, tokens: int, steps: int, per_step: float) -> Timed:
    return Timed(ok=True, chunks=chunks, end=end, prompt_tokens=5, output_tokens=tokens, decode_steps=steps,
                 accepted_per_step=per_step)


def test_a_stream_is_read_in_this_services_shape_and_llama_servers():
    """Usage in a chunk of its own (this service), or with the last choice (llama-server: the peer script)."""
    choice = {"text": "a", "index": 0, "logprobs": None, "finish_reason": None}
    last = {**choice, "text": "", "finish_reason": "length"}
    usage = {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}
    ours = [{"choices": [choice]}, {"choices": [last]}, {"choices": [], "usage": usage, "metrics": {"decode_steps": 1}}]
    theirs = [{"choices": [choice]}, {"choices": [last], "usage": usage}]
    for events in (ours, theirs):
        body = "".join(f"data: {json.dumps(e)}\n\n" for e in events) + "data: [DONE]\n\n"

        async def read():
            transport = httpx.MockTransport(lambda request: httpx.Response(200, text=body))
            async with httpx.AsyncClient(transport=transport, base_url="http://x") as client:
                return await stream_completion(client, {"prompt": "p"})

        t = asyncio.run(read())
        assert t.ok and (t.prompt_tokens, t.output_tokens) == (3, 2) and len(t.chunks) == 2


def test_figures_of_a_phase_and_the_medians_of_the_repeats():
    a = timed([0.1, 0.2, 0.4], 0.4, 5, 2, 2.0)  # TTFT 0.1, TPOT 0.3 / 4, chunk gaps 0.1 and 0.2
    b = timed([0.3, 0.5], 0.5, 3, 1, 2.0)  # TTFT 0.3, TPOT 0.1, gap 0.2
    failed = Timed(error="HTTP 500", end=0.05)
    row = phase_stats(Phase("speculative", 2, 0, 2.0, [a, b, failed], 500.0))
    assert row["requests"] == 2 and row["errors"] == 1
    assert row["requests_per_s"] == 1.0 and row["output_tokens_per_s"] == 4.0
    assert row["ttft_p50_ms"] == pytest.approx(200) and row["ttft_p90_ms"] == pytest.approx(280)
    assert row["tpot_p50_ms"] == pytest.approx((75 + 100) / 2)
    assert row["itl_p50_ms"] == pytest.approx(200) and row["itl_p99_ms"] == pytest.approx(200)
    assert row["e2e_p50_ms"] == pytest.approx(450) and row["accepted_tokens_per_step"] == 2.0
    assert row["peak_rss_mb"] == 500.0

    one = timed([0.1], 0.2, 2, 1, 1.0)
    phases = [("standard", 0, 1.0), ("speculative", 0, 0.5), ("standard", 1, 1.0), ("speculative", 1, 2.0)]
    rows = [phase_stats(Phase(mode, 2, repeat, seconds, [one], 400.0)) for mode, repeat, seconds in phases]
    # speculative: 4 tokens/s (2x standard) in repeat 0, 1 token/s (0.5x) in repeat 1
    summary = summarize(rows)
    assert [(r["mode"], r["concurrency"], r["repeats"], r["requests"]) for r in summary] == [
        ("standard", 2, 2, 2), ("speculative", 2, 2, 2)]
    assert summary[0]["vs_standard"] == 1.0 and summary[1]["vs_standard"] == pytest.approx((2.0 + 0.5) / 2)
    assert summary[1]["output_tokens_per_s"] == pytest.approx((4.0 + 1.0) / 2)
    lines = table(summary).splitlines()
    assert len(lines) == 4 and "speculative" in lines[3] and "1.25" in lines[3]


def test_a_tiny_benchmark_run_end_to_end(tmp_path):
    small = ["--model", str(SMALL_MODEL), "--heads", str(SMALL_MODEL / "medusa")]  # the default model: benchmarks
    run = subprocess.run([sys.executable, "benchmark.py", "--levels", "1,2", "--requests", "2", "--max-tokens", "6",
                          "--repeats", "1", "--baseline-hf", "--out", str(tmp_path), *small],
                         cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    requests = list(csv.DictReader((tmp_path / "requests.csv").open()))
    assert len(requests) == 2 * 2 * 2  # modes x levels x requests
    assert all(r["ok"] == "True" and r["output_tokens"] == "6" and float(r["ttft_ms"]) > 0 for r in requests)
    for r in requests:
        per_step = float(r["accepted_tokens_per_step"])
        assert per_step == 1.0 if r["mode"] == "standard" else per_step >= 1.0
    summary = list(csv.DictReader((tmp_path / "summary.csv").open()))
    assert [(r["mode"], r["concurrency"], r["errors"]) for r in summary] == [
        ("standard", "1", "0"), ("speculative", "1", "0"), ("standard", "2", "0"), ("speculative", "2", "0")]
    assert all(float(r["peak_rss_mb"]) > 100 for r in summary)  # read from the server's /metrics
    for r in summary:  # the tree the adaptive engine verified, from the server's step counters
        assert r["tree_nodes"] == "" if r["mode"] == "standard" else 1 <= float(r["tree_nodes"]) <= 11
    png = (tmp_path / "benchmark.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    checks = json.loads((tmp_path / "run.json").read_text())["checks"]
    assert any("standard == HF generate(): True; speculative == standard: True" in line for line in checks)
    assert "| speculative |" in run.stdout and "tok/s" in run.stdout
