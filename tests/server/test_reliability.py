"""Whatever a client sends, it gets the documented status in the OpenAI error shape, and nothing else
changes: the server keeps serving and no request is left running or waiting."""

from __future__ import annotations

import asyncio
import itertools
import json
import re
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import psutil
import pytest
from fastapi.testclient import TestClient
from transformers import AutoTokenizer

from app import create_app
from batch_processor import Ticket, Update
from config.settings import SMALL_MODEL
from engine.decode import Engine
from engine.messages import Event, Request
from engine.serving import Served, load_served
from server.completions import tokenize
from server.generation import BadRequest, Limits, max_prompt_chars
from server.protocol import MAX_STOP_CHARS, MAX_STOP_STRINGS, CompletionRequest
from tests.http_helpers import assert_error, serve, serving, sse_events, streamed, wait_for

ROOT = Path(__file__).resolve().parents[2]

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
    "a prompt of nearly a megabyte": ({"json": {"prompt": "x = 1; " * 130_000}}, 400, "prompt"),
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


def gauges(http) -> dict[str, float]:
    text = http.get("/metrics").text
    return {name: float(re.search(rf"^{name} (\S+)$", text, re.M).group(1))
            for name in ("medusa_requests_running", "medusa_requests_waiting")}


@pytest.mark.parametrize("case", BAD_INPUT, ids=list(BAD_INPUT))
def test_bad_input_gets_its_status_and_error_shape(http, case):
    kwargs, status, param = BAD_INPUT[case]
    error = assert_error(http.post("/v1/completions", **kwargs), status)
    if param is not None:
        assert error["param"] == param, error
    assert gauges(http) == {"medusa_requests_running": 0, "medusa_requests_waiting": 0}


@pytest.mark.parametrize(("method", "path", "status"), [("GET", "/v1/nothing", 404), ("GET", "/v1/completions", 405),
                                                        ("DELETE", "/v1/models", 405), ("POST", "/health", 405)])
def test_unknown_routes_and_wrong_methods(http, method, path, status):
    assert_error(http.request(method, path), status)


def test_the_server_keeps_serving_after_every_bad_input(http):
    for kwargs, _, _ in BAD_INPUT.values():
        http.post("/v1/completions", **kwargs)
    r = http.post("/v1/completions", json={"prompt": "def f():", "max_tokens": 4})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 4
    assert gauges(http) == {"medusa_requests_running": 0, "medusa_requests_waiting": 0}


def test_max_tokens_zero_scores_the_prompt(http):
    """lm-eval's loglikelihood request (echo, logprobs, max_tokens 0): the prompt's log-probs, as the
    same prompt's echo gets when one token is generated, and nothing generated; streamed alike."""
    body = {"prompt": "def f():", "echo": True, "logprobs": 1}
    r = http.post("/v1/completions", json={**body, "max_tokens": 0})
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    assert choice["text"] == "def f():" and choice["finish_reason"] == "length"
    assert r.json()["usage"]["completion_tokens"] == 0
    scored = choice["logprobs"]
    assert scored["token_logprobs"][0] is None and all(isinstance(x, float) for x in scored["token_logprobs"][1:])
    one = http.post("/v1/completions", json={**body, "max_tokens": 1}).json()["choices"][0]["logprobs"]
    n = len(scored["tokens"])
    assert n > 1 and {k: v[:n] for k, v in one.items()} == scored
    stream = http.post("/v1/completions", json={**body, "max_tokens": 0, "stream": True}).text
    chunks = [json.loads(e)["choices"][0] for e in sse_events(stream)[:-1]]
    assert chunks[0]["text"] == "def f():" and chunks[0]["logprobs"] == scored
    assert [c["finish_reason"] for c in chunks] == [None, "length"] and chunks[1]["text"] == ""


