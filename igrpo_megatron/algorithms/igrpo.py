"""iGRPO: draft selection from the recipe, per-round and per-step metrics.

iGRPO changes what is sampled and for which prompt, never the loss: the refinement groups it
produces go through ``group_advantages`` and ``policy_loss`` exactly like GRPO groups, so it wraps
GRPO, Dr.GRPO, DAPO and GSPO alike. The rollout itself (drafts, selection, K refinement rounds)
is ``igrpo_megatron.rollout.two_stage.TwoStageRollout``, which calls the functions here.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field, fields

import torch

from igrpo_megatron.algorithms.draft_selection import DraftSelection, select_drafts
from igrpo_megatron.config.algorithm import DraftSelectionConfig

__all__ = ["IGRPOStepMetrics", "RoundMetrics", "igrpo_step_metrics", "round_metrics", "select_with_config"]


def select_with_config(rewards: torch.Tensor, cfg: DraftSelectionConfig, **kwargs) -> DraftSelection:
    """:func:`select_drafts` with rule, policy and thresholds from ``recipe.algorithm.igrpo.selection``.

    ``kwargs`` are the per-call inputs: generator/seed, correct_mask, eligible_mask, draft_lengths.
    """
    return select_drafts(rewards, cfg.rule, cfg.all_zero_policy, tie_break=cfg.tie_break,
                         correct_threshold=cfg.correct_threshold,
                         all_zero_threshold=cfg.all_zero_threshold, **kwargs)


def _rate(num: torch.Tensor | int, den: int) -> float:
    return float(num) / den if den else math.nan


@dataclass
class RoundMetrics:
    """One refinement round. Rates over refinements of prompts that were refined *with* a draft.

    NaN when nothing was compared (e.g. every prompt skipped), so a log never shows a fake 0.
    """

    round: int
    num_refined_prompts: int
    refinement_reward_mean: float
    conditioning_reward_mean: float  # reward of the drafts shown in the prompts
    beats_draft_rate: float  # refinement reward > its draft's reward
    ties_draft_rate: float  # refinement reward == its draft's reward
    uniform_group_rate: float  # refinement groups with all-equal rewards (zero advantage)

    def as_dict(self, prefix: str = "") -> dict[str, float]:
        return {f"{prefix}{f.name}": float(getattr(self, f.name)) for f in fields(self) if f.name != "round"}


def round_metrics(selection: DraftSelection, refinement_rewards: torch.Tensor, round_index: int = 1
                  ) -> RoundMetrics:
    """Metrics of a round; ``refinement_rewards`` ``[P, G]`` rows align with ``selection`` rows.

    Rows of prompts with ``selection.refine`` False are ignored (they may hold anything).
    """
    r = refinement_rewards.detach().float().cpu()  # [P, G]
    refined = r[selection.refine]  # [R, G]
    with_draft = selection.use_draft[selection.refine]  # [R]
    compared = refined[with_draft]  # [D, G]
    draft_r = selection.selected_rewards[selection.refine][with_draft][:, None]  # [D, 1]
    num_groups = refined.shape[0]
    return RoundMetrics(
        round=round_index,
        num_refined_prompts=num_groups,
        refinement_reward_mean=float(refined.mean()) if refined.numel() else math.nan,
        conditioning_reward_mean=float(draft_r.mean()) if draft_r.numel() else math.nan,
        beats_draft_rate=_rate((compared > draft_r).sum(), compared.numel()),
        ties_draft_rate=_rate((compared == draft_r).sum(), compared.numel()),
        uniform_group_rate=_rate((refined.amax(1) == refined.amin(1)).sum(), num_groups),
    )


@dataclass
class IGRPOStepMetrics:
    """Per-step iGRPO metrics. ``as_dict`` gives round 1 unprefixed and every round as ``round{k}/``."""

    draft_reward_mean: float
    best_draft_reward_mean: float  # mean over prompts of the highest draft reward
    selected_draft_reward_mean: float
    all_zero_rate: float  # prompts whose drafts all scored <= all_zero_threshold
    selection_tie_rate: float
    skipped_rate: float
    no_draft_rate: float
    rounds: list[RoundMetrics] = field(default_factory=list)

    def as_dict(self) -> dict[str, float]:
        out = {f.name: float(getattr(self, f.name)) for f in fields(self) if f.name != "rounds"}
        if self.rounds:
            out.update(self.rounds[0].as_dict())
        if len(self.rounds) > 1:
            for rm in self.rounds:
                out.update(rm.as_dict(f"round{rm.round}/"))
        return out


def igrpo_step_metrics(draft_rewards: torch.Tensor, selection: DraftSelection,
                       rounds: Sequence[RoundMetrics] = ()) -> IGRPOStepMetrics:
    """Step metrics from the Stage-1 rewards ``[P, N]``, their selection and each round's metrics."""
    r = draft_rewards.detach().float().cpu()  # [P, N]
    sel = selection.as_dict()
    return IGRPOStepMetrics(
        draft_reward_mean=float(r.mean()) if r.numel() else math.nan,
        best_draft_reward_mean=float(r.amax(dim=1).mean()) if r.numel() else math.nan,
        selected_draft_reward_mean=sel["selected_draft_reward_mean"],
        all_zero_rate=sel["all_zero_rate"], selection_tie_rate=sel["selection_tie_rate"],
        skipped_rate=sel["skipped_rate"], no_draft_rate=sel["no_draft_rate"], rounds=list(rounds),
    )
