"""``igrpo compare``: GRPO against iGRPO (and iGRPO selection rules) at a matched rollout budget, over seeds.

Arms are named by ``--variants`` (default ``grpo,igrpo``): ``grpo`` (``algorithm.igrpo.enabled=false``),
``igrpo`` (enabled, the recipe's selection rule) and ``igrpo:<rule>`` (enabled, with
``algorithm.igrpo.selection.rule=<rule>``: best, worst, random, best_incorrect). The first arm is the
baseline every other arm is compared with.

All arms of a seed start from the same warm-start and tokenizer, see the same prompts and are
evaluated on the same held-out problems; GRPO samples ``algorithm.group_size`` completions per
prompt, iGRPO ``N + K x G`` (the recipe's budget check makes them equal). ``--warmstart shared``
(the default) trains the warm-start once, with the first seed, and starts every run from it: the
seeds then vary RL (sampling, prompt order) and the synthetic held-out draw, not the warm-start, as
RL papers run seeds from one SFT checkpoint, and a 3-seed compare costs one warm-start.
``--warmstart per-seed`` trains one per seed, so the intervals over seeds also hold the
warm-start's own noise. A run directory that already holds a
finished run of the same recipe (``recipe.yaml`` equal but for ``run.output_dir``, its newest
complete checkpoint at ``trainer.num_steps``) is reused, not trained again: a stopped compare picks up
where it was. A stop signal (SIGUSR1, SIGTERM, SIGHUP) ends the run in flight as in ``igrpo train``
(step, checkpoint, sidecar) and then the compare, with exit code 75. Writes to the output directory:

* ``compare.md``: per arm, held-out pass@1 before and after RL (mean ± sd, per seed), the final
  trained reward and the generated completions and tokens; per arm against the baseline, the mean
  difference of final held-out pass@1 with a paired 95% t interval over seeds and one over
  (seed, problem) pairs (``training.compare_stats``), and the tokens ratio (matched budget check);
  per iGRPO arm, the mechanism metrics (``algorithms.mechanism``) early and late in training.
* ``compare.png``: held-out accuracy and trained reward against steps and generated tokens, the
  plain-prompt accuracy of the training prompts, and refinement-beats-draft / copy rates.
* ``compare.json``: every curve, every interval, and ``budget_matched`` (for every seed, all arms
  generated as many completions).
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import statistics
from pathlib import Path
from typing import Any

from igrpo_megatron.config import load_recipe, recipe_to_yaml
from igrpo_megatron.config.algorithm import SELECTION_RULES
from igrpo_megatron.config.errors import UserError
from igrpo_megatron.config.evaluation import HELDOUT_BENCHMARK
from igrpo_megatron.config.files import atomic_write, write_text
from igrpo_megatron.config.schema import RecipeConfig
from igrpo_megatron.training.compare_stats import paired_problem_interval, paired_seed_interval
from igrpo_megatron.training.interfaces import EvaluatorFactory
from igrpo_megatron.training.preemption import StopRequest

logger = logging.getLogger(__name__)

DEFAULT_VARIANTS = "grpo,igrpo"
WARMSTART_MODES = ("shared", "per-seed")
WARMSTART_TEXT = {"shared": "one for every run (trained with seed {}); the seeds vary RL, not the warm-start",
                  "per-seed": "one per seed; the seeds vary the warm-start and RL"}
HELDOUT = f"eval/{HELDOUT_BENCHMARK}/pass@1"
# (series name, metrics.jsonl key) logged every step; see algorithms.mechanism and algorithms.igrpo.
STEP_SERIES = {"plain_acc_step": "mechanism/plain_prompt_acc", "beats_draft_step": "beats_draft_rate",
               "copy_rate_step": "mechanism/copy_rate",
               "refine_after_incorrect_step": "mechanism/refine_reward_draft_incorrect",
               "refine_after_correct_step": "mechanism/refine_reward_draft_correct"}


class CompareError(UserError, ValueError):
    """A bad ``igrpo compare`` argument (e.g. an unknown variant)."""


class CompareStopped(Exception):
    """A stop signal ended the run in flight (after its checkpoint); the arms after it were not started."""

    def __init__(self, run_dir: Path) -> None:
        super().__init__(f"compare stopped on a signal during {run_dir}; run the same command again to go on "
                         "(finished runs are reused, the stopped one resumes from its checkpoint)")
        self.run_dir = run_dir


def parse_variants(spec: str) -> dict[str, list[str]]:
    """``'grpo,igrpo,igrpo:worst'`` -> {arm name: the overrides that make it}, in order (first = baseline)."""
    arms: dict[str, list[str]] = {}
    for name in (x.strip() for x in spec.split(",")):
        if not name:
            continue
        algo, _, rule = name.partition(":")
        if name in arms:
            raise CompareError(f"--variants {spec!r}: {name!r} is listed twice")
        if algo == "grpo" and not rule:
            arms[name] = ["algorithm.igrpo.enabled=false"]
        elif algo == "igrpo" and (not rule or rule in SELECTION_RULES):
            arms[name] = ["algorithm.igrpo.enabled=true", *([f"algorithm.igrpo.selection.rule={rule}"] if rule else [])]
        else:
            raise CompareError(f"--variants {spec!r}: unknown variant {name!r}; use grpo, igrpo or igrpo:<rule> "
                               f"with a rule in {list(SELECTION_RULES)}")
    if len(arms) < 2:
        raise CompareError(f"--variants {spec!r}: name at least two arms (the first is the baseline), e.g. "
                           f"{DEFAULT_VARIANTS}")
    return arms


def _is_grpo(arm: str) -> bool:
    return arm == "grpo"


def _run_name(arm: str, seed: int) -> str:
    return f"{arm.replace(':', '-')}-seed{seed}"


def _history(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line] if path.exists() else []


def _curves(history: list[dict[str, Any]], arm: str) -> dict[str, Any]:
    """(step, value) and (generated tokens, value) series of held-out accuracy and trained reward, the
    per-step mechanism series, and the run's generated completions and tokens."""
    reward = "grpo/reward_mean" if _is_grpo(arm) else "refine/reward_mean"
    tokens = 0.0
    out: dict[str, Any] = {"acc_step": [], "acc_tokens": [], "reward_step": [], "reward_tokens": [],
                           **{name: [] for name in STEP_SERIES}}
    out["generated_completions"] = sum(h.get("generated_completions") or 0.0 for h in history)
    for h in history:
        tokens += h.get("generated_tokens") or 0.0
        if isinstance(h.get(HELDOUT), float):
            out["acc_step"].append((h["step"], h[HELDOUT]))
            out["acc_tokens"].append((tokens, h[HELDOUT]))
        if isinstance(h.get(reward), float):
            out["reward_step"].append((h["step"], h[reward]))
            out["reward_tokens"].append((tokens, h[reward]))
        for name, key in STEP_SERIES.items():
            if isinstance(h.get(key), float) and math.isfinite(h[key]):
                out[name].append((h["step"], h[key]))
    out["generated_tokens"] = tokens
    return out


