"""FP8 settings: what the recipe's ``model.fp8`` turns into, what it refuses, and micro-batch padding.

Running FP8 GEMMs needs Transformer Engine on a GPU; on a machine without one the build must stop
with an error naming the key (checked here). The FP8 forward itself is checked only where TE runs.
"""

from __future__ import annotations

import pytest

from igrpo_megatron.config import load_recipe
from igrpo_megatron.config.model import ModelConfig, ParallelConfig
from igrpo_megatron.models.capability import has_transformer_engine
from igrpo_megatron.models.transformer_config import fp8_pad_multiple, fp8_settings, make_transformer_config
from igrpo_megatron.training.batch import Sequence, TrainBatch, build_micro_batch, plan_micro_batches


@pytest.mark.parametrize("recipe, fmt, pad", [("tensorwise", "e4m3", 16), ("blockwise", "e4m3", 16),
                                              ("mxfp8", "e4m3", 32), ("delayed", "hybrid", 16)])
def test_each_recipe_maps_to_megatron_fields(recipe, fmt, pad):
    model = ModelConfig(fp8=recipe, params_dtype="bfloat16")
    settings = fp8_settings(model)
    assert settings["fp8"] == fmt and settings["fp8_recipe"] == recipe
    assert ("fp8_amax_history_len" in settings) == (recipe == "delayed")
    assert "first_last_layers_bf16" not in settings  # qwen2: every layer in FP8
    assert fp8_pad_multiple(model) == pad


def test_nemotron_h_keeps_first_and_last_layers_in_bf16():
    settings = fp8_settings(ModelConfig(architecture="nemotron_h", fp8="blockwise", params_dtype="bfloat16"))
    assert settings["first_last_layers_bf16"] is True
    assert settings["num_layers_at_start_in_bf16"] == settings["num_layers_at_end_in_bf16"] == 1


def test_no_fp8_changes_nothing():
    assert fp8_settings(ModelConfig()) == {} and fp8_pad_multiple(ModelConfig()) == 1


def test_recipe_refuses_delayed_on_nemotron_h_and_fp8_without_bf16():
    with pytest.raises(ValueError) as err:
        load_recipe("recipes/tiny_cpu.yaml", ["model.fp8=delayed", "model.architecture=nemotron_h",
                                              "model.hybrid_pattern=M*", "model.params_dtype=bfloat16"])
    assert "model.fp8='delayed' cannot be used with model.architecture=nemotron_h" in str(err.value)
    with pytest.raises(ValueError, match=r"model.fp8='tensorwise' needs model.params_dtype=bfloat16"):
        load_recipe("recipes/tiny_cpu.yaml", ["model.fp8=tensorwise"])
    ok = load_recipe("recipes/tiny_cpu.yaml", ["model.fp8=blockwise", "model.params_dtype=bfloat16"])
    assert ok.model.fp8 == "blockwise"


@pytest.mark.skipif(has_transformer_engine(), reason="Transformer Engine and a GPU are present: FP8 builds here")
def test_fp8_without_transformer_engine_names_the_key():
    with pytest.raises(RuntimeError, match=r"model.fp8='tensorwise' runs through Transformer Engine on a GPU"):
        make_transformer_config(ModelConfig(fp8="tensorwise", params_dtype="bfloat16"), ParallelConfig())


def test_micro_batches_are_padded_to_the_fp8_multiple():
    model = ModelConfig(fp8="mxfp8", params_dtype="bfloat16")
    pad = fp8_pad_multiple(model)
    batch = TrainBatch([Sequence(list(range(1, 8)), [9, 10, 11], 1.0), Sequence([1, 2, 3], [4] * 30, -1.0)])
    plans = plan_micro_batches([s.length for s in batch.sequences], token_budget=256, pad_to=pad)
    for plan in plans:
        mb = build_micro_batch(batch, plan, pad_to=pad)
        assert mb.tokens.shape[1] % pad == 0 and mb.tokens.shape[1] >= max(batch.sequences[i].length - 1 for i in plan)
        # Padding adds no trained tokens.
        assert int(mb.loss_mask.sum()) == sum(len(batch.sequences[i].completion_ids) for i in plan)
