"""Process groups, Megatron parallel state and seeding, from the recipe's ``parallel`` section."""

from __future__ import annotations

import datetime
import logging
import os
import random
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from igrpo_megatron.config.layout import check_world_size
from igrpo_megatron.config.model import ParallelConfig
from igrpo_megatron.config.ports import free_port

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ParallelLayout:
    """Where this rank sits. ``dp`` is derived: world = tp * pp * cp * dp."""

    rank: int
    world_size: int
    tp: int
    pp: int
    cp: int
    dp: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def resolve_backend(parallel: ParallelConfig) -> str:
    if parallel.backend != "auto":
        return parallel.backend
    return "nccl" if torch.cuda.is_available() else "gloo"


def check_layout(parallel: ParallelConfig, world_size: int) -> int:
    """Return the data-parallel size, or raise :class:`LayoutError` naming the keys that do not fit."""
    return check_world_size(parallel, world_size)


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy, torch and Megatron's model-parallel RNG tracker (per TP/PP rank)."""
    from megatron.core import tensor_parallel

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)


def init_distributed(parallel: ParallelConfig, seed: int = 1234, timeout_minutes: int = 30) -> ParallelLayout:
    """Initialise ``torch.distributed`` (from torchrun's env, or a single process) and Megatron's groups.

    Safe to call when a process group already exists (tests spawn their own gloo ranks).
    """
    from megatron.core import parallel_state

    if not dist.is_initialized():
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        if world_size == 1 and "MASTER_ADDR" not in os.environ:
            os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
            os.environ.setdefault("MASTER_PORT", str(free_port()))
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(
            backend=resolve_backend(parallel), rank=rank, world_size=world_size,
            timeout=datetime.timedelta(minutes=timeout_minutes),
        )
    world_size = dist.get_world_size()
    dp = check_layout(parallel, world_size)
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=parallel.tensor_model_parallel_size,
        pipeline_model_parallel_size=parallel.pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=parallel.virtual_pipeline_model_parallel_size,
        context_parallel_size=parallel.context_parallel_size,
    )
    seed_everything(seed)
    layout = ParallelLayout(
        rank=dist.get_rank(), world_size=world_size, tp=parallel.tensor_model_parallel_size,
        pp=parallel.pipeline_model_parallel_size, cp=parallel.context_parallel_size, dp=dp,
    )
    logger.info("distributed ready: %s", layout)
    return layout


def destroy_distributed() -> None:
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
