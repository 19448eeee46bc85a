"""The model side of the memory keys: LocalRMSNorm, the sequence-parallel local spec, recompute fields.

Single process; the multi-rank behaviour (TP=2 parity with recompute and sequence parallelism) is in
tests/training/test_rl_step_layouts.py.
"""

import pytest
import torch

from igrpo_megatron.config.model import ModelConfig, ParallelConfig
from igrpo_megatron.models.norms import LocalRMSNorm
from igrpo_megatron.models.transformer_config import make_transformer_config

TINY = dict(num_layers=2, hidden_size=64, ffn_hidden_size=128, num_attention_heads=4, num_query_groups=2,
            vocab_size=128, transformer_impl="local")


def test_local_rmsnorm_is_torch_rmsnorm_and_marks_its_weight_for_sequence_parallel():
    plain = make_transformer_config(ModelConfig(**TINY, norm_epsilon=1e-5), ParallelConfig())
    norm = LocalRMSNorm(plain, 64)
    assert norm.eps == 1e-5 and norm.weight.sequence_parallel is False
    reference = torch.nn.RMSNorm(64, eps=1e-5)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
        reference.weight.copy_(norm.weight)
    x = torch.randn(5, 3, 64)
    torch.testing.assert_close(norm(x), reference(x), rtol=0, atol=0)
    assert [name for name, _ in norm.named_parameters()] == ["weight"]  # checkpoint names unchanged
    # Megatron's finalize_model_grads sums the grads of parameters with sequence_parallel=True over TP.
    sp = make_transformer_config(ModelConfig(**TINY), ParallelConfig(tensor_model_parallel_size=2,
                                                                     sequence_parallel=True))
    assert LocalRMSNorm(sp, 64, eps=1e-3).weight.sequence_parallel is True
    assert LocalRMSNorm(sp, 64, eps=1e-3).eps == 1e-3  # an explicit eps wins (Megatron passes the config's)


def test_sequence_parallel_local_spec_uses_local_rmsnorm_everywhere(monkeypatch):
    from megatron.core.transformer.torch_norm import WrappedTorchNorm

    from igrpo_megatron.models import gpt
    from igrpo_megatron.models.gpt import gpt_layer_spec, sequence_parallel_local_spec

    # How many layers this stage builds is Megatron's call (it reads the pipeline rank, which needs
    # process groups); the TP=2 parity test builds real models through it.
    monkeypatch.setattr(gpt, "get_num_layers_to_build", lambda config, vp_stage=None: config.num_layers)

    model = ModelConfig(**TINY)
    layer = gpt_layer_spec(model)
    assert layer.submodules.input_layernorm is WrappedTorchNorm  # Megatron's: refuses sequence parallelism
    config = make_transformer_config(model, ParallelConfig())
    block = sequence_parallel_local_spec(layer, config, vp_stage=None)
    assert len(block.layer_specs) == 2 and block.layer_norm is LocalRMSNorm
    for spec in block.layer_specs:
        assert spec.submodules.input_layernorm is LocalRMSNorm and spec.submodules.pre_mlp_layernorm is LocalRMSNorm
        assert spec.submodules.self_attention == layer.submodules.self_attention  # the rest is Megatron's spec
    assert layer.submodules.input_layernorm is WrappedTorchNorm  # the original spec is not modified


def test_recompute_keys_reach_megatron():
    model = ModelConfig(**TINY, recompute_granularity="full", recompute_method="block", recompute_num_layers=1)
    config = make_transformer_config(model, ParallelConfig())
    assert (config.recompute_granularity, config.recompute_method, config.recompute_num_layers) == ("full", "block", 1)
    model = ModelConfig(**TINY, recompute_granularity="selective", recompute_modules=["core_attn", "mlp"])
    config = make_transformer_config(model, ParallelConfig())
    assert config.recompute_granularity == "selective" and config.recompute_modules == ["core_attn", "mlp"]
    assert make_transformer_config(ModelConfig(**TINY), ParallelConfig()).recompute_granularity is None


def test_layernorm_recompute_needs_transformer_engine():
    from igrpo_megatron.models.capability import has_transformer_engine

    if has_transformer_engine():
        pytest.skip("Transformer Engine is present: layernorm recompute is allowed here")
    model = ModelConfig(**TINY, recompute_granularity="selective", recompute_modules=["layernorm"])
    with pytest.raises(RuntimeError, match="model.recompute_modules includes 'layernorm'"):
        make_transformer_config(model, ParallelConfig())
