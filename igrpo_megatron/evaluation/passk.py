"""Unbiased pass@k per problem, its mean over a benchmark, and confidence intervals over problems.

With n samples of a problem of which c are correct, the probability that at least one of k samples
drawn without replacement is correct is

    pass@k = 1 - C(n - c, k) / C(n, k)                        (k <= n)

(the unbiased estimator of Chen et al., 2021, arXiv 2107.03374). It is computed here as
(C(n, k) - C(n - c, k)) / C(n, k) with exact integer binomials: Python's ``int / int`` is correctly
rounded however large the integers are, so the result carries a single rounding error, with neither
the cancellation of ``1 - x`` for small pass rates nor the error build-up of a float product.
pass@1 is c / n, i.e. accuracy averaged over the n samples.

Intervals are over *problems*: each problem contributes its own estimate p_i and the benchmark score
is their mean. ``ci_method='normal'`` is mean +- z * s / sqrt(P) with s the sample standard
deviation of the p_i (ddof 1), clipped to [0, 1]: closed-form and deterministic, the usual
"standard error over problems". ``'bootstrap'`` resamples problems with replacement (seeded) and
takes percentiles, which behaves better near 0 or 1 with few problems (AIME has 30). Neither counts
the sampling noise *within* a problem separately: it is already part of the spread of the p_i.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from statistics import NormalDist

CI_METHODS = ("normal", "bootstrap")


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k of one problem with ``n`` samples, ``c`` of them correct (exact, see module doc)."""
    if not (isinstance(n, int) and isinstance(c, int) and isinstance(k, int)):
        raise TypeError(f"pass_at_k needs integers, got n={n!r}, c={c!r}, k={k!r}.")
    if n < 1 or not 0 <= c <= n:
        raise ValueError(f"pass_at_k: need n >= 1 and 0 <= c <= n, got n={n}, c={c}.")
    if not 1 <= k <= n:
        raise ValueError(f"pass_at_k: k = {k} must be in 1..n = {n} (more samples per problem are needed "
                         f"for pass@{k}; raise the samples per problem or drop k).")
    if n - c < k:  # every draw of k samples contains a correct one
        return 1.0
    total = math.comb(n, k)
    return (total - math.comb(n - c, k)) / total  # integer numerator: no cancellation in "1 - x"


def per_problem_pass_at_k(correct: Sequence[Sequence[bool]], k: int) -> list[float]:
    """pass@k of each problem from its per-sample correctness flags (each problem needs >= k samples)."""
    return [pass_at_k(len(flags), sum(bool(f) for f in flags), k) for flags in correct]


@dataclass(frozen=True)
class Interval:
    """A mean over problems with its confidence interval."""

    value: float
    ci_low: float
    ci_high: float
    stderr: float  # s / sqrt(P) (reported for both methods)
    num_problems: int
    confidence: float
    method: str

    def excludes(self, x: float) -> bool:
        """Whether ``x`` lies outside the interval."""
        return x < self.ci_low or x > self.ci_high


def _stderr(values: Sequence[float]) -> float:
    p = len(values)
    if p < 2:
        return 0.0
    mean = sum(values) / p
    var = sum((v - mean) ** 2 for v in values) / (p - 1)
    return math.sqrt(var / p)


def mean_interval(values: Sequence[float], *, confidence: float = 0.95, method: str = "normal",
                  resamples: int = 2000, seed: int = 0, bounds: tuple[float, float] | None = (0.0, 1.0)
                  ) -> Interval:
    """Mean of per-problem values with a ``confidence`` interval (see the module doc for the methods).

    ``bounds`` clips the interval (scores live in [0, 1]; differences of scores in [-1, 1]); None: no clip.
    """
    if method not in CI_METHODS:
        raise ValueError(f"ci_method {method!r}: must be one of {list(CI_METHODS)}.")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence = {confidence}: must be in (0, 1).")
    values = [float(v) for v in values]
    if not values:
        return Interval(math.nan, math.nan, math.nan, math.nan, 0, confidence, method)
    mean = sum(values) / len(values)
    se = _stderr(values)
    if method == "normal":
        z = NormalDist().inv_cdf(0.5 + confidence / 2)
        low, high = mean - z * se, mean + z * se
    else:
        low, high = _bootstrap(values, confidence, resamples, seed)
    if bounds is not None:
        low, high = max(bounds[0], low), min(bounds[1], high)
    return Interval(mean, low, high, se, len(values), confidence, method)


def _bootstrap(values: list[float], confidence: float, resamples: int, seed: int) -> tuple[float, float]:
    """Percentile bootstrap of the mean: resample problems with replacement ``resamples`` times."""
    rng = random.Random(seed)
    p = len(values)
    means = sorted(sum(rng.choices(values, k=p)) / p for _ in range(resamples))
    alpha = (1 - confidence) / 2
    lo_idx = max(0, math.floor(alpha * resamples))
    hi_idx = min(resamples - 1, math.ceil((1 - alpha) * resamples) - 1)
    return means[lo_idx], means[hi_idx]


def difference_interval(a: Sequence[float], b: Sequence[float], *, paired: bool, confidence: float = 0.95,
                        method: str = "normal", resamples: int = 2000, seed: int = 0) -> Interval:
    """Interval of mean(b) - mean(a).

    ``paired`` (same problems, in the same order): the interval of the per-problem differences
    b_i - a_i, which removes the problem-difficulty spread both runs share. Unpaired: normal
    approximation with se = sqrt(se_a^2 + se_b^2) (bootstrap is not offered unpaired).
    """
    if paired:
        if len(a) != len(b):
            raise ValueError(f"paired difference needs equally many problems, got {len(a)} and {len(b)}.")
        diffs = [float(y) - float(x) for x, y in zip(a, b, strict=True)]
        return mean_interval(diffs, confidence=confidence, method=method, resamples=resamples, seed=seed,
                             bounds=(-1.0, 1.0))
    ia = mean_interval(a, confidence=confidence)
    ib = mean_interval(b, confidence=confidence)
    se = math.sqrt(ia.stderr ** 2 + ib.stderr ** 2)
    z = NormalDist().inv_cdf(0.5 + confidence / 2)
    d = ib.value - ia.value
    return Interval(d, max(-1.0, d - z * se), min(1.0, d + z * se), se, min(len(a), len(b)), confidence,
                    "normal")
