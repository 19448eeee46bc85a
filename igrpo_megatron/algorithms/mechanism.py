"""Per-step measurements of iGRPO's mechanism: does a refinement use its draft, and does it beat it?

iGRPO trains only on refinements of a selected draft; the model is then evaluated on the plain
prompt. Three questions tell whether that works in a given setting (issue 18):

* **Does a refinement beat its draft?** Mean refinement reward, split by whether the draft shown
  in its prompt was correct, and the mean of (refinement reward - that draft's reward). A model
  that only copies scores what its drafts scored: delta ~ 0, refinement reward ~ 1 after a correct
  draft and ~ 0 after an incorrect one.
* **Does it copy?** The fraction of refinements whose final answer equals the draft's (the same
  extracted answer string, whitespace ignored). Counted over refinements whose draft has an answer.
  A high copy rate after *incorrect* drafts is the failure mode: the refinement repeats the error.
* **Does the plain prompt follow?** The accuracy of plain-prompt samples of the training prompts.
  Drafts (iGRPO) and GRPO's samples *are* plain-prompt samples of the step's prompts from the
  current policy, so their accuracy, logged every step, is the training-prompt plain accuracy that
  iGRPO's gains must transfer to. It is the same number as ``draft/accuracy`` (iGRPO) or
  ``grpo/accuracy`` (GRPO), under one name for both.

Pure Python on numbers and answer strings: the caller extracts answers (``rewards.extraction``).
Every rate is NaN when nothing was counted, so a log never shows a made-up 0.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, fields

__all__ = ["MechanismMetrics", "RefinementPair", "mechanism_metrics", "same_answer"]


@dataclass(frozen=True)
class RefinementPair:
    """One refinement and the draft shown in its prompt."""

    draft_reward: float
    draft_correct: bool
    draft_answer: str | None  # None: the draft has no extractable final answer
    refine_reward: float
    refine_answer: str | None


@dataclass
class MechanismMetrics:
    """One step's mechanism metrics; ``as_dict`` keys them ``mechanism/<name>``."""

    plain_prompt_acc: float  # plain-prompt samples of the training prompts (drafts / GRPO samples) correct
    plain_prompt_reward: float  # their mean reward
    refine_reward_draft_correct: float  # mean refinement reward where the shown draft was correct
    refine_reward_draft_incorrect: float  # ... where it was incorrect
    refine_delta_mean: float  # mean over refinements of (refinement reward - its draft's reward)
    refine_delta_draft_correct: float
    refine_delta_draft_incorrect: float
    num_refinements_draft_correct: int
    num_refinements_draft_incorrect: int
    copy_rate: float  # refinement's answer == draft's answer, over refinements whose draft has an answer
    copy_rate_draft_correct: float
    copy_rate_draft_incorrect: float

    def as_dict(self, prefix: str = "mechanism/") -> dict[str, float]:
        return {f"{prefix}{f.name}": float(getattr(self, f.name)) for f in fields(self)}


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else math.nan


def same_answer(a: str | None, b: str | None) -> bool:
    """Whether two extracted answers are the same string once whitespace is removed (None never matches)."""
    if a is None or b is None:
        return False
    return "".join(a.split()) == "".join(b.split())


def _copy_rate(pairs: Sequence[RefinementPair]) -> float:
    with_answer = [p for p in pairs if p.draft_answer is not None]
    return _mean([float(same_answer(p.draft_answer, p.refine_answer)) for p in with_answer])


def mechanism_metrics(plain_rewards: Sequence[float], plain_correct: Sequence[bool],
                      pairs: Sequence[RefinementPair]) -> MechanismMetrics:
    """The step's metrics from its plain-prompt samples and its (draft, refinement) pairs.

    ``plain_rewards`` / ``plain_correct``: every plain-prompt sample of the step's training prompts
    (iGRPO drafts, or GRPO samples). ``pairs``: every refinement that was shown a draft (empty for
    GRPO: then only the plain-prompt metrics are numbers).
    """
    if len(plain_rewards) != len(plain_correct):
        raise ValueError(f"mechanism_metrics: {len(plain_rewards)} plain rewards but {len(plain_correct)} "
                         "correctness flags; pass one of each per sample")
    right = [p for p in pairs if p.draft_correct]
    wrong = [p for p in pairs if not p.draft_correct]

    def delta(ps: Sequence[RefinementPair]) -> float:
        return _mean([p.refine_reward - p.draft_reward for p in ps])

    return MechanismMetrics(
        plain_prompt_acc=_mean([float(c) for c in plain_correct]),
        plain_prompt_reward=_mean([float(r) for r in plain_rewards]),
        refine_reward_draft_correct=_mean([p.refine_reward for p in right]),
        refine_reward_draft_incorrect=_mean([p.refine_reward for p in wrong]),
        refine_delta_mean=delta(pairs),
        refine_delta_draft_correct=delta(right),
        refine_delta_draft_incorrect=delta(wrong),
        num_refinements_draft_correct=len(right),
        num_refinements_draft_incorrect=len(wrong),
        copy_rate=_copy_rate(pairs),
        copy_rate_draft_correct=_copy_rate(right),
        copy_rate_draft_incorrect=_copy_rate(wrong),
    )
