"""The HTTP service, tested the way clients use it: a real uvicorn server on a free port (httpx and
the OpenAI SDK as clients) serving the default model, plus apps built with special settings."""

from __future__ import annotations

import asyncio
import json
import os
import time
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path

import httpx
import pytest
import torch
from fastapi.testclient import TestClient
from transformers import AutoModelForCausalLM, AutoTokenizer

from app import create_app
from config.settings import Settings
from engine.decode import Engine
from engine.serving import Served, load_served
from tests.http_helpers import assert_error, wait_for

PROMPTS = ["def fibonacci(n):\n", "import os\nimport sys\n\n", "class Stack:\n    def __init__(self):\n",
           "for i in range(10):\n    print("]


@pytest.fixture(scope="session")
def reference(settings):
    """reference(prompt, max_tokens) -> the text of Hugging Face greedy generate() on the same model, in
    the dtype the service runs it in."""
    tokenizer = AutoTokenizer.from_pretrained(settings.model_name)
    model = AutoModelForCausalLM.from_pretrained(settings.model_name, dtype=getattr(torch, settings.resolved_dtype()))
    model.eval()

    def run(prompt: str, max_tokens: int) -> str:
        ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
        out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=max_tokens,
                             pad_token_id=tokenizer.pad_token_id)
        return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)

    return run


def stream(http, body: dict) -> tuple[list[dict], list[str]]:
    """(parsed chunks, raw SSE lines) of a streaming completion."""
    with http.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        raw = "".join(r.iter_text())
    assert "\r" not in raw
    events = [e for e in raw.split("\n\n") if e and not e.startswith(":")]  # ':' lines are keep-alive pings
    assert all(e.startswith("data: ") and "\n" not in e for e in events)
    assert events[-1] == "data: [DONE]"
    return [json.loads(e[6:]) for e in events[:-1]], events


def streamed_text(chunks: list[dict], index: int = 0) -> str:
    return "".join(c["text"] for ch in chunks for c in ch["choices"] if c["index"] == index)


# ---- endpoints -------------------------------------------------------------------------------------


def test_health_models_info_metrics(http, settings):
    assert http.get("/health").json() == {"status": "ok"}
    models = http.get("/v1/models").json()
    assert models["object"] == "list" and [m["id"] for m in models["data"]] == [settings.model_id()]
    info = http.get("/info").json()
    assert info["model"] == settings.model_id() and info["num_heads"] >= 1 and info["tree"]["nodes"] > 1
    assert {"device", "dtype", "deepspeed", "max_batch_size", "max_wait_ms", "queue_size"} <= set(info)
    assert info["deepspeed"] is True and info["dtype"] == settings.resolved_dtype()
    assert info["threads"] == settings.resolved_cpu_threads() == max(1, os.cpu_count() - 1)  # a core for the loop
    http.post("/v1/completions", json={"prompt": PROMPTS[0], "max_tokens": 4})
    text = http.get("/metrics").text
    for name in ["medusa_requests_running", "medusa_requests_waiting", "medusa_request_success_total",
                 "medusa_prompt_tokens_total", "medusa_generation_tokens_total", "medusa_decode_steps_total",
                 "medusa_time_to_first_token_seconds_bucket", "medusa_inter_token_latency_seconds_bucket",
                 "medusa_e2e_request_latency_seconds_bucket", "medusa_accepted_tokens_per_step_bucket",
                 "process_resident_memory_bytes"]:
        assert name in text


@pytest.mark.parametrize("speculative", [False, True])
def test_json_and_stream_equal_the_reference(http, reference, speculative):
    body = {"prompt": PROMPTS[0], "max_tokens": 40, "speculative": speculative}
    r = http.post("/v1/completions", json=body)
    assert r.status_code == 200
    out = r.json()
    assert out["id"].startswith("cmpl-") and out["object"] == "text_completion"
    choice = out["choices"][0]
    assert choice["text"] == reference(PROMPTS[0], 40)
    assert choice["finish_reason"] in ("stop", "length")
    usage, metrics = out["usage"], out["metrics"]
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    rate = metrics["accepted_tokens_per_step"]
    assert rate == 1.0 if not speculative else rate > 1.0
    chunks, _ = stream(http, {**body, "stream_options": {"include_usage": True}})
    assert streamed_text(chunks) == choice["text"]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == usage
    assert all(ch["usage"] is None for ch in chunks[:-1])
    assert [c["finish_reason"] for ch in chunks[:-1] for c in ch["choices"]][-1] == choice["finish_reason"]


