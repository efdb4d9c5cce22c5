"""POST /v1/chat/completions, /tokenize and /detokenize through HTTP, as clients use them: the
unmodified OpenAI SDK on the default chat model (SmolLM2-135M-Instruct, its own ChatML template),
the built-in vicuna_v1.1 template on a Vicuna-layout model, and every kind of bad chat input."""

from __future__ import annotations

import json

import httpx
import pytest
from fastapi.testclient import TestClient
from transformers import AutoTokenizer

from app import create_app
from config.chat_templates import VICUNA_SYSTEM
from config.settings import DEFAULT_MODEL
from load_medusa_from_hf import resolve_model
from tests.http_helpers import assert_error

MESSAGES = [{"role": "user", "content": "What is 2 + 2?"}]  # the int4 default answers it in one short sentence
CONVERSATION = [  # three turns: the answer to the last is generated
    {"role": "system", "content": "You are a terse assistant."},
    {"role": "user", "content": "Name a colour."},
    {"role": "assistant", "content": "Blue."},
    {"role": "user", "content": "Name another one."},
    {"role": "assistant", "content": "Red."},
    {"role": "user", "content": "And a third?"},
]


@pytest.fixture(scope="module")
def tokenizer():
    source = resolve_model(DEFAULT_MODEL)
    return AutoTokenizer.from_pretrained(source.name, gguf_file=source.gguf_file)


