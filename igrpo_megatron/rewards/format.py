"""The ``format`` reward: 1 when a completion follows the recipe's output structure, else 0."""

from __future__ import annotations

import re
from collections.abc import Sequence

from igrpo_megatron.config.reward import AnswerExtractionConfig, FormatRewardConfig, RewardConfig
from igrpo_megatron.rewards.extraction import extract_answer
from igrpo_megatron.rewards.interfaces import ItemInfo, RewardItem, RewardResult


class FormatReward:
    """Checks the thinking tags, the presence of an extractable answer, and an optional full-match regex."""

    judges_correctness = False

    def __init__(self, fmt: FormatRewardConfig, extraction: AnswerExtractionConfig):
        self.fmt = fmt
        self.extraction = extraction
        self._pattern = re.compile(fmt.pattern, re.DOTALL) if fmt.pattern else None

    @classmethod
    def from_config(cls, cfg: RewardConfig) -> FormatReward:
        return cls(cfg.format, cfg.extraction)

    def thinking_ok(self, completion: str) -> bool:
        """Thinking closed exactly once, opened at most once and before the close."""
        x = self.extraction
        if not x.think_close:
            return True
        if completion.count(x.think_close) != 1:
            return False
        if not x.think_open:
            return True
        opens = completion.count(x.think_open)
        return opens == 0 or (opens == 1 and completion.index(x.think_open) < completion.index(x.think_close))

    def follows(self, completion: str) -> bool:
        if self.fmt.require_think and not self.thinking_ok(completion):
            return False
        if self.fmt.require_answer and extract_answer(completion, self.extraction) is None:
            return False
        return self._pattern is None or self._pattern.fullmatch(completion) is not None

    def score(self, items: Sequence[RewardItem]) -> RewardResult:
        flags = [self.follows(item.completion) for item in items]
        info = [ItemInfo(formatted=f, components={"format": float(f)}) for f in flags]
        return RewardResult([float(f) for f in flags], info)

    def close(self) -> None:
        pass
