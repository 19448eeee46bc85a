"""Nemotron-H-style hybrid Mamba-Transformer on Megatron-Core (Nemotron-H-8B, tiny CPU models).

``model.hybrid_pattern`` has one character per layer: ``M`` a Mamba2 mixer, ``*`` self-attention
(no MLP), ``-`` an MLP (squared ReLU, no gate, no bias). Every layer is pre-norm (RMSNorm) with
a residual; there is no position embedding (the Mamba layers carry order); a final RMSNorm and,
by default, an untied output layer close the stack. On megatron-core >= 0.17 a ``|`` in the
pattern marks a pipeline-stage boundary.

Layer specs: Megatron's own Transformer Engine spec when TE and CUDA are there, otherwise a
local spec of Megatron-Core modules (torch RMSNorm, Column/RowParallelLinear, DotProductAttention).
Parameter names differ between the two (fused ``layer_norm_weight`` vs a separate norm), and the
local spec maps its names onto the TE ones in ``sharded_state_dict``, so distributed checkpoints
load across both.

Where ``mamba_ssm`` cannot run (no CUDA, or not installed), :func:`build_hybrid` first installs
the pure-PyTorch kernels of :mod:`igrpo_megatron.models.cpu_kernels`.

Limitations of the local spec (CPU): no context parallelism (local attention does not), no
packed sequences (CPU kernels). Sequence parallelism works: its norms are
:class:`~igrpo_megatron.models.norms.LocalRMSNorm`. On megatron-core 0.16, pipeline stages split
the layers evenly, there is no virtual pipeline, and the stack cannot recompute whole layers
(``model.recompute_granularity=full`` is refused there; selective works).
"""

from __future__ import annotations

import logging
from typing import Any

from igrpo_megatron.config.layout import check_layout, mamba_num_heads  # noqa: F401 (re-exported)
from igrpo_megatron.config.model import HYBRID_PIPE, ModelConfig, ParallelConfig
from igrpo_megatron.models import compat
from igrpo_megatron.models.capability import use_transformer_engine

logger = logging.getLogger(__name__)

PIPE = HYBRID_PIPE


def check_hybrid_config(model: ModelConfig, parallel: ParallelConfig) -> None:
    """Raise ValueError (a LayoutError) naming the key and the fix for a layout Megatron would reject."""
    check_layout(model, parallel)


def _check_local_spec_limits(parallel: ParallelConfig) -> None:
    if parallel.context_parallel_size > 1:
        raise ValueError("parallel.context_parallel_size > 1 needs the Transformer Engine spec (GPU); the "
                         "local hybrid spec (CPU) has no context-parallel attention: set it to 1")


def hybrid_config_overrides(model: ModelConfig) -> dict[str, Any]:
    """What the hybrid changes in the shared ``TransformerConfig`` (Nemotron-H has no biases)."""
    from megatron.core.activations import squared_relu

    return dict(
        is_hybrid_model=True,
        gated_linear_unit=False,
        activation_func=squared_relu,
        add_qkv_bias=False,
        bias_activation_fusion=False,  # Megatron fuses only GeLU / SwiGLU
        mamba_state_dim=model.mamba_state_dim,
        mamba_head_dim=model.mamba_head_dim,
        mamba_num_groups=model.mamba_num_groups,
        mamba_num_heads=model.mamba_num_heads,
    )