def test_golden_answer(http):
    from tests.engine.test_bundled import GOLDEN_PROMPT, GOLDEN_TEXT

    out = http.post("/v1/completions", json={"prompt": GOLDEN_PROMPT, "max_tokens": 48}).json()
    assert out["choices"][0]["text"] == GOLDEN_TEXT


def test_prompt_forms_n_and_choice_indices(http):
    one = {p: http.post("/v1/completions", json={"prompt": p, "max_tokens": 12}).json()["choices"][0]["text"]
           for p in PROMPTS[:2]}
    out = http.post("/v1/completions", json={"prompt": PROMPTS[:2], "n": 2, "max_tokens": 12}).json()
    assert [c["index"] for c in out["choices"]] == [0, 1, 2, 3]
    assert [c["text"] for c in out["choices"]] == [one[PROMPTS[0]]] * 2 + [one[PROMPTS[1]]] * 2
    tokenizer = AutoTokenizer.from_pretrained(http.get("/info").json()["model_path"])
    ids = tokenizer(PROMPTS[0])["input_ids"]
    by_ids = http.post("/v1/completions", json={"prompt": ids, "max_tokens": 12}).json()
    by_id_lists = http.post("/v1/completions", json={"prompt": [ids, ids], "max_tokens": 12}).json()
    assert by_ids["choices"][0]["text"] == one[PROMPTS[0]]
    assert [c["text"] for c in by_id_lists["choices"]] == [one[PROMPTS[0]]] * 2
    chunks, _ = stream(http, {"prompt": PROMPTS[:2], "n": 2, "max_tokens": 12})
    assert [streamed_text(chunks, i) for i in range(4)] == [c["text"] for c in out["choices"]]


def test_echo_stop_ignore_eos_and_logprobs(http):
    full = http.post("/v1/completions", json={"prompt": PROMPTS[2], "max_tokens": 30}).json()["choices"][0]["text"]
    echo = http.post("/v1/completions", json={"prompt": PROMPTS[2], "max_tokens": 30, "echo": True}).json()
    assert echo["choices"][0]["text"] == PROMPTS[2] + full
    stop = full.strip()[:3]
    cut = http.post("/v1/completions", json={"prompt": PROMPTS[2], "max_tokens": 30, "stop": [stop]}).json()
    assert cut["choices"][0]["text"] == full[: full.index(stop)] and cut["choices"][0]["finish_reason"] == "stop"
    chunks, _ = stream(http, {"prompt": PROMPTS[2], "max_tokens": 30, "stop": stop})
    assert streamed_text(chunks) == full[: full.index(stop)]
    long = http.post("/v1/completions", json={"prompt": PROMPTS[2], "max_tokens": 60, "ignore_eos": True}).json()
    assert long["usage"]["completion_tokens"] == 60 and long["choices"][0]["finish_reason"] == "length"
    lp = http.post("/v1/completions", json={"prompt": PROMPTS[2], "max_tokens": 8, "logprobs": 3}).json()
    logprobs = lp["choices"][0]["logprobs"]
    assert len(logprobs["tokens"]) == len(logprobs["token_logprobs"]) == len(logprobs["top_logprobs"]) == 8
    assert "".join(logprobs["tokens"]) == lp["choices"][0]["text"]
    assert all(len(top) <= 3 and max(top.values()) == pytest.approx(chosen, abs=1e-5)
               for chosen, top in zip(logprobs["token_logprobs"], logprobs["top_logprobs"]))
    assert logprobs["text_offset"][0] == 0 and logprobs["text_offset"] == sorted(logprobs["text_offset"])
    assert http.post("/v1/completions", json={"prompt": PROMPTS[2], "max_tokens": 4}).json()["choices"][0][
        "logprobs"] is None
    body = {"prompt": PROMPTS[2], "max_tokens": 8, "logprobs": 1, "echo": True}
    both = http.post("/v1/completions", json=body).json()
    lp, n_prompt = both["choices"][0]["logprobs"], both["usage"]["prompt_tokens"]
    assert len(lp["tokens"]) == n_prompt + 8 and lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    assert all(x is not None and x <= 0 for x in lp["token_logprobs"][1:])
    assert "".join(lp["tokens"]) == both["choices"][0]["text"] == PROMPTS[2] + logprobs_text(http, PROMPTS[2], 8)
    chunks, _ = stream(http, body)
    first = chunks[0]["choices"][0]
    assert first["text"] == PROMPTS[2] and first["logprobs"]["token_logprobs"] == lp["token_logprobs"][:n_prompt]
    assert streamed_text(chunks) == both["choices"][0]["text"]


