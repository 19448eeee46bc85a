"""Stream a TP/PP-sharded Megatron model out as full Hugging Face tensors, one at a time.

Every rank of the first data-parallel replica takes part (the others return at once: their
weights are identical). For each parameter, in a global order all ranks agree on, the TP ranks
of the stage that holds it all-gather the shards, the stage's TP-rank 0 converts the full tensor
to HF layout and, when it is not global rank 0, sends the pieces there. Only global rank 0
yields ``(hf_name, tensor)`` pairs. Peak extra memory is one full parameter (plus its shards),
so a consumer that writes or sends in bounded buckets keeps the whole export bounded.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from igrpo_megatron.config.model import ModelConfig
from igrpo_megatron.models import hf_qwen2
from igrpo_megatron.training.checkpoint import unwrap

logger = logging.getLogger(__name__)


def _global_layer(module: torch.nn.Module, local_name: str) -> int | None:
    parts = local_name.split(".")
    if len(parts) > 2 and parts[0] == "decoder" and parts[1] == "layers":
        return int(module.decoder.layers[int(parts[2])].layer_number) - 1
    return None


def local_params(chunks: list[torch.nn.Module]) -> list[tuple[hf_qwen2.MappedParam, torch.nn.Parameter]]:
    """This rank's parameters with their HF mapping (embedding/output appear on their stages only)."""
    out = []
    for chunk in chunks:
        module = unwrap(chunk)
        for name, param in module.named_parameters():
            out.append((hf_qwen2.map_param(name, _global_layer(module, name)), param))
    return out


def _gather_tp(param: torch.Tensor, kind: str) -> tuple[torch.Tensor, list[torch.Tensor] | None]:
    """Full tensor from this TP group's shards (and the shard list, which GLU needs)."""
    tp = parallel_state.get_tensor_model_parallel_world_size()
    if tp == 1 or not getattr(param, "tensor_model_parallel", False):
        return param.detach(), [param.detach()] if kind == hf_qwen2.GLU else None
    shards = [torch.empty_like(param) for _ in range(tp)]
    dist.all_gather(shards, param.detach().contiguous(), group=parallel_state.get_tensor_model_parallel_group())
    return torch.cat(shards, dim=param.partition_dim), shards


def _first_replica() -> bool:
    return parallel_state.get_data_parallel_rank() == 0 and parallel_state.get_context_parallel_rank() == 0


def _hf_shapes(mapped: hf_qwen2.MappedParam, param: torch.Tensor, cfg: ModelConfig) -> list[tuple[int, ...]]:
    """Shapes of the HF tensors a parameter becomes, worked out on the meta device (no data)."""
    tp = parallel_state.get_tensor_model_parallel_world_size()
    split = getattr(param, "tensor_model_parallel", False) and tp > 1
    shard = torch.empty(param.shape, device="meta")
    shards = [shard] * (tp if split else 1)
    full = torch.cat(shards, dim=param.partition_dim) if split else shard
    glu = shards if mapped.kind == hf_qwen2.GLU else None
    return [tuple(t.shape) for t in hf_qwen2.split_full(mapped.kind, full, cfg, glu_shards=glu)]


def export_hf_weights(chunks: list[torch.nn.Module], model_cfg: ModelConfig) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield full HF-named tensors on global rank 0; every other rank must iterate too (it yields nothing).

    Tensors come in the model's own dtype, in a fixed order: stage by stage, parameter by parameter.
    """
    if model_cfg.architecture != "qwen2":
        raise NotImplementedError(
            f"HF export of model.architecture={model_cfg.architecture!r} needs Megatron-Bridge (GPU image); "
            "the built-in mapping covers qwen2"
        )
    if not _first_replica():
        return
    pp_group = parallel_state.get_pipeline_model_parallel_group()
    pp_rank = parallel_state.get_pipeline_model_parallel_rank()
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    is_root = dist.get_rank() == 0
    mine = local_params(chunks)
    # One global order that every rank agrees on: each stage's (names, HF shapes, dtype), stage by stage.
    meta = [(m.hf_names, _hf_shapes(m, p, model_cfg), p.dtype) for m, p in mine]
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
                full, shards = _gather_tp(param, mapped.kind)
                if tp_rank == 0:
                    tensors = hf_qwen2.split_full(mapped.kind, full, model_cfg, glu_shards=shards)
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
