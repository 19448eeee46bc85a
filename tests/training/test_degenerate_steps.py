"""Degenerate steps (issue 17, item 3): uniform groups and all-zero drafts, through the real rollout
(``TwoStageRollout`` with the scripted engine of tests/helpers/scripted_rollout.py and the training
rewards), the loop's ``build_train_batch`` and ``RLTrainer._train_guarded``.

Every group uniform: zero advantages (no NaN from a zero standard deviation), counted as
``uniform_group_rate``, and the step takes no optimizer update (``faults/uniform_steps_skipped``; no
policy is even built here: reaching it would fail). Every draft scored 0 while some refinements are
right: the refinement groups still carry a learning signal. The optimizer side of a skipped
step is checked on the real Megatron policy in tests/training/test_step_faults.py.
"""

from __future__ import annotations

import math

import pytest

from igrpo_megatron.config.algorithm import AlgorithmConfig
from igrpo_megatron.config.schema import RecipeConfig
from igrpo_megatron.training.loop import RLTrainer, build_train_batch
from tests.helpers.scripted_rollout import (
    RUN_SEED,
    STEP,
    ScriptedEngine,
    problems,
    run_step,
    seed_table,
    table_script,
)

pytestmark = pytest.mark.faults

GOLDS = [5, 7]


def _step(fmt, rewards, drafts: str, refinements: list[str]):
    alg = AlgorithmConfig()
    alg.igrpo.num_drafts, alg.igrpo.num_refinements, alg.igrpo.num_rounds = 4, 2, 1
    alg.igrpo.grpo_equivalent_budget = 6
    kinds = {(p, 0): [drafts] * 4 for p in range(len(GOLDS))}
    kinds.update({(p, 1): refinements for p in range(len(GOLDS))})
    engine = ScriptedEngine(fmt.tokenizer, table_script(kinds, GOLDS, seed_table(RUN_SEED, STEP, len(GOLDS), 1)))
    recipe = RecipeConfig()
    recipe.algorithm = alg
    return run_step(engine, fmt, rewards, alg, problems(GOLDS)), recipe


def test_every_group_uniform_gives_zero_advantages_and_no_update(fmt, rewards):
    rollout, recipe = _step(fmt, rewards, "none", ["none", "none"])  # every draft and refinement scores 0
    assert {s.reward for s in rollout.samples} == {0.0}
    batch, extra = build_train_batch(rollout, recipe)
    assert extra["uniform_group_rate"] == 1.0
    assert all(s.advantage == 0.0 and math.isfinite(s.advantage) for s in batch.sequences)
    trainer = RLTrainer(recipe)  # no policy: a step that tried to train would fail here
    out = trainer._train_guarded(batch)
    assert out["updates_skipped"] == 1 and out["faults/uniform_steps_skipped"] == 1
    assert all(math.isfinite(v) for v in out.values())


def test_every_draft_scored_zero_still_trains_on_the_refinements(fmt, rewards):
    rollout, recipe = _step(fmt, rewards, "none", ["right", "none"])
    assert {s.reward for s in rollout.samples if s.stage == "draft"} == {0.0}
    batch, extra = build_train_batch(rollout, recipe)
    assert extra["uniform_group_rate"] == 0.0  # the refinement groups (the trained ones) differ
    advantages = [s.advantage for s in batch.sequences]
    assert all(math.isfinite(a) for a in advantages) and any(a > 0 for a in advantages)
