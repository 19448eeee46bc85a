"""The Nemotron-H-style hybrid on Megatron-Core, trained on CPU with the reference Mamba2 kernels.

Megatron runs in spawned gloo ranks (its Mamba mixer binds kernels once per process), so this
pytest process never imports ``megatron.core.ssm``.
"""

import math

import pytest

from igrpo_megatron.config.model import ModelConfig, ParallelConfig
from igrpo_megatron.models.hybrid import check_hybrid_config, mamba_num_heads
from tests.helpers.distributed import run_on_ranks
from tests.helpers.megatron_steps import run_layout

REL = 1e-5


def tiny_hybrid_config(**overrides) -> ModelConfig:
    """4 layers: Mamba2, attention, MLP, Mamba2. 8 Mamba heads of 16 in 2 groups (TP=2 splits both)."""
    base = dict(architecture="nemotron_h", hybrid_pattern="M*-M", num_layers=4, hidden_size=64, ffn_hidden_size=128,
                num_attention_heads=4, num_query_groups=2, vocab_size=128, max_position_embeddings=64,
                mamba_head_dim=16, mamba_num_groups=2, mamba_state_dim=8)
    base.update(overrides)
    return ModelConfig(**base)


# ---------------------------------------------------------------- configuration checks (no Megatron)


def test_default_mamba_heads_follow_megatron_expand_2():
    assert mamba_num_heads(tiny_hybrid_config()) == 2 * 64 // 16
    assert mamba_num_heads(tiny_hybrid_config(mamba_num_heads=6)) == 6


@pytest.mark.parametrize("overrides, parallel, message", [
    (dict(hybrid_pattern=None), {}, "model.hybrid_pattern is required"),
    (dict(hybrid_pattern="M*xM"), {}, "unknown symbols"),
    (dict(num_layers=3), {}, "set model.num_layers=4"),
    (dict(mamba_num_groups=3), {}, "model.mamba_num_groups"),
    (dict(mamba_num_groups=2), dict(tensor_model_parallel_size=4), "tensor_model_parallel_size"),
    (dict(hybrid_pattern="M*-", num_layers=3), dict(pipeline_model_parallel_size=2), "pipeline_model_parallel_size"),
], ids=["no-pattern", "bad-symbol", "layer-count", "heads-vs-groups", "groups-vs-tp", "uneven-pp"])
def test_invalid_hybrid_layouts_name_the_key(overrides, parallel, message):
    with pytest.raises(ValueError, match=message):
        check_hybrid_config(tiny_hybrid_config(**overrides), ParallelConfig(**parallel))


def test_valid_hybrid_layout_passes():
    check_hybrid_config(tiny_hybrid_config(), ParallelConfig(tensor_model_parallel_size=2))
    check_hybrid_config(tiny_hybrid_config(), ParallelConfig(pipeline_model_parallel_size=2))


# ---------------------------------------------------------------- one rank: structure, causality, gradients


