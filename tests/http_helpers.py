"""Helpers shared by the HTTP tests (test_medusa.py and tests/test_*.py)."""

from __future__ import annotations

import time

import httpx


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
