"""group_advantages: every option against hand-computed values."""

import dataclasses
import math

import pytest
import torch

from igrpo_megatron.algorithms import group_advantages, uniform_groups
from igrpo_megatron.config.algorithm import AdvantageConfig

# Three groups of G = 4:
#   g0 = [1, 0, 0, 1]: mean 0.5, unbiased var = 4 * 0.25 / 3 = 1/3, std = 0.577350
#   g1 = [2, 2, 2, 2]: all equal -> zero advantage, counted as uniform
#   g2 = [0, 0, 0, 3]: mean 0.75, var = (3 * 0.5625 + 5.0625) / 3 = 2.25, std = 1.5
REWARDS = torch.tensor([[1.0, 0.0, 0.0, 1.0], [2.0, 2.0, 2.0, 2.0], [0.0, 0.0, 0.0, 3.0]])


def test_grpo_divides_by_group_std():
    adv, m = group_advantages(REWARDS, eps=0.0)
    s = 0.5 / math.sqrt(1 / 3)  # 0.866025
    expected = torch.tensor([[s, -s, -s, s], [0.0, 0.0, 0.0, 0.0], [-0.5, -0.5, -0.5, 1.5]])
    torch.testing.assert_close(adv, expected)
    assert m.num_groups == 3 and m.num_uniform_groups == 1
    assert m.uniform_group_fraction == pytest.approx(1 / 3)
    assert m.reward_mean == pytest.approx(13 / 12)  # (2 + 8 + 3) / 12


def test_eps_is_added_to_std():
    # [0, 1]: mean 0.5, std = sqrt(0.5) = 0.707107; with eps = 1: 0.5 / 1.707107 = 0.292893
    adv, _ = group_advantages(torch.tensor([[0.0, 1.0]]), eps=1.0)
    torch.testing.assert_close(adv, torch.tensor([[-0.292893, 0.292893]]))


def test_dr_grpo_does_not_divide_by_std():
    adv, _ = group_advantages(REWARDS, normalize_by_std=False)
    expected = torch.tensor([[0.5, -0.5, -0.5, 0.5], [0.0] * 4, [-0.75, -0.75, -0.75, 2.25]])
    torch.testing.assert_close(adv, expected)


def test_leave_one_out_baseline():
    # g0: b_0 = (0 + 0 + 1) / 3 = 1/3 -> A_0 = 2/3; b_1 = (1 + 0 + 1) / 3 -> A_1 = -2/3
    # g2: b_0 = 3/3 = 1 -> -1;  b_3 = 0 -> 3
    adv, _ = group_advantages(REWARDS, normalize_by_std=False, leave_one_out=True)
    t = 2 / 3
    expected = torch.tensor([[t, -t, -t, t], [0.0] * 4, [-1.0, -1.0, -1.0, 3.0]])
    torch.testing.assert_close(adv, expected)


def test_leave_one_out_with_std_uses_the_whole_group_std():
    # g0: (2/3) / 0.577350 = 1.154701;  g2: [-1, -1, -1, 3] / 1.5
    adv, _ = group_advantages(REWARDS, normalize_by_std=True, leave_one_out=True, eps=0.0)
    u = (2 / 3) / math.sqrt(1 / 3)
    expected = torch.tensor([[u, -u, -u, u], [0.0] * 4, [-2 / 3, -2 / 3, -2 / 3, 2.0]])
    torch.testing.assert_close(adv, expected)


def test_uniform_group_is_exactly_zero_and_counted():
    # 0.1 is not exact in binary: without the explicit rule, (r - mean) / (std + eps) could be a
    # rounding residue divided by a tiny std. The rule makes it exactly 0.
    rewards = torch.tensor([[0.1, 0.1, 0.1], [0.7, 0.7, 0.7], [0.0, 1.0, 0.0]])
    adv, m = group_advantages(rewards)
    assert torch.equal(adv[:2], torch.zeros(2, 3))
    assert m.num_uniform_groups == 2
    assert uniform_groups(rewards).tolist() == [True, True, False]


def test_group_of_one_gives_zero_not_nan():
    adv, m = group_advantages(torch.tensor([[0.3], [1.0]]))
    assert torch.equal(adv, torch.zeros(2, 1))
    assert m.num_uniform_groups == 2


def test_config_fields_are_the_keyword_arguments():
    cfg = AdvantageConfig(normalize_by_std=False)
    adv, _ = group_advantages(REWARDS, **dataclasses.asdict(cfg))
    assert adv[0].tolist() == [0.5, -0.5, -0.5, 0.5]


def test_metrics_as_dict():
    _, m = group_advantages(REWARDS, eps=0.0)
    d = m.as_dict()
    assert d["num_uniform_groups"] == 1.0
    # mean std over groups = (0.577350 + 0 + 1.5) / 3 = 0.692450
    assert d["reward_std_mean"] == pytest.approx(0.692450, abs=1e-6)


@pytest.mark.parametrize("bad, match", [
    (torch.tensor([1.0, 0.0]), "num_groups, group_size"),
    (torch.tensor([[1.0, float("nan")]]), "NaN"),
])
def test_bad_rewards_are_rejected(bad, match):
    with pytest.raises(ValueError, match=match):
        group_advantages(bad)


def test_leave_one_out_needs_two():
    with pytest.raises(ValueError, match="leave_one_out"):
        group_advantages(torch.tensor([[1.0]]), leave_one_out=True)