def _single_rank_facts(rank, world_size, model_cfg):
    """Build the tiny hybrid on one CPU rank and report what the parent test asserts."""
    import torch

    from igrpo_megatron.models import build_model
    from igrpo_megatron.models.cpu_kernels import ssd
    from igrpo_megatron.runtime.cpu_mode import enable_cpu_mode
    from igrpo_megatron.runtime.parallel import destroy_distributed, init_distributed

    enable_cpu_mode()
    parallel = ParallelConfig()
    init_distributed(parallel, seed=7)
    model = build_model(model_cfg, parallel)
    import megatron.core.ssm.mamba_mixer as mixer

    tokens = torch.randint(0, model_cfg.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    positions = torch.arange(24).unsqueeze(0).expand(2, -1)
    logits = model(tokens, positions, None)  # [B, S, V]
    changed = tokens.clone()
    changed[:, 10] = (changed[:, 10] + 1) % model_cfg.vocab_size
    logits_changed = model(changed, positions, None)
    mamba_layers = [layer for layer in model.decoder.layers if hasattr(layer, "mixer")]
    for layer in mamba_layers:  # the inference-style path: conv kernel + scan + norm(y, z) separately
        layer.mixer.use_mem_eff_path = False
    logits_prefill = model(tokens, positions, None)
    for layer in mamba_layers:
        layer.mixer.use_mem_eff_path = True
    loss = model(tokens, positions, None, labels=tokens).float().mean()
    loss.backward()
    facts = dict(
        model_class=type(model).__name__,
        layer_classes=[type(layer).__name__ for layer in model.decoder.layers],
        mixer_uses_reference=mixer.mamba_split_conv1d_scan_combined is ssd.mamba_split_conv1d_scan_combined,
        mlp_activation=model.decoder.layers[2].mlp.activation_func.__name__,
        has_position_embeddings=hasattr(model.embedding, "position_embeddings"),
        final_norm=type(model.decoder.final_norm).__name__,
        param_names=[name for name, _ in model.named_parameters()],
        logits_shape=tuple(logits.shape),
        loss=float(loss),
        past_diff=float((logits_changed[:, :10] - logits[:, :10]).abs().max()),
        future_diff=float((logits_changed[:, 10:] - logits[:, 10:]).abs().max()),
        prefill_diff=float((logits_prefill - logits).abs().max()),
        no_grad=[n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0],
        # Checkpoint names live in each ShardedTensor's ``key`` (the dict keys stay module-local).
        sharded_keys=sorted(getattr(v, "key", k) for k, v in model.sharded_state_dict().items()),
        decode_diff=_decode_step_diff(mamba_layers[0].mixer),
    )
    destroy_distributed()
    return facts


def _decode_step_diff(mixer) -> float:
    """Prefill 8 steps into fresh states, decode the 9th: max |difference| from the full forward.

    Batch 1: megatron-core 0.19's PyTorch decoding step (what runs without CUDA, see
    ``models/compat.use_cpu_decode_kernels``) takes one token of one sequence at a time.
    """
    import torch

    hidden = torch.randn(9, 1, mixer.d_model, generator=torch.Generator().manual_seed(1))  # [L, B, D]
    conv_shape, ssm_shape = mixer.mamba_state_shapes_per_request()
    conv_state, ssm_state = torch.zeros(1, *conv_shape), torch.zeros(1, *ssm_shape)
    with torch.no_grad():
        full, _ = mixer(hidden)
        mixer._ssm_prefill(mixer.in_proj(hidden[:8])[0], conv_state=conv_state, ssm_state=ssm_state)
        step, _ = mixer._decode(hidden[8:], conv_state, ssm_state)
    return float((step[0] - full[8]).abs().max())


@pytest.fixture(scope="module")
def single_rank_facts():
    return run_on_ranks(_single_rank_facts, 1, args=(tiny_hybrid_config(),))[0]


def test_pattern_builds_the_layer_types_it_names(single_rank_facts):
    facts = single_rank_facts
    assert facts["model_class"] in ("MambaModel", "HybridModel")
    assert facts["layer_classes"] == ["MambaLayer", "TransformerLayer", "MLPLayer", "MambaLayer"]
    assert facts["mixer_uses_reference"]
    assert facts["mlp_activation"] == "squared_relu"
    assert not facts["has_position_embeddings"]
    assert facts["final_norm"] == "LocalRMSNorm"  # torch's RMSNorm, sequence-parallel aware (models/norms.py)
    names = facts["param_names"]
    assert "output_layer.weight" in names  # untied
    assert not any("bias" in n and "mixer" not in n for n in names)  # Nemotron-H: no linear biases
    assert "decoder.layers.1.self_attention.linear_qkv.weight" in names


def test_forward_is_causal_and_both_mixer_paths_agree(single_rank_facts):
    facts = single_rank_facts
    assert facts["logits_shape"] == (2, 24, 128)
    # Random init over 128 tokens: the loss is near ln(128) = 4.852.
    assert facts["loss"] == pytest.approx(math.log(128), abs=0.2)
    assert facts["past_diff"] == 0.0  # changing token 10 cannot move logits 0..9
    assert facts["future_diff"] > 1e-4  # ... but does move the later ones
    assert facts["prefill_diff"] < 1e-4  # fused training kernel == conv + scan + gated norm


def test_one_token_decode_step_matches_the_full_forward(single_rank_facts):
    assert single_rank_facts["decode_diff"] < 1e-5  # the mixer's recurrent step == its chunked scan


def test_every_parameter_gets_a_gradient(single_rank_facts):
    assert single_rank_facts["no_grad"] == []


def test_local_spec_checkpoints_under_the_transformer_engine_names(single_rank_facts):
    keys = single_rank_facts["sharded_keys"]
    assert "decoder.layers.0.mixer.in_proj.layer_norm_weight" in keys
    assert "decoder.layers.1.self_attention.linear_qkv.layer_norm_weight" in keys
    assert "decoder.layers.2.mlp.linear_fc1.layer_norm_weight" in keys
    assert not any(k.endswith(".norm.weight") and "mixer" not in k for k in keys)


# ---------------------------------------------------------------- layouts: TP=2 and PP=2 train like one rank


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    ckpt = str(tmp_path_factory.mktemp("hybrid_parity") / "init")
    result = run_layout(tiny_hybrid_config(), 1, train_kwargs=dict(save_init_to=ckpt))[0]
    return ckpt, result


@pytest.mark.multiprocess
@pytest.mark.timeout(900)
@pytest.mark.parametrize("layout", [dict(tensor_model_parallel_size=2), dict(pipeline_model_parallel_size=2)],
                         ids=["tp2", "pp2"])
def test_two_rank_layout_matches_single_rank(reference, layout):
    """2 gloo ranks, same initial weights (re-sharded checkpoint), same data, 3 optimizer steps."""
    ckpt, ref = reference
    assert len(ref["losses"]) == 3 and all(g > 0 for g in ref["grad_norms"])
    results = run_layout(tiny_hybrid_config(), 2, train_kwargs=dict(init_from=ckpt),
                         use_distributed_optimizer=False, **layout)
    for result in results:
        assert result["losses"] == pytest.approx(ref["losses"], rel=REL)
        assert result["grad_norms"] == pytest.approx(ref["grad_norms"], rel=REL)