def local_hybrid_stack_spec(api: compat.HybridApi) -> Any:
    """Stack spec from Megatron-Core modules only (no Transformer Engine): runs on CPU."""
    from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
    from megatron.core.ssm.mamba_layer import MambaLayer, MambaLayerSubmodules
    from megatron.core.ssm.mamba_mixer import MambaMixer, MambaMixerSubmodules
    from megatron.core.ssm.mlp_layer import MLPLayer
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
    from megatron.core.transformer.attention import SelfAttention, SelfAttentionSubmodules
    from megatron.core.transformer.dot_product_attention import DotProductAttention
    from megatron.core.transformer.enums import AttnMaskType
    from megatron.core.transformer.mlp import MLP, MLPSubmodules
    from megatron.core.transformer.spec_utils import ModuleSpec
    from megatron.core.transformer.transformer_layer import TransformerLayer, TransformerLayerSubmodules

    norm = compat.HybridRMSNorm
    mamba_layer = ModuleSpec(module=MambaLayer, submodules=MambaLayerSubmodules(
        norm=norm,
        mixer=ModuleSpec(module=MambaMixer, submodules=MambaMixerSubmodules(
            in_proj=ColumnParallelLinear, out_proj=RowParallelLinear)),
        mamba_bda=get_bias_dropout_add,
        sharded_state_dict_keys_map={"norm.": "mixer.in_proj.layer_norm_"},
    ))
    attention_layer = ModuleSpec(module=TransformerLayer, submodules=TransformerLayerSubmodules(
        input_layernorm=norm,
        self_attention=ModuleSpec(
            module=SelfAttention, params={"attn_mask_type": AttnMaskType.causal},
            submodules=SelfAttentionSubmodules(
                linear_qkv=ColumnParallelLinear, core_attention=DotProductAttention,
                linear_proj=RowParallelLinear)),
        self_attn_bda=get_bias_dropout_add,
        sharded_state_dict_keys_map={"input_layernorm.": "self_attention.linear_qkv.layer_norm_"},
    ))
    mlp_layer = ModuleSpec(module=MLPLayer, submodules=TransformerLayerSubmodules(
        pre_mlp_layernorm=norm,
        mlp=ModuleSpec(module=MLP, submodules=MLPSubmodules(
            linear_fc1=ColumnParallelLinear, linear_fc2=RowParallelLinear)),
        mlp_bda=get_bias_dropout_add,
        sharded_state_dict_keys_map={"pre_mlp_layernorm.": "mlp.linear_fc1.layer_norm_"},
    ))
    return ModuleSpec(
        module=compat.local_norm_stack(api.stack_cls),
        submodules=api.stack_submodules_cls(
            mamba_layer=mamba_layer, attention_layer=attention_layer, mlp_layer=mlp_layer),
    )


def _ensure_mamba_kernels() -> None:
    """Install the CPU kernels where ``mamba_ssm`` cannot run; check Megatron's mixer sees kernels."""
    from igrpo_megatron.models.cpu_kernels import install_cpu_mamba_kernels

    if install_cpu_mamba_kernels():
        logger.info("hybrid model uses the pure-PyTorch Mamba2 reference kernels")
    import megatron.core.ssm.mamba_mixer as mixer

    if not mixer.HAVE_MAMBA_SSM:
        raise RuntimeError("Megatron's Mamba mixer found no mamba_ssm kernels; install the 'gpu' extra "
                           "(mamba-ssm, causal-conv1d) or run without CUDA to use the CPU kernels")
    compat.use_cpu_decode_kernels(mixer)


def build_hybrid(
    model: ModelConfig,
    parallel: ParallelConfig,
    *,
    pre_process: bool = True,
    post_process: bool = True,
    vp_stage: int | None = None,
) -> Any:
    """One hybrid model chunk (``MambaModel`` on megatron-core <= 0.17, ``HybridModel`` after)."""
    from igrpo_megatron.models.transformer_config import make_transformer_config

    check_hybrid_config(model, parallel)
    use_te = use_transformer_engine(model.transformer_impl)
    if not use_te:
        _check_local_spec_limits(parallel)
    _ensure_mamba_kernels()
    api = compat.hybrid_api()
    if model.recompute_granularity == "full" and not compat.stack_recomputes_layers(api.stack_cls):
        raise ValueError(f"model.recompute_granularity=full: this megatron-core's {api.stack_cls.__name__} does "
                         "not recompute hybrid layers (megatron-core >= 0.19's HybridStack does); use "
                         "model.recompute_granularity=selective (attention and MLP layers) or null")
    if PIPE in model.hybrid_pattern and not api.pipe_separators:
        raise ValueError(f"model.hybrid_pattern={model.hybrid_pattern!r} uses '|' (pipeline stages), which "
                         "needs megatron-core >= 0.17; remove the '|' (stages then split layers evenly)")
    config = make_transformer_config(model, parallel, **hybrid_config_overrides(model))
    stack_spec = api.te_stack_spec() if use_te else local_hybrid_stack_spec(api)
    logger.debug("building hybrid %s (%s spec) with pattern %r", api.model_cls.__name__,
                 "TE" if use_te else "local", model.hybrid_pattern)
    return api.model_cls(
        config=config,
        vocab_size=model.vocab_size,
        max_sequence_length=model.max_position_embeddings,
        pre_process=pre_process,
        post_process=post_process,
        parallel_output=True,  # logits stay vocab-sharded [.., V/TP], as for the GPT builder
        share_embeddings_and_output_weights=not model.untie_embeddings_and_output_weights,
        position_embedding_type="none",
        **api.model_kwargs(stack_spec, model.hybrid_pattern, vp_stage),
    )
