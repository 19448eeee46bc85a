"""Hugging Face NemotronH <-> Megatron hybrid: layout mapping, import, export, and transformers' logits.

The tiny HF model is written by transformers itself (random init, every tensor then perturbed so
that no two norms or biases are equal and a swapped tensor changes the logits). Megatron runs in
spawned gloo ranks (its Mamba mixer binds kernels once per process), as in ``test_hybrid``.

transformers clamps Mamba step sizes at ``time_step_min`` (0.001) where Megatron does not (see
``models/hf_nemotron_h``); the logit comparison turns that clamp off in the transformers model so
the two compute the same function, and a separate test measures how small the clamp's effect is.
"""

import json
import math
import shutil

import pytest
import torch

from igrpo_megatron.config.model import ModelConfig
from igrpo_megatron.models import hf_nemotron_h
from igrpo_megatron.models.hf_qwen2 import QKV
from tests.helpers.distributed import run_on_ranks
from tests.helpers.hf_roundtrip import import_forward_export
from tests.helpers.tiny_models import load_state_dict

pytestmark = pytest.mark.timeout(900)

PATTERN = "M*M-"  # Mamba2, attention, Mamba2, MLP
SEQ = 24


def model_cfg(**overrides) -> ModelConfig:
    """8 Mamba heads of 16 in 2 groups (TP=2 splits heads and groups), 4 attention heads, 2 KV groups."""
    base = dict(architecture="nemotron_h", hybrid_pattern=PATTERN, num_layers=4, hidden_size=64,
                ffn_hidden_size=128, num_attention_heads=4, num_query_groups=2, vocab_size=128,
                max_position_embeddings=64, mamba_head_dim=16, mamba_num_groups=2, mamba_state_dim=8,
                norm_epsilon=1e-5, transformer_impl="local")
    base.update(overrides)
    return ModelConfig(**base)