def final_per_problem(run_dir: Path) -> dict[str, Any] | None:
    """The last held-out evaluation's per-problem pass@1: {step, ids, pass@1}; None when none was written."""
    reports = sorted((run_dir / "eval").glob("step_*/results.json"))
    if not reports:
        return None
    run = json.loads(reports[-1].read_text())
    bench = run["benchmarks"].get(HELDOUT_BENCHMARK)
    if bench is None:
        return None
    return {"step": int(reports[-1].parent.name.removeprefix("step_")),
            "ids": [str(p["id"]) for p in bench["problems"]], "pass@1": list(bench["per_problem"]["pass@1"])}


def _mean_sd(values: list[float]) -> str:
    if not values:
        return "n/a"
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.3f} ± {sd:.3f}"


def _table(results: dict[str, dict[int, dict]], seeds: list[int]) -> str:
    lines = ["| algorithm | held-out pass@1 before RL | after RL (mean ± sd) | per seed | final trained reward | "
             "generated completions | generated tokens |", "|---|---|---|---|---|---|---|"]
    for algo, per_seed in results.items():
        first = [c["acc_step"][0][1] for c in per_seed.values() if c["acc_step"]]
        last = [c["acc_step"][-1][1] for c in per_seed.values() if c["acc_step"]]
        reward = [c["reward_step"][-1][1] for c in per_seed.values() if c["reward_step"]]
        tokens = [c["generated_tokens"] for c in per_seed.values()]
        completions = [c["generated_completions"] for c in per_seed.values()]
        per = ", ".join(f"{s}: {per_seed[s]['acc_step'][-1][1]:.3f}" for s in seeds if per_seed[s]["acc_step"])
        lines.append(f"| {algo} | {_mean_sd(first)} | {_mean_sd(last)} | {per} | {_mean_sd(reward)} | "
                     f"{statistics.mean(completions) if completions else math.nan:.0f} | "
                     f"{statistics.mean(tokens) if tokens else math.nan:.0f} |")
    return "\n".join(lines)


