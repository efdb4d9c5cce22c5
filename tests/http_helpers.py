"""Helpers shared by the HTTP tests (test_medusa.py and tests/*/test_*.py)."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

from bench.loadgen import free_port
from config.settings import SMALL_MODEL

ROOT = Path(__file__).resolve().parents[1]


def assert_error(r: httpx.Response, status: int) -> dict:
    """The answer is `status` in the OpenAI error shape, with a message and no stack trace; returns the error."""
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    error = body["error"]
    assert error["code"] == status and error["message"] and "Traceback" not in error["message"]
    return error


def wait_for(condition, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def sse_events(raw: str) -> list[str]:
    return [e[6:] for e in raw.split("\n\n") if e.startswith("data: ")]


def streamed(url: str, body: dict, first: threading.Event, headers: dict | None = None) -> list[str]:
    """POST body to url as a stream (usage on); sets `first` once the first bytes arrive; the events."""
    body = {**body, "stream": True, "stream_options": {"include_usage": True}}
    raw = ""
    with httpx.stream("POST", url + "/v1/completions", json=body, headers=headers, timeout=120) as r:
        assert r.status_code == 200, r.read()
        for text in r.iter_text():
            raw += text
            first.set()
    return sse_events(raw)


def serve(*args: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "LOG_LEVEL": "warning"}
    small = ["--model-name", str(SMALL_MODEL), "--medusa-heads", str(SMALL_MODEL / "medusa")]  # flags after win
    return subprocess.Popen([sys.executable, "app.py", "--device", "cpu", *small, *args], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def serving(*args: str, port: int | None = None) -> tuple[subprocess.Popen, str]:
    """`python app.py` on a free port (or `port`), once it answers /health; and its URL."""
    port = port or free_port()
    server, url = serve("--port", str(port), *args), f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        assert server.poll() is None and time.monotonic() < deadline, "the server never became ready"
        try:
            if httpx.get(url + "/health").status_code == 200:
                return server, url
        except httpx.ConnectError:
            pass
        time.sleep(0.1)