def build_tiny_nemotron_h(path, seed: int = 3):
    """A random-init ``NemotronHForCausalLM`` with the sizes of :func:`model_cfg`, saved by transformers."""
    from transformers import NemotronHConfig, NemotronHForCausalLM

    config = NemotronHConfig(
        vocab_size=128, hidden_size=64, layers_block_type=["linear_attention", "full_attention",
                                                           "linear_attention", "mlp"],
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, intermediate_size=128,
        ssm_state_size=8, mamba_num_heads=8, mamba_head_dim=16, n_groups=2, layer_norm_epsilon=1e-5,
        max_position_embeddings=64, initializer_range=0.2, tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = NemotronHForCausalLM(config).to(torch.float32).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():  # norms start at 1, D at 1, conv bias at 0: make each tensor distinct
            param.add_(0.1 * torch.randn(param.shape, generator=gen))
    model.save_pretrained(str(path), safe_serialization=True)
    return path


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    return build_tiny_nemotron_h(tmp_path_factory.mktemp("hf") / "tiny_nemotron_h")


def tokens() -> torch.Tensor:
    return torch.randint(0, 128, (2, SEQ), generator=torch.Generator().manual_seed(0))


def hf_logits(path, clamp_dt: bool = True) -> torch.Tensor:
    """transformers' logits; ``clamp_dt=False`` lifts its dt >= time_step_min clamp, which Megatron lacks."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    if not clamp_dt:
        for layer in model.model.layers:
            if layer.block_type == "linear_attention":
                layer.mixer.time_step_limit = (0.0, math.inf)
    with torch.no_grad():
        return model(tokens()).logits


def _import_export(rank, world_size, hf_path, out_path, parallel_kwargs):
    return import_forward_export(rank, world_size, model_cfg(), tokens(), hf_path, out_path, parallel_kwargs)


def _assert_exported_equals_original(hf_dir, out):
    original, exported = load_state_dict(hf_dir), load_state_dict(out)
    assert sorted(original) == sorted(exported)
    for name in original:
        assert torch.equal(original[name], exported[name]), name


# ---------------------------------------------------------------- mapping only (no Megatron)


def test_every_megatron_name_maps_for_both_specs():
    local = hf_nemotron_h.map_param("decoder.layers.0.norm.weight", 2)
    te = hf_nemotron_h.map_param("decoder.layers.0.mixer.in_proj.layer_norm_weight", 2)
    assert local.hf_names == te.hf_names == ("backbone.layers.2.norm.weight",)
    qkv = hf_nemotron_h.map_param("decoder.layers.1.self_attention.linear_qkv.weight", 5)
    assert qkv.kind == QKV and qkv.hf_names[2] == "backbone.layers.5.mixer.v_proj.weight"
    assert hf_nemotron_h.map_param("decoder.final_norm.weight", None).hf_names == ("backbone.norm_f.weight",)
    assert hf_nemotron_h.hf_aliases("backbone.norm_f.weight") == ("backbone.norm_f.weight", "model.norm_f.weight")
    with pytest.raises(KeyError, match="decoder.layers.0.mixer.unknown"):
        hf_nemotron_h.map_param("decoder.layers.0.mixer.unknown", 0)


@pytest.mark.parametrize("kind", [hf_nemotron_h.IN_PROJ, hf_nemotron_h.CONV])
def test_mamba_tp_shards_split_every_component(kind):
    """Rank r holds [z_r, x_r, B_r, C_r, dt_r]: each component's r-th slice, not rows r*N/TP.. of the whole."""
    cfg = model_cfg()
    sections = hf_nemotron_h._sections(kind, cfg)  # z/x 128, B/C 16, dt 8 for in_proj
    full = torch.arange(sum(sections), dtype=torch.float32).unsqueeze(1).expand(-1, 3)
    shards = [hf_nemotron_h.shard_from_hf(kind, [full], cfg, tp_rank=r, tp_size=2, partition_dim=0) for r in (0, 1)]
    for rank, shard in enumerate(shards):
        expected = torch.cat([part.chunk(2)[rank] for part in full.split(sections)])
        assert torch.equal(shard, expected)
    assert not torch.equal(torch.cat(shards), full)  # plain concatenation would scramble the components
    assert torch.equal(hf_nemotron_h.merge_tp_shards(kind, shards, cfg, 0), full)


def test_hf_config_round_trips_through_transformers():
    from transformers import NemotronHConfig

    cfg = model_cfg(hybrid_pattern="M*|M-")  # a pipeline-stage mark is not part of the HF layout
    written = hf_nemotron_h.hf_config(cfg)
    loaded = NemotronHConfig(**{k: v for k, v in written.items() if k not in ("architectures", "model_type")})
    assert loaded.hybrid_override_pattern == PATTERN
    assert (loaded.mamba_num_heads, loaded.n_groups, loaded.head_dim) == (8, 2, 16)
    implied = hf_nemotron_h.model_config_from_hf(loaded.to_dict(), cfg)
    assert {k: v for k, v in implied.items() if getattr(cfg, k) != v} == {}


def _config_variant(hf_dir, tmp_path, **changes):
    out = tmp_path / "variant"
    out.mkdir()
    shutil.copy(hf_dir / "config.json", out / "config.json")
    cfg = json.loads((out / "config.json").read_text())
    cfg.update(changes)
    (out / "config.json").write_text(json.dumps(cfg))
    return out


@pytest.mark.parametrize("recipe, changes, message", [
    (dict(mamba_num_groups=4), {}, r"model\.mamba_num_groups: recipe has 4, .*config\.json has 2"),
    (dict(hybrid_pattern="M-M*"), {}, r"model\.hybrid_pattern: recipe has 'M-M\*', .*config\.json has 'M\*M-'"),
    (dict(mamba_num_heads=4), {}, r"model\.mamba_num_heads: recipe has 4, .*config\.json has 8"),
    ({}, dict(mlp_hidden_act="silu"), r"mlp_hidden_act='silu' is not supported"),
    ({}, dict(layers_block_type=["linear_attention", "moe", "linear_attention", "mlp"]), r"MoE layers"),
], ids=["groups", "pattern", "mamba-heads", "activation", "moe"])
def test_mismatched_recipe_or_unsupported_checkpoint_is_refused(hf_dir, tmp_path, recipe, changes, message):
    from igrpo_megatron.models.hf_io import HFCheckpointError, check_hf_config

    with pytest.raises(HFCheckpointError, match=message):
        check_hf_config(_config_variant(hf_dir, tmp_path, **changes), model_cfg(**recipe))


def test_matching_recipe_passes_including_stage_marks_and_old_keys(hf_dir, tmp_path):
    from igrpo_megatron.models.hf_io import check_hf_config

    check_hf_config(hf_dir, model_cfg())
    check_hf_config(hf_dir, model_cfg(hybrid_pattern="M*|M-"))
    old = _config_variant(hf_dir, tmp_path, hybrid_override_pattern=PATTERN, mamba_n_groups=2)
    cfg = json.loads((old / "config.json").read_text())
    del cfg["layers_block_type"], cfg["n_groups"]
    (old / "config.json").write_text(json.dumps(cfg))
    check_hf_config(old, model_cfg())


# ---------------------------------------------------------------- Megatron against transformers


def test_megatron_matches_transformers_and_export_is_exact(hf_dir, tmp_path):
    out = tmp_path / "exported"
    (megatron_logits,) = run_on_ranks(_import_export, 1, args=(str(hf_dir), str(out), {}))
    reference = hf_logits(hf_dir, clamp_dt=False)
    assert reference.std() > 0.5  # perturbed init_std=0.2 weights: a comparison with something to lose
    diff = (megatron_logits - reference).abs().max()
    assert diff <= 1e-4 * reference.abs().max(), f"max |Megatron - transformers| = {diff:.3g}"
    # Export: every tensor comes back bit for bit under the same names, and transformers reloads it
    # (with our config.json) to identical logits.
    _assert_exported_equals_original(hf_dir, out)
    assert torch.equal(hf_logits(out), hf_logits(hf_dir))
    assert torch.equal(hf_logits(out, clamp_dt=False), reference)


def test_transformers_dt_clamp_changes_little(hf_dir):
    """What the comparison above lifts: transformers' dt >= 0.001 clamp, absent from Megatron."""
    clamped, free = hf_logits(hf_dir), hf_logits(hf_dir, clamp_dt=False)
    diff = (clamped - free).abs().max()
    assert 0 < diff < 1e-2 * free.abs().max()  # the tiny model does take steps below 0.001, and they matter little


@pytest.mark.multiprocess
def test_tp2_import_gives_the_same_logits_and_exports_exactly(hf_dir, tmp_path):
    """TP=2 splits Mamba heads, B/C groups and attention groups; a wrong split changes the logits."""
    out = tmp_path / "exported"
    logits = run_on_ranks(_import_export, 2, args=(str(hf_dir), str(out), dict(tensor_model_parallel_size=2)))
    reference = hf_logits(hf_dir, clamp_dt=False)
    for rank_logits in logits:
        diff = (rank_logits - reference).abs().max()
        assert diff <= 1e-4 * reference.abs().max(), f"max |Megatron TP=2 - transformers| = {diff:.3g}"
    _assert_exported_equals_original(hf_dir, out)


@pytest.mark.multiprocess
def test_pp2_import_export_round_trip(hf_dir, tmp_path):
    """PP=2: stage 1's layers (Mamba + MLP) come back under their global layer numbers."""
    out = tmp_path / "exported"
    run_on_ranks(_import_export, 2, args=(str(hf_dir), str(out), dict(pipeline_model_parallel_size=2)))
    _assert_exported_equals_original(hf_dir, out)
