"""``algorithm.variant``: the loader writes a loss variant's fields; fields the recipe sets itself win."""

from pathlib import Path

import pytest

from igrpo_megatron.algorithms import with_variant
from igrpo_megatron.config import RecipeError, load_recipe
from igrpo_megatron.config.algorithm import LOSS_VARIANTS

RECIPES = Path(__file__).resolve().parents[2] / "recipes"
PATHS = ["model.hf_path=/ckpt", "data.train_path=/data.jsonl"]  # the GPU recipes mark them ??? (required)


def _loss_fields(recipe, variant: str) -> dict:
    """The recipe's values of the fields variant ``variant`` sets, shaped like its LOSS_VARIANTS entry."""
    a = recipe.algorithm
    return {section: {k: getattr(getattr(a, section), k) for k in values}
            for section, values in LOSS_VARIANTS[variant].items()}


@pytest.mark.parametrize("name", ["r1_distill_qwen_7b_dapo_igrpo", "r1_distill_qwen_7b_dapo",
                                  "r1_distill_qwen_7b_gspo_igrpo", "r1_distill_qwen_7b_gspo"])
def test_variant_recipes_get_the_variant_fields_over_the_base_grpo(name):
    r = load_recipe(RECIPES / f"{name}.yaml", PATHS)
    variant = name.split("_")[4]  # r1_distill_qwen_7b_<variant>[_igrpo]
    assert r.algorithm.variant == variant
    assert _loss_fields(r, variant) == LOSS_VARIANTS[variant]
    assert r.algorithm.igrpo.enabled == name.endswith("_igrpo")


def test_base_recipe_names_grpo_and_gets_its_fields():
    r = load_recipe(RECIPES / "r1_distill_qwen_7b_igrpo.yaml", PATHS)
    assert r.algorithm.variant == "grpo"
    assert _loss_fields(r, "grpo") == LOSS_VARIANTS["grpo"]


def test_a_field_on_the_command_line_wins_over_the_variant():
    r = load_recipe(RECIPES / "r1_distill_qwen_7b_dapo_igrpo.yaml", [*PATHS, "algorithm.loss.clip_high=0.3"])
    assert r.algorithm.loss.clip_high == 0.3
    assert r.algorithm.loss.aggregation == "token_mean"  # the variant's other fields stay


def test_variant_on_the_command_line_wins_over_fields_of_the_files(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("algorithm:\n  loss:\n    clip_high: 0.5\n    aggregation: token_mean\n")
    r = load_recipe(recipe, ["algorithm.variant=gspo"])
    assert _loss_fields(r, "gspo") == LOSS_VARIANTS["gspo"]


def test_a_field_in_the_variants_own_file_or_a_child_wins(tmp_path):
    (tmp_path / "base.yaml").write_text("algorithm:\n  loss:\n    clip_low: 0.1\n")
    (tmp_path / "mid.yaml").write_text("defaults: [base]\nalgorithm:\n  variant: dapo\n  loss:\n    clip_high: 0.25\n")
    (tmp_path / "top.yaml").write_text("defaults: [mid]\nalgorithm:\n  advantage:\n    normalize_by_std: false\n")
    r = load_recipe(tmp_path / "top.yaml")
    assert r.algorithm.loss.clip_low == 0.2        # base.yaml's 0.1 is below the variant's file: DAPO's value
    assert r.algorithm.loss.clip_high == 0.25      # set next to the variant: kept
    assert r.algorithm.advantage.normalize_by_std is False  # set in a child: kept
    assert r.algorithm.loss.aggregation == "token_mean"


def test_dr_grpo_divides_by_the_rollout_completion_length(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("algorithm:\n  variant: dr_grpo\nrollout:\n  sampling:\n    max_tokens: 300\n")
    r = load_recipe(recipe)
    assert r.algorithm.loss.aggregation == "seq_mean_token_sum_norm"
    assert r.algorithm.loss.max_length_normalizer == 300
    assert r.algorithm.advantage.normalize_by_std is False
    assert load_recipe(recipe, ["algorithm.loss.max_length_normalizer=512"]).algorithm.loss.max_length_normalizer == 512


def test_unknown_variant_names_the_key(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("algorithm:\n  variant: ppo2\n")
    with pytest.raises(RecipeError, match=r"algorithm\.variant.*'ppo2'"):
        load_recipe(recipe)


@pytest.mark.parametrize("name", sorted(LOSS_VARIANTS))
def test_the_loader_and_with_variant_read_one_table(tmp_path, name):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"algorithm:\n  variant: {name}\n")
    loaded = load_recipe(recipe).algorithm
    plain = load_recipe(tmp_path / "r.yaml", ["algorithm.variant=null"]).algorithm
    expected = with_variant(plain, name, max_length=loaded.loss.max_length_normalizer)
    assert loaded == expected
