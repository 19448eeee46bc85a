"""select_drafts: rules, deterministic tie-breaking, all-zero policies."""

import pytest
import torch

from igrpo_megatron.algorithms import select_drafts, select_with_config
from igrpo_megatron.config.algorithm import DraftSelectionConfig

# row 0: best is tied between drafts 1 and 2, worst is draft 3 alone
# row 1: every draft scored 0 (all-zero), so everything is tied
# row 2: best tied between 0 and 2, worst tied between 1 and 3
REWARDS = torch.tensor([[0.2, 1.0, 1.0, 0.0], [0.0, 0.0, 0.0, 0.0], [0.5, 0.3, 0.5, 0.3]])
LENGTHS = torch.tensor([[5, 9, 4, 1], [3, 2, 2, 7], [8, 6, 3, 6]])


def test_best_takes_the_lowest_index_among_ties():
    s = select_drafts(REWARDS, "best")
    assert s.indices.tolist() == [1, 0, 0]
    assert s.selected_rewards.tolist() == [1.0, 0.0, 0.5]
    assert s.tied.tolist() == [True, True, True]


def test_worst():
    s = select_drafts(REWARDS, "worst")
    assert s.indices.tolist() == [3, 0, 1]
    assert s.tied.tolist() == [False, True, True]


def test_shortest_tie_break():
    # best:  row0 {1: 9, 2: 4} -> 2; row1 lengths 3,2,2,7 -> 2 at 1 and 2 -> first -> 1; row2 {0: 8, 2: 3} -> 2
    assert select_drafts(REWARDS, "best", tie_break="shortest", draft_lengths=LENGTHS).indices.tolist() == [2, 1, 2]
    # worst: row0 {3} -> 3; row1 -> 1; row2 {1: 6, 3: 6} -> equal lengths -> first -> 1
    assert select_drafts(REWARDS, "worst", tie_break="shortest", draft_lengths=LENGTHS).indices.tolist() == [3, 1, 1]
    with pytest.raises(ValueError, match="draft_lengths"):
        select_drafts(REWARDS, tie_break="shortest")


def test_random_tie_break_stays_among_the_tied_and_is_seeded():
    rewards = REWARDS[:1].repeat(200, 1)  # best tied between 1 and 2 in every row
    a = select_drafts(rewards, "best", tie_break="random", seed=7)
    b = select_drafts(rewards, "best", tie_break="random", seed=7)
    assert torch.equal(a.indices, b.indices)
    assert set(a.indices.tolist()) == {1, 2}
    with pytest.raises(ValueError, match="seed"):
        select_drafts(rewards, tie_break="random")


def test_random_rule_is_reproducible_and_respects_eligibility():
    rewards = torch.zeros(100, 4)
    eligible = torch.tensor([[True, False, True, True]]).repeat(100, 1)
    a = select_drafts(rewards, "random", seed=3, eligible_mask=eligible)
    g = torch.Generator().manual_seed(3)
    b = select_drafts(rewards, "random", generator=g, eligible_mask=eligible)
    c = select_drafts(rewards, "random", seed=4, eligible_mask=eligible)
    assert torch.equal(a.indices, b.indices) and not torch.equal(a.indices, c.indices)
    assert set(a.indices.tolist()) == {0, 2, 3}


def test_best_incorrect():
    # correct = reward >= 1.0. row0 incorrect {0: 0.2, 3: 0.0} -> 0; rows 1, 2 have no correct draft
    s = select_drafts(REWARDS, "best_incorrect")
    assert s.indices.tolist() == [0, 0, 0] and not s.fallback.any()
    # an explicit correctness mask: only draft 1 of row 0 is correct -> incorrect {0, 2, 3} -> 2 (1.0)
    correct = torch.zeros(3, 4, dtype=torch.bool)
    correct[0, 1] = True
    assert select_drafts(REWARDS, "best_incorrect", correct_mask=correct).indices[0].item() == 2
    # every draft correct: falls back to the best, flagged
    s = select_drafts(torch.tensor([[1.0, 1.0, 2.0]]), "best_incorrect")
    assert s.indices.tolist() == [2] and s.fallback.tolist() == [True]


def test_eligible_mask_and_its_fallback():
    eligible = torch.tensor([[True, False, False, True], [False] * 4, [True] * 4])
    s = select_drafts(REWARDS, "best", eligible_mask=eligible)
    assert s.indices.tolist() == [0, 0, 0]  # row0 best eligible is 0.2 at 0; row1 none eligible -> all
    assert s.fallback.tolist() == [False, True, False]


@pytest.mark.parametrize("policy, refine, use_draft", [
    ("keep", [True, True, True], [True, True, True]),
    ("skip", [True, False, True], [True, False, True]),
    ("no_draft", [True, True, True], [True, False, True]),
])
def test_all_zero_policies(policy, refine, use_draft):
    s = select_drafts(REWARDS, "best", policy)
    assert s.all_zero.tolist() == [False, True, False]
    assert s.refine.tolist() == refine and s.use_draft.tolist() == use_draft


def test_all_zero_threshold_counts_negative_rewards():
    s = select_drafts(torch.tensor([[-1.0, -0.5], [-1.0, 0.5]]), all_zero_policy="skip")
    assert s.all_zero.tolist() == [True, False] and s.refine.tolist() == [False, True]
    s = select_drafts(torch.tensor([[0.2, 0.1]]), all_zero_threshold=0.25)
    assert s.all_zero.tolist() == [True]


def test_bad_settings_name_the_key():
    with pytest.raises(ValueError, match=r"algorithm\.igrpo\.selection\.rule"):
        select_drafts(REWARDS, "median")
    with pytest.raises(ValueError, match=r"all_zero_policy"):
        select_drafts(REWARDS, all_zero_policy="drop")
    with pytest.raises(ValueError, match="num_prompts, N"):
        select_drafts(torch.zeros(4))


def test_config_driven_selection_and_metrics():
    s = select_with_config(REWARDS, DraftSelectionConfig(rule="worst", all_zero_policy="skip"))
    assert s.indices.tolist() == [3, 0, 1]
    d = s.as_dict()
    # selected rewards [0.0, 0.0, 0.3]; ties in rows 1 and 2; row 1 skipped
    assert d["selected_draft_reward_mean"] == pytest.approx(0.1)
    assert d["selection_tie_rate"] == pytest.approx(2 / 3)
    assert d["skipped_rate"] == pytest.approx(1 / 3) and d["all_zero_rate"] == pytest.approx(1 / 3)
