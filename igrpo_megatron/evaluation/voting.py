"""Verifier-free agreement between samples: answer keys, vote shares, the majority pick.

Two answers vote together when their *keys* are equal: the extracted answer with whitespace,
``$``, ``\\left``/``\\right``, spacing commands and a trailing period removed, ``\\dfrac``/``\\tfrac``
read as ``\\frac``, and plain decimals written canonically (``27.0`` and ``27`` agree). This is string
equivalence, deliberately cheap: grouping with math-verify would cost a verifier call per pair of
samples and is not needed to find the most common answer in practice.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence

_SPACING = re.compile(r"\\left|\\right|\\!|\\,|\\;|\\:|\\quad|\\qquad|\s+")
_TEXT_WRAP = re.compile(r"^\\(?:text|textbf|mathrm)\{(.*)\}$")
_PLAIN_NUMBER = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)")
_THOUSANDS = re.compile(r"[+-]?\d{1,3}(,\d{3})+(\.\d+)?")


def answer_key(answer: str | None) -> str | None:
    """The voting key of an extracted answer (None when there is no answer)."""
    if answer is None:
        return None
    s = _SPACING.sub("", answer.strip().strip("$"))
    s = s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac").rstrip(".")
    m = _TEXT_WRAP.match(s)
    if m:
        s = m.group(1)
    if _THOUSANDS.fullmatch(s):
        s = s.replace(",", "")
    if _PLAIN_NUMBER.fullmatch(s):
        x = float(s)
        s = str(int(x)) if x.is_integer() and abs(x) < 1e15 else repr(x)
    return s or None


def vote_shares(answers: Sequence[str | None]) -> list[float]:
    """For each sample, the fraction of samples whose answer key equals its own (0 without an answer)."""
    keys = [answer_key(a) for a in answers]
    counts = Counter(k for k in keys if k is not None)
    n = max(len(keys), 1)
    return [counts[k] / n if k is not None else 0.0 for k in keys]


def majority_index(answers: Sequence[str | None]) -> int | None:
    """Index of the first sample carrying the most common answer key; None when no sample has an answer."""
    shares = vote_shares(answers)
    best = max(shares, default=0.0)
    if best == 0.0:
        return None
    return shares.index(best)
