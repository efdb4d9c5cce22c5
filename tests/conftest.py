"""Shared fixtures: one toy model with trained heads per session, and Hugging Face references."""

from __future__ import annotations

import functools
import shutil
import socket
import subprocess
import time

import httpx
import pytest
import torch

from config.settings import DEFAULT_HEADS, DEFAULT_MODEL, SMALL_MODEL
from load_medusa_from_hf import heads_tree, load_medusa_model
from training.toy_model import build_toy, stdlib_texts


@pytest.fixture(scope="session")
def toy():
    """(MedusaModel, tokenizer): a seeded random 2-layer Llama whose heads were self-distilled."""
    torch.manual_seed(0)
    return build_toy()


@pytest.fixture(scope="session")
def prompts(toy):
    """Eight held-out prompts of mixed lengths (3 to 40 tokens), as token ids."""
    _, tokenizer = toy
    ids = tokenizer(stdlib_texts(60)[-1])["input_ids"]
    lengths = [3, 17, 8, 40, 5, 26, 11, 33]
    return [ids[:1] + ids[100 + 50 * i : 100 + 50 * i + n - 1] for i, n in enumerate(lengths)]


@pytest.fixture(scope="session")
def hf_greedy(toy):
    """hf_greedy(prompt_ids, max_new_tokens, eos=<the model's>) -> generated ids, from HF generate()
    at batch 1; EOS ends the output and is not part of it."""
    model, tokenizer = toy

    @functools.cache
    def run(prompt: tuple[int, ...], max_new_tokens: int, eos: int) -> list[int]:
        ids = torch.tensor([prompt])
        out = model.model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            do_sample=False,
            max_new_tokens=max_new_tokens,
            eos_token_id=eos,
            pad_token_id=tokenizer.pad_token_id,
        )[0, len(prompt) :].tolist()
        return out[: out.index(eos)] if eos in out else out

    return lambda prompt, max_new_tokens, eos=tokenizer.eos_token_id: run(tuple(prompt), max_new_tokens, eos)


@pytest.fixture(scope="session")
def bundled():
    """(MedusaModel, tokenizer): the bundled model with its heads, fp32, without DeepSpeed."""
    return load_medusa_model(str(SMALL_MODEL), str(SMALL_MODEL / "medusa"))


@pytest.fixture(scope="session")
def bundled_tree():
    return heads_tree(str(SMALL_MODEL / "medusa"))


@pytest.fixture(scope="session")
def chat_url(settings, serve_with):
    """A server of the default chat model and its heads (the tests' flat cost table: the whole tree
    every step), shared by the chat API and demo page tests."""
    with serve_with(settings.model_copy(update={"model_name": DEFAULT_MODEL, "medusa_heads": str(DEFAULT_HEADS),
                                                "max_tokens_limit": 256})) as url:
        yield url


@pytest.fixture(scope="session")
def chat_http(chat_url):
    with httpx.Client(base_url=chat_url, timeout=120) as c:
        yield c


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory):
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.skip("redis-server is not installed (Debian package redis-server; .ci/run installs it)")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    folder = tmp_path_factory.mktemp("redis")
    proc = subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                             "--dir", str(folder)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2) as s:
                s.sendall(b"PING\r\n")
                if s.recv(16).startswith(b"+PONG"):
                    break
        except OSError:
            pass
        assert time.monotonic() < deadline and proc.poll() is None, "redis-server did not start"
        time.sleep(0.05)
    yield f"redis://127.0.0.1:{port}"
    proc.terminate()
    proc.wait(timeout=10)
