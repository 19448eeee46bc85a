"""Name and layout mapping between Megatron's hybrid (MambaModel) and Hugging Face ``NemotronHForCausalLM``.

Like :mod:`hf_qwen2`, conversions here take and give *full* tensors (TP-merged, as a TP=1 model
holds them); :func:`merge_tp_shards` and :func:`shard_from_hf` add the one thing plain
concatenation gets wrong. Megatron shards every Mamba2 component on its own, so TP rank ``r``
holds ``in_proj`` rows ``[z_r, x_r, B_r, C_r, dt_r]`` and ``conv1d`` channels ``[x_r, B_r, C_r]``;
the full tensors (and HF's) are ``[z, x, B, C, dt]`` and ``[x, B, C]``. ``A_log``, ``D``,
``dt_bias`` and the gated norm are per head or per channel and concatenate as they are.

With that, the layouts agree: ``in_proj``, ``conv1d`` (``[C, 1, 4]``), ``A_log``, ``D``, ``dt_bias``,
``mixer.norm`` (grouped by B/C group in both) and ``out_proj`` copy as is; attention fuses Q/K/V as
in Qwen2 (no bias, no RoPE on either side); the MLP is ``up_proj``/``down_proj`` with squared ReLU.
Every layer's pre-norm is HF's ``layers.N.norm`` whatever the layer type.

HF names are written with the ``backbone.`` prefix of NVIDIA's published checkpoints (what
transformers' ``save_pretrained`` writes; transformers and vLLM both rename it on load); import
also accepts ``model.``.

Two numeric differences from transformers remain (not from the mapping):

* Megatron's gated norm in the mixer always uses eps 1e-5, transformers uses ``layer_norm_epsilon``
  (= ``model.norm_epsilon``, 1e-5 in Nemotron-H): a warning names any other value.
* transformers (5.x) clamps each Mamba step size ``softplus(dt + dt_bias)`` from below at
  ``time_step_min`` (0.001); Megatron and vLLM do not clamp. Only steps below 0.001 differ, yet on
  the random tiny test model that moved logits by ~1e-2 (tests/models/test_hf_nemotron_h.py).
"""

from __future__ import annotations

import logging
import re
from typing import Any

import torch

from igrpo_megatron.config.model import ModelConfig
from igrpo_megatron.models import hf_qwen2
from igrpo_megatron.models.hf_qwen2 import DIRECT, QKV, MappedParam
from igrpo_megatron.models.hybrid import PIPE, mamba_num_heads

logger = logging.getLogger(__name__)

IN_PROJ, CONV = "mamba_in_proj", "mamba_conv"
HF_PREFIX, HF_ALT_PREFIX = "backbone.", "model."
MEGATRON_MAMBA_NORM_EPS = 1e-5  # MambaMixer builds its gated RMSNorm with eps=1e-5 whatever the config
CONV_KERNEL = 4  # MambaMixer's d_conv (MambaLayer never changes it)

