"""When the loop evaluates, and how it gets its evaluator (a factory passed in from above)."""

from __future__ import annotations

import inspect

import pytest

from igrpo_megatron.config.schema import RecipeConfig
from igrpo_megatron.config.training import TrainerConfig
from igrpo_megatron.training.interfaces import EvaluatorFactory
from igrpo_megatron.training.loop import RLTrainer, eval_due


def test_eval_runs_before_training_every_n_steps_and_after_the_last():
    # 7 steps, every 3: before training (0), after steps 3 and 6, and after the last one (7).
    assert [s for s in range(8) if eval_due(s, TrainerConfig(num_steps=7, eval_every=3))] == [0, 3, 6, 7]
    # The last step is a multiple: evaluated once, not twice.
    assert [s for s in range(7) if eval_due(s, TrainerConfig(num_steps=6, eval_every=3))] == [0, 3, 6]
    assert not any(eval_due(s, TrainerConfig(num_steps=7, eval_every=0)) for s in range(8))


def test_a_recipe_that_evaluates_needs_an_evaluator():
    recipe = RecipeConfig()
    recipe.trainer.eval_every = 2
    with pytest.raises(ValueError, match="trainer.eval_every = 2"):
        RLTrainer(recipe)
    recipe.trainer.eval_every = 0
    assert RLTrainer(recipe).make_evaluator is None


def test_the_cli_evaluator_takes_what_the_trainer_passes():
    from igrpo_megatron.evaluation.hook import PeriodicEvaluator

    wanted = set(inspect.signature(EvaluatorFactory.__call__).parameters) - {"self"}
    given = set(inspect.signature(PeriodicEvaluator).parameters)
    assert wanted <= given, wanted - given