def differences(results: dict[str, dict[int, dict]], per_problem: dict[str, dict[int, dict | None]],
                baseline: str) -> list[dict[str, Any]]:
    """Every arm against ``baseline``: final held-out pass@1 difference, its intervals, and the tokens ratio."""
    rows = []
    base = results[baseline]
    for arm, per_seed in results.items():
        if arm == baseline:
            continue
        final = {a: {s: c["acc_step"][-1][1] for s, c in results[a].items() if c["acc_step"]} for a in (baseline, arm)}
        problems = {a: {s: (p["ids"], p["pass@1"]) for s, p in per_problem[a].items() if p} for a in (baseline, arm)}
        seeds_ci = paired_seed_interval(final[baseline], final[arm])
        problems_ci = paired_problem_interval(problems[baseline], problems[arm])
        tokens = {a: statistics.mean(c["generated_tokens"] for c in results[a].values()) for a in (baseline, arm)}
        rows.append({"arm": arm, "baseline": baseline, "over_seeds": seeds_ci.as_dict(),
                     "over_problems": problems_ci.as_dict(), "tokens": tokens[arm], "baseline_tokens": tokens[baseline],
                     "tokens_ratio": tokens[arm] / tokens[baseline] if tokens[baseline] else math.nan,
                     "completions_matched": all(per_seed[s]["generated_completions"] == base[s]["generated_completions"]
                                                for s in per_seed if s in base)})
    return rows


def _ci(d: dict[str, Any]) -> str:
    if not math.isfinite(d["low"]):
        return f"n/a (n = {d['n']})"
    star = " *" if d["low"] > 0 or d["high"] < 0 else ""
    return f"[{d['low']:+.3f}, {d['high']:+.3f}] (n = {d['n']}){star}"


def _diff_table(rows: list[dict[str, Any]]) -> str:
    lines = ["| arm | vs | mean difference (held-out pass@1) | 95% CI over seeds (paired t) | "
             "95% CI over seed x problem (paired t) | generated tokens arm / baseline |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['arm']} | {r['baseline']} | {r['over_seeds']['mean']:+.3f} | {_ci(r['over_seeds'])} | "
                     f"{_ci(r['over_problems'])} | {r['tokens']:.0f} / {r['baseline_tokens']:.0f} = "
                     f"{r['tokens_ratio']:.3f}{'' if r['completions_matched'] else ' (completions NOT matched)'} |")
    return "\n".join(lines)


