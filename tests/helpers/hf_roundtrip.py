"""The rank body of the HF import/export round-trip tests (Qwen2 and Nemotron-H alike)."""

from __future__ import annotations

import torch

from igrpo_megatron.config.model import ModelConfig, ParallelConfig


def import_forward_export(rank: int, world_size: int, model_cfg: ModelConfig, ids: torch.Tensor, hf_path: str,
                          out_path: str, parallel_kwargs: dict) -> torch.Tensor | None:
    """Import ``hf_path`` at the given layout, run a forward on ``ids``, export to ``out_path``.

    Returns the full-vocabulary logits (TP shards gathered) when there is one pipeline stage, else None.
    Every rank starts from a different random init, so the import must overwrite all of it.
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
    if parallel.pipeline_model_parallel_size == 1:
        pos = torch.arange(ids.shape[1]).unsqueeze(0).expand_as(ids)
        with torch.no_grad():
            local = chunks[0](ids, pos, attention_mask=None)  # [B, S, V / TP]
        parts = [torch.empty_like(local) for _ in range(parallel.tensor_model_parallel_size)]
        torch.distributed.all_gather(parts, local.contiguous(), group=parallel_state.get_tensor_model_parallel_group())
        logits = torch.cat(parts, dim=-1)
    save_hf_checkpoint(chunks, model_cfg, out_path)
    destroy_distributed()
    return logits
