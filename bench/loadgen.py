"""The client side of the load tools (benchmark.py, bench/soak.py): start the service on a free local
port, send one streaming completion and time it as its client sees it, read the server's memory."""

from __future__ import annotations

import contextlib
import json
import re
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
TREE_STEPS = re.compile(rb'^medusa_speculative_steps_total\{nodes="(\d+)"\} (\S+)$', re.MULTILINE)
RSS = re.compile(rb"^(?:medusa_engine_)?process_resident_memory_bytes (\S+)$", re.MULTILINE)  # both processes


@contextlib.contextmanager
def local_server(*flags: str, ready_timeout: float = 300.0) -> Iterator[str]:
    """`python app.py` on a free port with `flags`, rate limits and API keys off; yields its URL once
    it answers /health, stops it (SIGTERM, then SIGKILL after a minute) at the end."""
    port = free_port()
    command = [sys.executable, "app.py", "--port", str(port), "--log-level", "warning", "--rate-limit=",
               "--api-keys=", *flags]
    server = subprocess.Popen(command, cwd=ROOT)
    url = f"http://127.0.0.1:{port}"
    try:
        until_healthy(url, server, ready_timeout, f"the server ({' '.join(command[1:])})")
        yield url
    finally:
        server.terminate()
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            server.kill()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def until_healthy(url: str, process: subprocess.Popen, timeout: float, what: str) -> None:
    """Wait for url/health to answer 200 (SystemExit if `process` exits or `timeout` passes first)."""
    deadline = time.monotonic() + timeout
    while not _healthy(url):
        if process.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"{what} did not become ready")
        time.sleep(0.2)


def _healthy(url: str) -> bool:
    try:
        return httpx.get(url + "/health").status_code == 200
    except httpx.TransportError:
        return False


async def _metrics(client: httpx.AsyncClient) -> bytes:
    """The server's /metrics, or nothing where it has none."""
    try:
        r = await client.get("/metrics")
    except httpx.HTTPError:
        return b""
    return r.content if r.status_code == 200 else b""


async def server_rss_mb(client: httpx.AsyncClient) -> float | None:
    """The server's resident memory (MB, its processes summed) from its /metrics, None where it does not say."""
    sizes = [float(m) for m in RSS.findall(await _metrics(client))]
    return sum(sizes) / 2**20 if sizes else None


async def speculative_steps(client: httpx.AsyncClient) -> dict[int, float]:
    """Decode steps so far with speculative sequences, by tokens verified per sequence (the tree in use)."""
    return {int(n): float(v) for n, v in TREE_STEPS.findall(await _metrics(client))}


@dataclass
class Timed:
    """One streamed completion as the client saw it; times in seconds from sending the request."""

    ok: bool = False
    error: str = ""
    chunks: list[float] = field(default_factory=list)  # arrival of each completion chunk
    end: float = 0.0
    prompt_tokens: int = 0
    output_tokens: int = 0
    decode_steps: int = 0
    accepted_per_step: float | None = None
    server_ms: float | None = None  # the server's own arrival-to-last-token time
    engine_ms: float | None = None  # the engine's own time for it (admission to last token)

    @property
    def ttft(self) -> float | None:
        return self.chunks[0] if self.chunks else None

    @property
    def tpot(self) -> float | None:
        """Time per output token after the first."""
        return (self.end - self.chunks[0]) / (self.output_tokens - 1) if self.chunks and self.output_tokens > 1 else None

    @property
    def itl(self) -> list[float]:
        """Gaps between chunks (a speculative step's chunk carries several tokens)."""
        return [b - a for a, b in zip(self.chunks, self.chunks[1:])]


async def stream_completion(client: httpx.AsyncClient, body: dict) -> Timed:
    """POST /v1/completions with `stream` and usage on; ok when it answered 200, sent no in-band error
    and ended with [DONE]."""
    body = {**body, "stream": True, "stream_options": {"include_usage": True}}
    t, start = Timed(), time.perf_counter()
    try:
        async with client.stream("POST", "/v1/completions", json=body) as r:
            if r.status_code != 200:
                await r.aread()
                t.error = f"HTTP {r.status_code}: {r.text[:200]}"
            else:
                await _read_events(r, t, start)
    except httpx.HTTPError as e:
        t.error = repr(e)
    t.end = time.perf_counter() - start
    return t


async def _read_events(r: httpx.Response, t: Timed, start: float) -> None:
    done = False
    async for line in r.aiter_lines():
        if not line.startswith("data: "):
            continue
        if line == "data: [DONE]":
            done = True
            continue
        event = json.loads(line[6:])
        if "error" in event:
            t.error = event["error"]["message"]
            continue
        if event["choices"]:
            t.chunks.append(time.perf_counter() - start)
        if event.get("usage"):  # its own chunk here; llama-server's comes with the last choice
            t.prompt_tokens, t.output_tokens = event["usage"]["prompt_tokens"], event["usage"]["completion_tokens"]
            metrics = event.get("metrics") or {}
            t.decode_steps, t.accepted_per_step = metrics.get("decode_steps", 0), metrics.get("accepted_tokens_per_step")
            t.server_ms, t.engine_ms = metrics.get("total_ms"), metrics.get("engine_ms")
    t.ok = done and not t.error
    if not done and not t.error:
        t.error = "the stream ended without [DONE]"
