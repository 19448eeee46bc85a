"""Test-time draft-then-refine (beyond the paper): pick a draft without a verifier, then refine it.

The paper evaluates iGRPO models on the plain prompt. A model trained to improve on a shown draft can
also be *used* that way: for each problem, look at N drafts (the first N plain samples, so the plain
pass@k comes for free), pick one with a rule that needs no gold answer, wrap it with the same
template the model was trained with (``recipe.algorithm.igrpo.prompt`` through
``data.prompts.PromptFormatter.refinement``, the builder training uses), and sample k refinements.
Round r > 1 picks from round r-1's samples. The pick uses ``algorithms.select_drafts`` with each draft's *vote share* as its score, so
'best' selects the self-consistency majority and the tie-breaks and all-zero policy are the
training ones.

Budget: this spends N drafts (shared with plain sampling when N <= k) plus k samples per round, so
compare ``refine.pass@1`` with the plain ``maj@n`` as well as ``pass@1``; ``refine.pick_correct``
says how often the picked draft was already right.

This module is the pick; ``runner.Evaluator.refine_async`` runs the rounds with it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from igrpo_megatron.algorithms.draft_selection import select_drafts
from igrpo_megatron.config.evaluation import RefinementEvalConfig
from igrpo_megatron.evaluation.records import SampleRecord
from igrpo_megatron.evaluation.voting import vote_shares

EXTRA_DRAFTS_ROUND = 999  # seed round of drafts sampled beyond the plain samples


@dataclass(frozen=True)
class Pick:
    """The conditioning sample chosen for one problem."""

    index: int
    vote_share: float
    use_draft: bool


def pick_drafts(pools: Sequence[Sequence[SampleRecord]], cfg: RefinementEvalConfig) -> list[Pick]:
    """One pick per problem from equally sized pools of scored samples, without looking at correctness."""
    if not pools:
        return []
    shares = torch.tensor([vote_shares([s.answer for s in pool]) for pool in pools], dtype=torch.float32)  # [P, M]
    if cfg.pick == "first":
        indices = [0] * len(pools)
        all_zero = (shares <= 0).all(dim=1)  # [P]
        use = [not (cfg.no_answer_policy == "no_draft" and bool(z)) for z in all_zero]
    else:
        lengths = torch.tensor([[s.num_tokens for s in pool] for pool in pools])  # [P, M]
        sel = select_drafts(shares, "best", cfg.no_answer_policy, tie_break=cfg.tie_break, draft_lengths=lengths)
        indices = [int(i) for i in sel.indices]
        use = [bool(u) for u in sel.use_draft]
    return [Pick(i, float(shares[p, i]), u) for p, (i, u) in enumerate(zip(indices, use, strict=True))]
