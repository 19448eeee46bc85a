"""DAPO's dynamic sampling (arXiv 2503.14476): train only on groups that carry a learning signal.

A group whose rewards are all equal gets zero advantage everywhere (``advantages.uniform_groups``),
so it adds nothing to the policy gradient but still dilutes the batch. Dynamic sampling drops such
groups and rolls out more prompts until ``target`` prompts have a group left, within a bound on
extra rounds. The unit that fills the batch is a prompt: under plain GRPO a prompt has one trained
group; under iGRPO its refinement group(s) (one per round with ``train_on_rounds: all``), and a
prompt counts as kept while at least one of them differs.

The rollout (``rollout.two_stage.TwoStageRollout``) calls :func:`informative_groups` and
:func:`kept_prompts` after every round, :func:`needs_refill` to decide on another one, and
:func:`select_groups` at the end for which groups are trained and the step's metrics.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from igrpo_megatron.algorithms.advantages import uniform_groups

__all__ = ["DynamicSamplingMetrics", "informative_groups", "kept_prompts", "needs_refill", "select_groups"]


def informative_groups(rewards: Sequence[Sequence[float]]) -> list[bool]:
    """True for every group whose rewards are not all equal (the test of ``uniform_groups``, so
    exactly the groups that get a nonzero advantage). Groups may differ in size."""
    return [not bool(uniform_groups(torch.tensor([list(r)], dtype=torch.float64))[0]) for r in rewards]


def kept_prompts(group_prompts: Sequence[int], informative: Sequence[bool]) -> list[int]:
    """The prompts (sorted) with at least one informative group; ``group_prompts[i]`` is group i's prompt."""
    return sorted({p for p, keep in zip(group_prompts, informative, strict=True) if keep})


def needs_refill(num_kept: int, target: int, extra_rounds: int, max_extra_rounds: int) -> bool:
    """Whether to roll out another round: fewer than ``target`` prompts kept and rounds left."""
    return num_kept < target and extra_rounds < max_extra_rounds


@dataclass
class DynamicSamplingMetrics:
    """What dynamic sampling did in one step (floats via :meth:`as_dict`, ``dynamic_sampling/*``)."""

    target_prompts: int
    kept_prompts: int      # prompts trained on (at most target_prompts)
    groups_dropped: int    # groups with all-equal rewards, not trained on
    groups_surplus: int    # informative groups of prompts beyond target_prompts, not trained on
    extra_rounds: int      # rollout rounds after the first

    @property
    def short(self) -> bool:
        """The bound on extra rounds was hit before the batch was full."""
        return self.kept_prompts < self.target_prompts

    def as_dict(self, prefix: str = "dynamic_sampling/") -> dict[str, float]:
        return {f"{prefix}target_prompts": float(self.target_prompts),
                f"{prefix}kept_prompts": float(self.kept_prompts),
                f"{prefix}groups_dropped": float(self.groups_dropped),
                f"{prefix}groups_surplus": float(self.groups_surplus),
                f"{prefix}extra_rounds": float(self.extra_rounds),
                f"{prefix}short_batch": float(self.short)}


def select_groups(rewards: Sequence[Sequence[float]], group_prompts: Sequence[int], target: int,
                  extra_rounds: int) -> tuple[list[bool], DynamicSamplingMetrics]:
    """Which groups are trained: the informative groups of the first ``target`` prompts (by prompt
    index, i.e. in the order they were sampled) that have one. Everything else is dropped.

    Args:
        rewards: each candidate group's rewards (the rewards that become its advantages).
        group_prompts: the prompt index of each group (same order as ``rewards``).
        target: prompts the step's batch should hold (``trainer.prompts_per_step``).
        extra_rounds: rollout rounds sampled after the first (reported only).

    Returns:
        ``(keep, metrics)`` with ``keep[i]`` True when group i is trained.
    """
    informative = informative_groups(rewards)
    chosen = set(kept_prompts(group_prompts, informative)[:target])
    keep = [inf and p in chosen for p, inf in zip(group_prompts, informative, strict=True)]
    surplus = sum(inf and p not in chosen for p, inf in zip(group_prompts, informative, strict=True))
    return keep, DynamicSamplingMetrics(target_prompts=target, kept_prompts=len(chosen),
                                        groups_dropped=informative.count(False), groups_surplus=surplus,
                                        extra_rounds=extra_rounds)
