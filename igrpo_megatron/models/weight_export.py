"""Stream a TP/PP-sharded Megatron model out as full Hugging Face tensors, one at a time.

Every rank of the first data-parallel replica takes part (the others return at once: their
weights are identical). For each parameter, in a global order all ranks agree on, the TP ranks
of the stage that holds it all-gather the shards, the stage's TP-rank 0 converts them to HF
layout and, when it is not global rank 0, sends the pieces there. Only global rank 0
yields ``(hf_name, tensor)`` pairs. Peak extra memory is one full parameter (plus its shards),
so a consumer that writes or sends in bounded buckets keeps the whole export bounded.

The name/layout mapping is picked by ``model.architecture`` (:func:`hf_mapping`): ``qwen2``
(:mod:`hf_qwen2`) or ``nemotron_h`` (:mod:`hf_nemotron_h`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from igrpo_megatron.config.model import ModelConfig
from igrpo_megatron.models import hf_nemotron_h, hf_qwen2, unwrap
from igrpo_megatron.models.hf_qwen2 import MappedParam

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class HFMapping:
    """What export and import need from one architecture's mapping (one interface for both families)."""

    map_param: Callable[[str, int | None], MappedParam]
    # (kind, TP shards in rank order, partition dim, cfg) -> HF tensors in MappedParam.hf_names order
    to_hf: Callable[[str, list[torch.Tensor], int, ModelConfig], list[torch.Tensor]]
    shard_from_hf: Callable[..., torch.Tensor]
    hf_config: Callable[[ModelConfig], dict[str, Any]]
    model_config_from_hf: Callable[[dict[str, Any], ModelConfig], dict[str, Any]]
    hf_aliases: Callable[[str], tuple[str, ...]]  # names a checkpoint may store one HF tensor under


def _qwen2_to_hf(kind: str, shards: list[torch.Tensor], partition_dim: int, cfg: ModelConfig) -> list[torch.Tensor]:
    full = shards[0] if len(shards) == 1 else torch.cat(shards, dim=partition_dim)
    return hf_qwen2.split_full(kind, full, cfg, glu_shards=shards if kind == hf_qwen2.GLU else None)


def _nemotron_h_to_hf(kind: str, shards: list[torch.Tensor], partition_dim: int,
                      cfg: ModelConfig) -> list[torch.Tensor]:
    full = hf_nemotron_h.merge_tp_shards(kind, shards, cfg, partition_dim)
    return hf_nemotron_h.split_full(kind, full, cfg)


_MAPPINGS = {
    "qwen2": HFMapping(hf_qwen2.map_param, _qwen2_to_hf, hf_qwen2.shard_from_hf,
                       hf_qwen2.hf_config, hf_qwen2.model_config_from_hf, lambda name: (name,)),
    "nemotron_h": HFMapping(hf_nemotron_h.map_param, _nemotron_h_to_hf, hf_nemotron_h.shard_from_hf,
                            hf_nemotron_h.hf_config, hf_nemotron_h.model_config_from_hf,
                            hf_nemotron_h.hf_aliases),
}


def hf_mapping(model_cfg: ModelConfig) -> HFMapping:
    """The HF mapping for ``model.architecture``."""
    if model_cfg.architecture not in _MAPPINGS:
        raise ValueError(f"no Hugging Face mapping for model.architecture={model_cfg.architecture!r}; "
                         f"known: {sorted(_MAPPINGS)}")
    return _MAPPINGS[model_cfg.architecture]


def partition_dim(param: torch.Tensor) -> int | None:
    """The dim a TP-split parameter is split along (None: replicated).

    The Mamba mixer marks ``conv1d``, ``A_log``, ``D``, ``dt_bias`` and its norm TP-split without
    setting ``partition_dim``; they are split along dim 0.
    """
    if not getattr(param, "tensor_model_parallel", False):
        return None
    return getattr(param, "partition_dim", 0)


