"""Name and layout mapping between Megatron's GPTModel and Hugging Face ``Qwen2ForCausalLM``.

Only *full* (TP-merged) tensors are handled here; gathering and scattering shards is the job of
``weight_export`` / ``hf_io``. Three layouts differ between the two:

* QKV: Megatron fuses them as ``[groups, q_per_group + 2, head, hidden]`` (each query group's
  queries, then its key, then its value); HF keeps ``q_proj``, ``k_proj``, ``v_proj``.
* SwiGLU: Megatron's ``linear_fc1`` stacks gate over up *per TP rank*; HF keeps ``gate_proj``
  and ``up_proj``.

The vocabulary is never padded: ``vocab_size`` must divide by TP (checked by the runtime), so that
the trainer's softmax runs over exactly the tokens vLLM samples from.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import torch

from igrpo_megatron.config.model import ModelConfig

DIRECT, QKV, GLU = "direct", "qkv", "glu"

# Megatron name inside a layer -> (kind, HF names inside layer). Local and TE specs differ only in
# where the norms live, so both spellings are listed.
_LAYER_MAP: dict[str, tuple[str, tuple[str, ...]]] = {
    "input_layernorm.weight": (DIRECT, ("input_layernorm.weight",)),
    "self_attention.linear_qkv.layer_norm_weight": (DIRECT, ("input_layernorm.weight",)),
    "self_attention.linear_qkv.weight": (QKV, ("self_attn.q_proj.weight", "self_attn.k_proj.weight",
                                               "self_attn.v_proj.weight")),
    "self_attention.linear_qkv.bias": (QKV, ("self_attn.q_proj.bias", "self_attn.k_proj.bias",
                                             "self_attn.v_proj.bias")),
    "self_attention.linear_proj.weight": (DIRECT, ("self_attn.o_proj.weight",)),
    "pre_mlp_layernorm.weight": (DIRECT, ("post_attention_layernorm.weight",)),
    "mlp.linear_fc1.layer_norm_weight": (DIRECT, ("post_attention_layernorm.weight",)),
    "mlp.linear_fc1.weight": (GLU, ("mlp.gate_proj.weight", "mlp.up_proj.weight")),
    "mlp.linear_fc2.weight": (DIRECT, ("mlp.down_proj.weight",)),
}
_TOP_MAP: dict[str, tuple[str, tuple[str, ...]]] = {
    "embedding.word_embeddings.weight": (DIRECT, ("model.embed_tokens.weight",)),
    "decoder.final_layernorm.weight": (DIRECT, ("model.norm.weight",)),
    "output_layer.weight": (DIRECT, ("lm_head.weight",)),
}
_LAYER_RE = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")


@dataclass(frozen=True)
class MappedParam:
    """One Megatron parameter and the HF tensors it corresponds to."""

    megatron_name: str      # local name in the chunk, e.g. decoder.layers.0.mlp.linear_fc1.weight
    kind: str               # DIRECT | QKV | GLU
    hf_names: tuple[str, ...]


def map_param(local_name: str, global_layer: int | None) -> MappedParam:
    """Map a chunk-local Megatron name; ``global_layer`` is the 0-based layer index in the full model."""
    match = _LAYER_RE.match(local_name)
    if match:
        suffix = match.group(2)
        if suffix not in _LAYER_MAP or global_layer is None:
            raise KeyError(f"no Hugging Face Qwen2 name for Megatron parameter {local_name!r}")
        kind, names = _LAYER_MAP[suffix]
        return MappedParam(local_name, kind, tuple(f"model.layers.{global_layer}.{n}" for n in names))
    if local_name not in _TOP_MAP:
        raise KeyError(f"no Hugging Face Qwen2 name for Megatron parameter {local_name!r}")
    kind, names = _TOP_MAP[local_name]
    return MappedParam(local_name, kind, names)


def _qkv_dims(cfg: ModelConfig) -> tuple[int, int, int]:
    head = cfg.kv_channels or cfg.hidden_size // cfg.num_attention_heads
    return cfg.num_query_groups, cfg.num_attention_heads // cfg.num_query_groups, head


def split_full(kind: str, full: torch.Tensor, cfg: ModelConfig, glu_shards: list[torch.Tensor] | None = None
               ) -> list[torch.Tensor]:
    """Full Megatron tensor -> HF tensors (in the order of ``MappedParam.hf_names``).

    For GLU pass the per-TP-rank shards in ``glu_shards`` (the gate/up stacking is per rank).
    """
    if kind == DIRECT:
        return [full]
    if kind == QKV:
        groups, q_per_group, head = _qkv_dims(cfg)
        rest = full.shape[1:]
        grouped = full.reshape(groups, q_per_group + 2, head, *rest)
        q = grouped[:, :q_per_group].reshape(groups * q_per_group * head, *rest)
        k = grouped[:, q_per_group].reshape(groups * head, *rest)
        v = grouped[:, q_per_group + 1].reshape(groups * head, *rest)
        return [q, k, v]
    if kind == GLU:
        shards = glu_shards if glu_shards is not None else [full]
        gates = [s[: s.shape[0] // 2] for s in shards]
        ups = [s[s.shape[0] // 2:] for s in shards]
        return [torch.cat(gates), torch.cat(ups)]
    raise ValueError(f"unknown mapping kind {kind!r}")


def shard_from_hf(kind: str, hf: list[torch.Tensor], cfg: ModelConfig, *, tp_rank: int, tp_size: int,
                  partition_dim: int | None) -> torch.Tensor:
    """HF tensors -> this TP rank's shard of the Megatron parameter."""
    if kind == GLU:
        gate, up = (t.chunk(tp_size, dim=0)[tp_rank] for t in hf)
        return torch.cat([gate, up])
    if kind == QKV:
        groups, q_per_group, head = _qkv_dims(cfg)
        q, k, v = hf
        rest = q.shape[1:]
        full = torch.cat([q.reshape(groups, q_per_group, head, *rest), k.reshape(groups, 1, head, *rest),
                          v.reshape(groups, 1, head, *rest)], dim=1).reshape(-1, *rest)
    else:
        (full,) = hf
    if partition_dim is None or tp_size == 1:
        return full
    return full.chunk(tp_size, dim=partition_dim)[tp_rank]


