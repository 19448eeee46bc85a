"""Recipe keys for 7-8B memory (activation recomputation, sequence parallelism) and what the plan makes of them.

Activation sizes are checked against hand arithmetic on a small Qwen2-style model (formulas in the
docstring of ``config/sizing.py``): h = 64, f = 128, 4 heads of 16 with 2 KV groups, vocabulary 256,
flash attention (no s x s term). Bytes per token and layer, TP = 1, no sequence parallelism:

    attention block  4h + 2 (a d + 2 g d) + 2 a d = 256 + 256 + 128 = 640
    SwiGLU MLP block 4h + 6f                      = 256 + 768       = 1024
    whole layer (kept without recompute)                            = 1664
    a fully recomputed layer keeps its input 2h                     = 128
    logits and their gradient, last stage: 4 V / TP                 = 1024
"""

from pathlib import Path

import pytest

from igrpo_megatron.cli import main
from igrpo_megatron.config import load_recipe
from igrpo_megatron.config.errors import UserError
from igrpo_megatron.config.layout import micro_batch_pad_multiple
from igrpo_megatron.config.model import ModelConfig, ParallelConfig
from igrpo_megatron.config.plan import format_plan, make_plan
from igrpo_megatron.config.sizing import activation_memory

RECIPES = Path(__file__).resolve().parents[2] / "recipes"
TINY = RECIPES / "tiny_cpu.yaml"
QWEN_7B = RECIPES / "r1_distill_qwen_7b_igrpo.yaml"
STAND_INS = ["model.hf_path=/x", "data.train_path=/y"]  # the plan runs with check_files=False below

SMALL = ModelConfig(num_layers=4, hidden_size=64, ffn_hidden_size=128, num_attention_heads=4, num_query_groups=2,
                    vocab_size=256, add_qkv_bias=False, transformer_impl="auto")


@pytest.mark.parametrize("overrides, message", [
    (["model.recompute_granularity=full"], "model.recompute_granularity=full needs model.recompute_method"),
    (["model.recompute_granularity=full", "model.recompute_method=uniform", "model.recompute_num_layers=0"],
     "model.recompute_num_layers = 0: must be >= 1"),
    # tiny_cpu has 2 layers on one pipeline stage
    (["model.recompute_granularity=full", "model.recompute_method=uniform", "model.recompute_num_layers=3"],
     "model.recompute_num_layers = 3 must divide the layers per pipeline stage (2)"),
    (["model.recompute_granularity=full", "model.recompute_method=block", "model.recompute_num_layers=3"],
     "model.recompute_num_layers = 3 exceeds the layers per pipeline stage (2)"),
    (["model.recompute_granularity=selective", "model.recompute_num_layers=1"],
     "model.recompute_num_layers = 1 applies to model.recompute_granularity=full only"),
    (["model.recompute_method=block"], "model.recompute_method = 'block' applies to model.recompute_granularity=full"),
    (["model.recompute_granularity=selective", "model.recompute_modules=[core_attn,moe]"],
     "model.recompute_modules = ['core_attn', 'moe']: choose one or more of"),
    (["model.recompute_modules=[mlp]"], "model.recompute_modules is set but model.recompute_granularity is null"),
    (["model.recompute_granularity=everything"], "model.recompute_granularity"),
])
def test_recompute_keys_that_cannot_work_name_the_key(overrides, message):
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        load_recipe(TINY, overrides)


def test_recompute_keys_that_work_load():
    full = load_recipe(TINY, ["model.recompute_granularity=full", "model.recompute_method=uniform",
                              "model.recompute_num_layers=2"]).model
    assert (full.recompute_granularity, full.recompute_method, full.recompute_num_layers) == ("full", "uniform", 2)
    sel = load_recipe(TINY, ["model.recompute_granularity=selective", "model.recompute_modules=[core_attn,mlp]"])
    assert sel.model.recompute_modules == ["core_attn", "mlp"]
    # Two pipeline stages of one layer each: block recompute of 1 layer per stage fits.
    load_recipe(TINY, ["parallel.pipeline_model_parallel_size=2", "model.recompute_granularity=full",
                       "model.recompute_method=block", "model.recompute_num_layers=1"])


def test_cli_refuses_a_bad_recompute_key_in_one_line(capsys):
    assert main(["plan", str(TINY), "model.recompute_granularity=full"]) == 2
    assert "model.recompute_method" in capsys.readouterr().err


def test_micro_batch_pad_multiple():
    tp2 = ParallelConfig(tensor_model_parallel_size=2)
    assert micro_batch_pad_multiple(ModelConfig(), tp2) == 1                    # SP off: no padding
    tp2.sequence_parallel = True
    assert micro_batch_pad_multiple(ModelConfig(), tp2) == 2                    # the sequence splits over TP
    tp6 = ParallelConfig(tensor_model_parallel_size=6, sequence_parallel=True)
    assert micro_batch_pad_multiple(ModelConfig(fp8="tensorwise"), tp6) == 48  # lcm(16, 6)
    assert micro_batch_pad_multiple(ModelConfig(fp8="mxfp8"), tp2) == 32       # lcm(32, 2)