def test_a_stop_string_cuts_its_tokens_from_the_log_probs_and_the_usage(http):
    """Tokens whose text a stop string cuts away entirely are neither in logprobs nor in usage; the
    token texts add up to the answer's text (no token straddles the cut here)."""
    body = {"prompt": "def fibonacci(n):\n", "max_tokens": 24, "logprobs": 0}
    full = http.post("/v1/completions", json=body).json()["choices"][0]
    text, tokens = full["text"], full["logprobs"]["tokens"]
    starts = list(itertools.accumulate(map(len, tokens), initial=0))[:-1]
    cut = next(s for s in starts if s >= 4 and len(text) >= s + 5 and text.find(text[s : s + 5]) == s)
    stop = text[cut : cut + 5]  # the first time the model writes it, at a token's start
    for stream in (False, True):
        r = http.post("/v1/completions", json={**body, "stop": stop, "stream": stream,
                                               "stream_options": {"include_usage": True} if stream else None})
        if stream:
            events = [json.loads(e) for e in sse_events(r.text)[:-1]]
            got = "".join(c["text"] for e in events for c in e["choices"])
            got_tokens = [t for e in events for c in e["choices"] if c["logprobs"] for t in c["logprobs"]["tokens"]]
            usage = events[-1]["usage"]
        else:
            choice, usage = r.json()["choices"][0], r.json()["usage"]
            got, got_tokens = choice["text"], choice["logprobs"]["tokens"]
        assert got == full["text"][:cut] and "".join(got_tokens) == got, (stream, got, got_tokens)
        assert usage["completion_tokens"] == len(got_tokens) == starts.index(cut)


# ---- deadlines -------------------------------------------------------------------------------------


def test_a_request_past_its_deadline_gets_504_and_frees_its_slot(settings, wait_ready):
    with TestClient(create_app(settings.model_copy(update={"request_timeout_s": 0.3}))) as c:
        wait_ready(c.get)
        long = {"prompt": "def f():", "max_tokens": c.get("/info").json()["max_context"] - 8, "ignore_eos": True}
        start = time.perf_counter()
        error = assert_error(c.post("/v1/completions", json=long), 504)
        assert time.perf_counter() - start < 2.0 and "0.3 s" in error["message"]
        with c.stream("POST", "/v1/completions", json={**long, "stream": True}) as r:
            events = sse_events("".join(r.iter_text()))
        assert r.status_code == 200 and events[-1] == "[DONE]"
        assert json.loads(events[-2])["error"]["code"] == 504  # in-band, after the chunks it did produce
        assert any(json.loads(e).get("choices") for e in events[:-2])
        wait_for(lambda: gauges(c) == {"medusa_requests_running": 0, "medusa_requests_waiting": 0})
        assert "medusa_request_timeout_total 2.0" in c.get("/metrics").text
        assert c.post("/v1/completions", json={"prompt": "def f():", "max_tokens": 4}).status_code == 200


def test_a_cancel_that_lands_as_an_update_arrives_is_not_lost():
    """A client going away cancels the task reading its ticket; an update put in the same instant
    must not swallow that cancel (asyncio.wait_for on Python 3.11 did), or generation runs on."""

    async def scenario() -> bool:
        ticket = Ticket([Request("a", [1], max_new_tokens=8)])

        async def read():
            async for _ in ticket.stream(time.perf_counter() + 300):
                pass

        reader = asyncio.create_task(read())
        for _ in range(3):
            await asyncio.sleep(0)  # the reader now waits for an update
        ticket.updates.put_nowait(Update(0, Event("a", [5], "x"), None))
        reader.cancel()
        for _ in range(3):
            await asyncio.sleep(0)
        done = reader.done()
        reader.cancel()
        return done and reader.cancelled()

    assert asyncio.run(scenario())


# ---- faults --------------------------------------------------------------------------------------


POISON = "import poison"


class FaultyEngine(Engine):
    """The served engine; choosing tokens for a batch with a sequence whose prompt is POISON raises
    (in its prefill and in its steps)."""

    def _accept(self, seqs, *args):
        if any(seq.request.prompt_ids == self.tokenizer(POISON)["input_ids"] for seq in seqs):
            raise RuntimeError("injected fault: /secret/path/weights.bin")
        return super()._accept(seqs, *args)


def faulty_loader(settings) -> Served:
    served = load_served(settings)
    served.engine.__class__ = FaultyEngine
    return served


