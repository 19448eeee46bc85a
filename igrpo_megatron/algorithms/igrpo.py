"""iGRPO: drafts, draft selection, draft-conditioned refinements, budget and per-step metrics.

iGRPO changes what is sampled and for which prompt, never the loss: the refinement groups it
produces go through ``group_advantages`` and ``policy_loss`` exactly like GRPO groups, so it wraps
GRPO, Dr.GRPO, DAPO and GSPO alike. :func:`run_igrpo_rollout` is the synchronous reference of the
two-stage rollout (the rollout layer runs the same steps asynchronously against vLLM).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields

import torch

from igrpo_megatron.algorithms.draft_selection import DraftSelection, select_drafts
from igrpo_megatron.algorithms.refinement_prompt import build_refinement_prompt
from igrpo_megatron.config.algorithm import DraftSelectionConfig, IGRPOConfig

logger = logging.getLogger(__name__)

__all__ = ["DraftSelection", "GroupRecord", "IGRPORollout", "IGRPOStepMetrics", "RoundMetrics",
           "build_refinement_prompt", "check_budget", "igrpo_step_metrics", "round_metrics",
           "run_igrpo_rollout", "select_drafts", "select_with_config"]


def check_budget(cfg: IGRPOConfig, prefix: str = "algorithm.igrpo") -> int:
    """N + K * G after checking it against ``grpo_equivalent_budget`` (ValueError on a mismatch).

    A mismatch passes only with ``allow_budget_mismatch: true``, and is then logged as a warning.
    """
    cfg.validate(prefix)
    total = cfg.completions_per_prompt()
    if total != cfg.grpo_equivalent_budget:
        logger.warning("iGRPO samples %d completions per prompt but the matched GRPO budget is %d "
                       "(%s.allow_budget_mismatch is true)", total, cfg.grpo_equivalent_budget, prefix)
    return total


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


@dataclass
class GroupRecord:
    """Completions sampled for one prompt text, with rewards; a candidate GRPO group."""

    problem_id: int
    round: int  # 0: Stage-1 drafts; k >= 1: refinement round k
    prompt: str
    completions: list[str]
    rewards: torch.Tensor  # [n]


@dataclass
class IGRPORollout:
    """Everything one iGRPO rollout step sampled."""

    drafts: list[GroupRecord]  # one per problem
    rounds: list[list[GroupRecord]]  # rounds[k-1]: groups refined in round k
    selections: list[DraftSelection]  # selections[k-1]: rows = problems still refining before round k
    metrics: IGRPOStepMetrics

    def training_groups(self, train_on_rounds: str = "all") -> list[GroupRecord]:
        """Groups that get the GRPO update; drafts only where round 1 was skipped ('skip' policy).

        'all': every refinement group; 'last': each problem's last group. Advantages are
        normalised within each group (drafts have N completions, refinements G).
        """
        if train_on_rounds not in ("all", "last"):
            raise ValueError(f"algorithm.igrpo.train_on_rounds = {train_on_rounds!r}: use 'all' or 'last'.")
        last: dict[int, GroupRecord] = {g.problem_id: g for g in self.drafts}
        chosen: list[GroupRecord] = []
        refined = set()
        for groups in self.rounds:
            for g in groups:
                last[g.problem_id] = g
                refined.add(g.problem_id)
                if train_on_rounds == "all":
                    chosen.append(g)
        if train_on_rounds == "last":
            return [last[p] for p in sorted(last)]
        return [g for g in self.drafts if g.problem_id not in refined] + chosen


def run_igrpo_rollout(
    problems: Sequence[str],
    generate: Callable[[list[str], int], list[list[str]]],
    score: Callable[[list[int], list[list[str]]], torch.Tensor],
    cfg: IGRPOConfig,
    *,
    seed: int | None = None,
    make_prompt: Callable[[str, str], str] | None = None,
    length_fn: Callable[[str], int] = len,
) -> IGRPORollout:
    """Drafts, then ``cfg.num_rounds`` rounds of selection and refinement (round k on round k-1).

    Args:
        problems: plain prompt texts q, one per problem.
        generate: ``(prompts, n) -> n completions per prompt`` (the rollout engine).
        score: ``(problem_ids, completions) -> rewards [len(problem_ids), n]`` (the training reward).
        cfg: ``recipe.algorithm.igrpo``.
        seed: seeds the 'random' selection rule / tie-break (one generator for all rounds).
        make_prompt: ``(problem, draft) -> q'``; default ``build_refinement_prompt`` with cfg.prompt
            and no token budget.
        length_fn: draft length for tie_break 'shortest' (default: characters).
    """
    make_prompt = make_prompt or (lambda q, d: build_refinement_prompt(q, d, cfg.prompt).text)
    gen = torch.Generator().manual_seed(int(seed)) if seed is not None else None
    ids = list(range(len(problems)))
    texts, rewards = _sample(generate, score, ids, list(problems), cfg.num_drafts)  # [P][N], [P, N]
    drafts = [GroupRecord(p, 0, problems[p], texts[p], rewards[p]) for p in ids]
    sources = {p: (texts[p], rewards[p]) for p in ids}
    rounds: list[list[GroupRecord]] = []
    selections: list[DraftSelection] = []
    round_stats: list[RoundMetrics] = []
    for k in range(1, cfg.num_rounds + 1):
        if not ids:
            break
        src_r = torch.stack([sources[p][1] for p in ids])  # [A, M]
        lengths = torch.tensor([[length_fn(t) for t in sources[p][0]] for p in ids])  # [A, M]
        sel = select_with_config(src_r, cfg.selection, generator=gen, draft_lengths=lengths)
        rows = [j for j in range(len(ids)) if sel.refine[j]]
        ref_ids = [ids[j] for j in rows]
        prompts = [make_prompt(problems[ids[j]], sources[ids[j]][0][int(sel.indices[j])])
                   if sel.use_draft[j] else problems[ids[j]] for j in rows]
        comps, ref_r = _sample(generate, score, ref_ids, prompts, cfg.num_refinements)  # [R][G], [R, G]
        full = torch.zeros(len(ids), cfg.num_refinements)
        full[rows] = ref_r
        rounds.append([GroupRecord(p, k, q, c, r)
                       for p, q, c, r in zip(ref_ids, prompts, comps, ref_r, strict=True)])
        selections.append(sel)
        round_stats.append(round_metrics(sel, full, k))
        sources = {p: (c, r) for p, c, r in zip(ref_ids, comps, ref_r, strict=True)}
        ids = ref_ids
    first = selections[0] if selections else select_with_config(rewards, cfg.selection, generator=gen)
    return IGRPORollout(drafts, rounds, selections, igrpo_step_metrics(rewards, first, round_stats))


def _sample(generate, score, ids: list[int], prompts: list[str], n: int
            ) -> tuple[list[list[str]], torch.Tensor]:
    """n completions per prompt and their rewards ``[len(prompts), n]`` (float32, CPU)."""
    if not prompts:
        return [], torch.zeros(0, n)
    completions = generate(prompts, n)
    if len(completions) != len(prompts) or any(len(c) != n for c in completions):
        raise ValueError(f"generate() must return {n} completions for each of the {len(prompts)} prompts.")
    rewards = torch.as_tensor(score(ids, completions)).detach().float().cpu()
    if tuple(rewards.shape) != (len(prompts), n):
        raise ValueError(f"score() must return rewards of shape {(len(prompts), n)}; got {tuple(rewards.shape)}.")
    return completions, rewards
