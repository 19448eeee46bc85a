"""Qwen2-style GPT on Megatron-Core (R1-Distill-Qwen-7B, OpenReasoning-Nemotron-7B, tiny CPU models).

RMSNorm, SwiGLU MLP, bias on the QKV projection only, RoPE with a configurable base,
grouped-query attention, tied or untied embeddings. With sequence parallelism on the local spec
(CPU), every norm is :class:`~igrpo_megatron.models.norms.LocalRMSNorm`; the Transformer Engine
spec is used unchanged.
"""

from __future__ import annotations

import dataclasses
import logging

import torch
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules, get_num_layers_to_build

from igrpo_megatron.config.model import ModelConfig, ParallelConfig
from igrpo_megatron.models.capability import use_transformer_engine
from igrpo_megatron.models.norms import LocalRMSNorm
from igrpo_megatron.models.transformer_config import make_transformer_config

logger = logging.getLogger(__name__)


def gpt_layer_spec(model: ModelConfig) -> ModuleSpec:
    """Transformer Engine spec when TE and a GPU are there, Megatron's local spec otherwise."""
    if use_transformer_engine(model.transformer_impl):
        from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_with_transformer_engine_spec

        return get_gpt_layer_with_transformer_engine_spec(qk_layernorm=False)
    return get_gpt_layer_local_spec(qk_layernorm=False, normalization="RMSNorm")


def sequence_parallel_local_spec(layer: ModuleSpec, config: TransformerConfig,
                                 vp_stage: int | None) -> TransformerBlockSubmodules:
    """The local spec with :class:`LocalRMSNorm` for every norm (the two per layer and the final one).

    Megatron's local norm refuses sequence parallelism, and a bare layer spec gets the block's
    final norm from Megatron's default, so the block is spelled out here: this stage's layers
    (as many as Megatron builds for it) and the final norm.
    """
    layer = dataclasses.replace(layer, submodules=dataclasses.replace(
        layer.submodules, input_layernorm=LocalRMSNorm, pre_mlp_layernorm=LocalRMSNorm))
    return TransformerBlockSubmodules(layer_specs=[layer] * get_num_layers_to_build(config, vp_stage=vp_stage),
                                      layer_norm=LocalRMSNorm)


def build_gpt(
    model: ModelConfig,
    parallel: ParallelConfig,
    *,
    pre_process: bool = True,
    post_process: bool = True,
    vp_stage: int | None = None,
) -> GPTModel:
    """One Megatron ``GPTModel`` chunk (a pipeline stage, or a virtual stage when ``vp_stage`` is set)."""
    config = make_transformer_config(model, parallel)
    spec: ModuleSpec | TransformerBlockSubmodules = gpt_layer_spec(model)
    if (parallel.sequence_parallel or config.params_dtype != torch.float32) and \
            not use_transformer_engine(model.transformer_impl):
        spec = sequence_parallel_local_spec(spec, config, vp_stage)  # its norm: SP and the model's dtype
    logger.debug("building qwen2 GPT: %d layers, hidden %d", model.num_layers, model.hidden_size)
    return GPTModel(
        config=config,
        transformer_layer_spec=spec,
        vocab_size=model.vocab_size,
        max_sequence_length=model.max_position_embeddings,
        pre_process=pre_process,
        post_process=post_process,
        parallel_output=True,  # logits stay vocab-sharded [.., V/TP]; log-probs are computed sharded
        share_embeddings_and_output_weights=not model.untie_embeddings_and_output_weights,
        position_embedding_type="rope",
        rotary_base=int(model.rotary_base),
        vp_stage=vp_stage,
    )