def _global_layer(module: torch.nn.Module, local_name: str) -> int | None:
    parts = local_name.split(".")
    if len(parts) > 2 and parts[0] == "decoder" and parts[1] == "layers":
        return int(module.decoder.layers[int(parts[2])].layer_number) - 1
    return None


def local_params(chunks: list[torch.nn.Module], model_cfg: ModelConfig) -> list[tuple[MappedParam, torch.nn.Parameter]]:
    """This rank's parameters with their HF mapping (embedding/output appear on their stages only)."""
    mapping = hf_mapping(model_cfg)
    out = []
    for chunk in chunks:
        module = unwrap(chunk)
        for name, param in module.named_parameters():
            out.append((mapping.map_param(name, _global_layer(module, name)), param))
    return out


def _gather_tp(param: torch.Tensor) -> list[torch.Tensor]:
    """This TP group's shards of ``param`` in rank order (just the parameter when it is not split)."""
    tp = parallel_state.get_tensor_model_parallel_world_size()
    if tp == 1 or partition_dim(param) is None:
        return [param.detach()]
    shards = [torch.empty_like(param) for _ in range(tp)]
    dist.all_gather(shards, param.detach().contiguous(), group=parallel_state.get_tensor_model_parallel_group())
    return shards


def _first_replica() -> bool:
    return parallel_state.get_data_parallel_rank() == 0 and parallel_state.get_context_parallel_rank() == 0


def _hf_shapes(mapping: HFMapping, mapped: MappedParam, param: torch.Tensor,
               cfg: ModelConfig) -> list[tuple[int, ...]]:
    """Shapes of the HF tensors a parameter becomes, worked out on the meta device (no data)."""
    tp = parallel_state.get_tensor_model_parallel_world_size()
    dim = partition_dim(param)
    shard = torch.empty(param.shape, device="meta")
    shards = [shard] * (tp if dim is not None and tp > 1 else 1)
    return [tuple(t.shape) for t in mapping.to_hf(mapped.kind, shards, dim or 0, cfg)]


def export_hf_weights(chunks: list[torch.nn.Module], model_cfg: ModelConfig) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield full HF-named tensors on global rank 0; every other rank must iterate too (it yields nothing).

    Tensors come in the model's own dtype, in a fixed order: stage by stage, parameter by parameter.
    """
    mapping = hf_mapping(model_cfg)
    if not _first_replica():
        return
    pp_group = parallel_state.get_pipeline_model_parallel_group()
    pp_rank = parallel_state.get_pipeline_model_parallel_rank()
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    is_root = dist.get_rank() == 0
    mine = local_params(chunks, model_cfg)
    # One global order that every rank agrees on: each stage's (names, HF shapes, dtype), stage by stage.
    meta = [(m.hf_names, _hf_shapes(mapping, m, p, model_cfg), p.dtype) for m, p in mine]
    table: list[Any] = [None] * parallel_state.get_pipeline_model_parallel_world_size()
    dist.all_gather_object(table, meta, group=pp_group)
    root = dist.get_global_rank(pp_group, 0)
    own = iter(mine)
    for stage, entries in enumerate(table):
        src = dist.get_global_rank(pp_group, stage)
        for hf_names, shapes, dtype in entries:
            tensors: list[torch.Tensor] | None = None
            if stage == pp_rank:
                mapped, param = next(own)
                shards = _gather_tp(param)
                if tp_rank == 0:
                    tensors = mapping.to_hf(mapped.kind, shards, partition_dim(param) or 0, model_cfg)
                    if not is_root:
                        for t in tensors:
                            dist.send(t.contiguous(), dst=root)
            elif is_root:
                tensors = []
                for shape in shapes:
                    buf = torch.empty(shape, dtype=dtype)
                    dist.recv(buf, src=src)
                    tensors.append(buf)
            if is_root:
                yield from zip(hf_names, tensors, strict=True)
