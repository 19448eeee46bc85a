"""Test-time draft-then-refine (beyond the paper): pick a draft without a verifier, then refine it.

The paper evaluates iGRPO models on the plain prompt. A model trained to improve on a shown draft can
also be *used* that way: for each problem, look at N drafts (the first N plain samples, so the plain
pass@k comes for free), pick one with a rule that needs no gold answer, wrap it with the same
template the model was trained with (``recipe.algorithm.igrpo.prompt`` through
``algorithms.build_refinement_prompt``), and sample k refinements. Round r > 1 picks from round r-1's
samples. The pick uses ``algorithms.select_drafts`` with each draft's *vote share* as its score, so
'best' selects the self-consistency majority and the tie-breaks and all-zero policy are the
training ones.

Budget: this spends N drafts (shared with plain sampling when N <= k) plus k samples per round, so
compare ``refine.pass@1`` with the plain ``maj@n`` as well as ``pass@1``; ``refine.pick_correct``
says how often the picked draft was already right.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from igrpo_megatron.algorithms.draft_selection import select_drafts
from igrpo_megatron.algorithms.refinement_prompt import build_refinement_prompt
from igrpo_megatron.config.evaluation import RefinementEvalConfig
from igrpo_megatron.evaluation.records import ProblemRecord, RefineRoundRecord, SampleRecord
from igrpo_megatron.evaluation.voting import vote_shares

if TYPE_CHECKING:
    from igrpo_megatron.evaluation.runner import Evaluator, Query
    from igrpo_megatron.rollout.interfaces import RolloutEngine

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


def _refinement_query(ev: Evaluator, query: Query, draft: SampleRecord, use_draft: bool) -> tuple[Query, bool, bool]:
    """(query, used_draft, truncated): the draft-conditioned prompt, or the plain one when it cannot be used.

    ``build_refinement_prompt`` counts raw text tokens (so ``max_draft_tokens`` means draft tokens), and
    the chat template's own tokens are taken off the budget first; the finished prompt is checked
    exactly. One that still does not fit, or that has no room left for any of the draft, falls back
    to the plain prompt (``used_draft`` False).
    """
    from igrpo_megatron.evaluation.runner import Query

    if not use_draft:
        return query, False, False
    budget = ev.cfg.refine.max_prompt_tokens
    if budget is None and ev.max_model_len is not None:
        budget = ev.max_model_len - ev.max_tokens
    text_budget = None if budget is None else budget - ev.prompts.count("")
    built = build_refinement_prompt(query.user_text, draft.text, ev.refine_prompt, max_prompt_tokens=text_budget,
                                    encode=ev.prompts.encode, decode=ev.prompts.decode)
    ids = ev.prompts.ids(built.text)
    if not built.fits or not built.draft_shown.strip() or (budget is not None and len(ids) > budget):
        return query, False, False  # no room for any of the draft: an empty "earlier attempt" helps nobody
    return Query(query.problem, built.text, ids), True, built.truncated


async def run_refinement(ev: Evaluator, engine: RolloutEngine, queries: Sequence[Query],
                         records: Sequence[ProblemRecord], n: int, *, label: str) -> None:
    """Run ``evaluation.refine.num_rounds`` rounds; fills ``records[i].refine`` (and ``extra_drafts``)."""
    cfg = ev.cfg.refine
    pools = [list(r.samples[:cfg.num_drafts]) for r in records]
    if cfg.num_drafts > n:
        extra = await ev.sample_and_score(engine, queries, cfg.num_drafts - n, round_no=EXTRA_DRAFTS_ROUND,
                                          label=f"{label} extra drafts")
        for record, pool, more in zip(records, pools, extra, strict=True):
            record.extra_drafts = more
            pool.extend(more)
    for rnd in range(1, cfg.num_rounds + 1):
        picks = pick_drafts(pools, cfg)
        built = [_refinement_query(ev, q, pool[p.index], p.use_draft)
                 for q, pool, p in zip(queries, pools, picks, strict=True)]
        samples = await ev.sample_and_score(engine, [b[0] for b in built], n, round_no=rnd,
                                            label=f"{label} refine round {rnd}")
        for record, pool, pick, (q, used, truncated), got in zip(records, pools, picks, built, samples, strict=True):
            draft = pool[pick.index]
            record.refine.append(RefineRoundRecord(
                round=rnd, picked=pick.index, picked_answer=draft.answer, picked_correct=draft.correct,
                vote_share=pick.vote_share, used_draft=used, draft_truncated=truncated,
                prompt_tokens=len(q.prompt_ids), samples=got))
        pools = samples
