"""API keys and rate limits, through the app as clients call it: keys are checked in constant time
and never logged; limits are per key (or client address), answered with OpenAI-shaped 429s and
X-RateLimit headers, and shared between replicas through a real redis-server."""

from __future__ import annotations

import logging

import pytest
from fastapi.testclient import TestClient

from app import create_app
from config.settings import Settings
from tests.http_helpers import assert_error

KEYS = "sk-first-0123456789,sk-second-abcdef"
BODY = {"prompt": "import os\n", "max_tokens": 2}


def app_client(settings, wait_ready, client=("testclient", 50000), **changes) -> TestClient:
    app = create_app(Settings(**{**settings.model_dump(), **changes}))
    c = TestClient(app, client=client)
    c.__enter__()
    wait_ready(c.get)
    return c


# ---- API keys ------------------------------------------------------------------------------------


def test_api_keys_guard_the_api_but_not_health_page_or_metrics(settings, wait_ready, caplog):
    caplog.set_level(logging.DEBUG)
    c = app_client(settings, wait_ready, api_keys=KEYS)
    try:
        missing = c.post("/v1/completions", json=BODY)
        assert "missing API key" in assert_error(missing, 401)["message"]
        assert missing.headers["WWW-Authenticate"] == "Bearer"
        wrong = c.post("/v1/completions", json=BODY, headers={"Authorization": "Bearer sk-wrong-guess"})
        assert assert_error(wrong, 401)["message"] == "invalid API key"
        assert_error(c.post("/v1/completions", json=BODY, headers={"Authorization": "Basic sk-first-0123456789"}), 401)
        for key in KEYS.split(","):
            ok = c.post("/v1/completions", json=BODY, headers={"Authorization": f"Bearer {key}"})
            assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 2
        for route in ("/v1/models", "/info"):
            assert_error(c.get(route), 401)
            assert c.get(route, headers={"Authorization": "Bearer sk-second-abcdef"}).status_code == 200
        assert c.get("/health").status_code == 200 and c.get("/metrics").status_code == 200
        assert c.get("/").status_code == 200
        info = c.get("/info", headers={"Authorization": "Bearer sk-first-0123456789"}).text
        assert "sk-" not in info
    finally:
        c.__exit__(None, None, None)
    logged = "\n".join(r.getMessage() for r in caplog.records) + caplog.text
    assert "sk-first" not in logged and "sk-second" not in logged and "sk-wrong" not in logged
    assert "sk-first" not in repr(Settings(api_keys=KEYS))


# ---- rate limits ---------------------------------------------------------------------------------


def test_no_rate_limit_unless_configured(settings, wait_ready):
    c = app_client(settings, wait_ready)
    try:
        for _ in range(5):
            r = c.post("/v1/completions", json=BODY)
            assert r.status_code == 200 and "X-RateLimit-Limit" not in r.headers
    finally:
        c.__exit__(None, None, None)


def assert_limited(r):
    error = assert_error(r, 429)
    assert error["type"] == "rate_limit_error" and "rate limit exceeded" in error["message"]
    assert 1 <= int(r.headers["Retry-After"]) <= 60
    assert r.headers["X-RateLimit-Limit"] == "3" and r.headers["X-RateLimit-Remaining"] == "0"


def test_rate_limit_per_client_address(settings, wait_ready):
    c = app_client(settings, wait_ready, rate_limit="3/minute")
    other = TestClient(c.app, client=("10.0.0.2", 40000))  # another address, same app
    try:
        remaining = []
        for body in (BODY, {**BODY, "stream": True}, BODY):  # a stream counts as one request
            r = c.post("/v1/completions", json=body)
            assert r.status_code == 200 and r.headers["X-RateLimit-Limit"] == "3"
            remaining.append(r.headers["X-RateLimit-Remaining"])
        assert remaining == ["2", "1", "0"]
        assert_limited(c.post("/v1/completions", json=BODY))
        assert c.get("/v1/models").status_code == 200 and c.get("/health").status_code == 200  # not limited
        assert other.post("/v1/completions", json=BODY).status_code == 200
    finally:
        c.__exit__(None, None, None)


def test_rate_limit_per_api_key(settings, wait_ready):
    c = app_client(settings, wait_ready, rate_limit="3/minute", api_keys=KEYS)
    first, second = ({"Authorization": f"Bearer {k}"} for k in KEYS.split(","))
    try:
        for _ in range(3):
            assert c.post("/v1/completions", json=BODY, headers=first).status_code == 200
        assert_limited(c.post("/v1/completions", json=BODY, headers=first))
        assert c.post("/v1/completions", json=BODY, headers=second).status_code == 200  # same address, other key
        assert_error(c.post("/v1/completions", json=BODY), 401)  # no key: 401 first, not a limit
    finally:
        c.__exit__(None, None, None)


def test_whitespace_around_a_key_does_not_escape_its_limit(settings, wait_ready):
    """"Bearer  k1" and "Bearer k1 " are the key k1 (the key guard strips them): the same bucket."""
    c = app_client(settings, wait_ready, rate_limit="3/minute", api_keys=KEYS)
    key = KEYS.split(",")[0]
    try:
        for spaces in ("", " ", "  "):
            r = c.post("/v1/completions", json=BODY, headers={"Authorization": f"Bearer {spaces}{key}{spaces}"})
            assert r.status_code == 200
        assert_limited(c.post("/v1/completions", json=BODY, headers={"Authorization": f"Bearer    {key}"}))
    finally:
        c.__exit__(None, None, None)


def test_bad_rate_limit_setting_is_refused_at_start():
    with pytest.raises(ValueError, match="rate_limit"):
        Settings(rate_limit="lots per minute")


def test_replicas_share_a_limit_through_redis(settings, wait_ready, redis_url):
    replicas = [app_client(settings, wait_ready, rate_limit="3/minute", rate_limit_storage=redis_url)
                for _ in range(2)]
    a, b = replicas
    try:
        assert a.post("/v1/completions", json=BODY).status_code == 200
        assert a.post("/v1/completions", json=BODY).status_code == 200
        assert b.post("/v1/completions", json=BODY).headers["X-RateLimit-Remaining"] == "0"  # b saw a's two
        assert_limited(b.post("/v1/completions", json=BODY))
        assert_limited(a.post("/v1/completions", json=BODY))
    finally:
        for c in replicas:
            c.__exit__(None, None, None)