@pytest.mark.parametrize("speculative", [False, True])
def test_the_openai_sdk_chats_with_and_without_speculation(chat_url, speculative):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=f"{chat_url}/v1", api_key="unused")
    model = client.models.list().data[0].id
    out = client.chat.completions.create(model=model, messages=CONVERSATION, max_tokens=32, temperature=0,
                                         extra_body={"speculative": speculative})
    assert out.object == "chat.completion" and out.id.startswith("chatcmpl-")
    message = out.choices[0].message
    assert message.role == "assistant" and message.content and "<|im_end|>" not in message.content
    assert out.choices[0].finish_reason in ("stop", "length")
    stream = list(client.chat.completions.create(model=model, messages=CONVERSATION, max_tokens=32, temperature=0,
                                                 stream=True, stream_options={"include_usage": True},
                                                 extra_body={"speculative": speculative}))
    assert stream[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == message.content
    finish = [c for c in stream if c.choices and c.choices[0].finish_reason]
    assert len(finish) == 1 and finish[0].choices[0].finish_reason == out.choices[0].finish_reason
    assert stream[-1].choices == [] and stream[-1].usage.completion_tokens == out.usage.completion_tokens
    assert all(c.object == "chat.completion.chunk" for c in stream)


def test_greedy_speculative_chat_equals_standard_and_ends_at_the_end_of_turn(chat_http):
    body = {"messages": MESSAGES, "max_tokens": 48}
    answers = [chat_http.post("/v1/chat/completions", json={**body, "speculative": s}).json() for s in (False, True)]
    assert answers[0]["choices"][0]["message"] == answers[1]["choices"][0]["message"]
    assert answers[1]["choices"][0]["message"]["content"] == "The answer is 4."
    assert answers[1]["choices"][0]["finish_reason"] == "stop"  # <|im_end|> ended it, and is not in the content
    assert answers[0]["metrics"]["accepted_tokens_per_step"] == 1.0


def test_the_rendered_prompt_is_the_tokenizers_chat_template(chat_http, tokenizer):
    expected = tokenizer.apply_chat_template(CONVERSATION, add_generation_prompt=True, tokenize=True,
                                             return_dict=True)["input_ids"]
    tokens = chat_http.post("/tokenize", json={"messages": CONVERSATION}).json()
    assert tokens["tokens"] == list(expected) and tokens["count"] == len(expected)
    answer = chat_http.post("/v1/chat/completions", json={"messages": CONVERSATION, "max_tokens": 1}).json()
    assert answer["usage"]["prompt_tokens"] == len(expected)
    text = chat_http.post("/detokenize", json={"tokens": tokens["tokens"]}).json()["prompt"]
    assert text == tokenizer.apply_chat_template(CONVERSATION, add_generation_prompt=True, tokenize=False)
    plain = chat_http.post("/tokenize", json={"prompt": "Hello there", "return_token_strs": True}).json()
    assert plain["tokens"] == tokenizer("Hello there")["input_ids"] and plain["token_strs"] == ["Hello", "Ġthere"]
    assert plain["max_model_len"] == chat_http.get("/info").json()["max_context"]


def test_chat_logprobs_have_the_chat_shape(chat_http):
    r = chat_http.post("/v1/chat/completions", json={"messages": MESSAGES, "max_tokens": 6, "logprobs": True,
                                                     "top_logprobs": 3}).json()
    content = r["choices"][0]["logprobs"]["content"]
    assert len(content) == r["usage"]["completion_tokens"]
    assert "".join(t["token"] for t in content) == r["choices"][0]["message"]["content"]
    for t in content:
        assert t["bytes"] == list(t["token"].encode()) and len(t["top_logprobs"]) == 3
        assert t["top_logprobs"][0]["logprob"] >= t["logprob"] - 1e-6  # greedy: the token is the most likely


def test_without_max_tokens_the_answer_runs_to_its_end(chat_http):
    r = chat_http.post("/v1/chat/completions", json={"messages": MESSAGES}).json()
    assert r["choices"][0]["finish_reason"] == "stop" and r["choices"][0]["message"]["content"]


def test_the_vicuna_template_is_fastchats(tmp_path, settings, wait_ready):
    """A Vicuna model's tokenizer has no template: the built-in vicuna_v1.1 renders its chats."""
    from tests.vicuna_layout import write_vicuna_layout

    model_dir, heads_dir = write_vicuna_layout(tmp_path)
    expected = ("You are a terse assistant. USER: Name a colour. ASSISTANT: Blue.</s>USER: Name another one. "
                "ASSISTANT: Red.</s>USER: And a third? ASSISTANT:")
    vicuna = {"model_name": str(model_dir), "medusa_heads": str(heads_dir), "medusa_choices": "tree7"}
    with TestClient(create_app(settings.model_copy(update=vicuna))) as c:
        wait_ready(c.get)
        tokens = c.post("/tokenize", json={"messages": CONVERSATION}).json()["tokens"]
        default_system = c.post("/tokenize", json={"messages": CONVERSATION[1:2]}).json()["tokens"]
    tok = AutoTokenizer.from_pretrained(model_dir)
    assert tokens == tok(expected)["input_ids"]  # <s> first, as FastChat tokenizes its prompt
    assert default_system == tok(f"{VICUNA_SYSTEM} USER: Name a colour. ASSISTANT:")["input_ids"]


# ---- bad input ---------------------------------------------------------------------------------------

USER = [{"role": "user", "content": "hi"}]
BAD_CHAT = {  # id: (body, status, the param named or None)
    "no messages": ({"messages": []}, 400, "messages"),
    "messages missing": ({"max_tokens": 4}, 400, "messages"),
    "an unknown role": ({"messages": [{"role": "robot", "content": "hi"}]}, 400, "messages"),
    "a non-text part": ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
                        400, "messages"),
    "an empty content list": ({"messages": [{"role": "user", "content": []}]}, 400, "messages"),
    "content null": ({"messages": [{"role": "user", "content": None}]}, 400, "messages"),
    "a text part without text": ({"messages": [{"role": "user", "content": [{"type": "text"}]}]}, 400, "messages"),
    "a system message later on": ({"messages": [*USER, {"role": "system", "content": "x"}]}, 200, None),
    "tools requested": ({"messages": USER, "tools": [{"type": "function", "function": {"name": "f"}}]}, 400, "tools"),
    "tool_choice": ({"messages": USER, "tool_choice": "required"}, 400, "tool_choice"),
    "a JSON response format": ({"messages": USER, "response_format": {"type": "json_object"}}, 400, "response_format"),
    "top_logprobs without logprobs": ({"messages": USER, "top_logprobs": 2}, 400, "top_logprobs"),
    "top_logprobs over 20": ({"messages": USER, "logprobs": True, "top_logprobs": 21}, 400, "top_logprobs"),
    "two different token limits": ({"messages": USER, "max_tokens": 4, "max_completion_tokens": 5}, 400,
                                   "max_completion_tokens"),
    "max_tokens over the limit": ({"messages": USER, "max_completion_tokens": 10**6}, 400, "max_tokens"),
    "n over the limit": ({"messages": USER, "n": 1000}, 400, "n"),
    "temperature too high": ({"messages": USER, "temperature": 3}, 400, "temperature"),
    "stream_options without stream": ({"messages": USER, "stream_options": {"include_usage": True}}, 400, None),
    "an unknown model": ({"messages": USER, "model": "gpt-4o"}, 404, "model"),
    "a conversation over the context": ({"messages": [{"role": "user", "content": "word " * 3000}]}, 400, "messages"),
}