def hf_config(cfg: ModelConfig) -> dict[str, Any]:
    """``config.json`` for ``Qwen2ForCausalLM`` with this model's sizes."""
    head = cfg.kv_channels or cfg.hidden_size // cfg.num_attention_heads
    return {
        "architectures": ["Qwen2ForCausalLM"],
        "model_type": "qwen2",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.ffn_hidden_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.num_query_groups,
        "head_dim": head,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.max_position_embeddings,
        "rms_norm_eps": cfg.norm_epsilon,
        "rope_theta": float(cfg.rotary_base),
        "tie_word_embeddings": not cfg.untie_embeddings_and_output_weights,
        "use_sliding_window": False,
        "attention_dropout": 0.0,
        "initializer_range": cfg.init_method_std,
        "torch_dtype": cfg.params_dtype,
        "use_cache": True,
    }


def model_config_from_hf(hf: dict[str, Any], base: ModelConfig) -> dict[str, Any]:
    """Recipe ``model`` fields implied by a Qwen2 ``config.json`` (used to check a recipe against it)."""
    return {
        "vocab_size": hf["vocab_size"],
        "hidden_size": hf["hidden_size"],
        "ffn_hidden_size": hf["intermediate_size"],
        "num_layers": hf["num_hidden_layers"],
        "num_attention_heads": hf["num_attention_heads"],
        "num_query_groups": hf.get("num_key_value_heads", hf["num_attention_heads"]),
        "rotary_base": float(hf.get("rope_theta", base.rotary_base)),
        "norm_epsilon": hf.get("rms_norm_eps", base.norm_epsilon),
        "untie_embeddings_and_output_weights": not hf.get("tie_word_embeddings", False),
    }
