"""DeepSpeed-Inference wrapping on CPU: every forward goes through the InferenceEngine, and the
wrapped model decodes exactly as the plain one."""

from __future__ import annotations

import copy
import multiprocessing
import socket
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import pytest
from deepspeed.inference.engine import InferenceEngine
from fastapi.testclient import TestClient

from app import create_app
from engine.decode import Engine
from engine.messages import Request
from engine.process import follow
from engine.serving import load_served
from engine.tree import preset
from load_medusa_from_hf import load_medusa_model
from medusa_model import MedusaModel, wrap_with_deepspeed
from tests.http_helpers import assert_error, wait_for
from tests.server.test_reliability import POISON, faulty_loader, gone


@pytest.fixture(scope="module")
def wrapped(toy):
    model, _ = toy
    base = copy.deepcopy(model.model)  # the session's toy model stays unwrapped
    return MedusaModel(base, model.heads, wrap_with_deepspeed(base, model.dtype))


def test_every_forward_goes_through_the_inference_engine(wrapped, toy, prompts):
    _, tokenizer = toy
    assert isinstance(wrapped.runner, InferenceEngine)
    calls = []
    hook = wrapped.runner.register_forward_pre_hook(lambda *_: calls.append(1))
    try:
        engine = Engine(wrapped, tokenizer, tree=preset("tree15"), max_batch_size=8)
        results = engine.generate([Request(str(i), p, max_new_tokens=20) for i, p in enumerate(prompts)])
    finally:
        hook.remove()
    steps = max(s.decode_steps for s in results)
    assert len(calls) == 1 + steps  # one prefill of all eight, then one forward per step


def test_wrapped_and_plain_decode_identically(wrapped, toy, prompts):
    model, tokenizer = toy
    reqs = [Request(str(i), p, max_new_tokens=30) for i, p in enumerate(prompts)]
    plain = Engine(model, tokenizer, tree=preset("tree15")).generate(reqs)
    ds = Engine(wrapped, tokenizer, tree=preset("tree15")).generate(reqs)
    assert [s.tokens for s in ds] == [s.tokens for s in plain]
    assert [s.decode_steps for s in ds] == [s.decode_steps for s in plain]


def test_kernel_injection_is_refused(toy):
    model, _ = toy
    with pytest.raises(ValueError, match="kernel injection cannot verify a Medusa tree"):
        wrap_with_deepspeed(model.model, model.dtype, kernel_inject=True)
    with pytest.raises(ValueError, match="kernel injection"):  # before any weight is read
        load_medusa_model("/nonexistent/model", deepspeed=True, kernel_inject=True)


def test_a_tensor_parallel_rank_caches_only_its_share_of_the_kv_heads(toy):
    """AutoTP gives each of tp_size ranks 1/tp_size of the attention heads, so a rank's KV cache holds
    that many (with the whole count, the first forward of a 2-rank run failed on the cache's shape)."""
    model, tokenizer = toy
    heads = model.config.num_key_value_heads
    for tp_size in (1, 2):
        ranked = MedusaModel(model.model, model.heads, tp_size=tp_size)
        cache = Engine(ranked, tokenizer, max_batch_size=2).new_batch().cache
        assert ranked.kv_heads == heads // tp_size and cache.k.shape[2] == cache.v.shape[2] == heads // tp_size


@contextmanager
def two_ranks(settings, monkeypatch, wait_ready, loader=load_served):
    """What `deepspeed --num_gpus 2 app.py` starts, on the CPU with gloo: rank 0 serves HTTP (with
    `loader`) and its engine process leads; rank 1 holds the other half of every layer and follows
    rank 0's rounds. Yields rank 0's client, ready, and rank 1's process (joined once rank 0 stops)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    launcher = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "LOCAL_SIZE": "2", "CROSS_RANK": "0",
                "CROSS_SIZE": "1"}  # as the deepspeed launcher sets them; the spawned processes inherit them
    for name, value in launcher.items():
        monkeypatch.setenv(name, value)
    ranks = [settings.model_copy(update={"world_size": 2, "rank": r, "local_rank": r}) for r in (0, 1)]
    follower = multiprocessing.get_context("spawn").Process(target=follow, args=(ranks[1],), daemon=True)
    follower.start()
    try:
        with TestClient(create_app(ranks[0], loader=loader)) as c:
            wait_ready(c.get)
            yield c, follower
        follower.join(30)  # rank 0 has stopped
    finally:
        follower.kill()


def test_two_tensor_parallel_ranks_answer_what_one_process_answers(settings, http, wait_ready, monkeypatch):
    """Greedy and seeded answers, one request or several at once, equal the single-process server's."""
    bodies = [{"prompt": ["def read_config(path):", "class Stack:\n", "import os\n"], "max_tokens": 24},
              {"prompt": "for i in range(10):\n", "max_tokens": 24, "speculative": False},
              {"prompt": "def f(x):", "max_tokens": 16, "temperature": 0.8, "seed": 7}]
    with two_ranks(settings, monkeypatch, wait_ready) as (c, follower):
        assert c.get("/info").json()["tp_size"] == 2
        with ThreadPoolExecutor(len(bodies)) as pool:
            together = list(pool.map(lambda body: c.post("/v1/completions", json=body), bodies))
        for body, answer in zip(bodies, together):
            texts = [choice["text"] for choice in answer.json()["choices"]]
            alone = [choice["text"] for choice in http.post("/v1/completions", json=body).json()["choices"]]
            assert texts == alone, body
    assert follower.exitcode == 0  # rank 0 stopping stops the followers


def test_a_step_that_fails_in_lockstep_stops_the_engine(settings, wait_ready, monkeypatch):
    """Alone, a failed step fails only its requests and the loop goes on. In lockstep the ranks that
    stepped fine no longer hold the same batch, so the engine stops: `python app.py` then exits with
    status 1 (tests/server/test_reliability.py), and the launcher stops the other ranks, here rank 1, which
    waits in that step's all-reduce."""
    with two_ranks(settings, monkeypatch, wait_ready, loader=faulty_loader) as (c, follower):  # rank 0's steps fail
        engine = c.get("/info").json()["engine_pid"]
        assert c.post("/v1/completions", json={"prompt": "def f(x):", "max_tokens": 8}).status_code == 200
        assert_error(c.post("/v1/completions", json={"prompt": POISON, "max_tokens": 8}), 500)
        assert "engine has stopped" in assert_error(c.get("/health"), 503)["message"]
        wait_for(lambda: gone(engine))
        follower.kill()  # as the launcher does
