"""DAPO in the training rollout: ``TwoStageRollout.run`` with dynamic sampling's refills and the
overlong penalty, then the loop's ``build_train_batch`` and ``RLTrainer._train_guarded``.

The scripted engine of tests/helpers/scripted_rollout.py decides every completion (rewards are the
training ones: math-verify + format, right 2, wrong 1, no answer 0); token ids come from a real
tokenizer. Prompts of extra rounds get the next prompt indices of the step (their own sampling
seeds). The loader side (``StepPrompts``: extra batches drawn once, every rank's loader agreeing)
runs on 2 gloo ranks at the end. The vLLM path is tests/e2e/test_tiny_dapo.py.
"""

from __future__ import annotations

import asyncio
import logging

import pytest

from igrpo_megatron.config.algorithm import AlgorithmConfig
from igrpo_megatron.config.schema import RecipeConfig
from igrpo_megatron.rollout.interfaces import SamplingParams
from igrpo_megatron.rollout.two_stage import TwoStageRollout, request_seed
from igrpo_megatron.training.loop import RLTrainer, build_train_batch
from tests.helpers.distributed import run_on_ranks
from tests.helpers.scripted_rollout import RUN_SEED, STEP, ScriptedEngine, problems, seed_table, table_script

GOLDS = [3, 4, 5, 6, 7, 8]  # up to 3 rounds of 2 prompts


def _grpo_seeds(num_prompts: int) -> dict[int, tuple[int, int]]:
    return {request_seed(RUN_SEED, STEP, p, "grpo", 0): (p, 0) for p in range(num_prompts)}


class Refills:
    """``more_prompts`` for the rollout: batch k of 2 prompts is prompts 2k, 2k + 1; records each call."""

    def __init__(self):
        self.calls: list[int] = []
        self.records = problems(GOLDS)

    def __call__(self, k: int):
        self.calls.append(k)
        return self.records[2 * k:2 * k + 2]


def _run(fmt, rewards, alg, kinds, seeds, *, max_tokens=64, more=None, fillers=None):
    engine = ScriptedEngine(fmt.tokenizer, table_script(kinds, GOLDS, seeds, fillers))
    runner = TwoStageRollout(engine, fmt, rewards.train, alg, SamplingParams(max_tokens=max_tokens),
                             max_prompt_length=4096, run_seed=RUN_SEED, draft_reward=rewards.draft)
    try:
        return asyncio.run(runner.run(problems(GOLDS)[:2], STEP, more))
    finally:
        runner.close()


def _grpo(max_extra_rounds: int = 3) -> AlgorithmConfig:
    alg = AlgorithmConfig(group_size=4)
    alg.igrpo.enabled = False
    alg.dynamic_sampling.enabled = True
    alg.dynamic_sampling.max_extra_rounds = max_extra_rounds
    return alg


def _recipe(alg: AlgorithmConfig) -> RecipeConfig:
    recipe = RecipeConfig()
    recipe.algorithm = alg
    return recipe


def test_grpo_refills_until_two_prompts_carry_a_signal(fmt, rewards):
    # Round 0: P0 all right (uniform, dropped), P1 mixed. Extra round 1: P2 and P3 mixed: the batch
    # is full with P1 and P2; P3 is surplus. No round 2 is asked for.
    kinds = {(0, 0): ["right"] * 4, (1, 0): ["right", "wrong", "none", "right"],
             (2, 0): ["none", "right", "none", "none"], (3, 0): ["wrong", "right", "right", "right"]}
    more = Refills()
    rollout = _run(fmt, rewards, _grpo(), kinds, _grpo_seeds(4), more=more)
    assert more.calls == [1]
    m = rollout.metrics
    assert (m["dynamic_sampling/extra_rounds"], m["dynamic_sampling/kept_prompts"],
            m["dynamic_sampling/groups_dropped"], m["dynamic_sampling/groups_surplus"],
            m["dynamic_sampling/short_batch"]) == (1, 2, 1, 1, 0)
    assert m["generated_completions"] == 16  # 4 prompts x G = 4: the refill's cost is counted
    assert [g.prompt_index for g in rollout.training_groups()] == [1, 2]
    batch, extra = build_train_batch(rollout, _recipe(_grpo()))
    assert extra["trained_sequences"] == 8 and extra["uniform_group_rate"] == 0.0
    for g in rollout.training_groups():  # every kept group has rewards that differ
        assert len({rollout.samples[i].reward for i in g.members}) > 1


def test_the_bound_stops_the_refill_and_an_empty_batch_takes_no_update(fmt, rewards, caplog):
    # Every prompt of every round uniform: two extra rounds (the bound), nothing kept, a warning,
    # and the loop's guard skips the optimizer update (no policy is built: reaching it would fail).
    kinds = {(p, 0): ["none"] * 4 if p % 2 else ["right"] * 4 for p in range(6)}
    more = Refills()
    with caplog.at_level(logging.WARNING, logger="igrpo_megatron.rollout.two_stage"):
        rollout = _run(fmt, rewards, _grpo(max_extra_rounds=2), kinds, _grpo_seeds(6), more=more)
    assert more.calls == [1, 2]
    m = rollout.metrics
    assert (m["dynamic_sampling/extra_rounds"], m["dynamic_sampling/kept_prompts"],
            m["dynamic_sampling/groups_dropped"], m["dynamic_sampling/short_batch"]) == (2, 0, 6, 1)
    assert "dynamic sampling kept 0 of 2 prompts after 2 extra round(s)" in caplog.text
    batch, extra = build_train_batch(rollout, _recipe(_grpo(2)))
    assert len(batch) == 0 and extra["trained_sequences"] == 0
    out = RLTrainer(_recipe(_grpo(2)))._train_guarded(batch)
    assert out["updates_skipped"] == 1 and out["faults/uniform_steps_skipped"] == 1


