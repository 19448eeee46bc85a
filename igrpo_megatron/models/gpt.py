"""Qwen2-style GPT on Megatron-Core (R1-Distill-Qwen-7B, OpenReasoning-Nemotron-7B, tiny CPU models).

RMSNorm, SwiGLU MLP, bias on the QKV projection only, RoPE with a configurable base,
grouped-query attention, tied or untied embeddings.
"""

from __future__ import annotations

import logging

from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.transformer.spec_utils import ModuleSpec

from igrpo_megatron.config.model import ModelConfig, ParallelConfig
from igrpo_megatron.models.capability import use_transformer_engine
from igrpo_megatron.models.transformer_config import make_transformer_config

logger = logging.getLogger(__name__)


def gpt_layer_spec(model: ModelConfig) -> ModuleSpec:
    """Transformer Engine spec when TE and a GPU are there, Megatron's local spec otherwise."""
    if use_transformer_engine(model.transformer_impl):
        from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_with_transformer_engine_spec

        return get_gpt_layer_with_transformer_engine_spec(qk_layernorm=False)
    return get_gpt_layer_local_spec(qk_layernorm=False, normalization="RMSNorm")


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
    logger.debug("building qwen2 GPT: %d layers, hidden %d", model.num_layers, model.hidden_size)
    return GPTModel(
        config=config,
        transformer_layer_spec=gpt_layer_spec(model),
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
