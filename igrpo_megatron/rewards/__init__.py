"""Rewards: math verification in a worker pool with hard timeouts, a format rule, a generative judge.

The loop imports :class:`RewardFunction` and :func:`build_rewards`; implementations are chosen by name
in ``recipe.reward.weights`` and live in their own modules (``math``, ``format``, ``judge``).
"""

from igrpo_megatron.rewards.extraction import extract_answer
from igrpo_megatron.rewards.interfaces import ItemInfo, RewardFunction, RewardItem, RewardResult
from igrpo_megatron.rewards.registry import (
    RewardFunctions,
    WeightedReward,
    build_reward,
    build_rewards,
    register_reward,
    registered_rewards,
)

__all__ = [
    "ItemInfo",
    "RewardFunction",
    "RewardFunctions",
    "RewardItem",
    "RewardResult",
    "WeightedReward",
    "build_reward",
    "build_rewards",
    "extract_answer",
    "register_reward",
    "registered_rewards",
]