def logprobs_text(http, prompt: str, max_tokens: int) -> str:
    return http.post("/v1/completions", json={"prompt": prompt, "max_tokens": max_tokens}).json()["choices"][0]["text"]


def test_unknown_fields_are_ignored(http):
    r = http.post("/v1/completions", json={"prompt": PROMPTS[0], "max_tokens": 3, "user": "x", "best_of": 1,
                                           "frequency_penalty": 0, "suffix": None})
    assert r.status_code == 200


# ---- the OpenAI SDK as a client ----------------------------------------------------------------------


@pytest.mark.parametrize("speculative", [False, True])
def test_openai_sdk(base_url, settings, speculative):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=f"{base_url}/v1", api_key="unused")
    extra = {"speculative": speculative}
    out = client.completions.create(model=settings.model_id(), prompt=PROMPTS[3], max_tokens=24, extra_body=extra)
    assert out.choices[0].text and out.usage.completion_tokens > 0
    parts = list(client.completions.create(model=settings.model_id(), prompt=PROMPTS[3], max_tokens=24, stream=True,
                                           stream_options={"include_usage": True}, extra_body=extra))
    assert "".join(p.choices[0].text for p in parts if p.choices) == out.choices[0].text
    assert parts[-1].usage.completion_tokens == out.usage.completion_tokens
    assert [m.id for m in client.models.list()] == [settings.model_id()]


# ---- concurrency -------------------------------------------------------------------------------------