def mechanism_summary(per_seed: dict[int, dict]) -> dict[str, dict[str, float]]:
    """Per mechanism series: its mean over the first and the last quarter of the steps, averaged over seeds."""
    out = {}
    for name in STEP_SERIES:
        early, late = [], []
        for curves in per_seed.values():
            values = [v for _, v in curves[name]]
            if values:
                k = max(1, len(values) // 4)
                early.append(statistics.mean(values[:k]))
                late.append(statistics.mean(values[-k:]))
        out[name] = {"early": statistics.mean(early) if early else math.nan,
                     "late": statistics.mean(late) if late else math.nan}
    return out


def _mechanism_table(summary: dict[str, dict[str, dict[str, float]]]) -> str:
    names = list(STEP_SERIES)
    lines = ["| arm | " + " | ".join(f"{n.removesuffix('_step')} (first → last quarter)" for n in names) + " |",
             "|---|" + "---|" * len(names)]
    for arm, s in summary.items():
        cells = [f"{s[n]['early']:.3f} → {s[n]['late']:.3f}" if math.isfinite(s[n]["early"]) else "n/a" for n in names]
        lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _plot(results: dict[str, dict[int, dict]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(3, 2, figsize=(11, 11))
    panels = [("acc_step", "step", "held-out pass@1"), ("acc_tokens", "generated tokens", "held-out pass@1"),
              ("reward_step", "step", "trained reward"), ("reward_tokens", "generated tokens", "trained reward"),
              ("plain_acc_step", "step", "plain-prompt accuracy (training prompts)"),
              ("beats_draft_step", "step", "refinement beats draft (solid) / copies it (dashed)")]
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, (key, xlabel, ylabel) in zip(axes.flat, panels, strict=True):
        series = [(key, "-")] + ([("copy_rate_step", "--")] if key == "beats_draft_step" else [])
        for color, (algo, per_seed) in zip(colors, results.items(), strict=False):
            for i, curves in enumerate(per_seed.values()):
                for name, style in series:
                    if curves[name]:
                        xs, ys = zip(*curves[name], strict=True)
                        ax.plot(xs, ys, style, color=color, alpha=0.7, label=algo if i == 0 and style == "-" else None)
        ax.set(xlabel=xlabel, ylabel=ylabel)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.suptitle(f"{' vs '.join(results)} at a matched rollout budget")
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    plt.close(fig)


def _share_warmstart(src: Path, dst: Path) -> None:
    """Give ``dst`` the tokenizer and warm-start ``src`` trained, so the runs start alike."""
    for name in ("tokenizer", "warmstart"):
        if (src / name).exists() and not (dst / name).exists():
            dst.mkdir(parents=True, exist_ok=True)
            shutil.copytree(src / name, dst / name)


def finished_run(run_dir: Path, recipe: RecipeConfig) -> bool:
    """Whether ``run_dir`` holds a finished run of ``recipe`` (its output directory aside): its newest
    complete, undamaged checkpoint is the one of the last step."""
    from igrpo_megatron.training.checkpoint import find_latest, step_dir

    saved, root = run_dir / "recipe.yaml", run_dir / "checkpoints"
    if not saved.exists() or find_latest(root) != step_dir(root, recipe.trainer.num_steps):
        return False
    previous = load_recipe(saved, [f"run.output_dir={recipe.run.output_dir}"])
    if recipe.trainer.warmstart.enabled and recipe.model.hf_path is None:
        previous.model.hf_path = None  # the run wrote its own warm-start's path there (wherever it then was)
    return recipe_to_yaml(previous) == recipe_to_yaml(recipe)


def run_compare(recipe_path: str, overrides: list[str], seeds: list[int], out_dir: str | None = None,
                evaluator: EvaluatorFactory | None = None, variants: str = DEFAULT_VARIANTS,
                warmstart: str = "shared", stop: StopRequest | None = None) -> Path:
    """Train every arm of ``variants`` for every seed (one after the other, in this process) and report.

    ``evaluator`` builds each run's held-out evaluation (``evaluation.hook.PeriodicEvaluator``);
    ``warmstart``: ``shared`` (one for the whole compare) or ``per-seed``. A signal caught by
    ``stop`` ends the run in flight as ``igrpo train`` would and raises :class:`CompareStopped`.
    """
    from igrpo_megatron.training.loop import run_training

    if warmstart not in WARMSTART_MODES:
        raise CompareError(f"--warmstart {warmstart!r}: expected one of {', '.join(WARMSTART_MODES)}")
    arms = parse_variants(variants)
    base = load_recipe(recipe_path, overrides)
    root = Path(out_dir or Path(base.run.output_dir) / f"{base.run.name}-compare")
    results: dict[str, dict[int, dict]] = {arm: {} for arm in arms}
    per_problem: dict[str, dict[int, dict | None]] = {arm: {} for arm in arms}
    first_dir: Path | None = None  # the run whose warm-start the next runs start from
    for seed in seeds:
        if warmstart == "per-seed":
            first_dir = None
        for arm, extra in arms.items():
            name = _run_name(arm, seed)
            recipe = load_recipe(recipe_path, [*overrides, *extra, f"run.seed={seed}", f"run.name={name}",
                                               f"run.output_dir={root}"])
            run_dir = root / name
            if finished_run(run_dir, recipe):
                logger.info("compare: %s (seed %d) already finished in %s; using it", arm, seed, run_dir)
            else:
                if first_dir is not None:
                    _share_warmstart(first_dir, run_dir)
                logger.info("compare: %s (seed %d)", arm, seed)
                if run_training(recipe, stop, evaluator=evaluator).preempted:
                    raise CompareStopped(run_dir)
            first_dir = first_dir or run_dir
            results[arm][seed] = _curves(_history(run_dir), arm)
            per_problem[arm][seed] = final_per_problem(run_dir)
    return write_report(root, recipe_path, overrides, seeds, arms, results, per_problem, base, warmstart)


def write_report(root: Path, recipe_path: str, overrides: list[str], seeds: list[int], arms: dict[str, list[str]],
                 results: dict[str, dict[int, dict]], per_problem: dict[str, dict[int, dict | None]], base: Any,
                 warmstart: str = "shared") -> Path:
    """compare.md, compare.png and compare.json from the runs' curves and final per-problem results."""
    baseline = next(iter(arms))
    diffs = differences(results, per_problem, baseline)
    mechanism = {arm: mechanism_summary(per_seed) for arm, per_seed in results.items() if not _is_grpo(arm)}
    _plot(results, root / "compare.png")
    matched = all(len({results[arm][seed]["generated_completions"] for arm in arms}) == 1 for seed in seeds)
    if not matched:
        logger.warning("compare: the arms generated different numbers of completions (see compare.json); the "
                       "comparison is not at a matched budget")
    write_text(root / "compare.json", json.dumps(
        {"recipe": str(recipe_path), "overrides": overrides, "seeds": seeds, "variants": arms, "baseline": baseline,
         "warmstart": warmstart,
         "budget_matched": matched, "differences": diffs, "mechanism": mechanism, "runs": results,
         "final_per_problem": per_problem}, indent=1))
    ig = base.algorithm.igrpo
    table = _table(results, seeds)
    text = (f"# {' vs '.join(arms)}: {recipe_path}, seeds {seeds}\n\nBudget: GRPO samples {base.algorithm.group_size} "
            f"per prompt, iGRPO N + K x G = {ig.num_drafts} + {ig.num_rounds} x {ig.num_refinements} = "
            f"{ig.completions_per_prompt()}; generated completions {'matched' if matched else 'NOT matched'} "
            f"(compare.json). Warm-start: {WARMSTART_TEXT[warmstart].format(seeds[0])}.\n\n{table}\n\n"
            f"## Against {baseline}\n\nFinal held-out pass@1, arm - {baseline}. Over "
            "seeds: Student-t interval of the per-seed differences (RL's noise and the held-out draw's, and the "
            "warm-start's with --warmstart per-seed). Over seed x problem: paired t "
            "interval of the per-problem pass@1 differences pooled across seeds (evaluation noise only, given the "
            f"trained models). * = the interval excludes 0.\n\n{_diff_table(diffs)}\n")
    if mechanism:
        text += ("\n## Mechanism (iGRPO arms)\n\nMean of each per-step metric over the first and the last quarter of "
                 "the steps, averaged over seeds: plain-prompt accuracy of the training prompts (the drafts), "
                 "refinement reward > its draft's, refinement answer = draft answer, refinement reward after an "
                 f"incorrect / a correct draft (docs/learning.md).\n\n{_mechanism_table(mechanism)}\n")
    text += "\n![curves](compare.png)\n"
    write_text(root / "compare.md", text)
    logger.info("comparison written to %s\n%s\n%s", root / "compare.md", table, _diff_table(diffs))
    return root
