"""Completions that break scoring (issue 17, item 2), through the reward the training loop builds.

``build_rewards(recipe.reward).train`` is what ``RLTrainer._setup_rollout`` hands the rollouts: the
default accuracy + format combination on real math-verify in the worker pool (1 worker here, 2 s
deadline). Injected in one batch: an empty completion, one cut at max tokens (inside the thinking
and inside the answer), one without an answer block, a gigantic ``\\boxed{}`` (200k digits; 4k
nested braces), and ``9^{9^{9^{9}}}`` that keeps sympy busy far past the deadline. Every item gets
an accuracy score (0 for all of these, 1 for the right answer next to them), the batch returns, and the pool
scores the next batch normally. More math-verify cases: tests/rewards/test_math.py.
"""

from __future__ import annotations

import pytest

from igrpo_megatron.config.reward import RewardConfig
from igrpo_megatron.rewards.interfaces import RewardItem
from igrpo_megatron.rewards.registry import build_rewards

pytestmark = pytest.mark.faults


def _boxed(answer: str) -> str:
    return f"<think>work</think><answer>\\boxed{{{answer}}}</answer>"


CASES = [  # (name, gold, completion, expected reward)
    ("right", "3", _boxed("3"), 1.0),
    ("empty", "3", "", 0.0),
    ("cut while thinking", "3", "<think>so it is \\boxed{3} unless", 0.0),
    ("cut inside the answer", "3", "<think>work</think><answer>\\boxed{3", 0.0),
    ("no answer block", "3", "<think>work</think>it is three", 0.0),
    ("gigantic box", "3", _boxed("9" * 200_000), 0.0),
    ("deeply nested box", "3", _boxed("{" * 4000 + "3" + "}" * 4000), None),  # either way, but scored
    ("hangs sympy", "3", _boxed("9^{9^{9^{9}}}"), 0.0),
]


@pytest.fixture(scope="module")
def reward():
    cfg = RewardConfig()
    cfg.math.num_workers, cfg.math.item_timeout_s = 1, 2.0
    rewards = build_rewards(cfg)
    yield rewards.train
    rewards.close()


def test_every_broken_completion_is_scored_and_the_pool_goes_on(reward):
    items = [RewardItem("what is 1+2?", gold, completion) for _, gold, completion, _ in CASES]
    result = reward.score(items)
    assert len(result) == len(CASES)
    for (name, _, _, expected), value, info in zip(CASES, result.rewards, result.info, strict=True):
        assert isinstance(value, float), name
        if expected is not None:  # the accuracy part; the format part pays for a well-formed reply only
            assert info.components["math"] == expected and info.correct == (expected == 1.0), f"{name}: {info}"
            assert value == expected + info.components["format"], name
    hung = result.info[[c[0] for c in CASES].index("hangs sympy")]
    assert hung.timed_out and "timeout" in hung.error
    assert result.counts()["no_answer"] >= 4  # empty, both cut-offs, no answer block
    # The pool replaced the killed worker: the next batch scores normally.
    again = reward.score([RewardItem("p", "4", _boxed("4")), RewardItem("p", "4", _boxed("5"))])
    assert [i.components["math"] for i in again.info] == [1.0, 0.0]