def test_a_failing_step_fails_only_its_request_and_the_loop_goes_on(settings, wait_ready):
    with TestClient(create_app(settings, loader=faulty_loader)) as c:
        wait_ready(c.get)
        healthy = {"prompt": "def read_config(path):", "max_tokens": 24}
        before = c.post("/v1/completions", json=healthy).json()["choices"][0]["text"]
        bad = {"prompt": POISON, "max_tokens": 24}
        error = assert_error(c.post("/v1/completions", json=bad), 500)
        assert "secret" not in error["message"] and "injected" not in error["message"]
        with c.stream("POST", "/v1/completions", json={**bad, "stream": True}) as r:
            events = sse_events("".join(r.iter_text()))
        assert events[-1] == "[DONE]" and json.loads(events[-2])["error"]["code"] == 500
        assert "secret" not in events[-2]
        assert c.get("/health").json() == {"status": "ok"}
        assert c.post("/v1/completions", json=healthy).json()["choices"][0]["text"] == before
        with ThreadPoolExecutor(4) as pool:  # in one batch: the engine isolates the poisoned sequence
            answers = list(pool.map(lambda b: c.post("/v1/completions", json=b), [healthy, bad, healthy, healthy]))
        assert_error(answers[1], 500)
        assert [a.json()["choices"][0]["text"] for a in answers if a.status_code == 200] == [before] * 3
        assert gauges(c) == {"medusa_requests_running": 0, "medusa_requests_waiting": 0}


def test_an_engine_process_that_dies_fails_its_requests_and_the_server_says_so(settings, wait_ready):
    with TestClient(create_app(settings)) as c:
        wait_ready(c.get)
        engine = psutil.Process(c.get("/info").json()["engine_pid"])
        with ThreadPoolExecutor(1) as pool:
            long = pool.submit(c.post, "/v1/completions", json={"prompt": "def f():", "max_tokens": 400,
                                                                "ignore_eos": True})
            wait_for(lambda: gauges(c)["medusa_requests_running"] == 1)
            engine.kill()
            assert_error(long.result(timeout=30), 500)
        assert "engine has stopped" in assert_error(c.get("/health"), 503)["message"]
        assert "engine has stopped" in assert_error(c.post("/v1/completions", json={"prompt": "x"}), 503)["message"]
        assert gauges(c) == {"medusa_requests_running": 0, "medusa_requests_waiting": 0}


def test_a_loader_that_cannot_go_to_the_engine_process_is_a_load_error(settings):
    with TestClient(create_app(settings, loader=lambda s: load_served(s))) as c:  # a lambda does not pickle
        wait_for(lambda: "could not start" in c.get("/health").text)
        assert "model is loading" not in assert_error(c.get("/health"), 503)["message"]


def test_a_model_that_fails_to_load_exits_non_zero_with_its_reason(tmp_path):
    server = serve("--model-name", str(tmp_path / "no-such-model"), "--port", "0")
    try:
        _, stderr = server.communicate(timeout=120)
    finally:
        server.kill()
    assert server.returncode == 1
    assert "model failed to load" in stderr and "no-such-model" in stderr.splitlines()[-1]


# ---- shutdown ------------------------------------------------------------------------------------


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def test_sigterm_lets_requests_in_flight_finish_then_exits_cleanly():
    server, url = serving("--shutdown-grace-s", "20")
    try:
        engine = httpx.get(url + "/info").json()["engine_pid"]
        body = {"prompt": "def f():", "max_tokens": 300, "ignore_eos": True}
        first_chunk = threading.Event()
        with ThreadPoolExecutor(2) as pool:
            stream = pool.submit(streamed, url, body, first_chunk)
            plain = pool.submit(httpx.post, url + "/v1/completions", json=body, timeout=60)
            assert first_chunk.wait(60)
            server.send_signal(signal.SIGTERM)
            events, response = stream.result(), plain.result()
        assert events[-1] == "[DONE]" and json.loads(events[-2])["usage"]["completion_tokens"] == 300
        assert response.status_code == 200 and response.json()["usage"]["completion_tokens"] == 300
        assert server.wait(timeout=30) == -signal.SIGTERM  # uvicorn re-raises the signal once it has drained
        assert "Traceback" not in server.stderr.read()
        assert gone(engine)
    finally:
        server.kill()


def test_the_engine_process_never_outlives_its_server():
    server, url = serving()
    try:
        engine = httpx.get(url + "/info").json()["engine_pid"]
        server.kill()  # no chance to stop the engine process: it must notice by itself
        server.wait(timeout=30)
        wait_for(lambda: gone(engine), timeout=15)
    finally:
        server.kill()


