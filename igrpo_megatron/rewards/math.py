"""The ``math`` reward: 1 when the completion's final answer equals the gold answer under math-verify.

Answers are extracted here (cheap string work) and only the (gold, answer) pairs go to the worker
pool, which runs ``math_verify.parse`` / ``verify`` (gold first) with a hard per-item deadline.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from igrpo_megatron.config.reward import AnswerExtractionConfig, RewardConfig
from igrpo_megatron.rewards.extraction import extract_answer, to_latex_input
from igrpo_megatron.rewards.interfaces import ItemInfo, RewardItem, RewardResult
from igrpo_megatron.rewards.pool import VerifyPool

logger = logging.getLogger(__name__)


class MathReward:
    """Rule-based correctness: 1.0 correct, 0.0 otherwise (wrong, no answer, timeout, unparseable)."""

    judges_correctness = True

    def __init__(self, extraction: AnswerExtractionConfig, pool: VerifyPool):
        self.extraction = extraction
        self.pool = pool

    @classmethod
    def from_config(cls, cfg: RewardConfig) -> MathReward:
        return cls(cfg.extraction, VerifyPool.from_config(cfg.math))

    def score(self, items: Sequence[RewardItem]) -> RewardResult:
        answers = [extract_answer(item.completion, self.extraction) for item in items]
        todo = [i for i, a in enumerate(answers) if a is not None]
        # Completions of one group often give the same answer: verify each distinct pair once.
        pairs = [(items[i].gold, to_latex_input(answers[i])) for i in todo]
        distinct = list(dict.fromkeys(pairs))
        verdicts = dict(zip(distinct, self.pool.verify(distinct), strict=True))
        outcomes = [verdicts[pair] for pair in pairs]
        info = [ItemInfo(no_answer=a is None, answer=a) for a in answers]
        bad_golds = set()
        for i, outcome in zip(todo, outcomes, strict=True):
            info[i].correct = outcome.correct
            info[i].timed_out = outcome.timed_out
            if outcome.status == "gold_unparsed":
                info[i].error = f"gold answer {items[i].gold!r} did not parse"
                bad_golds.add(items[i].gold)
            elif outcome.status in ("timeout", "error"):
                info[i].error = outcome.error or outcome.status
        if bad_golds:
            logger.warning("%d gold answer(s) could not be parsed by math-verify (those items score 0), e.g. "
                           "%r; fix the dataset's answer field.", len(bad_golds), next(iter(bad_golds)))
        for i in info:
            i.components["math"] = float(i.correct)
        return RewardResult([float(i.correct) for i in info], info)

    def close(self) -> None:
        self.pool.close()

    def __enter__(self) -> MathReward:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
