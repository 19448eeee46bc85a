"""Re-shardable model weights through ``megatron.core.dist_checkpointing``.

A checkpoint saved at one TP/PP layout loads at any other, because every tensor is stored
under its global name with its global shape. Writes go to a temporary directory that is
renamed into place only once complete, so a crash never leaves a half-written checkpoint.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing

logger = logging.getLogger(__name__)

_MODEL_KEY = "model"


def unwrap(chunk: torch.nn.Module) -> torch.nn.Module:
    """The Megatron model inside DDP (and any other ``.module`` wrappers)."""
    while hasattr(chunk, "module"):
        chunk = chunk.module
    return chunk


def _model_sharded_state_dict(chunks: list[torch.nn.Module]) -> dict:
    if len(chunks) == 1:
        return {_MODEL_KEY: unwrap(chunks[0]).sharded_state_dict()}
    return {f"{_MODEL_KEY}{i}": unwrap(c).sharded_state_dict() for i, c in enumerate(chunks)}


def _is_rank0() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def save_model_weights(chunks: list[torch.nn.Module], directory: str | os.PathLike) -> Path:
    """Save the model (all ranks call this) to ``directory`` atomically; returns the final path."""
    final = Path(directory)
    tmp = final.with_name(final.name + ".tmp")
    if _is_rank0():
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    _barrier()
    dist_checkpointing.save(_model_sharded_state_dict(chunks), str(tmp))
    _barrier()
    if _is_rank0():
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    _barrier()
    logger.info("saved model weights to %s", final)
    return final


def load_model_weights(chunks: list[torch.nn.Module], directory: str | os.PathLike) -> None:
    """Load weights saved by :func:`save_model_weights` at any TP/PP layout into ``chunks``."""
    path = Path(directory)
    if not path.is_dir() or not (path / "metadata.json").exists():
        raise FileNotFoundError(
            f"{path} is not a complete Megatron checkpoint (no metadata.json); "
            "was the save interrupted? Point at another checkpoint or start fresh."
        )
    sharded = _model_sharded_state_dict(chunks)
    state = dist_checkpointing.load(sharded, str(path))
    if len(chunks) == 1:
        unwrap(chunks[0]).load_state_dict(state[_MODEL_KEY], strict=True)
    else:
        for i, c in enumerate(chunks):
            unwrap(c).load_state_dict(state[f"{_MODEL_KEY}{i}"], strict=True)
    logger.info("loaded model weights from %s", path)
