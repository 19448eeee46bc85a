"""Build the Megatron-side training objects: model chunks wrapped in DDP, optimizer, LR schedule.

The trainer and the layout-parity tests both go through these functions, so a parity test
exercises exactly what training runs.
"""

from __future__ import annotations

import logging
import math

import torch
from megatron.core import parallel_state
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
from megatron.core.optimizer import OptimizerConfig as MegatronOptimizerConfig
from megatron.core.optimizer import get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

from igrpo_megatron.config.model import ModelConfig, ParallelConfig
from igrpo_megatron.config.training import OptimizerConfig
from igrpo_megatron.models import build_model
from igrpo_megatron.models.transformer_config import torch_dtype

logger = logging.getLogger(__name__)


def build_model_chunks(model: ModelConfig, parallel: ParallelConfig, *, wrap_ddp: bool = True) -> list[torch.nn.Module]:
    """This rank's model chunks: one per virtual pipeline stage (one chunk without interleaving)."""
    vpp = parallel.virtual_pipeline_model_parallel_size
    chunks = []
    for vp_stage in range(vpp or 1):
        stage = vp_stage if vpp is not None else None
        chunk = build_model(
            model, parallel,
            pre_process=parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=stage),
            post_process=parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=stage),
            vp_stage=stage,
        )
        chunk.model_type = getattr(chunk, "model_type", None) or _encoder_or_decoder()
        chunks.append(chunk)
    if not wrap_ddp:
        return chunks
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=parallel.overlap_grad_reduce,
        use_distributed_optimizer=parallel.use_distributed_optimizer,
        check_for_nan_in_grad=False,  # MegatronPolicy.train_step skips (and counts) a non-finite update instead
        bucket_size=None if parallel.overlap_grad_reduce else None,
    )
    wrapped = []
    for i, chunk in enumerate(chunks):
        wrapped.append(
            DistributedDataParallel(
                config=chunk.config, ddp_config=ddp_config, module=chunk,
                # Only the first chunk's buckets are overlapped with backward (Megatron's rule).
                disable_bucketing=i > 0,
            )
        )
    return wrapped


def _encoder_or_decoder():
    from megatron.core.enums import ModelType

    return ModelType.encoder_or_decoder


def build_optimizer(
    optim: OptimizerConfig, model: ModelConfig, parallel: ParallelConfig, chunks: list[torch.nn.Module]
):
    """Megatron's (distributed) AdamW over all chunks."""
    dtype = torch_dtype(model.params_dtype)
    config = MegatronOptimizerConfig(
        optimizer="adam",
        lr=optim.lr,
        min_lr=optim.lr * optim.min_lr_ratio,
        weight_decay=optim.weight_decay,
        adam_beta1=optim.adam_beta1,
        adam_beta2=optim.adam_beta2,
        adam_eps=optim.adam_eps,
        clip_grad=optim.clip_grad,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        params_dtype=dtype,
        use_distributed_optimizer=parallel.use_distributed_optimizer,
        overlap_param_gather=parallel.overlap_param_gather,
    )
    return get_megatron_optimizer(config, chunks)


def build_scheduler(optim: OptimizerConfig, optimizer, total_steps: int) -> OptimizerParamScheduler:
    """Linear warm-up to ``lr``, then cosine down to ``lr * min_lr_ratio`` at ``total_steps``."""
    warmup = int(math.floor(optim.warmup_fraction * total_steps))
    return OptimizerParamScheduler(
        optimizer,
        init_lr=0.0 if warmup > 0 else optim.lr,
        max_lr=optim.lr,
        min_lr=optim.lr * optim.min_lr_ratio,
        lr_warmup_steps=warmup,
        lr_decay_steps=max(total_steps, warmup + 1),
        lr_decay_style="cosine",
        start_wd=optim.weight_decay,
        end_wd=optim.weight_decay,
        wd_incr_steps=max(total_steps, 1),
        wd_incr_style="constant",
    )