# Megatron name inside a layer -> (kind, HF names inside ``layers.N``). Local and TE specs differ
# only in where each layer's pre-norm lives, so both spellings are listed.
_LAYER_MAP: dict[str, tuple[str, tuple[str, ...]]] = {
    # Mamba2 layer ('M')
    "norm.weight": (DIRECT, ("norm.weight",)),
    "mixer.in_proj.layer_norm_weight": (DIRECT, ("norm.weight",)),
    "mixer.in_proj.weight": (IN_PROJ, ("mixer.in_proj.weight",)),
    "mixer.conv1d.weight": (CONV, ("mixer.conv1d.weight",)),
    "mixer.conv1d.bias": (CONV, ("mixer.conv1d.bias",)),
    "mixer.conv1d_weight": (CONV, ("mixer.conv1d.weight",)),  # megatron-core >= 0.17: bare parameters
    "mixer.conv1d_bias": (CONV, ("mixer.conv1d.bias",)),
    "mixer.dt_bias": (DIRECT, ("mixer.dt_bias",)),
    "mixer.A_log": (DIRECT, ("mixer.A_log",)),
    "mixer.D": (DIRECT, ("mixer.D",)),
    "mixer.norm.weight": (DIRECT, ("mixer.norm.weight",)),
    "mixer.out_proj.weight": (DIRECT, ("mixer.out_proj.weight",)),
    # attention layer ('*')
    "input_layernorm.weight": (DIRECT, ("norm.weight",)),
    "self_attention.linear_qkv.layer_norm_weight": (DIRECT, ("norm.weight",)),
    "self_attention.linear_qkv.weight": (QKV, ("mixer.q_proj.weight", "mixer.k_proj.weight",
                                               "mixer.v_proj.weight")),
    "self_attention.linear_proj.weight": (DIRECT, ("mixer.o_proj.weight",)),
    # MLP layer ('-')
    "pre_mlp_layernorm.weight": (DIRECT, ("norm.weight",)),
    "mlp.linear_fc1.layer_norm_weight": (DIRECT, ("norm.weight",)),
    "mlp.linear_fc1.weight": (DIRECT, ("mixer.up_proj.weight",)),
    "mlp.linear_fc2.weight": (DIRECT, ("mixer.down_proj.weight",)),
}
_TOP_MAP: dict[str, str] = {
    "embedding.word_embeddings.weight": "embeddings.weight",
    "decoder.final_norm.weight": "norm_f.weight",
}
_LAYER_RE = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")

# HF ``layers_block_type`` entries <-> hybrid_pattern symbols ('E': MoE, which the builder lacks).
_BLOCK_SYMBOL = {"linear_attention": "M", "full_attention": "*", "mlp": "-", "moe": "E"}
_SYMBOL_BLOCK = {v: k for k, v in _BLOCK_SYMBOL.items()}


def map_param(local_name: str, global_layer: int | None) -> MappedParam:
    """Map a chunk-local Megatron name; ``global_layer`` is the 0-based layer index in the full model."""
    match = _LAYER_RE.match(local_name)
    if match:
        suffix = match.group(2)
        if suffix not in _LAYER_MAP or global_layer is None:
            raise KeyError(f"no Hugging Face NemotronH name for Megatron parameter {local_name!r}")
        kind, names = _LAYER_MAP[suffix]
        return MappedParam(local_name, kind, tuple(f"{HF_PREFIX}layers.{global_layer}.{n}" for n in names))
    if local_name == "output_layer.weight":
        return MappedParam(local_name, DIRECT, ("lm_head.weight",))
    if local_name not in _TOP_MAP:
        raise KeyError(f"no Hugging Face NemotronH name for Megatron parameter {local_name!r}")
    return MappedParam(local_name, DIRECT, (HF_PREFIX + _TOP_MAP[local_name],))


def hf_aliases(hf_name: str) -> tuple[str, ...]:
    """Names a checkpoint may use for ``hf_name``: ``backbone.*`` (NVIDIA's) or ``model.*``."""
    if hf_name.startswith(HF_PREFIX):
        return hf_name, HF_ALT_PREFIX + hf_name[len(HF_PREFIX):]
    return (hf_name,)


def _sections(kind: str, cfg: ModelConfig) -> list[int]:
    """Full sizes of the Mamba components stacked along dim 0 of ``in_proj`` / ``conv1d``."""
    heads = mamba_num_heads(cfg)
    d_inner = heads * cfg.mamba_head_dim
    bc = cfg.mamba_num_groups * cfg.mamba_state_dim
    if kind == IN_PROJ:
        return [d_inner, d_inner, bc, bc, heads]  # z, x, B, C, dt
    if kind == CONV:
        return [d_inner, bc, bc]  # x, B, C
    raise ValueError(f"{kind!r} is not a per-component Mamba kind")


