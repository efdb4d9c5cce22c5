"""Two replicas of `python app.py` behind nginx, sharing their rate limits through Redis: the topology
of deploy/docker-compose.yml, run with the real programs (Debian's nginx and redis-server; skipped
where they are missing) and deploy/nginx.conf itself, every request sent to nginx."""

from __future__ import annotations

import re
import shutil
import signal
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import yaml

from bench.loadgen import free_port
from tests.http_helpers import serving, streamed

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
KEYS = [f"sk-replica-test-{i}" for i in range(5)]  # one per part of the test: each has its own budget
LIMIT = 8  # requests per minute and key


def test_the_compose_file_and_the_manifest_are_what_the_readme_says():
    compose = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())["services"]
    assert set(compose) == {"redis", "medusa", "nginx"} and compose["medusa"]["deploy"]["replicas"] == 2
    env = compose["medusa"]["environment"]
    assert env["RATE_LIMIT_STORAGE"] == "redis://redis:6379" and env["TRUSTED_PROXIES"]
    docs = {d["kind"] + "/" + d["metadata"]["name"]: d for d in yaml.safe_load_all((DEPLOY / "kubernetes.yaml").read_text())}
    assert set(docs) == {"Deployment/medusa", "Service/medusa", "Deployment/medusa-redis", "Service/medusa-redis"}
    [container] = docs["Deployment/medusa"]["spec"]["template"]["spec"]["containers"]
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"]["path"] == "/health"
    assert container["lifecycle"]["preStop"]["exec"]["command"][0] == "sleep"
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    grace = docs["Deployment/medusa"]["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    drain = int(next(e["value"] for e in container["env"] if e["name"] == "SHUTDOWN_GRACE_S"))
    assert grace > drain + 5  # preStop, then the drain, inside the grace period
    assert docs["Service/medusa"]["spec"]["ports"][0]["targetPort"] == "http"


@pytest.fixture(scope="module")
def nginx_binary():
    binary = shutil.which("nginx") or (shutil.which("nginx", path="/usr/sbin:/sbin"))
    if binary is None:
        pytest.skip("nginx is not installed (Debian package nginx-light; .ci/run installs it)")
    return binary


@pytest.fixture(scope="module")
def cluster(nginx_binary, redis_url, tmp_path_factory):
    """Two replicas, Redis, nginx; yields the nginx URL, {replica URL: its process}, and restart(replica URL)."""
    flags = ["--api-keys", ",".join(KEYS), "--rate-limit", f"{LIMIT}/minute", "--rate-limit-storage", redis_url,
             "--trusted-proxies", "127.0.0.1", "--shutdown-grace-s", "20"]
    with ThreadPoolExecutor(2) as pool:
        replicas = dict((url, server) for server, url in pool.map(lambda _: serving(*flags), range(2)))
    folder = tmp_path_factory.mktemp("nginx")
    port = free_port()
    conf = (DEPLOY / "nginx.conf").read_text()
    servers = "\n".join(f"        server {u.removeprefix('http://')} max_fails=1 fail_timeout=5s;" for u in replicas)
    conf, n = re.subn(r"^\s*server medusa:8000 .*$", servers, conf, flags=re.M)
    assert n == 1
    conf = conf.replace("listen 8080;", f"listen 127.0.0.1:{port};")
    conf = conf.replace("http {", f"http {{\n    access_log off;\n    client_body_temp_path {folder}/body;\n"
                                  f"    proxy_temp_path {folder}/proxy;\n", 1)
    (folder / "nginx.conf").write_text(conf)
    nginx = subprocess.Popen([nginx_binary, "-p", str(folder), "-c", str(folder / "nginx.conf"), "-g",
                              f"daemon off; pid {folder}/nginx.pid; error_log {folder}/error.log;"],
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 10
    while True:
        assert nginx.poll() is None, nginx.stderr.read().decode()
        try:
            if httpx.get(url + "/health").status_code == 200:
                break
        except httpx.HTTPError:
            assert time.monotonic() < deadline, "nginx did not start"
            time.sleep(0.05)
    def restart(replica: str) -> None:
        """A replica that exited comes back on its port (as a process manager would start it)."""
        replicas[replica], _ = serving(*flags, port=int(replica.rsplit(":", 1)[1]))

    yield url, replicas, restart
    nginx.terminate()
    nginx.wait(10)
    for server in replicas.values():
        server.kill()
        server.wait(30)


def key(i: int) -> dict:
    return {"Authorization": f"Bearer {KEYS[i]}"}


def served(replica: str) -> int:
    """Requests a replica has answered, from its own /metrics."""
    text = httpx.get(replica + "/metrics").text
    return int(sum(float(v) for v in re.findall(r"^medusa_request_success_total\{[^}]*\} (\S+)$", text, re.M)))


def running(replica: str) -> int:
    return int(float(re.search(r"^medusa_requests_running (\S+)$", httpx.get(replica + "/metrics").text, re.M)[1]))


BODY = {"prompt": "def f(x):\n", "max_tokens": 4}


def test_both_replicas_serve_and_the_limit_is_shared(cluster):
    url, replicas, _ = cluster
    before = {r: served(r) for r in replicas}
    codes = [httpx.post(url + "/v1/completions", json=BODY, headers=key(0), timeout=60).status_code
             for _ in range(LIMIT + 4)]
    assert codes.count(200) == LIMIT and codes.count(429) == 4, codes  # N answers for the key, across both
    per_replica = {r: served(r) - before[r] for r in replicas}
    assert sum(per_replica.values()) == LIMIT and min(per_replica.values()) >= 1, per_replica
    print(f"\n{codes.count(200)} of {len(codes)} answered (limit {LIMIT}/minute), per replica {list(per_replica.values())}")


def test_server_sent_events_arrive_as_they_are_produced(cluster):
    url, _, _ = cluster
    body = {"prompt": "def f(x):\n", "max_tokens": 200, "ignore_eos": True, "stream": True, "speculative": False}
    arrivals, start = [], time.perf_counter()
    with httpx.stream("POST", url + "/v1/completions", json=body, headers=key(1), timeout=60) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                arrivals.append(time.perf_counter() - start)
    spread = arrivals[-1] - arrivals[0]
    assert len(arrivals) >= 100 and spread > 0.2, (len(arrivals), spread)
    # as produced, not in a few buffered bursts: the chunks come in many distinct tenths of the stream
    assert len({int(10 * (t - arrivals[0]) / spread) for t in arrivals}) >= 8
    print(f"\n{len(arrivals)} chunks over {spread:.2f} s through nginx")


def test_sigterm_to_a_replica_mid_stream_loses_nothing(cluster):
    url, replicas, restart = cluster
    body = {"prompt": "def f(x):\n", "max_tokens": 480, "ignore_eos": True, "speculative": False}
    first = threading.Event()
    with ThreadPoolExecutor(1) as pool:
        streaming = pool.submit(streamed, url, body, first, key(2))
        assert first.wait(60) or streaming.result()
        busy = next(r for r in replicas if running(r) == 1)
        replicas[busy].send_signal(signal.SIGTERM)
        time.sleep(0.3)
        after = [httpx.post(url + "/v1/completions", json=BODY, headers=key(2), timeout=60).status_code for _ in range(4)]
        events = streaming.result(timeout=120)
    assert after == [200] * 4  # new requests go to the other replica
    assert events[-1] == "[DONE]" and '"completion_tokens":480' in events[-2].replace(" ", "")
    assert replicas[busy].wait(30) in (0, -signal.SIGTERM, 143)  # it drained, then exited cleanly
    restart(busy)


def test_sigkill_of_a_replica_gets_a_clean_502_then_the_other_serves(cluster):
    url, replicas, _ = cluster
    body = {"prompt": "def f(x):\n", "max_tokens": 480, "ignore_eos": True, "speculative": False}
    with ThreadPoolExecutor(1) as pool:
        in_flight = pool.submit(httpx.post, url + "/v1/completions", json=body, headers=key(3), timeout=60)
        deadline = time.monotonic() + 30
        while not (busy := [r for r in replicas if running(r) == 1]):
            assert time.monotonic() < deadline
            time.sleep(0.02)
        replicas[busy[0]].kill()
        killed = time.monotonic()
        cut = in_flight.result(timeout=30)
    assert cut.status_code == 502 and time.monotonic() - killed < 5  # nginx's clean 502, at once, not a hang
    answers = [httpx.post(url + "/v1/completions", json=BODY, headers=key(3), timeout=60) for _ in range(4)]
    assert [a.status_code for a in answers] == [200] * 4  # the other replica serves every new request
    print(f"\nfailover: the first answer after SIGKILL came {time.monotonic() - killed:.2f} s after it")
