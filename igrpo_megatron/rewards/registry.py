"""Reward components by name, and the weighted combinations the recipe asks for.

A component is built by a factory ``(cfg, lookup) -> RewardFunction`` registered under a name;
``lookup(name)`` returns another component of the same build (the judge uses it for its fallback), so
the draft and training rewards share one math-verify pool. Adding a reward is one decorated function::

    @register_reward("length_penalty")
    def _build(cfg: RewardConfig, lookup: ComponentLookup) -> RewardFunction:
        return LengthPenalty(...)
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

from igrpo_megatron.config.reward import RewardConfig
from igrpo_megatron.config.validate import raise_errors
from igrpo_megatron.rewards.interfaces import ItemInfo, RewardFunction, RewardItem, RewardResult

logger = logging.getLogger(__name__)

ComponentLookup = Callable[[str], RewardFunction]
RewardFactory = Callable[[RewardConfig, ComponentLookup], RewardFunction]

_REGISTRY: dict[str, RewardFactory] = {}
CORRECTNESS_PREFERENCE = ("math", "judge")


def register_reward(name: str) -> Callable[[RewardFactory], RewardFactory]:
    """Decorator: make ``factory`` buildable as ``name`` in ``reward.weights``."""
    def deco(factory: RewardFactory) -> RewardFactory:
        if name in _REGISTRY and _REGISTRY[name] is not factory:
            raise ValueError(f"a reward named {name!r} is already registered; pick another name.")
        _REGISTRY[name] = factory
        return factory
    return deco


def registered_rewards() -> list[str]:
    return sorted(_REGISTRY)


@register_reward("math")
def _build_math(cfg: RewardConfig, lookup: ComponentLookup) -> RewardFunction:
    from igrpo_megatron.rewards.math import MathReward

    return MathReward.from_config(cfg)


@register_reward("format")
def _build_format(cfg: RewardConfig, lookup: ComponentLookup) -> RewardFunction:
    from igrpo_megatron.rewards.format import FormatReward

    return FormatReward.from_config(cfg)


@register_reward("judge")
def _build_judge(cfg: RewardConfig, lookup: ComponentLookup) -> RewardFunction:
    from igrpo_megatron.rewards.judge import JudgeReward

    if cfg.judge.fallback == "judge":
        raise ValueError("reward.judge.fallback = 'judge': the judge cannot be its own fallback; use 'math'.")
    return JudgeReward(cfg.judge, cfg.extraction, fallback=lookup(cfg.judge.fallback))


class WeightedReward:
    """reward_i = sum_c weight_c * score_c(item_i); flags merged, ``correct`` taken from one component."""

    def __init__(self, components: dict[str, RewardFunction], weights: dict[str, float],
                 correct_from: str | None, owns_components: bool = False):
        self.components = components
        self.weights = dict(weights)
        self.correct_from = correct_from
        self.judges_correctness = correct_from is not None
        self.owns_components = owns_components

    def score(self, items: Sequence[RewardItem]) -> RewardResult:
        parts = {name: self.components[name].score(items) for name in self.weights}
        rewards = [0.0] * len(items)
        info = [ItemInfo() for _ in items]
        for name, result in parts.items():
            if len(result) != len(items):
                raise RuntimeError(f"reward component {name!r} returned {len(result)} results for "
                                   f"{len(items)} items (bug in that component).")
            w = self.weights[name]
            for i, (r, part) in enumerate(zip(result.rewards, result.info, strict=True)):
                rewards[i] += w * r
                _merge(info[i], part, name, r)
        if self.correct_from is not None:
            for i, part in zip(info, parts[self.correct_from].info, strict=True):
                i.correct = part.correct
        return RewardResult(rewards, info)

    def close(self) -> None:
        """Close the components when this reward owns them (shared ones are closed by RewardFunctions)."""
        if self.owns_components:
            for comp in self.components.values():
                comp.close()

    def __enter__(self) -> WeightedReward:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _merge(into: ItemInfo, part: ItemInfo, name: str, score: float) -> None:
    into.components[name] = score
    if into.formatted is None:
        into.formatted = part.formatted
    into.no_answer |= part.no_answer
    into.timed_out |= part.timed_out
    into.judge_fallback |= part.judge_fallback
    into.error = into.error or part.error
    into.answer = into.answer or part.answer


@dataclass
class RewardFunctions:
    """The rewards a run needs: ``train`` (Stage-2 / GRPO updates) and ``draft`` (iGRPO draft selection)."""

    train: WeightedReward
    draft: WeightedReward
    components: dict[str, RewardFunction]

    def close(self) -> None:
        """Close every component once (stops the math-verify workers)."""
        for comp in self.components.values():
            comp.close()

    def __enter__(self) -> RewardFunctions:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class _Builder:
    """Builds each named component at most once, resolving references between components."""

    def __init__(self, cfg: RewardConfig):
        self.cfg = cfg
        self.built: dict[str, RewardFunction] = {}
        self._building: list[str] = []

    def __call__(self, name: str) -> RewardFunction:
        if name in self.built:
            return self.built[name]
        if name not in _REGISTRY:
            raise ValueError(f"unknown reward component {name!r} in recipe.reward; registered: "
                             f"{registered_rewards()}. Fix the name or register it with @register_reward.")
        if name in self._building:
            raise ValueError(f"reward components refer to each other in a cycle: {self._building + [name]}.")
        self._building.append(name)
        try:
            self.built[name] = _REGISTRY[name](self.cfg, self)
        finally:
            self._building.pop()
        return self.built[name]

    def weighted(self, weights: dict[str, float], key: str) -> WeightedReward:
        components = {name: self(name) for name in weights}
        return WeightedReward(components, weights, self._correct_from(weights, key))

    def _correct_from(self, weights: dict[str, float], key: str) -> str | None:
        chosen = self.cfg.correct_from
        if chosen is not None:
            comp = self(chosen)
            if not comp.judges_correctness:
                raise ValueError(f"reward.correct_from = {chosen!r}: that component does not judge correctness; "
                                 f"use one of {list(CORRECTNESS_PREFERENCE)} or null.")
            if chosen not in weights:
                raise ValueError(f"reward.correct_from = {chosen!r} is not in {key}; add it there (weight 0 "
                                 "computes it without rewarding it) or set correct_from: null.")
            return chosen
        for name in weights:
            if self(name).judges_correctness:
                return name
        logger.warning("%s has no component that judges correctness (math, judge): every item's correct "
                       "flag is false, so draft rules such as best_incorrect see no correct drafts.", key)
        return None


def build_rewards(cfg: RewardConfig) -> RewardFunctions:
    """Build the training and draft-selection rewards of ``recipe.reward``, sharing their components."""
    raise_errors(cfg, "reward")
    builder = _Builder(cfg)
    try:
        train = builder.weighted(cfg.weights, "reward.weights")
        draft = builder.weighted(cfg.draft_weights if cfg.draft_weights is not None else cfg.weights,
                                 "reward.draft_weights")
    except BaseException:
        for comp in builder.built.values():
            comp.close()
        raise
    return RewardFunctions(train=train, draft=draft, components=dict(builder.built))


def build_reward(cfg: RewardConfig, weights: dict[str, float] | None = None) -> WeightedReward:
    """One reward owning its components (evaluation, tools): ``weights`` or else reward.weights.

    Its ``close()`` stops the math-verify workers. Training uses :func:`build_rewards` instead.
    """
    key = "weights argument" if weights is not None else "reward.weights"
    weights = dict(weights) if weights is not None else cfg.weights
    raise_errors(replace(cfg, weights=weights, draft_weights=None), "reward")
    builder = _Builder(cfg)
    try:
        reward = builder.weighted(weights, key)
    except BaseException:
        for comp in builder.built.values():
            comp.close()
        raise
    # Components built only as dependencies (e.g. the judge's fallback) are closed with the reward too.
    reward.components = {**builder.built, **reward.components}
    reward.owns_components = True
    return reward
