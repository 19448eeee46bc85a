"""Hugging Face checkpoints (safetensors + config.json) in and out of the Megatron model.

Import reads only the tensors each rank needs (lazily, through ``safe_open``) and copies its TP
shard into place. Export streams full tensors from ``weight_export`` into size-bounded shard
files in a temporary directory that is renamed into place when complete. Both take the
name/layout mapping of ``model.architecture`` (Qwen2 or Nemotron-H) from ``weight_export.hf_mapping``.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from safetensors import safe_open
from safetensors.torch import save_file

from igrpo_megatron.config.errors import UserError
from igrpo_megatron.config.files import replace_directory
from igrpo_megatron.config.model import ModelConfig
from igrpo_megatron.models.weight_export import export_hf_weights, hf_mapping, local_params, partition_dim

logger = logging.getLogger(__name__)

INDEX_NAME = "model.safetensors.index.json"


class HFCheckpointError(UserError, ValueError):
    """A Hugging Face checkpoint is missing, incomplete, or does not match the recipe."""


def _tensor_locations(hf_dir: Path) -> dict[str, Path]:
    """Which safetensors file holds each tensor (single file or sharded with an index)."""
    index = hf_dir / INDEX_NAME
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        return {name: hf_dir / fname for name, fname in weight_map.items()}
    files = sorted(hf_dir.glob("*.safetensors"))
    if not files:
        raise HFCheckpointError(f"{hf_dir}: no *.safetensors files (and no {INDEX_NAME})")
    out: dict[str, Path] = {}
    for f in files:
        with safe_open(str(f), framework="pt") as fh:
            out.update({k: f for k in fh.keys()})
    return out


def check_hf_config(hf_dir: Path, model_cfg: ModelConfig) -> None:
    """Refuse a checkpoint whose config.json disagrees with the recipe's model section."""
    cfg_path = hf_dir / "config.json"
    if not cfg_path.exists():
        raise HFCheckpointError(f"{hf_dir}: config.json not found; is model.hf_path a Hugging Face checkpoint?")
    try:
        hf = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as exc:
        raise HFCheckpointError(f"{cfg_path}: not valid JSON ({exc})") from None
    try:
        implied = hf_mapping(model_cfg).model_config_from_hf(hf, model_cfg)
    except ValueError as exc:
        raise HFCheckpointError(f"{cfg_path}: {exc}") from None
    wrong = {k: (getattr(model_cfg, k), v) for k, v in implied.items() if getattr(model_cfg, k) != v}
    if wrong:
        lines = "\n".join(f"  model.{k}: recipe has {mine!r}, {cfg_path} has {theirs!r}"
                          for k, (mine, theirs) in wrong.items())
        raise HFCheckpointError(f"the recipe's model section does not match the checkpoint:\n{lines}")


def load_hf_into_megatron(chunks: list[torch.nn.Module], model_cfg: ModelConfig, hf_dir: str | os.PathLike) -> None:
    """Copy a Hugging Face Qwen2 / NemotronH checkpoint into this rank's Megatron chunks (any TP/PP layout)."""
    hf_dir = Path(hf_dir)
    check_hf_config(hf_dir, model_cfg)
    mapping = hf_mapping(model_cfg)
    where = _tensor_locations(hf_dir)
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    tp_size = parallel_state.get_tensor_model_parallel_world_size()
    handles: dict[Path, object] = {}
    try:
        for mapped, param in local_params(chunks, model_cfg):
            stored = {n: next((a for a in mapping.hf_aliases(n) if a in where), None) for n in mapped.hf_names}
            missing = [n for n, found in stored.items() if found is None]
            if missing:
                raise HFCheckpointError(f"{hf_dir}: tensor(s) {missing} not found (needed for {mapped.megatron_name})")
            hf = []
            for name in stored.values():
                path = where[name]
                if path not in handles:
                    handles[path] = safe_open(str(path), framework="pt")
                hf.append(handles[path].get_tensor(name))
            shard = mapping.shard_from_hf(mapped.kind, hf, model_cfg, tp_rank=tp_rank, tp_size=tp_size,
                                          partition_dim=partition_dim(param))
            if shard.shape != param.shape:
                raise HFCheckpointError(f"{hf_dir}: {mapped.hf_names} gives shape {tuple(shard.shape)} for "
                                        f"{mapped.megatron_name}, which has {tuple(param.shape)}")
            with torch.no_grad():
                param.copy_(shard.to(param.dtype))
    finally:
        handles.clear()
    logger.info("loaded Hugging Face weights from %s", hf_dir)


def _buckets(pairs: Iterable[tuple[str, torch.Tensor]], max_bytes: int) -> Iterator[dict[str, torch.Tensor]]:
    bucket: dict[str, torch.Tensor] = {}
    size = 0
    for name, tensor in pairs:
        nbytes = tensor.numel() * tensor.element_size()
        if bucket and size + nbytes > max_bytes:
            yield bucket
            bucket, size = {}, 0
        bucket[name] = tensor.contiguous()
        size += nbytes
    if bucket:
        yield bucket


def write_safetensors_shards(pairs: Iterable[tuple[str, torch.Tensor]], out_dir: Path,
                             max_shard_bytes: int = 2 << 30) -> dict[str, str]:
    """Write (name, tensor) pairs into shard files of bounded size plus the index; returns the map."""
    weight_map: dict[str, str] = {}
    files = []
    for i, bucket in enumerate(_buckets(pairs, max_shard_bytes)):
        fname = f"model-{i + 1:05d}.safetensors"
        save_file(bucket, str(out_dir / fname), metadata={"format": "pt"})
        files.append(fname)
        weight_map.update({name: fname for name in bucket})
    (out_dir / INDEX_NAME).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}, indent=1))
    return weight_map


def save_hf_checkpoint(chunks: list[torch.nn.Module], model_cfg: ModelConfig, out_dir: str | os.PathLike, *,
                       tokenizer_dir: str | os.PathLike | None = None, max_shard_bytes: int = 2 << 30) -> Path:
    """Export the model as a Hugging Face checkpoint (Qwen2 or NemotronH). Collective: every rank calls it."""
    final = Path(out_dir)
    tmp = final.with_name(final.name + ".tmp")
    is_root = not dist.is_initialized() or dist.get_rank() == 0
    if is_root:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        write_safetensors_shards(export_hf_weights(chunks, model_cfg), tmp, max_shard_bytes)
        (tmp / "config.json").write_text(json.dumps(hf_mapping(model_cfg).hf_config(model_cfg), indent=2))
        if tokenizer_dir is not None:
            for f in Path(tokenizer_dir).iterdir():
                if f.is_file() and (f.name.startswith("tokenizer") or f.name.endswith("_map.json")
                                    or f.name == "chat_template.jinja"):
                    shutil.copy2(f, tmp / f.name)
        replace_directory(tmp, final)
        logger.info("exported Hugging Face checkpoint to %s", final)
    else:
        for _ in export_hf_weights(chunks, model_cfg):
            pass
    if dist.is_initialized():
        dist.barrier()
    return final
