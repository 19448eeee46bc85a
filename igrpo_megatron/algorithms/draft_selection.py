"""iGRPO Stage 1 -> Stage 2: which draft of each prompt conditions the refinements.

Selection runs on CPU (it is [num_prompts, N] numbers) and is deterministic: the same rewards,
settings and seed give the same choice on every rank and every run.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from igrpo_megatron.config.algorithm import ALL_ZERO_POLICIES, SELECTION_RULES, TIE_BREAKS

logger = logging.getLogger(__name__)


@dataclass
class DraftSelection:
    """The outcome of :func:`select_drafts`, one entry per prompt (all tensors on CPU, ``[P]``).

    ``indices[p]`` is the rule's pick for every prompt; whether it is shown is ``use_draft[p]``.
    ``refine[p]`` False means Stage 2 is skipped for p and its drafts form its GRPO group.
    """

    rule: str
    indices: torch.Tensor  # [P] long
    selected_rewards: torch.Tensor  # [P] float32, reward of indices[p]
    all_zero: torch.Tensor  # [P] bool: every draft scored <= all_zero_threshold
    use_draft: torch.Tensor  # [P] bool: the refinement prompt contains the draft
    refine: torch.Tensor  # [P] bool: Stage 2 runs for this prompt
    tied: torch.Tensor  # [P] bool: several drafts were equal under the rule; tie_break decided
    fallback: torch.Tensor  # [P] bool: the rule had no candidate (e.g. no incorrect draft) and used 'best'

    def __len__(self) -> int:
        return int(self.indices.numel())

    def as_dict(self) -> dict[str, float]:
        n = max(len(self), 1)
        return {
            "selected_draft_reward_mean": float(self.selected_rewards.mean()) if len(self) else 0.0,
            "selection_tie_rate": float(self.tied.sum()) / n,
            "selection_fallback_rate": float(self.fallback.sum()) / n,
            "all_zero_rate": float(self.all_zero.sum()) / n,
            "skipped_rate": float((~self.refine).sum()) / n,
            "no_draft_rate": float((self.refine & ~self.use_draft).sum()) / n,
        }


def _generator(generator: torch.Generator | None, seed: int | None) -> torch.Generator:
    if generator is not None:
        return generator
    if seed is None:
        raise ValueError("draft selection with rule 'random' or tie_break 'random' needs a generator= or "
                         "seed= (derive it from the recipe seed and the step so runs are reproducible).")
    return torch.Generator().manual_seed(int(seed))


def _check(rewards: torch.Tensor, rule: str, all_zero_policy: str, tie_break: str,
           masks: dict[str, torch.Tensor | None]) -> None:
    if rewards.dim() != 2 or rewards.shape[1] < 1:
        raise ValueError(f"rewards must be [num_prompts, N] with N >= 1; got {tuple(rewards.shape)}.")
    for key, value, allowed in (("rule", rule, SELECTION_RULES), ("all_zero_policy", all_zero_policy,
                                ALL_ZERO_POLICIES), ("tie_break", tie_break, TIE_BREAKS)):
        if value not in allowed:
            raise ValueError(f"algorithm.igrpo.selection.{key} = {value!r}: must be one of {list(allowed)}.")
    for name, m in masks.items():
        if m is not None and tuple(m.shape) != tuple(rewards.shape):
            raise ValueError(f"{name} must have the shape of rewards {tuple(rewards.shape)}; got {tuple(m.shape)}.")
    if tie_break == "shortest" and masks["draft_lengths"] is None:
        raise ValueError("algorithm.igrpo.selection.tie_break = 'shortest' needs draft_lengths [P, N]; pass "
                         "the drafts' token counts or use tie_break 'first'.")


def _break_ties(tied_set: torch.Tensor, tie_break: str, lengths: torch.Tensor | None,
                gen: torch.Generator | None) -> torch.Tensor:
    """Index ``[P]`` of one True entry per row of ``tied_set`` ``[P, N]`` (each row has one or more)."""
    if tie_break == "shortest":
        big = torch.iinfo(torch.long).max
        lens = torch.where(tied_set, lengths.long(), torch.full_like(lengths.long(), big))  # [P, N]
        tied_set = tied_set & (lens == lens.amin(dim=1, keepdim=True))
    elif tie_break == "random":
        prio = torch.rand(tied_set.shape, generator=gen)  # [P, N]
        return torch.where(tied_set, prio, torch.full_like(prio, -1.0)).argmax(dim=1)
    return tied_set.int().argmax(dim=1)  # argmax returns the first maximum: the lowest index


def select_drafts(
    rewards: torch.Tensor,
    rule: str = "best",
    all_zero_policy: str = "keep",
    *,
    tie_break: str = "first",
    generator: torch.Generator | None = None,
    seed: int | None = None,
    correct_mask: torch.Tensor | None = None,
    eligible_mask: torch.Tensor | None = None,
    draft_lengths: torch.Tensor | None = None,
    correct_threshold: float = 1.0,
    all_zero_threshold: float = 0.0,
) -> DraftSelection:
    """Pick one draft per prompt to condition Stage 2 on.

    Rules: 'best' = argmax reward, 'worst' = argmin reward, 'random' = uniform over candidates,
    'best_incorrect' = argmax reward among incorrect drafts ('best' over all when none is incorrect;
    flagged in ``fallback``). Ties under the rule are broken by ``tie_break``: 'first' = lowest draft
    index, 'shortest' = fewest tokens then lowest index, 'random' = seeded uniform among the tied.

    All-zero prompts (every reward <= all_zero_threshold) follow ``all_zero_policy``: 'keep' uses
    the pick as usual, 'skip' sets refine=False (train plain GRPO on the drafts), 'no_draft'
    refines from the plain prompt (use_draft=False).

    Args:
        rewards: ``[P, N]`` Stage-1 rewards (same reward as training), any device.
        rule, all_zero_policy, tie_break: see ``recipe.algorithm.igrpo.selection``.
        generator / seed: randomness for 'random' rule or tie-break (one of them is required then).
        correct_mask: ``[P, N]`` bool, which drafts are correct; None: reward >= correct_threshold.
        eligible_mask: ``[P, N]`` bool, drafts that may be picked (e.g. well-formatted ones); a row
            with none eligible considers all its drafts (flagged in ``fallback``). None: all.
        draft_lengths: ``[P, N]`` token counts; required by tie_break 'shortest'.
    """
    _check(rewards, rule, all_zero_policy, tie_break,
           {"correct_mask": correct_mask, "eligible_mask": eligible_mask, "draft_lengths": draft_lengths})
    r = rewards.detach().float().cpu()  # [P, N]
    needs_rng = rule == "random" or tie_break == "random"
    gen = _generator(generator, seed) if needs_rng else None
    eligible = torch.ones_like(r, dtype=torch.bool) if eligible_mask is None else eligible_mask.bool().cpu()
    fallback = ~eligible.any(dim=1)  # [P]
    eligible = eligible | fallback[:, None]

    if rule == "random":
        key = torch.rand(r.shape, generator=gen)  # [P, N]
    else:
        key = -r if rule == "worst" else r.clone()
    candidates = eligible
    if rule == "best_incorrect":
        correct = r >= correct_threshold if correct_mask is None else correct_mask.bool().cpu()
        candidates = eligible & ~correct
        no_incorrect = ~candidates.any(dim=1)  # [P]: fall back to 'best' over the eligible drafts
        fallback = fallback | no_incorrect
        candidates = torch.where(no_incorrect[:, None], eligible, candidates)

    key = torch.where(candidates, key, torch.full_like(key, float("-inf")))
    tied_set = candidates & (key == key.amax(dim=1, keepdim=True))  # [P, N]
    lengths = None if draft_lengths is None else draft_lengths.cpu()
    indices = _break_ties(tied_set, tie_break, lengths, gen)  # [P]

    all_zero = (r <= all_zero_threshold).all(dim=1)  # [P]
    refine = ~all_zero if all_zero_policy == "skip" else torch.ones_like(all_zero)
    use_draft = refine & ~all_zero if all_zero_policy in ("skip", "no_draft") else refine.clone()
    return DraftSelection(
        rule=rule, indices=indices, selected_rewards=r.gather(1, indices[:, None]).squeeze(1),
        all_zero=all_zero, use_draft=use_draft, refine=refine, tied=tied_set.sum(dim=1) > 1,
        fallback=fallback,
    )
