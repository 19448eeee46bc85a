"""DAPO's dynamic sampling and overlong reward shaping (arXiv 2503.14476): the pure functions the
rollout calls, their recipe keys, and ``algorithm.variant: dapo`` turning both on.

The rollout side (refill rounds, the bound, metrics, iGRPO refinement groups) is in
tests/rollout/test_dynamic_sampling.py; a real training step in tests/e2e/test_tiny_dapo.py.
"""

from __future__ import annotations

import pytest
import torch

from igrpo_megatron.algorithms.dynamic_sampling import (
    informative_groups,
    kept_prompts,
    needs_refill,
    select_groups,
)
from igrpo_megatron.algorithms.overlong import overlong_penalty
from igrpo_megatron.config import RecipeError, load_recipe
from igrpo_megatron.config.algorithm import OverlongPenaltyConfig

TINY = "recipes/tiny_cpu.yaml"  # rollout.sampling.max_tokens = 48


# ---------------------------------------------------------------------------- overlong penalty
def test_penalty_below_inside_and_beyond_the_buffer():
    # L_max = 20, L_cache = 5: no penalty up to 15 tokens, then -(|y| - 15) / 5, and -1 past 20.
    #   |y|:      0    15    16     18     20    23
    #   penalty:  0     0   -0.2  -0.6   -1.0  -1.0
    got = overlong_penalty([0, 15, 16, 18, 20, 23], max_length=20, buffer=5)
    assert got.tolist() == pytest.approx([0.0, 0.0, -0.2, -0.6, -1.0, -1.0])
    # DAPO's own numbers: L_max 20,480, L_cache 4,096; 18,432 tokens is half-way into the buffer.
    assert overlong_penalty([16384, 18432, 20480], 20480, 4096).tolist() == pytest.approx([0.0, -0.5, -1.0])


def test_penalty_factor_scales_and_the_buffer_must_fit():
    # factor 0.5: half of the values above (-0.1 at 16 tokens, -0.5 at and past L_max).
    assert overlong_penalty(torch.tensor([16, 20, 30]), 20, 5, factor=0.5).tolist() == pytest.approx([-0.1, -0.5, -0.5])
    # A buffer of the whole budget: the penalty grows from the first token, -|y| / L_max.
    assert overlong_penalty([0, 10, 20], 20, 20).tolist() == pytest.approx([0.0, -0.5, -1.0])
    for bad in (0, 21):
        with pytest.raises(ValueError, match="overlong buffer"):
            overlong_penalty([1], 20, bad)


def test_buffer_defaults_to_a_fifth_of_the_completion_budget():
    assert OverlongPenaltyConfig().buffer_tokens(20480) == 4096  # DAPO: 4,096 of 20,480
    assert OverlongPenaltyConfig().buffer_tokens(48) == 9
    assert OverlongPenaltyConfig(overlong_buffer=16).buffer_tokens(48) == 16


def test_recipe_errors_name_the_keys():
    with pytest.raises(RecipeError, match=r"algorithm\.overlong_penalty\.overlong_buffer = 64.*max_tokens = 48"):
        load_recipe(TINY, ["algorithm.overlong_penalty.overlong_buffer=64"])
    with pytest.raises(RecipeError, match=r"algorithm\.overlong_penalty\.penalty_factor = -1"):
        load_recipe(TINY, ["algorithm.overlong_penalty.penalty_factor=-1"])
    with pytest.raises(RecipeError, match=r"algorithm\.dynamic_sampling\.max_extra_rounds = -1"):
        load_recipe(TINY, ["algorithm.dynamic_sampling.max_extra_rounds=-1"])


# ---------------------------------------------------------------------------- dynamic sampling
def test_groups_with_equal_rewards_carry_no_signal():
    # all right, mixed, all the same fraction, one completion (always uniform), shaped rewards that differ
    rewards = [[2, 2, 2], [0, 1, 0], [0.5, 0.5], [2], [2.0, 2.0 - 0.2]]
    assert informative_groups(rewards) == [False, True, False, False, True]


def test_refill_is_needed_until_full_or_out_of_rounds():
    assert needs_refill(num_kept=1, target=2, extra_rounds=0, max_extra_rounds=3)
    assert not needs_refill(num_kept=2, target=2, extra_rounds=0, max_extra_rounds=3)  # full
    assert not needs_refill(num_kept=0, target=2, extra_rounds=3, max_extra_rounds=3)  # bound hit
    assert not needs_refill(num_kept=0, target=2, extra_rounds=0, max_extra_rounds=0)  # filter only


def test_grpo_groups_keep_the_first_informative_prompts():
    # One group per prompt (plain GRPO). Prompts 0 and 3 uniform; 1, 2, 4 informative; target 2:
    # prompts 1 and 2 are trained, prompt 4 is surplus.
    rewards = [[1, 1], [0, 1], [1, 0], [0, 0], [0, 1]]
    prompts = [0, 1, 2, 3, 4]
    assert kept_prompts(prompts, informative_groups(rewards)) == [1, 2, 4]
    keep, m = select_groups(rewards, prompts, target=2, extra_rounds=1)
    assert keep == [False, True, True, False, False]
    assert (m.kept_prompts, m.groups_dropped, m.groups_surplus, m.extra_rounds, m.short) == (2, 2, 1, 1, False)
    assert m.as_dict()["dynamic_sampling/short_batch"] == 0.0


def test_igrpo_refinement_groups_are_filtered_per_group_and_counted_per_prompt():
    # Two refinement rounds trained per prompt (train_on_rounds: all): prompt 0 has a uniform round-1
    # group and an informative round-2 group, so it is kept with only the informative one; prompt 1
    # has both uniform and is dropped; prompt 2 has both informative. Target 3: short by one.
    rewards = [[1, 1], [0, 1], [0, 0], [1, 1], [0, 1], [1, 0]]
    prompts = [0, 0, 1, 1, 2, 2]
    keep, m = select_groups(rewards, prompts, target=3, extra_rounds=2)
    assert keep == [False, True, False, False, True, True]
    assert (m.kept_prompts, m.groups_dropped, m.groups_surplus, m.short) == (2, 3, 0, True)
    assert m.as_dict() == {"dynamic_sampling/target_prompts": 3.0, "dynamic_sampling/kept_prompts": 2.0,
                           "dynamic_sampling/groups_dropped": 3.0, "dynamic_sampling/groups_surplus": 0.0,
                           "dynamic_sampling/extra_rounds": 2.0, "dynamic_sampling/short_batch": 1.0}


def test_nothing_informative_keeps_nothing():
    keep, m = select_groups([[0, 0], [1, 1]], [0, 1], target=2, extra_rounds=0)
    assert keep == [False, False] and m.kept_prompts == 0 and m.short


# ---------------------------------------------------------------------------- variant
def test_variant_dapo_turns_both_on_and_a_recipe_field_still_wins():
    r = load_recipe(TINY, ["algorithm.variant=dapo"]).algorithm
    assert r.dynamic_sampling.enabled and r.overlong_penalty.enabled
    assert r.overlong_penalty.penalty_factor == 1.0 and r.loss.clip_high == 0.28
    r = load_recipe(TINY, ["algorithm.variant=dapo", "algorithm.dynamic_sampling.enabled=false"]).algorithm
    assert not r.dynamic_sampling.enabled and r.overlong_penalty.enabled
    for other in ("grpo", "dr_grpo", "gspo"):  # the other members switch both off
        r = load_recipe(TINY, [f"algorithm.variant={other}"]).algorithm
        assert not r.dynamic_sampling.enabled and not r.overlong_penalty.enabled
