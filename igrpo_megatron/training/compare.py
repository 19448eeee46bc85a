"""``igrpo compare``: GRPO against iGRPO at a matched rollout budget, over several seeds.

For every seed both algorithms start from the same warm-start and tokenizer (trained once, by the
first run of that seed) and see the same prompts; GRPO samples ``algorithm.group_size`` completions
per prompt, iGRPO ``num_drafts + num_refinements`` (the recipe's budget check makes them equal).
Writes ``compare.md`` (final held-out accuracy and reward, mean and per seed), ``compare.png``
(held-out accuracy and reward against steps and against generated tokens) and ``compare.json``
(every curve, and the completions each run generated: ``budget_matched`` when, for every seed,
both algorithms generated as many).
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import statistics
from pathlib import Path
from typing import Any

from igrpo_megatron.config import load_recipe
from igrpo_megatron.config.files import atomic_write, write_text
from igrpo_megatron.training.interfaces import EvaluatorFactory

logger = logging.getLogger(__name__)

ALGORITHMS = {"grpo": ["algorithm.igrpo.enabled=false"], "igrpo": ["algorithm.igrpo.enabled=true"]}
HELDOUT = "eval/heldout/pass@1"


def _history(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line] if path.exists() else []


def _curves(history: list[dict[str, Any]], algo: str) -> dict[str, list[tuple[float, float]]]:
    """(step, value) and (generated tokens, value) series of held-out accuracy and trained reward."""
    reward = "grpo/reward_mean" if algo == "grpo" else "refine/reward_mean"
    tokens, out = 0.0, {"acc_step": [], "acc_tokens": [], "reward_step": [], "reward_tokens": []}
    out["generated_completions"] = sum(h.get("generated_completions") or 0.0 for h in history)
    for h in history:
        tokens += h.get("generated_tokens") or 0.0
        if isinstance(h.get(HELDOUT), float):
            out["acc_step"].append((h["step"], h[HELDOUT]))
            out["acc_tokens"].append((tokens, h[HELDOUT]))
        if isinstance(h.get(reward), float):
            out["reward_step"].append((h["step"], h[reward]))
            out["reward_tokens"].append((tokens, h[reward]))
    return out


def _mean_sd(values: list[float]) -> str:
    if not values:
        return "n/a"
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.3f} ± {sd:.3f}"


def _table(results: dict[str, dict[int, dict]], seeds: list[int]) -> str:
    lines = ["| algorithm | held-out pass@1 before RL | after RL (mean ± sd) | per seed | final trained reward | "
             "generated tokens |", "|---|---|---|---|---|---|"]
    for algo, per_seed in results.items():
        first = [c["acc_step"][0][1] for c in per_seed.values() if c["acc_step"]]
        last = [c["acc_step"][-1][1] for c in per_seed.values() if c["acc_step"]]
        reward = [c["reward_step"][-1][1] for c in per_seed.values() if c["reward_step"]]
        tokens = [c["acc_tokens"][-1][0] for c in per_seed.values() if c["acc_tokens"]]
        per = ", ".join(f"{s}: {per_seed[s]['acc_step'][-1][1]:.3f}" for s in seeds if per_seed[s]["acc_step"])
        lines.append(f"| {algo} | {_mean_sd(first)} | {_mean_sd(last)} | {per} | {_mean_sd(reward)} | "
                     f"{statistics.mean(tokens) if tokens else math.nan:.0f} |")
    return "\n".join(lines)


def _plot(results: dict[str, dict[int, dict]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(11, 8))
    panels = [("acc_step", "step", "held-out pass@1"), ("acc_tokens", "generated tokens", "held-out pass@1"),
              ("reward_step", "step", "trained reward"), ("reward_tokens", "generated tokens", "trained reward")]
    for ax, (key, xlabel, ylabel) in zip(axes.flat, panels, strict=True):
        for color, (algo, per_seed) in zip(("tab:blue", "tab:orange"), results.items(), strict=False):
            for i, curves in enumerate(per_seed.values()):
                if curves[key]:
                    xs, ys = zip(*curves[key], strict=True)
                    ax.plot(xs, ys, color=color, alpha=0.7, label=algo if i == 0 else None)
        ax.set(xlabel=xlabel, ylabel=ylabel)
        ax.legend()
    fig.suptitle("GRPO vs iGRPO at a matched rollout budget")
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    plt.close(fig)


def _share_warmstart(src: Path, dst: Path) -> None:
    """Give ``dst`` the tokenizer and warm-start ``src`` trained, so both algorithms start alike."""
    for name in ("tokenizer", "warmstart"):
        if (src / name).exists() and not (dst / name).exists():
            dst.mkdir(parents=True, exist_ok=True)
            shutil.copytree(src / name, dst / name)


def run_compare(recipe_path: str, overrides: list[str], seeds: list[int], out_dir: str | None = None,
                evaluator: EvaluatorFactory | None = None) -> Path:
    """Train both algorithms for every seed (one after the other, in this process) and report.

    ``evaluator`` builds each run's held-out evaluation (``evaluation.hook.PeriodicEvaluator``).
    """
    from igrpo_megatron.training.loop import run_training

    base = load_recipe(recipe_path, overrides)
    root = Path(out_dir or Path(base.run.output_dir) / f"{base.run.name}-compare")
    results: dict[str, dict[int, dict]] = {algo: {} for algo in ALGORITHMS}
    for seed in seeds:
        first_dir: Path | None = None
        for algo, extra in ALGORITHMS.items():
            name = f"{algo}-seed{seed}"
            recipe = load_recipe(recipe_path, [*overrides, *extra, f"run.seed={seed}", f"run.name={name}",
                                               f"run.output_dir={root}"])
            run_dir = root / name
            if first_dir is not None:
                _share_warmstart(first_dir, run_dir)
            logger.info("compare: %s (seed %d)", algo, seed)
            run_training(recipe, evaluator=evaluator)
            first_dir = first_dir or run_dir
            results[algo][seed] = _curves(_history(run_dir), algo)
    table = _table(results, seeds)
    _plot(results, root / "compare.png")
    matched = all(len({results[algo][seed]["generated_completions"] for algo in ALGORITHMS}) == 1 for seed in seeds)
    if not matched:
        logger.warning("compare: GRPO and iGRPO generated different numbers of completions (see compare.json); "
                       "the comparison is not at a matched budget")
    write_text(root / "compare.json", json.dumps({"recipe": str(recipe_path), "overrides": overrides, "seeds": seeds,
                                                  "budget_matched": matched, "runs": results}, indent=1))
    ig = base.algorithm.igrpo
    text = (f"# GRPO vs iGRPO: {recipe_path}, seeds {seeds}\n\nBudget: GRPO samples {base.algorithm.group_size} "
            f"per prompt, iGRPO N + K x G = {ig.num_drafts} + {ig.num_rounds} x {ig.num_refinements} = "
            f"{ig.completions_per_prompt()}; generated completions {'matched' if matched else 'NOT matched'} "
            f"(compare.json).\n\n{table}\n\n![curves](compare.png)\n")
    write_text(root / "compare.md", text)
    logger.info("comparison written to %s\n%s", root / "compare.md", table)
    return root
