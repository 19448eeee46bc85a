"""The reward seam: what a reward function takes, what it returns, and the protocol it follows.

Rollouts (draft selection, Stage-2 rewards) and evaluation only see :class:`RewardFunction`; which
implementation runs is chosen by name in ``recipe.reward`` (see ``igrpo_megatron.rewards.registry``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable


@dataclass(frozen=True)
class RewardItem:
    """One thing to score: the problem text, its reference (gold) answer, and a model completion."""

    problem: str
    gold: str
    completion: str


@dataclass
class ItemInfo:
    """What a reward learned about one item, beyond its scalar reward.

    ``correct`` is what draft-selection rules read (e.g. best_incorrect); the other flags feed the
    per-step counters. ``formatted`` is None when no format rule was applied.
    """

    correct: bool = False
    formatted: bool | None = None
    no_answer: bool = False
    timed_out: bool = False
    judge_fallback: bool = False
    error: str | None = None  # why an item could not be scored normally (timeout, crash, judge down, ...)
    answer: str | None = None  # the extracted final answer, when one was extracted
    components: dict[str, float] = field(default_factory=dict)  # per-component scores (combined rewards)


COUNTED_FLAGS = ("correct", "formatted", "no_answer", "timed_out", "judge_fallback")


@dataclass
class RewardResult:
    """Per-item rewards and infos, aligned with the input items."""

    rewards: list[float]
    info: list[ItemInfo]

    def __post_init__(self) -> None:
        if len(self.rewards) != len(self.info):
            raise ValueError(f"RewardResult has {len(self.rewards)} rewards but {len(self.info)} infos; "
                             "a reward function must return one of each per item.")

    def __len__(self) -> int:
        return len(self.rewards)

    @property
    def correct(self) -> list[bool]:
        return [i.correct for i in self.info]

    def counts(self) -> dict[str, int]:
        """How many items raised each flag, plus ``items`` and ``errors`` (for the metrics logger)."""
        out = {"items": len(self.info)}
        for flag in COUNTED_FLAGS:
            out[flag] = sum(1 for i in self.info if getattr(i, flag))
        out["errors"] = sum(1 for i in self.info if i.error is not None)
        return out

    def metrics(self, prefix: str = "reward") -> dict[str, float]:
        """Mean reward, per-component means and flag rates, keyed ``{prefix}/{name}``."""
        n = max(len(self.rewards), 1)
        out = {f"{prefix}/mean": sum(self.rewards) / n}
        names = sorted({name for i in self.info for name in i.components})
        for name in names:
            out[f"{prefix}/{name}"] = sum(i.components.get(name, 0.0) for i in self.info) / n
        for key, count in self.counts().items():
            if key != "items":
                out[f"{prefix}/{key}_rate"] = count / n
        return out


@runtime_checkable
class RewardFunction(Protocol):
    """Scores a batch of items. Implementations must return one reward and one info per item, in order.

    ``judges_correctness`` says whether ``ItemInfo.correct`` means anything (math, judge: yes;
    format: no). ``close()`` releases processes, threads and connections; it must be idempotent.
    """

    judges_correctness: bool

    def score(self, items: Sequence[RewardItem]) -> RewardResult: ...

    def close(self) -> None: ...
