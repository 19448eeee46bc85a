"""The bench suite's own checks: the GPU check at tiny size on CPU (same script, ``--cpu-tiny``),
and ``python -m bench`` running its real training-step entry and refusing bad input.

The GPU check runs once per module (about a minute on 2 cores) through bench/gpu_check.sh, the
command the GPU machine runs.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.timeout(900)


@pytest.fixture(scope="module")
def gpu_check(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check")
    proc = subprocess.run(["bash", "bench/gpu_check.sh", "--cpu-tiny", "--out", str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=800, env={**os.environ, "PYTHON": sys.executable})
    path = out / "gpu_check.json"
    assert path.exists(), proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc, json.loads(path.read_text())


def test_gpu_check_runs_the_rl_step_and_measures_it(gpu_check):
    proc, r = gpu_check
    step = r["step"]
    assert r["size"] == "cpu-tiny" and r["model"]["dtype"] == "bfloat16"
    assert all(math.isfinite(s) and s > 0 for s in step["seconds"])
    assert math.isfinite(step["loss"])
    # Model FLOPs of the recorded batch, from the stated formula: at least 6 x matmul params x tokens.
    assert step["model_flops"] >= 6 * r["model"]["matmul_params"] * r["batch"]["tokens"]
    assert r["matmul_ceiling"]["dtype"] == "bfloat16" and r["matmul_ceiling"]["flops_per_s"] > 0
    assert 0 < r["mfu_vs_measured_matmul"] == pytest.approx(step["flops_per_s"] / r["matmul_ceiling"]["flops_per_s"])
    assert "RL step model FLOP/s" in proc.stdout  # the short table


def test_gpu_check_logprobs_match_float32(gpu_check):
    _, r = gpu_check
    lp = r["logprobs_vs_fp32"]
    assert lp["finite"] and lp["tokens"] > 0
    # bf16 keeps 8 bits of mantissa: per-token log-probs of a tiny model differ from fp32 by ~1e-2,
    # not by whole nats (which a wrong weight copy or a misaligned target would give).
    assert 0 < lp["mean_abs_diff"] < 0.05 and lp["max_abs_diff"] < 0.5


def test_gpu_check_checkpoint_round_trip(gpu_check):
    _, r = gpu_check
    assert r["checkpoint"]["ok"], r["checkpoint"]


def test_bench_train_entry_reports_figures_with_ceiling(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, "-m", "bench", "recipes/tiny_cpu.yaml", "--quick", "--only", "train",
                           "--workdir", str(tmp_path), "--json", str(out)], cwd=ROOT, capture_output=True, text=True,
                          timeout=800)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    entry = json.loads(out.read_text())["entries"]["train"]
    flops = next(f for f in entry["figures"] if f["name"] == "RL step model FLOP/s")
    assert flops["ceiling"] > 0 and flops["ratio"] == pytest.approx(flops["value"] / flops["ceiling"])
    assert "6*N*s" in entry["details"]["formula"]
    assert "| train | RL step model FLOP/s |" in proc.stdout


def test_bench_refuses_unknown_entry_and_bad_recipe(tmp_path):
    bad = subprocess.run([sys.executable, "-m", "bench", "recipes/tiny_cpu.yaml", "--only", "nope"], cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "unknown entry nope" in bad.stderr
    missing = subprocess.run([sys.executable, "-m", "bench", str(tmp_path / "none.yaml"), "--only", "train"], cwd=ROOT,
                             capture_output=True, text=True, timeout=300)
    assert missing.returncode == 2 and "none.yaml" in missing.stderr and len(missing.stderr.strip().splitlines()) == 1