def test_a_server_whose_engine_process_dies_answers_its_requests_then_exits_non_zero():
    """So that a process manager restarts it, and the `deepspeed` launcher stops the ranks that follow it."""
    server, url = serving()
    try:
        with httpx.Client(base_url=url, timeout=60) as c, ThreadPoolExecutor(1) as pool:
            engine = c.get("/info").json()["engine_pid"]
            long = pool.submit(c.post, "/v1/completions", json={"prompt": "def f():", "max_tokens": 400,
                                                                "ignore_eos": True})
            wait_for(lambda: gauges(c)["medusa_requests_running"] == 1)
            psutil.Process(engine).kill()
            assert_error(long.result(timeout=30), 500)
        assert server.wait(timeout=30) == 1
        assert "exiting: the engine process exited while serving" in server.stderr.read()  # then, maybe, the
        # resource tracker's warning: the killed process's tqdm lock (a named semaphore) is left to it to remove
    finally:
        server.kill()


# ---- browsers ----------------------------------------------------------------------------------


def test_cors_is_off_unless_configured(settings):
    preflight = {"Origin": "https://elsewhere.example", "Access-Control-Request-Method": "POST"}
    closed = TestClient(create_app(settings))  # not started: no model needed for the headers
    assert "access-control-allow-origin" not in closed.options("/v1/completions", headers=preflight).headers
    assert "access-control-allow-origin" not in closed.get("/health", headers=preflight).headers
    open_ = TestClient(create_app(settings.model_copy(update={"cors_origins": ["https://elsewhere.example"]})))
    r = open_.options("/v1/completions", headers=preflight)
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "https://elsewhere.example"
    other = {**preflight, "Origin": "https://evil.example"}
    assert "access-control-allow-origin" not in open_.options("/v1/completions", headers=other).headers


# ---- load ----------------------------------------------------------------------------------------

BURST_PROMPTS = ["def read_config(path):", "import numpy as np\n", "class Stack:\n    def __init__(self):",
                 "for i in range(10):\n    print("]


@pytest.fixture(scope="module")
def small_server(settings, serve_with):
    """A server with little room: 4 sequences in the batch and 4 in the queue."""
    with serve_with(settings.model_copy(update={"max_batch_size": 4, "queue_size": 4})) as url:
        yield url


def alone(url: str, body: dict) -> str:
    r = httpx.post(url + "/v1/completions", json=body, timeout=60)
    assert r.status_code == 200
    return r.json()["choices"][0]["text"]


def test_overload_gets_fast_429s_and_every_accepted_request_its_own_answer(small_server):
    bodies = [{"prompt": p, "max_tokens": 32, "ignore_eos": True} for p in BURST_PROMPTS]
    answers = [alone(small_server, b) for b in bodies]
    process = psutil.Process()
    rss_before = process.memory_info().rss

    async def one(client: httpx.AsyncClient, i: int):
        start = time.perf_counter()
        r = await client.post("/v1/completions", json=bodies[i % len(bodies)])
        return i, r, time.perf_counter() - start

    async def burst():
        async with httpx.AsyncClient(base_url=small_server, timeout=120,
                                     limits=httpx.Limits(max_connections=200)) as client:
            return await asyncio.gather(*(one(client, i) for i in range(64)))

    results = asyncio.run(burst())
    accepted = [(i, r) for i, r, _ in results if r.status_code == 200]
    refused = [(r, seconds) for _, r, seconds in results if r.status_code == 429]
    assert len(accepted) + len(refused) == 64 and len(accepted) >= 8 and refused
    for r, seconds in refused:
        assert_error(r, 429)
        assert int(r.headers["Retry-After"]) >= 1 and seconds < 1.0
    for i, r in accepted:
        assert r.json()["choices"][0]["text"] == answers[i % len(bodies)]
    wait_for(lambda: gauges(httpx.Client(base_url=small_server)) == {"medusa_requests_running": 0,
                                                                       "medusa_requests_waiting": 0})
    assert process.memory_info().rss <= rss_before + 100 * 2**20


