"""How `python app.py` holds connections (server/connections.py), through a real server: HEAD on GET
routes, X-Forwarded-For trusted only from the configured proxies, and stalled connections closed."""

from __future__ import annotations

import socket
import time

import httpx
import pytest

from tests.http_helpers import serving


def raw(url: str) -> socket.socket:
    host, port = url.removeprefix("http://").split(":")
    return socket.create_connection((host, int(port)), timeout=10)


def read_until_closed(sock: socket.socket, seconds: float) -> tuple[bytes, float | None]:
    """What the server sent, and the seconds until it closed the connection (None: it stayed open)."""
    start, received = time.monotonic(), b""
    sock.settimeout(seconds)
    try:
        while chunk := sock.recv(65536):
            received += chunk
        return received, time.monotonic() - start
    except TimeoutError:
        return received, None
    except ConnectionResetError:
        return received, time.monotonic() - start


@pytest.fixture
def strict():
    """A server with short deadlines."""
    server, url = serving("--header-timeout-s", "1", "--body-timeout-s", "2")
    yield url
    server.terminate()
    server.wait(30)


@pytest.mark.parametrize("path", ["/health", "/", "/metrics", "/v1/models", "/info"])
def test_head_answers_like_get_without_a_body(base_url, path):
    get, head = httpx.get(base_url + path), httpx.head(base_url + path)
    assert get.status_code == head.status_code == 200
    assert head.content == b"" and head.headers["content-type"] == get.headers["content-type"]


def test_a_forged_x_forwarded_for_is_not_a_new_rate_limit_bucket():
    """No proxy is trusted by default: the limit is the connection's address, whatever the header says."""
    server, url = serving("--rate-limit", "3/minute")
    try:
        body = {"prompt": "import os\n", "max_tokens": 1}
        codes = [httpx.post(url + "/v1/completions", json=body, headers={"X-Forwarded-For": f"10.0.0.{i}"}).status_code
                 for i in range(5)]
        assert codes == [200, 200, 200, 429, 429]
    finally:
        server.terminate()
        server.wait(30)


def test_a_trusted_proxy_gives_each_client_its_own_bucket():
    server, url = serving("--rate-limit", "1/minute", "--trusted-proxies", "127.0.0.1")
    try:
        body = {"prompt": "import os\n", "max_tokens": 1}
        for client in ("10.0.0.1", "10.0.0.2"):
            first, second = (httpx.post(url + "/v1/completions", json=body, headers={"X-Forwarded-For": client})
                             for _ in range(2))
            assert (first.status_code, second.status_code) == (200, 429)
    finally:
        server.terminate()
        server.wait(30)


def test_stalled_connections_are_closed_and_the_server_keeps_serving(strict):
    heads = [raw(strict) for _ in range(50)]
    for s in heads:
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: appl")  # a head, trickled: never ends
    body = raw(strict)
    body.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: 100\r\n\r\n{\"prompt\"")  # a body that never arrives in full
    start = time.monotonic()
    assert httpx.get(strict + "/health", timeout=5).status_code == 200  # meanwhile, the server answers
    assert all(read_until_closed(s, 5)[1] is not None for s in heads)
    assert time.monotonic() - start < 6
    reply, closed = read_until_closed(body, 5)
    assert reply.startswith(b"HTTP/1.1 408 ") and b"did not arrive within 2 s" in reply and closed is not None
    assert httpx.get(strict + "/health", timeout=5).status_code == 200
