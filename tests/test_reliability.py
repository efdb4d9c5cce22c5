"""Whatever a client sends, it gets the documented status in the OpenAI error shape, and nothing else
changes: the server keeps serving and no request is left running or waiting."""

from __future__ import annotations

import re

import pytest

from protocol import MAX_STOP_CHARS, MAX_STOP_STRINGS

JSON = {"content-type": "application/json"}
BAD_INPUT = {  # id: (request arguments for httpx, expected status, the `param` the error names or None)
    "malformed JSON": ({"content": b'{"prompt": "x",', "headers": JSON}, 400, None),
    "invalid UTF-8": ({"content": b'{"prompt": "\xff\xfe"}', "headers": JSON}, 400, None),
    "body not an object": ({"json": ["x"]}, 400, None),
    "not JSON at all": ({"content": b"prompt=x", "headers": {"content-type": "application/x-www-form-urlencoded"}},
                        400, None),
    "missing prompt": ({"json": {"max_tokens": 4}}, 400, "prompt"),
    "empty prompt": ({"json": {"prompt": ""}}, 400, "prompt"),
    "empty prompt list": ({"json": {"prompt": []}}, 400, "prompt"),
    "an empty prompt among several": ({"json": {"prompt": ["def f():", ""]}}, 400, "prompt"),
    "prompt of the wrong type": ({"json": {"prompt": {"text": "x"}}}, 400, "prompt"),
    "prompt mixing text and ids": ({"json": {"prompt": ["x", 5]}}, 400, "prompt"),
    "token id out of vocabulary": ({"json": {"prompt": [10**6]}}, 400, "prompt"),
    "negative token id": ({"json": {"prompt": [-1]}}, 400, "prompt"),
    "prompt over the context window": ({"json": {"prompt": "x = 1\n" * 2000, "max_tokens": 8}}, 400, "prompt"),
    "max_tokens of the wrong type": ({"json": {"prompt": "x", "max_tokens": "ten"}}, 400, "max_tokens"),
    "max_tokens negative": ({"json": {"prompt": "x", "max_tokens": -1}}, 400, "max_tokens"),
    "max_tokens over the limit": ({"json": {"prompt": "x", "max_tokens": 10**6}}, 400, "max_tokens"),
    "temperature negative": ({"json": {"prompt": "x", "temperature": -0.1}}, 400, "temperature"),
    "temperature too high": ({"json": {"prompt": "x", "temperature": 2.5}}, 400, "temperature"),
    "temperature not a number": ({"json": {"prompt": "x", "temperature": "hot"}}, 400, "temperature"),
    "top_p zero": ({"json": {"prompt": "x", "top_p": 0}}, 400, "top_p"),
    "top_p over one": ({"json": {"prompt": "x", "top_p": 1.5}}, 400, "top_p"),
    "top_k zero": ({"json": {"prompt": "x", "top_k": 0}}, 400, "top_k"),
    "n zero": ({"json": {"prompt": "x", "n": 0}}, 400, "n"),
    "n over the limit": ({"json": {"prompt": "x", "n": 1000}}, 400, "n"),
    "too many stop strings": ({"json": {"prompt": "x", "stop": ["a"] * (MAX_STOP_STRINGS + 1)}}, 400, "stop"),
    "a stop string too long": ({"json": {"prompt": "x", "stop": "a" * (MAX_STOP_CHARS + 1)}}, 400, "stop"),
    "an empty stop string": ({"json": {"prompt": "x", "stop": [""]}}, 400, "stop"),
    "logprobs over five": ({"json": {"prompt": "x", "logprobs": 6}}, 400, "logprobs"),
    "seed beyond 64 bits": ({"json": {"prompt": "x", "seed": 2**64}}, 400, "seed"),
    "unknown acceptance rule": ({"json": {"prompt": "x", "acceptance": "loose"}}, 400, "acceptance"),
    "stream_options without stream": ({"json": {"prompt": "x", "stream_options": {"include_usage": True}}},
                                      400, None),
    "unknown model": ({"json": {"prompt": "x", "model": "gpt-4"}}, 404, "model"),
    "body over the size limit": ({"content": b"x" * 2_000_000, "headers": JSON}, 413, None),
}


def assert_error_shape(r, status: int) -> dict:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    error = body["error"]
    assert error["code"] == status and error["message"] and "Traceback" not in error["message"]
    return error


def gauges(http) -> dict[str, float]:
    text = http.get("/metrics").text
    return {name: float(re.search(rf"^{name} (\S+)$", text, re.M).group(1))
            for name in ("medusa_requests_running", "medusa_requests_waiting")}


@pytest.mark.parametrize("case", BAD_INPUT, ids=list(BAD_INPUT))
def test_bad_input_gets_its_status_and_error_shape(http, case):
    kwargs, status, param = BAD_INPUT[case]
    error = assert_error_shape(http.post("/v1/completions", **kwargs), status)
    if param is not None:
        assert error["param"] == param, error
    assert gauges(http) == {"medusa_requests_running": 0, "medusa_requests_waiting": 0}


@pytest.mark.parametrize(("method", "path", "status"), [("GET", "/v1/nothing", 404), ("GET", "/v1/completions", 405),
                                                        ("DELETE", "/v1/models", 405), ("POST", "/health", 405)])
def test_unknown_routes_and_wrong_methods(http, method, path, status):
    assert_error_shape(http.request(method, path), status)


def test_the_server_keeps_serving_after_every_bad_input(http):
    for kwargs, _, _ in BAD_INPUT.values():
        http.post("/v1/completions", **kwargs)
    r = http.post("/v1/completions", json={"prompt": "def f():", "max_tokens": 4})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 4
    assert gauges(http) == {"medusa_requests_running": 0, "medusa_requests_waiting": 0}


def test_max_tokens_zero_scores_the_prompt(http):
    r = http.post("/v1/completions", json={"prompt": "def f():", "max_tokens": 0, "echo": True, "logprobs": 0})
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    assert choice["text"] == "def f():" and choice["finish_reason"] == "length"
    assert r.json()["usage"]["completion_tokens"] == 0
