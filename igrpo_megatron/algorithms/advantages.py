"""Group-relative advantages: GRPO's critic-free baseline, and its Dr.GRPO / leave-one-out variants."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

logger = logging.getLogger(__name__)


@dataclass
class AdvantageMetrics:
    """What one call to :func:`group_advantages` saw (floats, ready for the metrics logger)."""

    num_groups: int
    num_uniform_groups: int  # groups whose rewards are all equal: zero advantage, no policy gradient
    reward_mean: float
    reward_std_mean: float  # mean over groups of the within-group std
    advantage_abs_mean: float

    @property
    def uniform_group_fraction(self) -> float:
        return self.num_uniform_groups / max(self.num_groups, 1)

    def as_dict(self) -> dict[str, float]:
        return {
            "num_groups": float(self.num_groups),
            "num_uniform_groups": float(self.num_uniform_groups),
            "uniform_group_fraction": self.uniform_group_fraction,
            "reward_mean": self.reward_mean,
            "reward_std_mean": self.reward_std_mean,
            "advantage_abs_mean": self.advantage_abs_mean,
        }


def uniform_groups(rewards: torch.Tensor) -> torch.Tensor:
    """Bool ``[num_groups]``: True where every reward of the group is the same (no learning signal)."""
    return rewards.amax(dim=1) == rewards.amin(dim=1)


def group_advantages(
    rewards: torch.Tensor,
    *,
    normalize_by_std: bool = True,
    leave_one_out: bool = False,
    eps: float = 1e-6,
) -> tuple[torch.Tensor, AdvantageMetrics]:
    """Advantages of each completion relative to its own group.

    A_i = (r_i - b_i) / (std(r) + eps)   with normalize_by_std (GRPO),
    A_i =  r_i - b_i                      without it (Dr.GRPO),
    where b_i = mean(r) over the group, or with leave_one_out b_i = (sum(r) - r_i) / (G - 1).
    std is the unbiased (Bessel-corrected) std of the whole group, also with leave_one_out.

    A group whose rewards are all equal gets exactly zero advantage (not a rounding residue, and
    also for G = 1) and is counted in ``metrics.num_uniform_groups``.

    Args:
        rewards: ``[num_groups, group_size]`` scalar rewards, one row per prompt (any float dtype).
        normalize_by_std: divide by the group's reward std (False: Dr.GRPO).
        leave_one_out: baseline excludes the completion itself (needs group_size >= 2).
        eps: added to the std before dividing.

    Returns:
        ``(advantages [num_groups, group_size] float32, AdvantageMetrics)``.
    """
    if rewards.dim() != 2:
        raise ValueError(f"rewards must be [num_groups, group_size]; got shape {tuple(rewards.shape)}. "
                         f"Reshape the flat rewards with rewards.view(num_prompts, group_size).")
    if not torch.isfinite(rewards).all():
        raise ValueError("rewards contain NaN or inf; fix the reward function (a failed check should "
                         "score 0, not NaN).")
    num_groups, group_size = rewards.shape
    if leave_one_out and group_size < 2:
        raise ValueError(f"leave_one_out needs group_size >= 2 (got {group_size}); set "
                         f"algorithm.advantage.leave_one_out: false or sample more completions.")
    r = rewards.float()  # [P, G]
    uniform = uniform_groups(r)  # [P]
    if leave_one_out:
        baseline = (r.sum(dim=1, keepdim=True) - r) / (group_size - 1)  # [P, G]
    else:
        baseline = r.mean(dim=1, keepdim=True)  # [P, 1]
    adv = r - baseline  # [P, G]
    std = r.std(dim=1, keepdim=True) if group_size > 1 else torch.zeros_like(r[:, :1])  # [P, 1]
    if normalize_by_std:
        adv = adv / (std + eps)
    adv = torch.where(uniform[:, None], torch.zeros_like(adv), adv)
    metrics = AdvantageMetrics(
        num_groups=num_groups,
        num_uniform_groups=int(uniform.sum()),
        reward_mean=float(r.mean()) if r.numel() else 0.0,
        reward_std_mean=float(std.mean()) if r.numel() else 0.0,
        advantage_abs_mean=float(adv.abs().mean()) if r.numel() else 0.0,
    )
    return adv, metrics
