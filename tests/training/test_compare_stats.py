"""``igrpo compare``'s statistics and report, without training: the interval math on hand-computed
values, the variant parser, and ``write_report`` (what ``run_compare`` calls after the runs) on run
directories written here (metrics.jsonl lines and a held-out results.json per run)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from igrpo_megatron.config import load_recipe, save_resolved_recipe
from igrpo_megatron.config.errors import UserError
from igrpo_megatron.training.checkpoint import TRAINER_STATE
from igrpo_megatron.training.compare import (
    _curves,
    _history,
    final_per_problem,
    finished_run,
    parse_variants,
    write_report,
)
from igrpo_megatron.training.compare_stats import (
    paired_problem_interval,
    paired_seed_interval,
    t_interval,
    t_quantile,
)

ROOT = Path(__file__).resolve().parents[2]


def test_t_quantiles_match_closed_forms_and_tables():
    # df = 1 (Cauchy): tan(pi (p - 1/2)) = tan(0.475 pi) = 12.706205
    assert t_quantile(0.975, 1) == pytest.approx(12.706205, abs=1e-5)
    # df = 2: F(t) = 1/2 + t / (2 sqrt(2 + t^2)) -> t = a sqrt(2 / (1 - a^2)), a = 2p - 1 = 0.95: 4.302653
    assert t_quantile(0.975, 2) == pytest.approx(4.302653, abs=1e-5)
    assert t_quantile(0.975, 5) == pytest.approx(2.570582, abs=1e-5)  # printed t tables
    assert t_quantile(0.975, 30) == pytest.approx(2.042272, abs=1e-5)
    assert t_quantile(0.975, 100_000) == pytest.approx(1.959964, abs=1e-5)  # the normal limit
    with pytest.raises(ValueError, match="0.5 < p < 1"):
        t_quantile(0.3, 4)


def test_t_interval_by_hand():
    # mean 0.2, sd 0.1, se 0.1 / sqrt(3) = 0.057735; half-width 4.302653 x 0.057735 = 0.248414
    ci = t_interval([0.1, 0.2, 0.3])
    assert (ci.mean, ci.low, ci.high, ci.n) == pytest.approx((0.2, -0.048414, 0.448414, 3), abs=1e-6)
    assert not ci.excludes_zero()
    one = t_interval([0.4])
    assert one.mean == 0.4 and math.isnan(one.low) and math.isnan(one.high)  # no spread from one value


def test_paired_seed_interval_by_hand():
    # differences 0.05, 0.02, 0.08: mean 0.05, sd 0.03, se 0.017321, half-width 4.302653 x 0.017321 = 0.074524
    ci = paired_seed_interval({1: 0.40, 2: 0.50, 3: 0.30}, {1: 0.45, 2: 0.52, 3: 0.38, 4: 0.9})  # seed 4 unpaired
    assert (ci.mean, ci.low, ci.high, ci.n) == pytest.approx((0.05, -0.024524, 0.124524, 3), abs=1e-6)


def test_paired_problem_interval_pairs_by_id_and_pools_seeds():
    base = {1: (["a", "b", "c"], [0.50, 0.25, 0.00]), 2: (["d", "e", "f"], [1.00, 0.50, 0.25])}
    arm = {1: (["c", "a", "b"], [0.50, 0.75, 0.25]),  # other order: paired by id -> 0.25, 0.00, 0.50
           2: (["d", "e", "f"], [1.00, 0.75, 0.50])}  # -> 0.00, 0.25, 0.25
    # 6 differences: mean 1.25 / 6 = 0.208333; sum of squared deviations 0.177083, sd sqrt(0.177083 / 5) = 0.188193,
    # se 0.188193 / sqrt(6) = 0.076830; t(0.975, 5) = 2.570582: half-width 0.197498
    ci = paired_problem_interval(base, arm)
    assert (ci.mean, ci.low, ci.high, ci.n) == pytest.approx((0.208333, 0.010835, 0.405831, 6), abs=1e-5)
    assert ci.excludes_zero()
    with pytest.raises(ValueError, match="seed 1: the two runs evaluated different held-out problems"):
        paired_problem_interval(base, {1: (["a", "b", "x"], [0, 0, 0])})


def test_variants_are_parsed_in_order_and_bad_ones_are_user_errors():
    arms = parse_variants("grpo,igrpo,igrpo:worst,igrpo:best_incorrect")
    assert list(arms) == ["grpo", "igrpo", "igrpo:worst", "igrpo:best_incorrect"]
    assert arms["grpo"] == ["algorithm.igrpo.enabled=false"]
    assert arms["igrpo:worst"] == ["algorithm.igrpo.enabled=true", "algorithm.igrpo.selection.rule=worst"]
    for bad, match in (("grpo,igrpo:bestest", "unknown variant 'igrpo:bestest'"), ("grpo", "at least two arms"),
                       ("grpo,grpo", "listed twice"), ("grpo,dapo", "unknown variant 'dapo'")):
        with pytest.raises(UserError, match=match):
            parse_variants(bad)


def _fake_run(run_dir: Path, arm: str, accs: tuple[float, float], per_problem: list[float], tokens: float) -> None:
    """What a 2-step run with evaluations at steps 0 and 2 leaves behind (only the keys compare reads)."""
    reward = "grpo/reward_mean" if arm == "grpo" else "refine/reward_mean"
    lines = [{"step": 0, "eval/heldout/pass@1": accs[0]}]
    for step in (1, 2):
        h = {"step": step, reward: 0.5, "generated_tokens": tokens / 2, "generated_completions": 16.0,
             "mechanism/plain_prompt_acc": 0.3 + 0.1 * step}
        if arm != "grpo":
            h.update({"beats_draft_rate": 0.1 * step, "mechanism/copy_rate": 0.9 - 0.1 * step,
                      "mechanism/refine_reward_draft_incorrect": 0.2, "mechanism/refine_reward_draft_correct": None})
        lines.append(h)
    lines[-1]["eval/heldout/pass@1"] = accs[1]
    run_dir.mkdir(parents=True)
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(h) + "\n" for h in lines))
    results = {"benchmarks": {"heldout": {"problems": [{"id": f"p{i}"} for i in range(len(per_problem))],
                                         "per_problem": {"pass@1": per_problem}}}}
    (run_dir / "eval" / "step_000002").mkdir(parents=True)
    (run_dir / "eval" / "step_000002" / "results.json").write_text(json.dumps(results))


def test_report_has_intervals_tokens_and_mechanism(tmp_path):
    arms = parse_variants("grpo,igrpo:worst")
    runs = {("grpo", 1): ((0.3, 0.40), [0.5, 0.25, 0.5], 1000.0), ("igrpo:worst", 1): ((0.3, 0.45), [0.75, 0.25, 0.5], 990.0),
            ("grpo", 2): ((0.3, 0.50), [0.5, 0.50, 0.5], 1000.0), ("igrpo:worst", 2): ((0.3, 0.52), [0.5, 0.50, 0.75], 1010.0)}
    results = {arm: {} for arm in arms}
    per_problem = {arm: {} for arm in arms}
    for (arm, seed), (accs, pp, tokens) in runs.items():
        run_dir = tmp_path / f"{arm.replace(':', '-')}-seed{seed}"
        _fake_run(run_dir, arm, accs, pp, tokens)
        results[arm][seed] = _curves(_history(run_dir), arm)
        per_problem[arm][seed] = final_per_problem(run_dir)
    base = load_recipe(ROOT / "recipes" / "tiny_cpu.yaml")
    write_report(tmp_path, "recipes/tiny_cpu.yaml", [], [1, 2], arms, results, per_problem, base)

    report = json.loads((tmp_path / "compare.json").read_text())
    assert report["baseline"] == "grpo" and report["budget_matched"] is True
    (d,) = report["differences"]
    # over seeds: differences 0.05, 0.02 -> mean 0.035, sd 0.021213, se 0.015, t(0.975, 1) = 12.706205
    assert d["over_seeds"]["mean"] == pytest.approx(0.035)
    assert d["over_seeds"]["high"] - d["over_seeds"]["mean"] == pytest.approx(12.706205 * 0.015, abs=1e-6)
    # over seed x problem: 0.25, 0, 0, 0, 0, 0.25 -> mean 0.083333
    assert d["over_problems"]["mean"] == pytest.approx(0.5 / 6) and d["over_problems"]["n"] == 6
    assert d["tokens"] == pytest.approx(1000.0) and d["baseline_tokens"] == pytest.approx(1000.0)
    mech = report["mechanism"]["igrpo:worst"]
    assert mech["beats_draft_step"] == {"early": pytest.approx(0.1), "late": pytest.approx(0.2)}
    assert math.isnan(mech["refine_after_correct_step"]["early"])  # never logged as a number
    assert "mechanism" not in report or "grpo" not in report["mechanism"]
    md = (tmp_path / "compare.md").read_text()
    assert "| igrpo:worst | grpo | +0.035 |" in md and "(n = 6)" in md and "## Mechanism" in md
    assert (tmp_path / "compare.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_bad_variant_is_one_line_and_exit_2_before_anything_runs(tmp_path, capsys):
    from igrpo_megatron.cli import main

    code = main(["compare", str(ROOT / "recipes" / "tiny_cpu.yaml"), "--variants", "grpo,igrpo:greedy",
                 "--output", str(tmp_path)])
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("igrpo: --variants 'grpo,igrpo:greedy': unknown variant") and "\n" not in err
    assert not list(tmp_path.iterdir())  # nothing was trained or written


def test_a_run_is_reused_only_when_finished_with_the_same_recipe(tmp_path):
    recipe_path = ROOT / "recipes" / "tiny_cpu.yaml"
    here = load_recipe(recipe_path, ["run.seed=2", f"run.output_dir={tmp_path / 'new'}"])
    run_dir = tmp_path / "old" / "igrpo-seed2"
    # The same run made elsewhere (another output directory): reused once its last checkpoint is the final one.
    made = load_recipe(recipe_path, ["run.seed=2", f"run.output_dir={tmp_path / 'old'}"])
    made.model.hf_path = str(run_dir / "warmstart")  # what training writes there after its warm-start
    save_resolved_recipe(made, run_dir)
    assert not finished_run(run_dir, here)  # no checkpoint yet
    for step in (here.trainer.num_steps - 1, here.trainer.num_steps):  # what a complete save leaves behind
        (run_dir / "checkpoints" / f"step_{step:06d}").mkdir(parents=True)
        for name in ("metadata.json", TRAINER_STATE):
            (run_dir / "checkpoints" / f"step_{step:06d}" / name).write_text("{}")
    (run_dir / "checkpoints" / "latest").write_text(f"step_{here.trainer.num_steps - 1:06d}\n")
    assert not finished_run(run_dir, here)  # stopped one step short
    (run_dir / "checkpoints" / "latest").write_text(f"step_{here.trainer.num_steps:06d}\n")
    assert finished_run(run_dir, here)
    # Any other setting makes it another run.
    assert not finished_run(run_dir, load_recipe(recipe_path, ["run.seed=3", f"run.output_dir={tmp_path / 'new'}"]))
    assert not finished_run(run_dir, load_recipe(recipe_path, ["run.seed=2", "algorithm.igrpo.selection.rule=worst",
                                                               f"run.output_dir={tmp_path / 'new'}"]))


def test_an_unknown_warmstart_mode_is_a_user_error(tmp_path):
    from igrpo_megatron.training.compare import run_compare

    with pytest.raises(UserError, match="--warmstart 'once'"):
        run_compare(str(ROOT / "recipes" / "tiny_cpu.yaml"), [], [1], str(tmp_path), warmstart="once")
    assert not list(tmp_path.iterdir())
