"""Shared helpers of the evaluation tests: an exact-match reward, a scripted engine.

Their tiny tokenizer is the ``tiny_tokenizer`` fixture of tests/conftest.py.

The public eval files come from the ``eval_data_dir`` fixture in tests/conftest.py (which says where
it looks, and when a test without them skips or fails); tests that do not need those exact files
write their own small ones.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from igrpo_megatron.rewards.interfaces import ItemInfo, RewardItem, RewardResult
from igrpo_megatron.rollout.interfaces import Completion, CompletionGroup, SamplingParams

REPO = Path(__file__).resolve().parents[2]


BOXED = re.compile(r"\\boxed\{([^{}]*)\}")


class ExactReward:
    """Correct when the last \\boxed{} equals the gold string: a fast stand-in for the math reward."""

    judges_correctness = True

    def __init__(self):
        self.calls = 0
        self.closed = False

    def score(self, items: list[RewardItem]) -> RewardResult:
        self.calls += 1
        info = []
        for item in items:
            found = BOXED.findall(item.completion)
            answer = found[-1] if found else None
            info.append(ItemInfo(correct=answer == item.gold, no_answer=answer is None, answer=answer))
        return RewardResult([float(i.correct) for i in info], info)

    def close(self) -> None:
        self.closed = True


@dataclass
class ScriptedEngine:
    """A ``RolloutEngine`` that answers from a script instead of a model.

    Plain prompts: sample j of the problem whose text appears in the prompt answers ``script[text][j]``
    (None: no boxed answer). Refinement prompts (they contain ``marker``): every sample repeats the
    boxed answer of the draft shown after the marker, or gives no answer when the draft has none.
    """

    tokenizer: object
    script: dict[str, list[str | None]]
    marker: str = "Earlier attempt:"
    calls: list[tuple[int, SamplingParams, list]] = field(default_factory=list)
    prompts: list[str] = field(default_factory=list)
    policy_version: int = 0

    def _answers(self, text: str, n: int) -> list[str | None]:
        if self.marker in text:
            found = BOXED.findall(text.split(self.marker, 1)[1])
            return [found[-1] if found else None] * n
        for problem, answers in self.script.items():
            if problem in text:
                return [answers[j % len(answers)] for j in range(n)]
        raise AssertionError(f"scripted engine got a prompt for no scripted problem: {text!r}")

    async def generate(self, prompts, sampling=None, seeds=None):
        sampling = sampling or SamplingParams()
        self.calls.append((len(prompts), sampling, list(seeds) if seeds is not None else None))
        groups = []
        for ids in prompts:
            text = self.tokenizer.decode(list(ids))
            self.prompts.append(text)
            comps = []
            for a in self._answers(text, sampling.n):
                out = "<think>work</think> First we work through the steps one at a time. " + (
                    f"The answer is \\boxed{{{a}}}." if a is not None else "I give up.")
                comps.append(Completion(token_ids=[1] * 5, logprobs=[], text=out, finish_reason="stop",
                                        stop_reason=None, policy_version=self.policy_version))
            groups.append(CompletionGroup(list(ids), comps, self.policy_version))
        return groups

    async def close(self) -> None:  # BlockingRolloutClient closes its client
        pass
