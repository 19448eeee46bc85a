"""Turn a training checkpoint (any TP/PP layout) into a Hugging Face directory vLLM and transformers load."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from igrpo_megatron.config.schema import RecipeConfig

logger = logging.getLogger(__name__)


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """A checkpoint directory itself, or the newest complete, undamaged one under a checkpoints root."""
    from igrpo_megatron.training.checkpoint import find_latest, is_complete, verify_checkpoint

    path = Path(path)
    if is_complete(path):
        verify_checkpoint(path)  # a damaged one: CheckpointError naming the file
        return path
    latest = find_latest(path)
    if latest is None:
        raise FileNotFoundError(f"{path}: no complete checkpoint here (expected metadata.json and "
                                "trainer_state.pt, or step_* directories with a 'latest' pointer)")
    return latest


def export_checkpoint_to_hf(checkpoint: str | os.PathLike, recipe: RecipeConfig, out_dir: str | os.PathLike,
                            tokenizer_dir: str | os.PathLike | None = None) -> Path:
    """Load the model part of ``checkpoint`` at TP = PP = 1 in this process and write it as HF layout.

    Starts (and tears down) a one-process gloo group when none exists; the optimizer state in the
    checkpoint is not read.
    """
    import torch.distributed as dist

    from igrpo_megatron.config.model import ParallelConfig
    from igrpo_megatron.models.hf_io import save_hf_checkpoint
    from igrpo_megatron.runtime.cpu_mode import cpu_mode
    from igrpo_megatron.runtime.parallel import destroy_distributed, init_distributed
    from igrpo_megatron.training.checkpoint import load_model_weights
    from igrpo_megatron.training.megatron_setup import build_model_chunks

    source = resolve_checkpoint(checkpoint)
    owns_group = not dist.is_initialized()
    parallel = ParallelConfig(backend="gloo", use_distributed_optimizer=False)
    with cpu_mode():
        init_distributed(parallel, seed=recipe.run.seed)
        try:
            chunks = build_model_chunks(recipe.model, parallel, wrap_ddp=False)
            load_model_weights(chunks, source)
            out = save_hf_checkpoint(chunks, recipe.model, out_dir, tokenizer_dir=tokenizer_dir)
        finally:
            if owns_group:
                destroy_distributed()
    logger.info("exported %s to %s", source, out)
    return out
