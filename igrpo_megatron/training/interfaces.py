"""What the training loop needs from the packages above it, as small protocols.

The loop evaluates the policy every ``trainer.eval_every`` steps, but evaluation sits above training
in the package order (it imports training's checkpoint export). So the loop holds a
:class:`PeriodicEvaluation` built by an :class:`EvaluatorFactory` that its caller passes in:
``igrpo train`` and ``igrpo compare`` pass ``evaluation.hook.PeriodicEvaluator``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

from igrpo_megatron.rewards.interfaces import RewardFunction


class PeriodicEvaluation(Protocol):
    """Scores the current policy on held-out problems through the trainer's rollout engine."""

    def __call__(self, engine: Any, step: int) -> dict[str, float]:
        """Evaluate now; flat metrics such as ``{'eval/heldout/pass@1': 0.4, ...}``."""
        ...

    def close(self) -> None:
        """Stop what the evaluation started (reward workers)."""
        ...


class EvaluatorFactory(Protocol):
    """Builds the run's :class:`PeriodicEvaluation` once the trainer has its tokenizer and reward."""

    def __call__(self, recipe: Any, *, tokenizer: Any, reward: RewardFunction, run_dir: Path,
                 max_model_len: int | None) -> PeriodicEvaluation:
        ...
