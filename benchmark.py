"""Standard vs speculative decoding under concurrent load, through the HTTP service.

Concurrent streaming clients (asyncio + httpx) send greedy completions of a fixed length at each
concurrency level; standard and speculative phases alternate (never mixed in one batch) and the whole
run is repeated so that machine drift hits both modes. Reported per mode and level, as medians of the
repeats: requests/s, output tokens/s, TTFT, TPOT, inter-chunk latency and end-to-end latency (p50,
p90, p99), accepted tokens per step, errors, the server's peak RSS. Writes every request and the
summary as CSV, and a plot of tokens/s and p50 latency against concurrency.

    python benchmark.py                                     # starts the service on the bundled model
    python benchmark.py --levels 1,4 --requests 8 --repeats 1
    python benchmark.py --url http://host:8000 --prompts prompts.json
    python benchmark.py --baseline-hf                       # also HF generate() and the engine in-process
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import csv
import json
import random
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np
from tqdm import tqdm

from bench.baseline import InProcess
from bench.loadgen import ROOT, Timed, local_server, server_rss_mb, speculative_steps, stream_completion
from config.settings import DEFAULT_HEADS, DEFAULT_MODEL

MODES = ("standard", "speculative")
PROMPTS_FILE = ROOT / "benchmark_prompts.json"
PERCENTILES = (50, 90, 99)


@dataclass
class Phase:
    """One mode at one concurrency level in one repeat: its requests and how long they took together."""

    mode: str
    level: int
    repeat: int
    seconds: float
    requests: list[Timed]
    peak_rss_mb: float | None
    tree_steps: dict[int, float] = field(default_factory=dict)  # the phase's speculative steps by tree nodes


def request_body(prompt: str, mode: str, max_tokens: int) -> dict:
    """Greedy, a fixed number of tokens (EOS ignored, as serving benchmarks send it)."""
    return {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
            "speculative": mode == "speculative"}


async def run_phase(url: str, mode: str, level: int, prompts: list[str], count: int, max_tokens: int,
                    rate: float | None, rng: random.Random, bar: tqdm | None
                    ) -> tuple[float, list[Timed], float | None, dict[int, float]]:
    """`count` requests, at most `level` in flight, arriving as a Poisson process of `rate` per second
    (all at once when None); returns (seconds from the first send to the last answer, timings in
    request order, the server's peak RSS meanwhile, its speculative steps meanwhile by tree nodes)."""
    gaps = [rng.expovariate(rate) if rate else 0.0 for _ in range(count)]
    slots = asyncio.Semaphore(level)
    rss: list[float] = []
    limits = httpx.Limits(max_connections=level + 1)
    async with httpx.AsyncClient(base_url=url, timeout=httpx.Timeout(600.0), limits=limits) as client:
        async def one(i: int, delay: float) -> Timed:
            await asyncio.sleep(delay)
            async with slots:
                t = await stream_completion(client, request_body(prompts[i % len(prompts)], mode, max_tokens))
            if bar is not None:
                bar.update()
            return t

        async def sample_rss(stop: asyncio.Event) -> None:
            while not stop.is_set():
                if (mb := await server_rss_mb(client)) is not None:
                    rss.append(mb)
                try:
                    await asyncio.wait_for(stop.wait(), 0.5)
                except TimeoutError:
                    pass

        stop = asyncio.Event()
        steps_before = await speculative_steps(client)
        sampler = asyncio.create_task(sample_rss(stop))
        start = time.perf_counter()
        timings = await asyncio.gather(*(one(i, d) for i, d in enumerate(np.cumsum(gaps))))
        seconds = time.perf_counter() - start
        stop.set()
        await sampler
        steps = {n: v - steps_before.get(n, 0.0) for n, v in (await speculative_steps(client)).items()}
    return seconds, list(timings), max(rss, default=None), {n: v for n, v in steps.items() if v}


def percentiles(values: list[float]) -> list[float | None]:
    return list(np.percentile(values, PERCENTILES)) if values else [None] * len(PERCENTILES)


def phase_stats(p: Phase) -> dict:
    """One phase's figures: rates over the phase's wall time, latency percentiles over its requests."""
    ok = [t for t in p.requests if t.ok]
    tokens = sum(t.output_tokens for t in ok)
    steps = sum(t.decode_steps for t in ok)
    decoded = sum(t.accepted_per_step * t.decode_steps for t in ok if t.accepted_per_step)
    row = {"mode": p.mode, "concurrency": p.level, "repeat": p.repeat, "requests": len(ok),
           "errors": len(p.requests) - len(ok), "seconds": p.seconds, "requests_per_s": len(ok) / p.seconds,
           "output_tokens_per_s": tokens / p.seconds, "accepted_tokens_per_step": decoded / steps if steps else None}
    for name, values in (("ttft", [t.ttft for t in ok if t.ttft is not None]),
                         ("tpot", [t.tpot for t in ok if t.tpot is not None]),
                         ("itl", [gap for t in ok for gap in t.itl]), ("e2e", [t.end for t in ok])):
        for q, v in zip(PERCENTILES, percentiles(values)):
            row[f"{name}_p{q}_ms"] = None if v is None else 1e3 * v
    overheads = [t.end * 1e3 / t.engine_ms - 1 for t in ok if t.engine_ms]  # over the engine's own time for it
    row["http_overhead_p50"] = statistics.median(overheads) if overheads else None
    row["peak_rss_mb"] = p.peak_rss_mb
    steps = sum(p.tree_steps.values())  # tokens verified per speculative sequence, averaged over the steps
    row["tree_nodes"] = sum(n * c for n, c in p.tree_steps.items()) / steps if steps else None
    return row


def summarize(rows: list[dict]) -> list[dict]:
    """Per mode and level: the median of each figure over the repeats (errors and requests summed), and
    speculative over standard output tokens/s as the median of the ratios within each repeat."""
    keys = sorted({(r["mode"], r["concurrency"]) for r in rows}, key=lambda k: (k[1], MODES.index(k[0])))
    by = {(r["mode"], r["concurrency"], r["repeat"]): r for r in rows}
    out = []
    for mode, level in keys:
        mine = [r for r in rows if (r["mode"], r["concurrency"]) == (mode, level)]
        row = {"mode": mode, "concurrency": level, "repeats": len(mine)}
        for k in mine[0]:
            if k in row or k == "repeat":
                continue
            values = [r[k] for r in mine if r[k] is not None]
            row[k] = sum(values) if k in ("requests", "errors") else statistics.median(values) if values else None
        standard = [(by.get(("standard", level, r["repeat"])), r) for r in mine]
        ratios = [r["output_tokens_per_s"] / s["output_tokens_per_s"] for s, r in standard if s and s["output_tokens_per_s"]]
        row["vs_standard"] = statistics.median(ratios) if ratios else None
        out.append(row)
    return out


COLUMNS = [("mode", "mode", "{}"), ("conc", "concurrency", "{}"), ("req/s", "requests_per_s", "{:.2f}"),
           ("tok/s", "output_tokens_per_s", "{:.1f}"), ("vs std", "vs_standard", "{:.2f}"),
           ("TTFT p50", "ttft_p50_ms", "{:.0f}"), ("p90", "ttft_p90_ms", "{:.0f}"), ("p99", "ttft_p99_ms", "{:.0f}"),
           ("TPOT p50", "tpot_p50_ms", "{:.1f}"), ("p90", "tpot_p90_ms", "{:.1f}"), ("p99", "tpot_p99_ms", "{:.1f}"),
           ("ITL p50", "itl_p50_ms", "{:.1f}"), ("p90", "itl_p90_ms", "{:.1f}"), ("p99", "itl_p99_ms", "{:.1f}"),
           ("E2E p50", "e2e_p50_ms", "{:.0f}"), ("p90", "e2e_p90_ms", "{:.0f}"), ("p99", "e2e_p99_ms", "{:.0f}"),
           ("acc/step", "accepted_tokens_per_step", "{:.2f}"), ("errors", "errors", "{}"),
           ("tree", "tree_nodes", "{:.1f}"), ("RSS MB", "peak_rss_mb", "{:.0f}")]


def table(summary: list[dict]) -> str:
    """A fixed-width table (markdown pipes, so the README can show it as printed)."""
    cells = [[title for title, _, _ in COLUMNS]]
    for row in summary:
        cells.append(["-" if row[key] is None else fmt.format(row[key]) for _, key, fmt in COLUMNS])
    widths = [max(len(r[i]) for r in cells) for i in range(len(COLUMNS))]
    lines = ["| " + " | ".join(c.rjust(w) for c, w in zip(r, widths)) + " |" for r in cells]
    lines.insert(1, "| " + " | ".join("-" * (w - 1) + ":" for w in widths) + " |")
    return "\n".join(lines)


def write_csv(path: Path, rows: list[dict]) -> None:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def request_rows(phases: list[Phase]) -> list[dict]:
    rows = []
    for p in phases:
        for i, t in enumerate(p.requests):
            rows.append({"mode": p.mode, "concurrency": p.level, "repeat": p.repeat, "request": i, "ok": t.ok,
                         "error": t.error, "prompt_tokens": t.prompt_tokens, "output_tokens": t.output_tokens,
                         "ttft_ms": t.ttft and 1e3 * t.ttft, "tpot_ms": t.tpot and 1e3 * t.tpot,
                         "e2e_ms": 1e3 * t.end, "chunks": len(t.chunks), "decode_steps": t.decode_steps,
                         "accepted_tokens_per_step": t.accepted_per_step, "server_ms": t.server_ms,
                         "engine_ms": t.engine_ms})
    return rows


def plot(summary: list[dict], path: Path, title: str, tree_nodes: int | None = None) -> None:
    """Tokens/s, p50 latencies and the adaptive tree's size (up to `tree_nodes`, the whole tree) by concurrency."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, middle, right) = plt.subplots(1, 3, figsize=(15, 4))
    for mode, style in zip(MODES, ("o-", "s--")):
        rows = [r for r in summary if r["mode"] == mode]
        if not rows:
            continue
        levels = [r["concurrency"] for r in rows]
        left.plot(levels, [r["output_tokens_per_s"] for r in rows], style, label=mode)
        middle.plot(levels, [r["e2e_p50_ms"] for r in rows], style, label=f"{mode}, end to end")
        middle.plot(levels, [r["ttft_p50_ms"] for r in rows], style, alpha=0.4, label=f"{mode}, first token")
        trees = [(r["concurrency"], r["tree_nodes"]) for r in rows if r.get("tree_nodes") is not None]
        if trees:  # where the adaptive tree shrinks
            right.plot(*zip(*trees), style, label=f"{mode}: tokens verified per sequence (mean)")
            right.set_ylim(0, max(max(n for _, n in trees), tree_nodes or 0) + 1)
    for ax, ylabel in ((left, "output tokens/s"), (middle, "p50 latency (ms)"), (right, "tree nodes in use")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrent clients")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def checks(summary: list[dict], baseline: dict | None) -> list[str]:
    """The comparisons the README quotes, as sentences."""
    at = {(r["mode"], r["concurrency"]): r for r in summary}
    levels = sorted({r["concurrency"] for r in summary})
    lines = []
    ratios = [f"{c}: {at['speculative', c]['vs_standard']:.2f}x" for c in levels if ("speculative", c) in at]
    if ratios:
        lines.append("speculative / standard output tokens/s by concurrency: " + ", ".join(ratios))
    if ("standard", 1) in at:
        one = at["standard", 1]["output_tokens_per_s"]
        lines.append("standard output tokens/s vs concurrency 1: " + ", ".join(
            f"{c}: {at['standard', c]['output_tokens_per_s'] / one:.2f}x" for c in levels[1:] if ("standard", c) in at))
    for mode in MODES:
        if (mode, 1) in at and at[mode, 1]["http_overhead_p50"] is not None:
            lines.append(f"{mode} at concurrency 1: end-to-end over the server engine's own time for the same "
                         f"request, median {100 * at[mode, 1]['http_overhead_p50']:+.1f}%")
    if baseline:
        hf = baseline["tokens_per_s"]["hf"]
        if ("standard", 1) in at:
            http = at["standard", 1]["output_tokens_per_s"]
            lines.append(f"HF generate() in-process: {hf:.1f} tokens/s; standard over HTTP at concurrency 1: "
                         f"{http:.1f} ({http / hf:.2f}x)")
        for mode in MODES:
            if (mode, 1) in at:
                engine_ms, http_ms = 1e3 * baseline["seconds_per_request"][mode], at[mode, 1]["e2e_p50_ms"]
                lines.append(f"{mode} at concurrency 1, median per request: {http_ms:.0f} ms over HTTP, "
                             f"{engine_ms:.0f} ms in-process engine in this process ({100 * (http_ms / engine_ms - 1):+.1f}%)")
        lines.append(f"in-process outputs: standard == HF generate(): {baseline['standard_equals_hf']}; "
                     f"speculative == standard: {baseline['speculative_equals_standard']}")
    return lines


def server_info(url: str) -> dict:
    """This service's /info; for another OpenAI-compatible server (llama-server), what /v1/models says."""
    r = httpx.get(url + "/info")
    if r.status_code == 200:
        return r.json()
    model = httpx.get(url + "/v1/models").json()["data"][0]["id"]
    return {"model": Path(model).name, "tree": {"name": "no Medusa", "nodes": 1}, "device": "?", "dtype": "?",
            "max_batch_size": "?"}


def load_prompts(path: Path) -> list[str]:
    """A JSON list of prompt strings, or an object with one under "prompts"."""
    data = json.loads(path.read_text())
    prompts = data["prompts"] if isinstance(data, dict) else data
    if not prompts or not all(isinstance(p, str) and p for p in prompts):
        raise SystemExit(f"{path}: expected a non-empty list of prompt strings")
    return prompts


def requests_at(args: argparse.Namespace, level: int) -> int:
    return args.requests or max(8, 2 * level)


async def run_all(url: str, args: argparse.Namespace, prompts: list[str], baseline: InProcess | None
                  ) -> list[Phase]:
    counts = {c: requests_at(args, c) for c in args.levels}
    top = max(args.levels)
    for mode in args.modes:  # warm-up, discarded: every batch size up to the largest level
        await run_phase(url, mode, top, prompts, top, min(8, args.max_tokens), None, random.Random(0), None)
    phases = []
    with tqdm(total=len(args.modes) * args.repeats * sum(counts.values()), unit="req") as bar:
        for repeat in range(args.repeats):
            for level in args.levels:
                order = args.modes if repeat % 2 == 0 else args.modes[::-1]  # neither mode always goes first
                for mode in order:
                    bar.set_postfix_str(f"repeat {repeat + 1}, {mode}, concurrency {level}")
                    rng = random.Random(f"{args.seed}-{repeat}-{level}")  # both modes: the same arrivals
                    seconds, timings, rss, trees = await run_phase(url, mode, level, prompts, counts[level],
                                                            args.max_tokens, args.rate, rng, bar)
                    phases.append(Phase(mode, level, repeat, seconds, timings, rss, trees))
                if baseline is not None and level == min(args.levels):
                    bar.set_postfix_str(f"repeat {repeat + 1}, in-process baseline")
                    baseline.run()  # blocks the event loop: nothing is in flight now
    return phases


def arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", help="a running server (default: start `app.py` on a free port, rate limits off)")
    parser.add_argument("--model", default=DEFAULT_MODEL, help="the model the started server (and the "
                        "--baseline-hf run) loads")
    parser.add_argument("--heads", default=str(DEFAULT_HEADS))
    parser.add_argument("--max-batch-size", type=int, help="of the started server; default: the largest level")
    parser.add_argument("--server-flag", action="append", default=[], help="another flag for the started server, "
                        "e.g. --server-flag=--no-deepspeed (repeatable)")
    parser.add_argument("--levels", type=lambda s: [int(c) for c in s.split(",")], default=[1, 4, 16, 64],
                        help="concurrency levels, comma-separated")
    parser.add_argument("--requests", type=int, help="per level and mode; default: 2 x concurrency, at least 8")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--rate", type=float, help="Poisson arrivals per second; default: all requests at once")
    parser.add_argument("--prompts", type=Path, default=PROMPTS_FILE, help="JSON list of prompt strings")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--modes", type=lambda s: s.split(","), default=list(MODES))
    parser.add_argument("--baseline-hf", action="store_true", help="also time HF generate() and the engine "
                        "in this process, batch 1, on the requests of the lowest level, once per repeat")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmark_results", help="folder for the CSVs and plot")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if unknown := set(args.modes) - set(MODES):
        parser.error(f"unknown modes {sorted(unknown)}; choose from {MODES}")
    return args


def main() -> None:
    args = arguments()
    prompts = load_prompts(args.prompts)
    flags = ["--model-name", args.model, "--medusa-heads", args.heads, "--max-batch-size",
             str(args.max_batch_size or max(args.levels)), "--queue-size", str(max(64, *args.levels)), *args.server_flag]
    server = contextlib.nullcontext(args.url.rstrip("/")) if args.url else local_server(*flags)
    first = requests_at(args, min(args.levels))
    baseline = InProcess(args.model, args.heads, [prompts[i % len(prompts)] for i in range(first)], MODES,
                         args.max_tokens) if args.baseline_hf else None
    with server as url:
        info = server_info(url)
        phases = asyncio.run(run_all(url, args, prompts, baseline))
    rows = [phase_stats(p) for p in phases]
    summary = summarize(rows)
    args.out.mkdir(parents=True, exist_ok=True)
    write_csv(args.out / "requests.csv", request_rows(phases))
    write_csv(args.out / "phases.csv", rows)
    write_csv(args.out / "summary.csv", summary)
    threads = f", CPU threads: {info['threads']}" if info.get("threads") else ""
    title = (f"{info['model']} ({info['tree']['name']}, {info['tree']['nodes']} nodes), {info['device']} "
             f"{info['dtype']}{threads}, max batch {info['max_batch_size']}, {args.max_tokens} tokens per request, "
             f"median of {args.repeats}")
    plot(summary, args.out / "benchmark.png", title, info["tree"]["nodes"])
    result = baseline and baseline.result()
    lines = checks(summary, result)
    (args.out / "run.json").write_text(json.dumps({"command": vars(args) | {"out": str(args.out), "prompts": str(
        args.prompts)}, "server": info, "baseline": result, "checks": lines}, indent=1) + "\n")
    print(f"\n{title}\n{table(summary)}\n" + "\n".join(lines) + f"\nCSVs and plot: {args.out}")
    if any(r["errors"] for r in summary):
        raise SystemExit(1)


if __name__ == "__main__":
    main()
