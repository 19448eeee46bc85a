"""The mechanism metrics (issue 18): refinement vs its draft, copy rate, plain-prompt accuracy.

The pure function on hand-made pairs, then the function the training loop calls
(``rollout.mechanism.rollout_mechanism_metrics``) on a real ``TwoStageRollout`` step driven by the
scripted engine of tests/helpers/scripted_rollout.py, scored by the real training rewards.
"""

from __future__ import annotations

import math

import pytest

from igrpo_megatron.algorithms.mechanism import RefinementPair, mechanism_metrics, same_answer


def test_hand_computed_pairs():
    pairs = [
        # draft correct (reward 1, answer "12"): one copy, one worse refinement with another answer
        RefinementPair(1.0, True, "12", 1.0, "12"),
        RefinementPair(1.0, True, "12", 0.0, "13"),
        # draft incorrect (reward 0, answer "7"): a fix, a copy with spaces, a refinement without an answer
        RefinementPair(0.0, False, "7", 1.0, "9"),
        RefinementPair(0.0, False, "7", 0.0, " 7 "),
        RefinementPair(0.0, False, "7", 0.0, None),
        # draft incorrect with no answer: counted in rewards, not in the copy rate
        RefinementPair(0.0, False, None, 1.0, "9"),
    ]
    m = mechanism_metrics([1.0, 0.0, 0.0, 1.0, 0.5], [True, False, False, True, False], pairs)
    assert m.plain_prompt_acc == pytest.approx(2 / 5)
    assert m.plain_prompt_reward == pytest.approx(2.5 / 5)
    assert m.refine_reward_draft_correct == pytest.approx(0.5)  # (1 + 0) / 2
    assert m.refine_reward_draft_incorrect == pytest.approx(0.5)  # (1 + 0 + 0 + 1) / 4
    assert m.refine_delta_draft_correct == pytest.approx(-0.5)  # (0 - 1) / 2
    assert m.refine_delta_draft_incorrect == pytest.approx(0.5)  # (1 + 0 + 0 + 1) / 4
    assert m.refine_delta_mean == pytest.approx(1 / 6)  # (0 - 1 + 1 + 0 + 0 + 1) / 6
    assert (m.num_refinements_draft_correct, m.num_refinements_draft_incorrect) == (2, 4)
    assert m.copy_rate == pytest.approx(2 / 5)  # copies: "12", " 7 "; 5 pairs whose draft has an answer
    assert m.copy_rate_draft_correct == pytest.approx(1 / 2)
    assert m.copy_rate_draft_incorrect == pytest.approx(1 / 3)
    d = m.as_dict()
    assert d["mechanism/plain_prompt_acc"] == pytest.approx(0.4) and len(d) == 12


def test_grpo_step_has_only_the_plain_prompt_numbers():
    m = mechanism_metrics([1.0, 0.0], [True, False], [])
    assert m.plain_prompt_acc == 0.5
    nan_keys = [k for k, v in m.as_dict().items() if isinstance(v, float) and math.isnan(v)]
    assert len(nan_keys) == 8  # every refinement rate and delta: nothing was compared, no fake 0
    assert (m.num_refinements_draft_correct, m.num_refinements_draft_incorrect) == (0, 0)


def test_answers_compare_without_whitespace_and_none_never_matches():
    assert same_answer("1 2", "12") and not same_answer(None, None) and not same_answer("3", None)


def test_mismatched_plain_inputs_are_an_error():
    with pytest.raises(ValueError, match="2 plain rewards but 1"):
        mechanism_metrics([1.0, 0.0], [True], [])


# --------------------------------------------------------------- through the real rollout


def test_the_loop_function_on_a_scripted_two_stage_step(fmt, rewards):
    from igrpo_megatron.config.algorithm import AlgorithmConfig
    from igrpo_megatron.config.reward import RewardConfig
    from igrpo_megatron.rollout.mechanism import rollout_mechanism_metrics
    from tests.helpers.scripted_rollout import ScriptedEngine, problems, run_step, seed_table, table_script

    golds = [5, 7]
    alg = AlgorithmConfig()
    alg.igrpo.num_drafts, alg.igrpo.num_refinements, alg.igrpo.num_rounds = 4, 2, 1
    alg.igrpo.grpo_equivalent_budget = 6
    # Rewards (math + format, weight 1 each): right 2, wrong 1 (answer gold + 1), none 0 (no answer).
    kinds = {(0, 0): ["right", "wrong", "wrong", "none"],  # 'best' shows draft 0: correct, answer 5
             (0, 1): ["right", "right"],                   # both copy it
             (1, 0): ["wrong", "none", "none", "none"],    # 'best' shows draft 0: incorrect, answer 8
             (1, 1): ["right", "wrong"]}                   # one fix (7), one copy (8)
    engine = ScriptedEngine(fmt.tokenizer, table_script(kinds, golds, seed_table(3, 0, 2, 1)))
    rollout = run_step(engine, fmt, rewards, alg, problems(golds))
    m = rollout_mechanism_metrics(rollout, RewardConfig().extraction)  # the rewards fixture's settings
    assert m["mechanism/plain_prompt_acc"] == pytest.approx(1 / 8)  # one of 8 drafts is right
    assert m["mechanism/plain_prompt_reward"] == pytest.approx(5 / 8)  # (2 + 1 + 1 + 0) + (1 + 0 + 0 + 0)
    assert m["mechanism/plain_prompt_acc"] == pytest.approx(rollout.metrics["draft/accuracy"])
    assert m["mechanism/refine_reward_draft_correct"] == pytest.approx(2.0)
    assert m["mechanism/refine_reward_draft_incorrect"] == pytest.approx(1.5)
    assert m["mechanism/refine_delta_draft_correct"] == pytest.approx(0.0)
    assert m["mechanism/refine_delta_draft_incorrect"] == pytest.approx(0.5)  # (2 - 1 + 1 - 1) / 2
    assert m["mechanism/refine_delta_mean"] == pytest.approx(0.25)
    assert m["mechanism/num_refinements_draft_correct"] == 2
    assert m["mechanism/num_refinements_draft_incorrect"] == 2
    assert m["mechanism/copy_rate"] == pytest.approx(3 / 4)
    assert m["mechanism/copy_rate_draft_correct"] == pytest.approx(1.0)
    assert m["mechanism/copy_rate_draft_incorrect"] == pytest.approx(0.5)