def merge_tp_shards(kind: str, shards: list[torch.Tensor], cfg: ModelConfig, partition_dim: int) -> torch.Tensor:
    """TP shards (in rank order) -> the full Megatron tensor, component by component where needed."""
    if len(shards) == 1:
        return shards[0]
    if kind not in (IN_PROJ, CONV):
        return torch.cat(shards, dim=partition_dim)
    tp = len(shards)
    local = [size // tp for size in _sections(kind, cfg)]
    pieces = [shard.split(local, dim=0) for shard in shards]  # [rank][component]
    return torch.cat([torch.cat([p[c] for p in pieces], dim=0) for c in range(len(local))], dim=0)


def split_full(kind: str, full: torch.Tensor, cfg: ModelConfig) -> list[torch.Tensor]:
    """Full Megatron tensor -> HF tensors (in the order of ``MappedParam.hf_names``)."""
    if kind in (DIRECT, IN_PROJ, CONV):
        return [full]
    if kind == QKV:
        return hf_qwen2.split_full(QKV, full, cfg)
    raise ValueError(f"unknown mapping kind {kind!r}")


def shard_from_hf(kind: str, hf: list[torch.Tensor], cfg: ModelConfig, *, tp_rank: int, tp_size: int,
                  partition_dim: int | None) -> torch.Tensor:
    """HF tensors -> this TP rank's shard of the Megatron parameter."""
    if kind not in (IN_PROJ, CONV):
        return hf_qwen2.shard_from_hf(kind, hf, cfg, tp_rank=tp_rank, tp_size=tp_size, partition_dim=partition_dim)
    (full,) = hf
    sections = _sections(kind, cfg)
    if full.shape[0] != sum(sections):
        raise ValueError(f"{kind}: HF tensor has {full.shape[0]} rows, the recipe's Mamba sizes give "
                         f"{sum(sections)} ({sections})")
    if partition_dim is None or tp_size == 1:
        return full
    return torch.cat([part.chunk(tp_size, dim=0)[tp_rank] for part in full.split(sections, dim=0)], dim=0)


def _warn_norm_eps(eps: float) -> None:
    if eps != MEGATRON_MAMBA_NORM_EPS:
        logger.warning("norm_epsilon=%g: transformers' Mamba gated norm uses it, Megatron's always uses %g, so "
                       "Mamba layers differ slightly between the two; Nemotron-H uses 1e-5", eps,
                       MEGATRON_MAMBA_NORM_EPS)


def hf_config(cfg: ModelConfig) -> dict[str, Any]:
    """``config.json`` for ``NemotronHForCausalLM`` with this model's sizes (transformers >= 5 layout)."""
    _warn_norm_eps(cfg.norm_epsilon)
    pattern = (cfg.hybrid_pattern or "").replace(PIPE, "")
    return {
        "architectures": ["NemotronHForCausalLM"],
        "model_type": "nemotron_h",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "layers_block_type": [_SYMBOL_BLOCK[s] for s in pattern],
        "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.num_query_groups,
        "head_dim": cfg.kv_channels or cfg.hidden_size // cfg.num_attention_heads,
        "attention_bias": False,
        "intermediate_size": cfg.ffn_hidden_size,
        "mlp_hidden_act": "relu2",
        "mlp_bias": False,
        "ssm_state_size": cfg.mamba_state_dim,
        "mamba_num_heads": mamba_num_heads(cfg),
        "mamba_head_dim": cfg.mamba_head_dim,
        "n_groups": cfg.mamba_num_groups,
        "conv_kernel": CONV_KERNEL,
        "use_conv_bias": True,
        "use_bias": False,
        "mamba_proj_bias": False,
        "mamba_hidden_act": "silu",
        "chunk_size": 128,
        "layer_norm_epsilon": cfg.norm_epsilon,
        "max_position_embeddings": cfg.max_position_embeddings,
        "tie_word_embeddings": not cfg.untie_embeddings_and_output_weights,
        "residual_in_fp32": False,
        "num_nextn_predict_layers": 0,
        "hidden_dropout": 0.0,
        "attention_dropout": 0.0,
        "initializer_range": cfg.init_method_std,
        "torch_dtype": cfg.params_dtype,
        "use_cache": True,
    }


def _get(hf: dict[str, Any], keys: tuple[str, ...], default: Any) -> Any:
    """First of ``keys`` present in ``hf`` (older configs spell some Mamba keys ``mamba_*``)."""
    return next((hf[k] for k in keys if k in hf), default)


def _pattern_from_hf(hf: dict[str, Any]) -> str:
    blocks = hf.get("layers_block_type")
    if blocks is None:
        if "hybrid_override_pattern" not in hf:
            raise ValueError("config.json has neither layers_block_type nor hybrid_override_pattern")
        return hf["hybrid_override_pattern"]
    unknown = sorted(set(blocks) - set(_BLOCK_SYMBOL))
    if unknown:
        raise ValueError(f"layers_block_type has unknown layer types {unknown}")
    return "".join(_BLOCK_SYMBOL[b] for b in blocks)


def _check_supported(hf: dict[str, Any], pattern: str) -> None:
    """Raise ValueError naming the HF key of a feature the Megatron hybrid does not build."""
    fixed = {
        ("mlp_hidden_act",): "relu2", ("mamba_hidden_act",): "silu",
        ("conv_kernel", "mamba_d_conv"): CONV_KERNEL, ("use_conv_bias", "mamba_conv_bias"): True,
        ("use_bias",): False, ("mamba_proj_bias",): False, ("attention_bias",): False, ("mlp_bias",): False,
    }
    for keys, want in fixed.items():
        have = _get(hf, keys, want)
        if have != want:
            raise ValueError(f"{keys[0]}={have!r} is not supported: the Megatron hybrid builds {keys[0]}={want!r}")
    if "E" in pattern:
        raise ValueError(f"layers_block_type has MoE layers (pattern {pattern!r}); the hybrid builder has "
                         "no MoE ('E') layers")
    if hf.get("num_nextn_predict_layers", 0):
        logger.warning("num_nextn_predict_layers=%s: multi-token-prediction weights are not loaded",
                       hf["num_nextn_predict_layers"])


def model_config_from_hf(hf: dict[str, Any], base: ModelConfig) -> dict[str, Any]:
    """Recipe ``model`` fields implied by a NemotronH ``config.json`` (used to check a recipe against it).

    Where the recipe leaves a size to its default (``kv_channels``, ``mamba_num_heads``: null) or
    marks pipeline stages in ``hybrid_pattern`` (``|``), an equal HF value is reported in the
    recipe's own spelling, so only real differences show. Raises ValueError for unsupported features.
    """
    pattern = _pattern_from_hf(hf)
    _check_supported(hf, pattern)
    required = ("vocab_size", "hidden_size", "intermediate_size", "num_attention_heads", "ssm_state_size",
                "mamba_head_dim", "mamba_num_heads")
    absent = [k for k in required if k not in hf]
    if absent:
        raise ValueError(f"keys {absent} missing; is it a NemotronH config.json?")
    hidden, heads = hf["hidden_size"], hf["num_attention_heads"]
    head_dim = hf.get("head_dim") or hidden // heads
    mamba_head_dim = hf["mamba_head_dim"]
    m_heads = hf["mamba_num_heads"]
    eps = hf.get("layer_norm_epsilon", base.norm_epsilon)
    _warn_norm_eps(eps)
    same_pattern = (base.hybrid_pattern or "").replace(PIPE, "") == pattern
    return {
        "vocab_size": hf["vocab_size"],
        "hidden_size": hidden,
        "ffn_hidden_size": hf["intermediate_size"],
        "num_layers": len(pattern),
        "hybrid_pattern": base.hybrid_pattern if same_pattern else pattern,
        "num_attention_heads": heads,
        "num_query_groups": hf.get("num_key_value_heads") or heads,
        "kv_channels": None if base.kv_channels is None and head_dim == hidden // heads else head_dim,
        "mamba_state_dim": hf["ssm_state_size"],
        "mamba_head_dim": mamba_head_dim,
        "mamba_num_groups": _get(hf, ("n_groups", "mamba_n_groups"), 8),
        "mamba_num_heads": (None if base.mamba_num_heads is None and m_heads == 2 * hidden // mamba_head_dim
                            else m_heads),
        "norm_epsilon": eps,
        "untie_embeddings_and_output_weights": not hf.get("tie_word_embeddings", False),
    }
