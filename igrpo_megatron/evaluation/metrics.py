"""Benchmark metrics from per-problem records: pass@k, majority vote, answer/truncation rates, refinement.

Every metric is first computed per problem and then averaged over problems with an interval
(:func:`passk.mean_interval`), and the per-problem values are kept so two runs on the same problems
can be compared pairwise. Names:

- ``pass@k``: unbiased pass@k for each k asked for, plus k = 1 (accuracy averaged over the samples)
  and k = n (the samples per problem), leaving out k > n;
- ``maj@n``: the most common answer among all n samples is correct (self-consistency);
- ``no_answer_rate``, ``truncated_rate`` (finish_reason 'length'), ``mean_tokens``;
- ``refine.*``: the same for the last refinement round, plus ``refine.pick_correct`` (the draft picked
  to condition round 1 was correct: the accuracy of the verifier-free pick itself, i.e. maj@N of the
  drafts), and ``refine.r{r}.*`` per round when there are several.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from igrpo_megatron.evaluation.passk import Interval, mean_interval, pass_at_k
from igrpo_megatron.evaluation.records import ProblemRecord, SampleRecord
from igrpo_megatron.evaluation.voting import majority_index


@dataclass(frozen=True)
class IntervalSettings:
    """How intervals are computed (from ``recipe.evaluation``)."""

    confidence: float = 0.95
    method: str = "normal"
    resamples: int = 2000
    seed: int = 0


def sample_metrics(groups: Sequence[Sequence[SampleRecord]], ks: Sequence[int]) -> dict[str, list[float]]:
    """Per-problem values of the sample-level metrics of one set of groups (one group per problem)."""
    n = min((len(g) for g in groups), default=0)
    out: dict[str, list[float]] = {}
    for k in sorted({1, n, *ks}):
        if 1 <= k <= n:
            out[f"pass@{k}"] = [pass_at_k(len(g), sum(s.correct for s in g), k) for g in groups]
    if n > 1:
        out[f"maj@{n}"] = [_majority_correct(g) for g in groups]
    out["no_answer_rate"] = [_mean([s.answer is None for s in g]) for g in groups]
    out["truncated_rate"] = [_mean([s.finish_reason == "length" for s in g]) for g in groups]
    out["mean_tokens"] = [_mean([s.num_tokens for s in g]) for g in groups]
    return out


def _mean(values: Sequence[float | bool]) -> float:
    return sum(float(v) for v in values) / len(values) if values else 0.0


def _majority_correct(group: Sequence[SampleRecord]) -> float:
    i = majority_index([s.answer for s in group])
    return float(i is not None and group[i].correct)


def per_problem_metrics(problems: Sequence[ProblemRecord], ks: Sequence[int]) -> dict[str, list[float]]:
    """Per-problem values of every metric, plain and (when present) refinement."""
    out = sample_metrics([p.samples for p in problems], ks)
    rounds = len(problems[0].refine) if problems else 0
    if rounds:
        out["refine.pick_correct"] = [float(p.refine[0].picked_correct) for p in problems]
        for r in range(rounds):
            values = sample_metrics([p.refine[r].samples for p in problems], ks)
            if rounds > 1:
                out.update({f"refine.r{r + 1}.{k}": v for k, v in values.items()})
            if r == rounds - 1:
                out.update({f"refine.{k}": v for k, v in values.items()})
    return out


def summarize(per_problem: dict[str, list[float]], settings: IntervalSettings = IntervalSettings()
              ) -> dict[str, Interval]:
    """Mean and interval of each metric over problems (token counts are not clipped to [0, 1])."""
    return {name: mean_interval(values, confidence=settings.confidence, method=settings.method,
                                resamples=settings.resamples, seed=settings.seed,
                                bounds=None if name.endswith("mean_tokens") else (0.0, 1.0))
            for name, values in per_problem.items()}
