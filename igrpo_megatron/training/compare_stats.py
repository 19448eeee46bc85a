"""Paired 95% intervals for ``igrpo compare``: arm - baseline held-out pass@1, over seeds and over problems.

Two intervals answer two questions:

* **Over seeds** (training noise): per seed s, d_s = acc_arm(s) - acc_base(s) (both arms of a seed
  start from the same warm-start and see the same prompts and held-out problems). The interval is
  the Student-t interval of the mean of the d_s with n_seeds - 1 degrees of freedom:
  mean(d) +- t_{(1+c)/2, n-1} * sd(d) / sqrt(n). With 3 seeds, t = 4.303: wide, honestly so.
* **Over held-out problems** (evaluation noise, given the trained models): per seed and problem,
  d_{s,p} = pass@1_arm(s, p) - pass@1_base(s, p) (pass@1 of a problem = its fraction of correct
  samples), pooled across seeds; a paired t interval over all n = seeds x problems differences.
  It does not contain the seed-to-seed spread, so it is narrower than the one over seeds; a
  difference that only this interval excludes from 0 may not survive a new set of training seeds.

No scipy here: the t quantile is found by bisection on the t CDF, integrated with Simpson's rule.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from statistics import NormalDist

__all__ = ["DiffInterval", "paired_problem_interval", "paired_seed_interval", "t_interval", "t_quantile"]


def _t_pdf(x: float, df: int) -> float:
    log_c = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)
    return math.exp(log_c - (df + 1) / 2 * math.log1p(x * x / df))


def _t_cdf_above_half(t: float, df: int, intervals: int = 2000) -> float:
    """P(T <= t) for t >= 0: 1/2 + the integral of the density over [0, t] (composite Simpson)."""
    h = t / intervals
    inner = sum((4 if i % 2 else 2) * _t_pdf(i * h, df) for i in range(1, intervals))
    return 0.5 + h / 3 * (_t_pdf(0.0, df) + inner + _t_pdf(t, df))


def t_quantile(p: float, df: int) -> float:
    """The ``p`` quantile (0.5 < p < 1) of Student's t with ``df`` degrees of freedom (1e-9 accurate)."""
    if not 0.5 < p < 1 or df < 1:
        raise ValueError(f"t_quantile: need 0.5 < p < 1 and df >= 1 (got p={p}, df={df})")
    if df > 10_000:
        return NormalDist().inv_cdf(p)
    low, high = 0.0, 1.0
    while _t_cdf_above_half(high, df) < p:
        high *= 2
    for _ in range(50):
        mid = (low + high) / 2
        if _t_cdf_above_half(mid, df) < p:
            low = mid
        else:
            high = mid
    return (low + high) / 2


@dataclass(frozen=True)
class DiffInterval:
    """A mean difference with its interval; NaN bounds when fewer than 2 differences exist."""

    mean: float
    low: float
    high: float
    n: int
    confidence: float
    method: str

    def excludes_zero(self) -> bool:
        return self.low > 0 or self.high < 0

    def as_dict(self) -> dict:
        return asdict(self)


def t_interval(values: Sequence[float], confidence: float = 0.95, method: str = "t") -> DiffInterval:
    """Student-t interval of the mean of ``values`` (sample sd, n - 1 degrees of freedom)."""
    vals = [float(v) for v in values]
    n = len(vals)
    if n == 0:
        return DiffInterval(math.nan, math.nan, math.nan, 0, confidence, method)
    mean = sum(vals) / n
    if n < 2:
        return DiffInterval(mean, math.nan, math.nan, n, confidence, method)
    sd = math.sqrt(sum((v - mean) ** 2 for v in vals) / (n - 1))
    half = t_quantile(0.5 + confidence / 2, n - 1) * sd / math.sqrt(n)
    return DiffInterval(mean, mean - half, mean + half, n, confidence, method)


def paired_seed_interval(base: Mapping[int, float], arm: Mapping[int, float],
                         confidence: float = 0.95) -> DiffInterval:
    """t interval of arm - base over the seeds both have (see the module doc)."""
    seeds = sorted(set(base) & set(arm))
    return t_interval([arm[s] - base[s] for s in seeds], confidence, method=f"paired t over {len(seeds)} seeds")


def paired_problem_interval(base: Mapping[int, tuple[Sequence[str], Sequence[float]]],
                            arm: Mapping[int, tuple[Sequence[str], Sequence[float]]],
                            confidence: float = 0.95) -> DiffInterval:
    """Paired t interval of arm - base over (seed, problem) pairs, pooled across seeds.

    ``base[seed]`` / ``arm[seed]``: (problem ids, per-problem pass@1). Problems are paired by id within
    a seed; an id only one side scored is an error (the arms of a seed evaluate the same problems).
    """
    diffs: list[float] = []
    for seed in sorted(set(base) & set(arm)):
        a = dict(zip(*base[seed], strict=True))
        b = dict(zip(*arm[seed], strict=True))
        if a.keys() != b.keys():
            raise ValueError(f"seed {seed}: the two runs evaluated different held-out problems "
                             f"({len(a.keys() - b.keys())} and {len(b.keys() - a.keys())} not shared); "
                             "a paired comparison needs the same ones")
        diffs.extend(b[k] - a[k] for k in a)
    return t_interval(diffs, confidence, method="paired t over seed x problem")
