"""bench/gpu_figures.py on a toy shape on the CPU, so that the prepared GPU script keeps working
between the sessions that have a GPU."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_the_gpu_figures_script_runs_every_section_on_a_toy_shape(tmp_path):
    run = subprocess.run([sys.executable, "-m", "bench.gpu_figures", "--tiny", "--device", "cpu", "--steps", "2",
                          "--out", str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    figures = json.loads((tmp_path / "gpu_figures.json").read_text())
    failed = {name: v["error"] for name, v in figures.items() if isinstance(v, dict) and "error" in v}
    assert not failed, failed
    assert figures["shape"]["parameters"] > 0 and figures["copy_bandwidth_gb_s"] > 0
    steps = figures["step_ms"]
    assert {f"{tree}@{b}" for tree in ("root", "tree15", "mc_sim_7b_63", "bundled") for b in (1, 32)} <= set(steps)
    assert steps["root@1/root"] == 1.0 and all(v > 0 for v in steps.values())
    parity = figures["bundled_fp32"]
    assert parity["sequences_identical"] == parity["prompts"] == parity["standard_equals_hf"] == 4
    assert parity["accepted_tokens_per_step"] > 1.0
    assert figures["engine_standard_tokens_per_s"]["batch_32"] > 0 and figures["hf_generate_eager"]["tokens_per_s"] > 0
    assert set(figures["projected_speedup"]) >= {"batch_1", "batch_32"}
    static = figures["captured_forward_ms"]  # eager only on the CPU: no CUDA graph to capture
    assert set(static) == {f"{t}@{b}" for t in (1, 16, 64) for b in (1, 32)} and all(v["eager"] > 0 for v in static.values())
