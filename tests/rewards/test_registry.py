"""Components by name, weighted combinations, the correct flag, and recipe validation."""

from __future__ import annotations

from collections.abc import Sequence

import pytest

from igrpo_megatron.config.reward import RewardConfig
from igrpo_megatron.rewards import (
    RewardFunction,
    build_reward,
    build_rewards,
    register_reward,
    registered_rewards,
)
from igrpo_megatron.rewards.interfaces import ItemInfo, RewardItem, RewardResult


class LengthBonus:
    """A test component: 0.1 per character of the completion, capped at 1; closes are counted."""

    judges_correctness = False
    closed = 0

    def score(self, items: Sequence[RewardItem]) -> RewardResult:
        values = [min(1.0, 0.1 * len(item.completion)) for item in items]
        return RewardResult(values, [ItemInfo() for _ in items])

    def close(self) -> None:
        LengthBonus.closed += 1


register_reward("test_length_bonus")(lambda cfg, lookup: LengthBonus())


def _cfg(**kwargs) -> RewardConfig:
    cfg = RewardConfig(**kwargs)
    cfg.math.num_workers = 1
    return cfg


GOOD = RewardItem("p", "\\frac{1}{2}", "<think>w</think><answer>\\boxed{0.5}</answer>")   # correct, formatted
WRONG = RewardItem("p", "\\frac{1}{2}", "<think>w</think><answer>\\boxed{2}</answer>")    # wrong, formatted
NO_ANSWER = RewardItem("p", "3", "<think>w</think>I give up")                           # no answer


def test_default_recipe_is_accuracy_plus_format_with_shared_components():
    with build_rewards(_cfg()) as rewards:
        assert rewards.train.weights == {"math": 1.0, "format": 1.0}
        assert rewards.draft.components["math"] is rewards.train.components["math"]  # one pool
        result = rewards.train.score([GOOD, WRONG, NO_ANSWER])
    assert result.rewards == [2.0, 1.0, 0.0]
    assert result.correct == [True, False, False]
    assert [i.formatted for i in result.info] == [True, True, False]
    assert [i.no_answer for i in result.info] == [False, False, True]
    assert result.info[1].components == {"math": 0.0, "format": 1.0}
    assert result.counts() == {"items": 3, "correct": 1, "formatted": 2, "no_answer": 1, "timed_out": 0,
                               "judge_fallback": 0, "errors": 0}
    metrics = result.metrics("train_reward")
    assert metrics["train_reward/mean"] == pytest.approx(1.0)
    assert metrics["train_reward/math"] == pytest.approx(1 / 3)
    assert metrics["train_reward/formatted_rate"] == pytest.approx(2 / 3)


def test_weights_scale_components_and_zero_weight_is_logged_not_rewarded():
    with build_rewards(_cfg(weights={"math": 2.0, "format": 0.0}, draft_weights={"format": 0.5})) as rewards:
        train = rewards.train.score([GOOD, WRONG])
        draft = rewards.draft.score([GOOD, WRONG])
    assert train.rewards == [2.0, 0.0]
    assert train.info[1].components["format"] == 1.0  # computed, weight 0
    assert draft.rewards == [0.5, 0.5]
    assert draft.correct == [False, False]  # no correctness component in the draft reward


def test_a_registered_component_is_usable_by_name():
    assert "test_length_bonus" in registered_rewards()
    LengthBonus.closed = 0
    reward = build_reward(_cfg(), weights={"test_length_bonus": 1.0, "format": 2.0})
    result = reward.score([RewardItem("p", "1", "abc"), GOOD])
    assert result.rewards == [pytest.approx(0.3), pytest.approx(1.0 + 2.0)]
    assert isinstance(reward, RewardFunction)
    reward.close()
    assert LengthBonus.closed == 1


def test_build_reward_owns_and_closes_its_pool():
    reward = build_reward(_cfg(), weights={"math": 1.0})
    assert reward.score([GOOD]).rewards == [1.0]
    pool = reward.components["math"].pool
    procs = [w.proc for w in pool._workers]
    reward.close()
    assert not any(p.is_alive() for p in procs)


def test_correct_from_picks_the_component():
    with build_rewards(_cfg(weights={"format": 1.0, "math": 0.0})) as rewards:
        assert rewards.train.correct_from == "math"  # the first component that judges correctness
        assert rewards.train.score([GOOD]).correct == [True]
    with pytest.raises(ValueError, match="does not judge correctness"):
        build_rewards(_cfg(correct_from="format"))
    with pytest.raises(ValueError, match=r"not in reward.draft_weights"):
        build_rewards(_cfg(correct_from="math", draft_weights={"format": 1.0}))


def test_unknown_component_names_the_registered_ones():
    with pytest.raises(ValueError, match=r"unknown reward component 'mathh'.*'format'.*'math'"):
        build_rewards(_cfg(weights={"mathh": 1.0}))


def test_register_refuses_a_second_factory_under_one_name():
    with pytest.raises(ValueError, match="already registered"):
        register_reward("math")(lambda cfg, lookup: LengthBonus())


def test_validate_reports_every_problem_with_its_key():
    cfg = RewardConfig(weights={})
    cfg.math.item_timeout_s = 0
    cfg.math.start_method = "fork"
    cfg.judge.prompt_template = "no placeholder"
    cfg.judge.score_regex = "SCORE: [01]"
    cfg.judge.url = "localhost:8000"
    cfg.extraction.source = "regex"
    cfg.format.pattern = "(unclosed"
    errors = "\n".join(cfg.errors())
    for key in ("reward.weights is empty", "reward.math.item_timeout_s = 0", "reward.math.start_method = 'fork'",
                "{solution}", "reward.judge.score_regex", "has no group", "reward.judge.url",
                "reward.extraction.regex", "reward.format.pattern"):
        assert key in errors, f"missing: {key}\n{errors}"
    assert RewardConfig().errors() == []
    with pytest.raises(ValueError, match="invalid reward settings"):
        build_rewards(cfg)