def test_full_recompute_activations_against_hand_arithmetic():
    one = ParallelConfig()
    tokens = 100

    def per_token(**kw):
        return activation_memory(SMALL, one, tokens, tokens, **kw).peak / tokens

    assert per_token(recompute="none") == 4 * 1664 + 1024
    # uniform 1: every layer keeps 128, one layer is re-run at a time.
    assert per_token(recompute="full") == 4 * 128 + 1664 + 1024
    # uniform 2: two runs keep their inputs, one run of two layers is re-run at a time.
    assert per_token(recompute="full", recompute_num_layers=2) == 2 * 128 + 2 * 1664 + 1024
    # block 2: the first two layers keep their inputs, the other two everything, one layer re-run.
    assert per_token(recompute="full", recompute_method="block", recompute_num_layers=2) == (
        2 * 128 + 2 * 1664 + 1664 + 1024)
    # block over every layer is uniform 1.
    assert per_token(recompute="full", recompute_method="block", recompute_num_layers=4) == per_token(recompute="full")


def test_sequence_parallel_activations_against_hand_arithmetic():
    tokens = 100
    tp2 = ParallelConfig(tensor_model_parallel_size=2)

    def per_token(sp):
        return activation_memory(SMALL, tp2, tokens, tokens, sequence_parallel=sp).peak / tokens

    # TP=2: attention 4h + (256 + 128) / 2 = 448, MLP 4h + 768 / 2 = 640; logits 4 V / 2 = 512.
    assert per_token(False) == 4 * (448 + 640) + 512
    # Sequence parallel: the replicated 4h per block is split too: attention 128 + 192, MLP 128 + 384.
    assert per_token(True) == 4 * (320 + 512) + 512


def test_the_plan_uses_the_recipe_keys():
    keys = ["model.recompute_granularity=full", "model.recompute_method=block", "model.recompute_num_layers=14",
            "parallel.sequence_parallel=true"]
    recipe = load_recipe(QWEN_7B, [*STAND_INS, *keys])
    plan = make_plan(recipe, check_files=False)
    assert plan.errors == [] and plan.recompute == "full"
    plain = make_plan(load_recipe(QWEN_7B, STAND_INS), check_files=False)
    no_sp = make_plan(load_recipe(QWEN_7B, [*STAND_INS, *keys[:3]]), check_files=False)
    every_layer = make_plan(load_recipe(QWEN_7B, [*STAND_INS, *keys[:2], "model.recompute_num_layers=28",
                                                  keys[3]]), check_files=False)
    assert plain.recompute == "none"
    # Sequence parallelism shrinks every row; block-recomputing 14 of 28 layers sits between none and all.
    for mode in ("none", "selective", "full"):
        assert plan.activations[mode].peak < no_sp.activations[mode].peak
    assert every_layer.activations["full"].peak < plan.activations["full"].peak < plan.activations["none"].peak
    assert plan.peak_gib() == plan.peak_gib("full") < plain.peak_gib()  # the fit check takes the recipe's row
    text = format_plan(plan, recipe)
    full_row = next(line for line in text.splitlines() if "recompute full" in line)
    assert "(block, 14 layers)" in full_row and "<- this recipe" in full_row
    assert "sequence parallel on" in text
    assert "<- this recipe" in next(line for line in format_plan(plain, recipe).splitlines() if "recompute none" in line)


def test_the_fit_error_suggests_the_memory_keys():
    errs = make_plan(load_recipe(QWEN_7B, [*STAND_INS, "trainer.micro_batch_tokens=32768"]), check_files=False).errors
    assert len(errs) == 1
    assert "set parallel.sequence_parallel=true (peak" in errs[0] and "model.recompute_granularity" in errs[0]
    # Already on: not suggested again. Full recompute over every layer makes the same budget fit.
    errs = make_plan(load_recipe(QWEN_7B, [*STAND_INS, "trainer.micro_batch_tokens=32768",
                                           "parallel.sequence_parallel=true"]), check_files=False).errors
    assert len(errs) == 1 and "sequence_parallel=true" not in errs[0]
    assert make_plan(load_recipe(QWEN_7B, [*STAND_INS, "trainer.micro_batch_tokens=32768",
                                           "model.recompute_granularity=full", "model.recompute_method=uniform",
                                           "model.recompute_num_layers=1"]), check_files=False).errors == []


def test_the_plan_sizes_padded_micro_batches():
    # The longest sequence 1023 + 4096 = 5119 tokens; TP = 2 with sequence parallelism pads it to 5120.
    odd = [*STAND_INS, "data.max_prompt_length=1023", "trainer.micro_batch_tokens=16"]
    assert make_plan(load_recipe(QWEN_7B, odd), check_files=False).micro_batch_tokens == 5119
    sp = make_plan(load_recipe(QWEN_7B, [*odd, "parallel.sequence_parallel=true"]), check_files=False)
    assert sp.micro_batch_tokens == 5120
