"""The run's ``summary.md`` and ``training.png``: what people look at after a run."""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

from igrpo_megatron.config.files import write_figure, write_text
from igrpo_megatron.config.schema import RecipeConfig

logger = logging.getLogger(__name__)

HELDOUT = "eval/heldout/pass@1"


def _series(history: list[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    pts = [(h["step"], h[key]) for h in history if isinstance(h.get(key), (int, float)) and math.isfinite(h[key])]
    return [p[0] for p in pts], [p[1] for p in pts]


def reward_key(recipe: RecipeConfig) -> str:
    """The reward the update trains on: refinements for iGRPO, the group for GRPO."""
    return "refine/reward_mean" if recipe.algorithm.igrpo.enabled else "grpo/reward_mean"


def plot_training(history: list[dict[str, Any]], recipe: RecipeConfig, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for key, label in ((reward_key(recipe), "trained reward"), ("draft/reward_mean", "draft reward")):
        x, y = _series(history, key)
        if x:
            axes[0].plot(x, y, label=label)
    axes[0].set(xlabel="step", ylabel="mean reward", title="Reward per step")
    axes[0].legend()
    x, y = _series(history, HELDOUT)
    axes[1].plot(x, y, marker="o")
    axes[1].set(xlabel="step", ylabel="pass@1", title="Held-out accuracy")
    fig.suptitle(recipe.run.name)
    fig.tight_layout()
    return write_figure(path, fig, dpi=100)


def write_summary(run_dir: Path, history: list[dict[str, Any]], recipe: RecipeConfig) -> Path:
    """``summary.md`` (held-out accuracy before and after RL, rewards, timings) and the plot."""
    run_dir = Path(run_dir)
    plot = plot_training(history, recipe, run_dir / "training.png")
    steps, acc = _series(history, HELDOUT)
    _, reward = _series(history, reward_key(recipe))
    _, step_time = _series(history, "time/step")
    lines = [f"# {recipe.run.name}", "",
             f"- algorithm: {'iGRPO' if recipe.algorithm.igrpo.enabled else 'GRPO'}, "
             f"{recipe.trainer.num_steps} steps x {recipe.trainer.prompts_per_step} prompts",
             f"- model: {recipe.model.architecture}, {recipe.model.num_layers} layers, hidden {recipe.model.hidden_size}",
             *([f"- tags: {', '.join(f'{k}={v}' for k, v in recipe.run.tags.items())}"] if recipe.run.tags else []),
             ""]
    if acc:
        ev = recipe.evaluation
        how = ("greedy" if ev.sampling.temperature == 0 else f"sampled at temperature {ev.sampling.temperature:g}, "
               f"mean of {ev.hook.samples_per_problem} per problem")
        lines += ["| | step | held-out pass@1 |", "|---|---|---|",
                  f"| before RL | {steps[0]} | {acc[0]:.3f} |", f"| after RL | {steps[-1]} | {acc[-1]:.3f} |", "",
                  f"- held-out pass@1: {ev.hook.num_problems or 'all'} problems, {how}"]
    if reward:
        lines.append(f"- trained reward: first step {reward[0]:.3f}, last step {reward[-1]:.3f}")
    if step_time:
        lines.append(f"- mean step time: {sum(step_time) / len(step_time):.1f} s over {len(step_time)} steps")
    lines += ["", f"![training curves]({plot.name})", ""]
    out = run_dir / "summary.md"
    write_text(out, "\n".join(lines))
    logger.info("summary written to %s", out)
    return out