def test_sixteen_concurrent_requests_are_batched_and_each_gets_its_own_answer(http, base_url):
    bodies = [{"prompt": PROMPTS[i % 4] + "x" * (i // 4), "max_tokens": 24, "ignore_eos": True} for i in range(16)]
    alone = [http.post("/v1/completions", json=b).json()["choices"][0]["text"] for b in bodies]
    before = http.get("/info").json()["steps_by_batch_size"]

    async def burst():
        async with httpx.AsyncClient(base_url=base_url, timeout=60) as c:
            return await asyncio.gather(*(c.post("/v1/completions", json=b) for b in bodies))

    together = [r.json()["choices"][0]["text"] for r in asyncio.run(burst())]
    assert together == alone
    after = http.get("/info").json()["steps_by_batch_size"]
    batched = {k: v - before.get(k, 0) for k, v in after.items() if int(k) > 1}
    assert sum(batched.values()) > 0, after


def generated_tokens(http) -> float:
    line = next(x for x in http.get("/metrics").text.splitlines() if x.startswith("medusa_generation_tokens_total"))
    return float(line.split()[-1])


def test_a_client_that_disconnects_mid_stream_frees_its_slot(http, base_url):
    room = http.get("/info").json()["max_context"] - 40
    body = {"prompt": PROMPTS[1], "max_tokens": room, "ignore_eos": True, "stream": True}
    before = generated_tokens(http)
    with httpx.Client(base_url=base_url, timeout=60) as c, c.stream("POST", "/v1/completions", json=body) as r:
        assert r.status_code == 200
        next(r.iter_lines())  # the stream has started
        assert http.get("/info").json()["running"] == 1
    deadline = time.monotonic() + 10
    while http.get("/info").json()["running"]:
        assert time.monotonic() < deadline, "the slot was never freed"
        time.sleep(0.05)
    assert generated_tokens(http) - before < room  # cut short, not run to the end
    assert http.post("/v1/completions", json={"prompt": PROMPTS[0], "max_tokens": 4}).status_code == 200


def test_a_client_that_gives_up_on_a_json_request_frees_its_slot(http, base_url):
    room = http.get("/info").json()["max_context"] - 40
    body = {"prompt": PROMPTS[1], "max_tokens": room, "ignore_eos": True, "speculative": False}
    before = generated_tokens(http)
    with httpx.Client(base_url=base_url, timeout=httpx.Timeout(60, read=0.3)) as c, pytest.raises(httpx.ReadTimeout):
        c.post("/v1/completions", json=body)
    deadline = time.monotonic() + 10
    while http.get("/info").json()["running"]:
        assert time.monotonic() < deadline, "the slot was never freed"
        time.sleep(0.05)
    assert generated_tokens(http) - before < room


def test_seeded_sampling_is_reproducible_with_and_without_speculation(http):
    body = {"prompt": PROMPTS[2], "max_tokens": 32, "temperature": 0.8, "top_p": 0.95, "seed": 1234,
            "ignore_eos": True}

    def text(**changes) -> str:
        return http.post("/v1/completions", json={**body, **changes}).json()["choices"][0]["text"]

    first = text(speculative=True)
    assert text(speculative=True) == first
    assert text(speculative=False) == first
    chunks, _ = stream(http, body)
    assert streamed_text(chunks) == first
    assert text(seed=99) != first
    two = http.post("/v1/completions", json={**body, "n": 2}).json()["choices"]
    assert two[0]["text"] == first and two[1]["text"] != first
    typical = http.post("/v1/completions", json={**body, "acceptance": "typical"}).json()
    assert typical["usage"]["completion_tokens"] == 32 and typical["metrics"]["accepted_tokens_per_step"] >= 1.0
    unseeded = {text(seed=None, temperature=1.0, top_p=1.0) for _ in range(3)}
    assert len(unseeded) > 1


# ---- errors ------------------------------------------------------------------------------------------


def test_one_error_per_status_and_the_server_keeps_serving(http):
    assert assert_error(http.post("/v1/completions", json={"prompt": "x", "max_tokens": -1}), 400)["param"] == "max_tokens"
    assert_error(http.post("/v1/completions", content=b"{nope", headers={"content-type": "application/json"}), 400)
    assert_error(http.post("/v1/completions", json={"prompt": "x", "stream_options": {"include_usage": True}}), 400)
    assert assert_error(http.post("/v1/completions", json={"prompt": "x" * 5000, "max_tokens": 8}), 400)["param"] == "prompt"
    assert assert_error(http.post("/v1/completions", json={"prompt": "x", "top_p": 0}), 400)["param"] == "top_p"
    assert_error(http.post("/v1/completions", json={"prompt": "x", "temperature": 2.5}), 400)
    assert_error(http.post("/v1/completions", json={"prompt": "x", "acceptance": "loose"}), 400)
    assert_error(http.post("/v1/completions", json={"prompt": [10**6]}), 400)
    assert assert_error(http.post("/v1/completions", json={"prompt": "x", "model": "gpt-4"}), 404)["param"] == "model"
    assert_error(http.get("/v1/nothing"), 404)
    assert_error(http.get("/v1/completions"), 405)
    big = b"x" * 2_000_000
    assert_error(http.post("/v1/completions", content=big, headers={"content-type": "application/json"}), 413)
    chunks = iter([big[:600_000]] * 3)  # no Content-Length: counted as it streams in
    assert_error(http.post("/v1/completions", content=chunks, headers={"content-type": "application/json"}), 413)
    assert assert_error(http.post("/v1/completions", json={"prompt": 5}), 400)["param"] == "prompt"
    assert http.post("/v1/completions", json={"prompt": PROMPTS[0], "max_tokens": 4}).status_code == 200


class GatedEngine(Engine):
    """The served engine, with decode steps that wait until the gate (a file: the engine runs in a
    process of its own) exists."""

    gate: Path

    def step(self, batch):
        wait_for(self.gate.exists)
        return super().step(batch)


def gated_loader(gate: Path, settings: Settings) -> Served:
    served = load_served(settings)
    served.engine.__class__, GatedEngine.gate = GatedEngine, gate
    return served


def test_a_full_queue_answers_429_with_retry_after(settings, wait_ready, tmp_path):
    tight = settings.model_copy(update={"max_batch_size": 1, "queue_size": 1})
    gate = tmp_path / "open"
    with TestClient(create_app(tight, loader=partial(gated_loader, gate))) as c, ThreadPoolExecutor(2) as pool:
        try:
            wait_ready(c.get)
            body = {"prompt": PROMPTS[0], "max_tokens": 8}
            running = pool.submit(c.post, "/v1/completions", json=body)  # takes the only slot
            wait_for(lambda: c.get("/info").json()["running"] == 1)
            waiting = pool.submit(c.post, "/v1/completions", json=body)  # takes the only place in the queue
            wait_for(lambda: c.get("/info").json()["waiting"] == 1)
            full = c.post("/v1/completions", json=body)
            assert_error(full, 429)
            assert int(full.headers["Retry-After"]) >= 1
        finally:
            gate.touch()
        assert running.result().status_code == waiting.result().status_code == 200
        assert c.post("/v1/completions", json=body).status_code == 200


def slow_loader(release: Path, settings: Settings) -> Served:
    wait_for(release.exists)
    return load_served(settings)


def test_503_until_the_model_is_loaded(settings, wait_ready, tmp_path):
    release = tmp_path / "release"
    with TestClient(create_app(settings, loader=partial(slow_loader, release))) as c:
        assert_error(c.get("/health"), 503)
        assert_error(c.post("/v1/completions", json={"prompt": "x"}), 503)
        release.touch()
        wait_ready(c.get)
        assert c.post("/v1/completions", json={"prompt": "x", "max_tokens": 2}).status_code == 200


# ---- a Vicuna-layout model: SentencePiece-style tokenizer, FasterDecoding heads --------------------


def test_vicuna_layout_served_through_env(tmp_path, monkeypatch, wait_ready):
    from tests.vicuna_layout import TEXT, write_vicuna_layout

    model_dir, heads_dir = write_vicuna_layout(tmp_path)
    monkeypatch.setenv("MODEL_NAME", str(model_dir))
    monkeypatch.setenv("MEDUSA_HEADS", str(heads_dir))
    monkeypatch.setenv("MEDUSA_CHOICES", "tree7")
    monkeypatch.setenv("DEVICE", "cpu")
    with TestClient(create_app(Settings())) as c:
        wait_ready(c.get)
        assert c.get("/info").json()["num_heads"] == 3
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        dtype = c.get("/info").json()["dtype"]
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype)).eval()
        for prompt in [TEXT[:37]]:  # the model recites TEXT from here
            body = {"prompt": prompt, "max_tokens": 80}
            out = c.post("/v1/completions", json=body).json()
            text = out["choices"][0]["text"]
            with c.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
                raw = "".join(r.iter_text())
            chunks = [json.loads(e[6:]) for e in raw.split("\n\n") if e.startswith("data: {")]
            assert streamed_text(chunks) == text
            ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
            ref = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=80)[0]
            head = tokenizer.decode(ref[: ids.shape[1]], skip_special_tokens=True)
            whole = tokenizer.decode(ref, skip_special_tokens=True)  # the text as one decode: spaces kept
            assert whole == head + text
            assert whole == TEXT and text.endswith("東京 🚀 naïve déjà vu.\n    def f(x):\n  return x\n")