def test_clients_that_drop_mid_stream_leave_the_others_untouched(base_url, http):
    bodies = [{"prompt": p, "max_tokens": 48, "ignore_eos": True} for p in BURST_PROMPTS]
    answers = [alone(base_url, b) for b in bodies]

    async def one(client: httpx.AsyncClient, i: int) -> str | None:
        body = {**bodies[i % len(bodies)], "stream": True}
        async with client.stream("POST", "/v1/completions", json=body) as r:
            assert r.status_code == 200
            text, chunks = "", 0
            async for line in r.aiter_lines():
                if line.startswith("data: {"):
                    chunks += 1
                    text += "".join(c["text"] for c in json.loads(line[6:])["choices"])
                    if i % 2 and chunks == 3:
                        return None  # drops the connection mid-stream
            return text

    async def crowd():
        async with httpx.AsyncClient(base_url=base_url, timeout=120, limits=httpx.Limits(max_connections=100)) as c:
            return await asyncio.gather(*(one(c, i) for i in range(40)))

    texts = asyncio.run(crowd())
    for i, text in enumerate(texts):
        assert (text is None) == bool(i % 2)
        if text is not None:
            assert text == answers[i % len(bodies)]
    wait_for(lambda: gauges(http) == {"medusa_requests_running": 0, "medusa_requests_waiting": 0})


def test_soak_script_at_a_small_size():
    run = subprocess.run([sys.executable, "-m", "bench.soak", "--minutes", "0.1", "--concurrency", "2", "--model",
                          str(SMALL_MODEL), "--heads", str(SMALL_MODEL / "medusa")], cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    result = json.loads(run.stdout[run.stdout.index("{"):])
    assert result["requests"] >= 2 and result["errors"] == 0
    assert result["rss_mb"]["start"] > 0 and result["latency_s"]["p50"] > 0


def test_a_request_cannot_change_what_is_served(http, settings):
    info = http.get("/info").json()
    sneaky = {"prompt": "def f():", "max_tokens": 2, "model_name": "/etc", "medusa_heads": "/tmp",
              "medusa_choices": "mc_sim_7b_63", "device": "cuda", "dtype": "float16", "api_keys": "mine"}
    assert http.post("/v1/completions", json=sneaky).status_code == 200  # unknown fields are ignored
    assert_error(http.post("/v1/completions", json={"prompt": "x", "model": "/etc/passwd"}), 404)
    assert http.get("/info").json() | {"running": 0, "waiting": 0, "steps_by_batch_size": {}} == \
        info | {"running": 0, "waiting": 0, "steps_by_batch_size": {}}
    for method in ("PUT", "PATCH", "DELETE"):
        assert http.request(method, "/info").status_code == 405


def test_a_text_that_cannot_fit_is_refused_without_tokenising_it():
    tokenizer = AutoTokenizer.from_pretrained(SMALL_MODEL)
    bound = max_prompt_chars(tokenizer, 512)
    longest = max(len(tokenizer.decode([i])) for i in range(len(tokenizer)))
    for source in sorted(ROOT.glob("*.py")):  # the bound's premise: no token covers more than `longest` characters
        text = source.read_text()
        assert len(text) <= len(tokenizer(text)["input_ids"]) * longest

    class Untouchable:
        def __call__(self, text):
            raise AssertionError("tokenised a text that cannot fit")

    limits = Limits(512, 16, 4, len(tokenizer), True, bound)
    with pytest.raises(BadRequest, match="longer than the context") as refused:
        tokenize(CompletionRequest(prompt="x" * (bound + 1)), Untouchable(), limits)
    assert refused.value.param == "prompt"
    with pytest.raises(BadRequest, match="exceeds the context"):  # under the bound: tokenised, then measured
        tokenize(CompletionRequest(prompt="x = 1\n" * (bound // 6)), tokenizer, limits)


def test_a_failure_naming_requests_already_answered_fails_only_the_others(settings):
    """A failed round can name a choice whose request already failed (its sibling's earlier round):
    that one is skipped, the others' tickets get the failure."""
    from batch_processor import DynamicBatcher, EngineFailure
    from server.metrics import ServiceMetrics

    async def scenario():
        batcher = DynamicBatcher(settings, load_served, ServiceMetrics())
        batcher.dead = True  # no engine process: nothing to send cancels to
        ticket = Ticket([Request("a", [1]), Request("b", [2])])
        batcher._owner = {"a": (ticket, 0), "b": (ticket, 1)}
        batcher._fail(["gone-already", "a"])
        return ticket.updates.get_nowait(), batcher._owner

    failure, owners = asyncio.run(scenario())
    assert isinstance(failure, EngineFailure) and owners == {}