@pytest.mark.parametrize("case", BAD_CHAT, ids=list(BAD_CHAT))
def test_bad_chat_input_gets_its_status_and_error_shape(chat_http, case):
    body, status, param = BAD_CHAT[case]
    r = chat_http.post("/v1/chat/completions", json={"max_tokens": 2, **body} if status == 200 else body)
    if status == 200:  # the template's own rule: SmolLM2's ChatML renders a late system turn as it is
        assert r.status_code == 200, r.text
        return
    error = assert_error(r, status)
    if param is not None:
        assert error["param"] == param, error


BAD_TOKENIZE = {
    "neither prompt nor messages": ("/tokenize", {}, 400),
    "both prompt and messages": ("/tokenize", {"prompt": "x", "messages": USER}, 400),
    "a bad message": ("/tokenize", {"messages": [{"role": "robot", "content": "x"}]}, 400),
    "an unknown model": ("/tokenize", {"prompt": "x", "model": "other"}, 404),
    "a token outside the vocabulary": ("/detokenize", {"tokens": [10**7]}, 400),
    "a negative token": ("/detokenize", {"tokens": [-1]}, 400),
    "tokens not a list": ("/detokenize", {"tokens": "1 2 3"}, 400),
}


@pytest.mark.parametrize("case", BAD_TOKENIZE, ids=list(BAD_TOKENIZE))
def test_bad_tokenize_input(chat_http, case):
    route, body, status = BAD_TOKENIZE[case]
    assert_error(chat_http.post(route, json=body), status)


def test_a_model_without_a_template_says_how_to_set_one(http):
    """The session's small code model has no chat template and is no Vicuna."""
    error = assert_error(http.post("/v1/chat/completions", json={"messages": USER}), 400)
    assert "CHAT_TEMPLATE" in error["message"] and "vicuna_v1.1" in error["message"]
    assert "CHAT_TEMPLATE" in assert_error(http.post("/tokenize", json={"messages": USER}), 400)["message"]
    assert http.post("/tokenize", json={"prompt": "def f():"}).status_code == 200


def test_chat_and_completions_share_one_rate_limit(settings, serve_with):
    limited = settings.model_copy(update={"rate_limit": "3/minute", "chat_template": "chatml"})
    with serve_with(limited) as url, httpx.Client(base_url=url) as c:
        assert c.post("/v1/completions", json={"prompt": "x", "max_tokens": 1}).status_code == 200
        assert c.post("/v1/chat/completions", json={"messages": USER, "max_tokens": 1}).status_code == 200
        assert c.post("/v1/chat/completions", json={"messages": USER, "max_tokens": 1}).status_code == 200
        assert_error(c.post("/v1/completions", json={"prompt": "x", "max_tokens": 1}), 429)
        assert_error(c.post("/v1/chat/completions", json={"messages": USER, "max_tokens": 1}), 429)


def test_the_chat_stream_has_its_shape(chat_http):
    body = {"messages": MESSAGES, "max_tokens": 8, "n": 2, "temperature": 0.8, "seed": 3, "stream": True}
    with chat_http.stream("POST", "/v1/chat/completions", json=body) as r:
        raw = "".join(r.iter_text())
    events = [e[6:] for e in raw.split("\n\n") if e.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    for index in (0, 1):
        mine = [c["choices"][0] for c in chunks if c["choices"][0]["index"] == index]
        assert mine[0]["delta"] == {"role": "assistant", "content": ""}
        assert mine[-1]["delta"] == {} and mine[-1]["finish_reason"] in ("stop", "length")
        assert all(c["finish_reason"] is None and set(c["delta"]) == {"content"} for c in mine[1:-1])
