"""The adversarial probe's findings (issue 23), each through HTTP: one request's sampling parameters
cannot fail the step of others, and small hostile bodies cannot hold the event loop (a timed
/health probe runs during each), nor escape the rate limit by being refused."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from bench.loop_stall import ATTACKS, attack
from tests.http_helpers import assert_error

BYSTANDERS = [{"prompt": p, "max_tokens": 12, "ignore_eos": True}
              for p in ("def read_config(path):", "import numpy as np\n", "class Stack:\n")]
HOSTILE_SAMPLING = [  # each was a 500 for every request in its step
    {"prompt": "x", "max_tokens": 4, "temperature": 0.8, "top_k": 2**70},
    {"prompt": "x", "max_tokens": 4, "temperature": 0.8, "top_k": 100_000},
    {"prompt": "y", "max_tokens": 4, "temperature": 0.8, "top_k": 40},
    {"prompt": "z", "max_tokens": 4, "temperature": 1e-39, "seed": 1},
    {"prompt": "w", "max_tokens": 4, "temperature": 0.9, "top_p": 1e-46},
]


def test_no_sampling_parameters_fail_the_requests_beside_them(base_url, http):
    alone = [http.post("/v1/completions", json=b).json()["choices"][0]["text"] for b in BYSTANDERS]
    with ThreadPoolExecutor(len(BYSTANDERS) + len(HOSTILE_SAMPLING)) as pool:
        futures = [pool.submit(httpx.post, base_url + "/v1/completions", json=b, timeout=60)
                   for b in [*HOSTILE_SAMPLING, *BYSTANDERS]]
        answers = [f.result() for f in futures]
    assert [r.status_code for r in answers] == [200] * len(answers), [r.text for r in answers if r.status_code != 200]
    assert [r.json()["choices"][0]["text"] for r in answers[len(HOSTILE_SAMPLING):]] == alone


def test_a_vanishing_temperature_is_greedy(http):
    greedy = http.post("/v1/completions", json={"prompt": "def fibonacci(n):\n", "max_tokens": 12}).json()
    tiny = http.post("/v1/completions", json={"prompt": "def fibonacci(n):\n", "max_tokens": 12,
                                               "temperature": 1e-39, "seed": 1}).json()
    assert tiny["choices"][0]["text"] == greedy["choices"][0]["text"]


@pytest.mark.parametrize("name", ATTACKS)
def test_a_hostile_body_is_refused_without_holding_the_event_loop(base_url, http, name):
    result = attack(base_url, ATTACKS[name])
    assert result["statuses"] == [400] * 3
    assert result["worst_health_ms"] < 500, result  # 2-4 s before the bounds
    assert len(assert_error(result["last"], 400)["message"]) < 300


def test_long_lists_fail_fast_with_one_error_that_names_the_field(http):
    prompts = assert_error(http.post("/v1/completions", json={"prompt": ["a"] * 5000}), 400)
    assert prompts["param"] == "prompt" and "at most 1024" in prompts["message"]
    stops = assert_error(http.post("/v1/completions", json={"prompt": "x", "stop": ["a"] * 5}), 400)
    assert stops["param"] == "stop" and "at most 4" in stops["message"]


def test_refused_bodies_count_against_the_rate_limit(settings, serve_with):
    with serve_with(settings.model_copy(update={"rate_limit": "3/minute"})) as url, httpx.Client(base_url=url) as c:
        for body in ({"prompt": [""] * 1000}, {"prompt": "x", "top_p": 7}, {"prompt": "x", "stop": [1] * 10}):
            r = c.post("/v1/completions", json=body)
            assert_error(r, 400)
            assert "x-ratelimit-remaining" in r.headers
        limited = c.post("/v1/completions", json={"prompt": "x", "max_tokens": 1})
        assert_error(limited, 429)
        assert_error(c.post("/v1/completions", content=b"{not json"), 429)
