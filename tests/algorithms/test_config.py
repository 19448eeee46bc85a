"""The algorithm recipe section: defaults, validation messages, registries matching the choices."""

import dataclasses

import pytest

from igrpo_megatron.algorithms import LOSS_VARIANTS, with_variant
from igrpo_megatron.algorithms.aggregation import aggregation_names
from igrpo_megatron.algorithms.kl import kl_estimator_names
from igrpo_megatron.algorithms.losses import ratio_level_names
from igrpo_megatron.config import algorithm as A
from igrpo_megatron.config.validate import raise_errors


def _all_sections(obj):
    yield obj
    for f in dataclasses.fields(obj):
        v = getattr(obj, f.name)
        if dataclasses.is_dataclass(v):
            yield from _all_sections(v)


def test_defaults_are_valid_and_are_the_paper_settings():
    cfg = A.AlgorithmConfig()
    assert cfg.errors() == []
    assert cfg.loss.aggregation == "seq_mean_token_mean" and cfg.loss.kl.estimator == "k3"
    assert cfg.loss.kl.coef == 0.0
    assert (cfg.igrpo.num_drafts, cfg.igrpo.num_refinements, cfg.igrpo.grpo_equivalent_budget) == (4, 4, 8)


def test_every_field_has_help_text():
    for section in _all_sections(A.AlgorithmConfig()):
        for f in dataclasses.fields(section):
            assert f.metadata.get("help"), f"{type(section).__name__}.{f.name} has no help"


def test_registries_match_the_declared_choices():
    assert set(aggregation_names()) == set(A.AGGREGATIONS)
    assert set(kl_estimator_names()) == set(A.KL_ESTIMATORS)
    assert set(ratio_level_names()) == set(A.RATIO_LEVELS)


def test_budget_mismatch_is_an_error_naming_the_keys():
    cfg = A.IGRPOConfig(num_drafts=4, num_refinements=4, grpo_equivalent_budget=6)
    msg = "\n".join(cfg.errors())
    # 4 + 1 * 4 = 8 != 6
    assert "algorithm.igrpo.grpo_equivalent_budget = 6" in msg and "= 8" in msg
    assert "allow_budget_mismatch" in msg
    assert A.IGRPOConfig(num_drafts=4, num_refinements=4, grpo_equivalent_budget=6,
                         allow_budget_mismatch=True).errors() == []
    # disabled iGRPO does not check its budget
    assert A.IGRPOConfig(enabled=False, grpo_equivalent_budget=6).errors() == []


def test_budget_counts_every_round():
    # 2 drafts + 2 rounds * 3 refinements = 8
    assert A.IGRPOConfig(num_drafts=2, num_refinements=3, num_rounds=2, grpo_equivalent_budget=8).errors() == []
    with pytest.raises(ValueError, match="num_rounds"):  # the check code that builds a section itself runs
        raise_errors(A.IGRPOConfig(num_drafts=4, num_refinements=4, num_rounds=2), "algorithm.igrpo")


def test_all_errors_are_reported_at_once():
    cfg = A.AlgorithmConfig()
    cfg.loss.aggregation = "seq_mean_token_sum_norm"  # needs max_length_normalizer
    cfg.loss.kl.estimator = "k9"
    cfg.igrpo.prompt.template = "no placeholders"
    cfg.igrpo.selection.rule = "median"
    msg = "\n".join(cfg.errors())
    for key in ("algorithm.loss.max_length_normalizer", "algorithm.loss.kl.estimator = 'k9'",
                "algorithm.igrpo.prompt.template must contain {problem}",
                "algorithm.igrpo.prompt.template must contain {draft}",
                "algorithm.igrpo.selection.rule = 'median'"):
        assert key in msg, key


def test_leave_one_out_needs_groups_of_two():
    cfg = A.AlgorithmConfig()
    cfg.advantage.leave_one_out = True
    cfg.igrpo = A.IGRPOConfig(num_drafts=7, num_refinements=1)
    assert any("leave_one_out" in e for e in cfg.errors())


@pytest.mark.parametrize("name", sorted(LOSS_VARIANTS))
def test_every_variant_is_a_valid_config(name):
    cfg = with_variant(A.AlgorithmConfig(), name, max_length=4096)
    assert cfg.errors() == []
    assert cfg.igrpo == A.IGRPOConfig()  # the wrapper settings are untouched


def test_variant_fields():
    base = A.AlgorithmConfig()
    dapo = with_variant(base, "dapo")
    assert (dapo.loss.clip_low, dapo.loss.clip_high, dapo.loss.aggregation) == (0.2, 0.28, "token_mean")
    dr = with_variant(base, "dr_grpo", max_length=1024)
    assert not dr.advantage.normalize_by_std and dr.loss.max_length_normalizer == 1024
    assert with_variant(base, "gspo").loss.ratio_level == "sequence"
    assert base.loss.clip_high == 0.2  # a copy, not a mutation
    with pytest.raises(ValueError, match="unknown loss variant"):
        with_variant(base, "ppo2")
