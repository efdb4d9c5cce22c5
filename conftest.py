"""Applies to every test: no test may reach the Hugging Face Hub (set before huggingface_hub loads),
and the service under a real uvicorn server, shared by the HTTP tests of one session."""

import os
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("COST_CACHE_DIR", os.path.join(tempfile.mkdtemp(prefix="medusa-costs-"), "costs"))  # not ~/.cache

import contextlib  # noqa: E402  (after the environment is set)
import threading  # noqa: E402
import time  # noqa: E402

import httpx  # noqa: E402
import pytest  # noqa: E402
import uvicorn  # noqa: E402

from app import create_app  # noqa: E402
from config.settings import SMALL_MODEL, Settings  # noqa: E402
from engine.adaptive import CostTable  # noqa: E402


def until_ready(get, timeout=120.0):
    deadline = time.monotonic() + timeout
    while get("/health").status_code != 200:
        assert time.monotonic() < deadline, "the service never became ready"
        time.sleep(0.05)


@pytest.fixture(scope="session")
def wait_ready():
    """wait_ready(get): poll get("/health") until 200 (an app still loading its model answers 503)."""
    return until_ready


@pytest.fixture(scope="session")
def settings(tmp_path_factory):
    """fp32 (exact references), and a fixed step cost table that is flat: every step costs the same
    whatever it verifies, so the adaptive chooser always takes the whole tree (tests of the service
    do not depend on this machine's speed; tests/engine/test_adaptive.py varies the table)."""
    flat = tmp_path_factory.mktemp("costs") / "flat.json"
    CostTable((1, 64), (1, 64), ((0.01, 0.01), (0.01, 0.01))).save(flat)
    return Settings(model_name=str(SMALL_MODEL), medusa_heads=str(SMALL_MODEL / "medusa"), device="cpu",
                    max_batch_size=16, max_wait_ms=20, queue_size=64, cost_table=str(flat))


@contextlib.contextmanager
def live_server(settings: Settings):
    """The app under uvicorn on a free port; yields its base URL once the model is loaded."""
    server = uvicorn.Server(uvicorn.Config(create_app(settings), host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.02)
    url = f"http://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}"
    with httpx.Client(base_url=url) as c:
        until_ready(c.get)
    yield url
    server.should_exit = True
    thread.join(timeout=10)


@pytest.fixture(scope="session")
def serve_with():
    """serve_with(settings): a context manager serving the app under uvicorn; yields its base URL."""
    return live_server


@pytest.fixture(scope="session")
def base_url(settings):
    with live_server(settings) as url:
        yield url


@pytest.fixture(scope="session")
def http(base_url):
    with httpx.Client(base_url=base_url, timeout=60) as c:
        yield c


