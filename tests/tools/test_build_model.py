"""The bundled model's build, at a tiny size on the CPU, the way a GPU machine runs it: a packed
corpus unpacked elsewhere, the base model pretrained (resumably) and saved in bf16, then heads trained
on the same corpus; bench/device_build.sh end to end; the results load as the service loads them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from load_medusa_from_hf import load_medusa_model
from training.corpus import MAX_FILE_BYTES, SourceFile, collect, pack, source_roots, split
from training.toy_model import stdlib_texts

ROOT = Path(__file__).resolve().parents[2]
TINY = ["--vocab-size", "320", "--hidden-size", "32", "--intermediate-size", "64", "--layers", "1", "--heads", "2",
        "--kv-heads", "2", "--context", "64", "--batch", "2", "--seq-len", "32", "--eval-every", "6", "--warmup", "2"]


@pytest.fixture(scope="module")
def archive(tmp_path_factory) -> Path:
    """Standard-library files and a few more under site-packages/, packed."""
    texts = [t for t in stdlib_texts(60) if t.strip() and len(t.encode()) < MAX_FILE_BYTES]
    files = [SourceFile("stdlib", f"m{i}.py", t) for i, t in enumerate(texts)]
    files += [SourceFile("site-packages", f"pkg/m{i}.py", t) for i, t in enumerate(texts[:20])]
    archive = tmp_path_factory.mktemp("packed") / "corpus.tar.xz"
    pack(files, archive)
    return archive


@pytest.fixture(scope="module")
def corpus(archive, tmp_path_factory) -> Path:
    """The packed corpus unpacked elsewhere: collect() reads the same files from it."""
    folder = tmp_path_factory.mktemp("unpacked")
    with tarfile.open(archive) as tar:
        tar.extractall(folder, filter="data")
        names = sorted(m.name for m in tar.getmembers())
    assert sorted(f.name for f in collect(source_roots(folder))) == names
    return folder


def build(corpus: Path, work: Path, out: Path, steps: int) -> None:
    cmd = [sys.executable, "-m", "training.build_model", "--sources", str(corpus), "--work", str(work), "--out", str(out),
           "--steps", str(steps), "--no-compile", "--save-dtype", "bfloat16", *TINY]
    subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True, text=True)


def test_build_resumes_and_saves_a_folder_the_auto_classes_load(corpus, tmp_path):
    work, out = tmp_path / "work", tmp_path / "model"
    build(corpus, work, out, steps=6)
    first = json.loads((out / "training.json").read_text())
    build(corpus, work, out, steps=12)  # picks up the checkpoint at step 6
    report = json.loads((out / "training.json").read_text())
    assert [e["step"] for e in first["log"]] == [6] and [e["step"] for e in report["log"]] == [6, 12]
    assert report["log"][0] == first["log"][0] and report["log"][1]["held_out_loss"] < first["log"][0]["held_out_loss"]
    assert report["shape"]["hidden_size"] == 32 and report["schedule"]["batch"] == 2
    _, held_out = split(collect(source_roots(corpus)))
    assert report["corpus"]["held_out_files"] == [f.name for f in held_out]
    model = AutoModelForCausalLM.from_pretrained(out, dtype="auto")
    assert model.dtype == torch.bfloat16 and model.config.hidden_size == 32
    assert all(f.stat().st_size < 15 * 2**20 for f in out.iterdir())

    heads = tmp_path / "heads"
    subprocess.run([sys.executable, "-m", "training.train_medusa", "--model", str(out), "--out", str(heads), "--python-sources",
                    str(corpus), "--heads", "2", "--shared-lm-head", "--self-distill", "--sequences", "8",
                    "--eval-sequences", "4", "--seq-len", "24", "--prompt-tokens", "8", "--steps", "3", "--batch", "4",
                    "--device", "cpu"], cwd=ROOT, check=True, capture_output=True, text=True)
    medusa, _ = load_medusa_model(str(out), str(heads), deepspeed=False)
    assert medusa.num_heads == 2 and medusa.dtype == torch.float32  # bf16 on disk, fp32 to serve on the CPU


def test_device_script_runs_end_to_end_at_a_tiny_size(archive, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    env = {**os.environ, "PYTHON": sys.executable, "NAME": "tiny", "CORPUS": str(archive), "DEVICE": "cpu", "WORK": str(tmp_path / "work"),
           "OUT": str(out), "SHAPE": " ".join([*TINY, "--steps", "4", "--no-compile"]),
           "HEADS": "--sequences 8 --eval-sequences 4 --seq-len 24 --prompt-tokens 8 --steps 2 --batch 4"}
    run = subprocess.run(["bash", "bench/device_build.sh"], cwd=ROOT, env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-3000:]
    parts = sorted(out.glob("model.tar.part-*"))
    assert parts and all(p.stat().st_size <= 15 * 2**20 for p in parts)
    back = tmp_path / "back"
    back.mkdir()
    subprocess.run(f"cat {' '.join(str(p) for p in parts)} | tar x -C {back}", shell=True, check=True)
    assert not (back / "tiny" / "medusa").exists()  # the base model is packed before the heads are trained
    subprocess.run(["tar", "xf", str(out / "heads.tar"), "-C", str(back)], check=True)
    model, _ = load_medusa_model(str(back / "tiny"), str(back / "tiny" / "medusa"), deepspeed=False)
    assert model.num_heads == 4 and model.config.hidden_size == 32