def test_without_more_prompts_uniform_groups_are_only_dropped(fmt, rewards):
    kinds = {(0, 0): ["right"] * 4, (1, 0): ["right", "none", "none", "none"]}
    rollout = _run(fmt, rewards, _grpo(), kinds, _grpo_seeds(2))
    assert rollout.metrics["dynamic_sampling/extra_rounds"] == 0
    assert rollout.metrics["dynamic_sampling/kept_prompts"] == 1
    assert rollout.metrics["dynamic_sampling/short_batch"] == 1
    assert [g.prompt_index for g in rollout.training_groups()] == [1]


def test_igrpo_filters_refinement_groups_and_refills_with_the_two_stage_rollout(fmt, rewards):
    # N = 4 drafts, G = 2 refinements. P0: drafts mixed, refinements both right (uniform: dropped).
    # P1: every draft without an answer, refinements right / none (kept). Extra round: P2 refined
    # mixed (kept, fills the batch), P3 refined mixed (surplus).
    alg = AlgorithmConfig()
    alg.igrpo.num_drafts, alg.igrpo.num_refinements, alg.igrpo.grpo_equivalent_budget = 4, 2, 6
    alg.dynamic_sampling.enabled = True
    kinds = {(0, 0): ["right", "wrong", "none", "none"], (0, 1): ["right", "right"],
             (1, 0): ["none"] * 4, (1, 1): ["right", "none"],
             (2, 0): ["wrong"] * 4, (2, 1): ["wrong", "right"],
             (3, 0): ["right"] * 4, (3, 1): ["none", "right"]}
    more = Refills()
    rollout = _run(fmt, rewards, alg, kinds, seed_table(RUN_SEED, STEP, 4, 1), more=more)
    assert more.calls == [1]
    trained = rollout.training_groups()
    assert [(g.prompt_index, g.stage) for g in trained] == [(1, "refine"), (2, "refine")]
    drafts = [g for g in rollout.groups if g.stage == "draft"]
    assert len(drafts) == 4 and not any(g.trained for g in drafts)  # both stages ran for the refill
    m = rollout.metrics
    assert (m["dynamic_sampling/kept_prompts"], m["dynamic_sampling/groups_dropped"],
            m["dynamic_sampling/groups_surplus"]) == (2, 1, 1)
    assert m["generated_completions"] == 4 * (4 + 2)  # drafts and refinements of all 4 prompts


def test_overlong_penalty_shapes_every_reward_before_anything_reads_it(fmt, rewards):
    # Plain GRPO, no dynamic sampling, every completion right (reward 2) at three lengths (short,
    # mid, long in tokens, the same for both prompts). L_max = long, L_cache = long - short: the
    # short one gets no penalty, the long one -1 (2 - 1 = 1), the middle one -(mid - short) / L_cache.
    alg = AlgorithmConfig(group_size=3)
    alg.igrpo.enabled = False
    kinds = {(p, 0): ["right", "right", "right"] for p in range(2)}
    fillers = {(p, 0, j): f for p in range(2) for j, f in enumerate((1, 4, 9))}
    probe = _run(fmt, rewards, alg, kinds, _grpo_seeds(2), fillers=fillers)
    assert {s.reward for s in probe.samples} == {2.0}
    assert build_train_batch(probe, _recipe(alg))[1]["uniform_group_rate"] == 1.0  # unshaped: no signal
    per_prompt = [[len(s.completion_ids) for s in probe.samples if s.prompt_index == p] for p in range(2)]
    assert per_prompt[0] == per_prompt[1] and len(set(per_prompt[0])) == 3, per_prompt
    short, mid, long = per_prompt[0]
    alg.overlong_penalty.enabled = True
    alg.overlong_penalty.overlong_buffer = long - short
    rollout = _run(fmt, rewards, alg, kinds, _grpo_seeds(2), max_tokens=long, fillers=fillers)
    expected = {short: 0.0, mid: -(mid - short) / (long - short), long: -1.0}
    for s in rollout.samples:
        assert s.length_penalty == pytest.approx(expected[len(s.completion_ids)])
        assert s.reward == pytest.approx(2.0 + expected[len(s.completion_ids)])
    # Shaped, the right answers differ in reward: both groups now carry a signal.
    assert build_train_batch(rollout, _recipe(alg))[1]["uniform_group_rate"] == 0.0
    m = rollout.metrics
    assert m["overlong/penalty_mean"] == pytest.approx((expected[mid] - 1.0) * 2 / 6)
    assert m["overlong/penalised_fraction"] == pytest.approx(4 / 6)  # mid and long of both prompts
    assert "overlong/penalty_mean" not in probe.metrics  # off: not logged


def _agree(rank, world_size):
    from igrpo_megatron.data.datasets import PromptLoader
    from igrpo_megatron.training.step_prompts import StepPrompts

    loader = PromptLoader(problems(list(range(20))), batch_size=2, seed=0)
    prompts = StepPrompts(loader)
    again = None
    if rank == 0:  # the rollout asks on rank 0 only; a retried step asks again
        first = prompts.more(2)
        again = prompts.more(2) is first and prompts.more(1) is prompts.extra[0]
    drawn = prompts.agree()
    return drawn, loader.state_dict(), again


@pytest.mark.multiprocess
def test_every_rank_draws_the_extra_batches_rank0_drew():
    """2 gloo ranks."""
    (drawn0, state0, again), (drawn1, state1, _) = run_on_ranks(_agree, world_size=2)
    assert again  # drawn once, remembered
    assert drawn0 == drawn1 == 2
    assert state0 == state1 == {"epoch": 0, "index": 6}  # 3 batches of 2
