"""Build Megatron-Core's ``TransformerConfig`` from the recipe's model and parallel sections."""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
import torch.nn.functional as F
from megatron.core.transformer import TransformerConfig

from igrpo_megatron.config.model import FP8_PAD_MULTIPLE, ModelConfig, ParallelConfig
from igrpo_megatron.models.capability import has_cuda, has_transformer_engine

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def torch_dtype(name: str) -> torch.dtype:
    return _DTYPES[name]


def fp8_pad_multiple(model: ModelConfig) -> int:
    """What FP8 needs micro-batch sequence lengths padded to (1 without FP8); the whole rule, with
    sequence parallelism, is ``config.layout.micro_batch_pad_multiple``."""
    return FP8_PAD_MULTIPLE.get(model.fp8, 1)


def recompute_settings(model: ModelConfig) -> dict[str, Any]:
    """``TransformerConfig`` fields for the recipe's ``model.recompute_*`` keys (empty without recompute)."""
    if model.recompute_granularity is None:
        return {}
    out: dict[str, Any] = dict(recompute_granularity=model.recompute_granularity,
                               recompute_method=model.recompute_method,
                               recompute_num_layers=model.recompute_num_layers)
    if model.recompute_modules is not None:
        if "layernorm" in model.recompute_modules and not has_transformer_engine():
            # Megatron's CheckpointWithoutOutput, which recomputes the norms, calls Transformer Engine.
            raise RuntimeError("model.recompute_modules includes 'layernorm', which Megatron recomputes through "
                               "Transformer Engine (GPU only); remove it here (core_attn and mlp work anywhere)")
        out["recompute_modules"] = list(model.recompute_modules)
    return out


def fp8_settings(model: ModelConfig) -> dict[str, Any]:
    """``TransformerConfig`` fields for the recipe's ``model.fp8`` (empty without FP8).

    Current-scaling recipes use e4m3 both ways; delayed scaling uses 'hybrid' (e4m3 forward, e5m2
    gradients) with a 1024-step amax history. Nemotron-H keeps its first and last layers in bf16.
    """
    if not model.fp8:
        return {}
    out: dict[str, Any] = dict(fp8="hybrid" if model.fp8 == "delayed" else "e4m3", fp8_recipe=model.fp8)
    if model.fp8 == "delayed":
        out.update(fp8_amax_history_len=1024, fp8_amax_compute_algo="max")
    if model.architecture == "nemotron_h":
        out.update(first_last_layers_bf16=True, num_layers_at_start_in_bf16=1, num_layers_at_end_in_bf16=1)
    return out


def make_transformer_config(model: ModelConfig, parallel: ParallelConfig, **overrides: Any) -> TransformerConfig:
    """The Qwen2-style defaults (RMSNorm, SwiGLU, bias on QKV only); builders pass ``overrides``.

    Fused kernels are off on CPU (they are CUDA-only); results then match across TP/PP layouts
    to fp32 rounding, which the parity tests rely on.
    """
    dtype = torch_dtype(model.params_dtype)
    on_gpu = has_cuda()
    kwargs: dict[str, Any] = dict(
        num_layers=model.num_layers,
        hidden_size=model.hidden_size,
        ffn_hidden_size=model.ffn_hidden_size,
        num_attention_heads=model.num_attention_heads,
        num_query_groups=model.num_query_groups,
        kv_channels=model.kv_channels,
        normalization="RMSNorm",
        layernorm_epsilon=model.norm_epsilon,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=model.add_qkv_bias,
        hidden_dropout=model.hidden_dropout,
        attention_dropout=model.attention_dropout,
        init_method_std=model.init_method_std,
        tensor_model_parallel_size=parallel.tensor_model_parallel_size,
        pipeline_model_parallel_size=parallel.pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=parallel.virtual_pipeline_model_parallel_size,
        context_parallel_size=parallel.context_parallel_size,
        sequence_parallel=parallel.sequence_parallel,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        use_cpu_initialization=not on_gpu,
        perform_initialization=True,
        bias_activation_fusion=on_gpu,
        bias_dropout_fusion=on_gpu,
        masked_softmax_fusion=on_gpu,
        apply_rope_fusion=False,
        gradient_accumulation_fusion=False,
        persist_layer_norm=False,
        deallocate_pipeline_outputs=on_gpu,
        # gloo has no ordering guarantee inside a batched isend/irecv: with PP=2 a rank's next and
        # previous stage are the same peer, and interleaved schedules then swap activations and grads.
        batch_p2p_comm=on_gpu,
        **recompute_settings(model),
    )
    if model.fp8:
        if not has_transformer_engine():
            raise RuntimeError(f"model.fp8={model.fp8!r} runs through Transformer Engine on a GPU, and this "
                               f"machine has no CUDA device or no importable transformer_engine; set model.fp8: null "
                               f"(or install the 'gpu' extra on a GPU machine)")
        kwargs.update(fp8_settings(model))
    kwargs.update(overrides)
    valid = {f.name for f in dataclasses.fields(TransformerConfig)}
    unknown = sorted(set(kwargs) - valid)
    if unknown:
        raise TypeError(f"TransformerConfig has no fields {unknown} in this megatron-core version")
    return TransformerConfig(**kwargs)
