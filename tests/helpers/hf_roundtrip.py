"""The rank body of the HF import/export round-trip tests (Qwen2 and Nemotron-H alike)."""

from __future__ import annotations

import torch

from igrpo_megatron.config.model import ModelConfig, ParallelConfig


def import_forward_export(rank: int, world_size: int, model_cfg: ModelConfig, ids: torch.Tensor, hf_path: str,
                          out_path: str, parallel_kwargs: dict) -> torch.Tensor | None:
    """Import ``hf_path`` at the given layout, run a forward on ``ids``, export to ``out_path``.

    Returns the full-vocabulary logits (TP shards gathered) on the ranks of the last pipeline stage,
    None on the others. Every rank starts from a different random init, so the import must overwrite
    all of it.
    """
    from megatron.core import parallel_state

    from igrpo_megatron.models.hf_io import load_hf_into_megatron, save_hf_checkpoint
    from igrpo_megatron.runtime.cpu_mode import enable_cpu_mode
    from igrpo_megatron.runtime.parallel import destroy_distributed, init_distributed
    from igrpo_megatron.training.megatron_setup import build_model_chunks

    enable_cpu_mode()
    parallel = ParallelConfig(**parallel_kwargs)
    init_distributed(parallel, seed=rank + 100)
    chunks = build_model_chunks(model_cfg, parallel, wrap_ddp=False)
    load_hf_into_megatron(chunks, model_cfg, hf_path)
    logits = None
    local = _forward(chunks, ids)
    if local is not None:  # the last pipeline stage
        parts = [torch.empty_like(local) for _ in range(parallel.tensor_model_parallel_size)]
        torch.distributed.all_gather(parts, local.contiguous(), group=parallel_state.get_tensor_model_parallel_group())
        logits = torch.cat(parts, dim=-1)
    save_hf_checkpoint(chunks, model_cfg, out_path)
    destroy_distributed()
    return logits


def _forward(chunks: list[torch.nn.Module], ids: torch.Tensor) -> torch.Tensor | None:
    """One forward through Megatron's pipeline schedule (as training runs it): ``[B, S, V / TP]`` logits on
    the last pipeline stage, None on the others."""
    from megatron.core import parallel_state
    from megatron.core.pipeline_parallel import get_forward_backward_func

    pos = torch.arange(ids.shape[1]).unsqueeze(0).expand_as(ids)

    def step(data_iterator, model):
        out = model(next(data_iterator), pos, attention_mask=None)
        return out, lambda output, non_loss_data=False: output.detach().clone()

    with torch.no_grad():
        collected = get_forward_backward_func()(
            forward_step_func=step, data_iterator=iter([ids]), model=chunks, num_microbatches=1,
            seq_length=ids.shape[1], micro_batch_size=ids.shape[0], forward_only=True, collect_non_loss_data=True)
    return collected[0] if parallel_state.is_pipeline_last_stage(ignore_virtual=True) else None
