"""The format reward: closed thinking, an extractable answer, and an optional full-match pattern."""

from __future__ import annotations

import pytest

from igrpo_megatron.config.reward import AnswerExtractionConfig, FormatRewardConfig
from igrpo_megatron.rewards.format import FormatReward
from igrpo_megatron.rewards.interfaces import RewardItem


def _score(reward: FormatReward, completions: list[str]) -> list[float]:
    return reward.score([RewardItem("p", "1", c) for c in completions]).rewards


@pytest.mark.parametrize("completion, expected", [
    ("<think>work</think><answer>3</answer>", 1.0),
    ("work</think>\\boxed{3}", 1.0),                         # <think> opened by the chat template
    ("<think>work</think>no answer", 0.0),                    # nothing extractable
    ("<think>work", 0.0),                                     # thinking cut off
    ("<think>a</think><think>b</think><answer>3</answer>", 0.0),  # thinking twice
    ("</think><think>a<answer>3</answer>", 0.0),              # opened after it was closed
    ("<think>a</think><answer>3", 0.0),                       # answer block not closed
])
def test_default_structure(completion, expected):
    reward = FormatReward(FormatRewardConfig(), AnswerExtractionConfig())
    assert _score(reward, [completion]) == [expected]


def test_pattern_must_match_the_whole_completion_and_info_reports_it():
    fmt = FormatRewardConfig(pattern=r"\s*<think>.*</think>\s*<answer>.*</answer>\s*")
    reward = FormatReward(fmt, AnswerExtractionConfig())
    good = "<think>a\nb</think>\n<answer>\\boxed{3}</answer>\n"
    trailing = "<think>a</think><answer>3</answer> and more text"
    boxed_only = "<think>a</think>\\boxed{3}"
    result = reward.score([RewardItem("p", "1", c) for c in (good, trailing, boxed_only)])
    assert result.rewards == [1.0, 0.0, 0.0]
    assert [i.formatted for i in result.info] == [True, False, False]
    assert [i.components["format"] for i in result.info] == [1.0, 0.0, 0.0]
    assert reward.judges_correctness is False


def test_rules_can_be_switched_off():
    loose = FormatReward(FormatRewardConfig(require_think=False, require_answer=False),
                         AnswerExtractionConfig(require_think_close=False))
    assert _score(loose, ["anything at all", "<think>a</think><think>"]) == [1.0, 1.0]
