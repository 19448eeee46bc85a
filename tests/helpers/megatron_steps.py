"""Run a few optimizer steps of a tiny Megatron-Core LM on CPU, in any TP/PP/DP layout.

Layout-parity tests call :func:`train_steps` on 1 rank and on several gloo ranks and compare
what comes back. Everything model- and optimizer-shaped goes through the project's own
``igrpo_megatron.training.megatron_setup`` so the tests exercise what training runs.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from igrpo_megatron.config.model import ModelConfig, ParallelConfig
from igrpo_megatron.config.training import OptimizerConfig


def tiny_gpt_config(**overrides: Any) -> ModelConfig:
    base = dict(architecture="qwen2", num_layers=4, hidden_size=64, ffn_hidden_size=128, num_attention_heads=4,
                num_query_groups=2, vocab_size=128, max_position_embeddings=64)
    base.update(overrides)
    return ModelConfig(**base)


def _batches(vocab: int, global_batch: int, seq_len: int, steps: int, seed: int) -> list[torch.Tensor]:
    """The same token data on every rank: one [global_batch, seq_len + 1] tensor per step."""
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (global_batch, seq_len + 1), generator=gen) for _ in range(steps)]


def _forward_step(data_iterator, model):
    tokens = next(data_iterator)  # [mbs, S + 1]
    inputs, labels = tokens[:, :-1], tokens[:, 1:]
    position_ids = torch.arange(inputs.shape[1]).unsqueeze(0).expand_as(inputs)
    per_token_loss = model(inputs, position_ids, attention_mask=None, labels=labels)  # [mbs, S]

    def loss_func(output):
        loss = output.float().mean()
        return loss, {"loss": loss.detach().clone()}  # the schedule scales `loss` in place

    return per_token_loss, loss_func


def train_steps(
    model_cfg: ModelConfig,
    parallel_cfg: ParallelConfig,
    *,
    steps: int = 3,
    global_batch: int = 8,
    micro_batch: int = 2,
    seq_len: int = 16,
    seed: int = 1234,
    lr: float = 1e-3,
    init_from: str | None = None,
    save_init_to: str | None = None,
) -> dict[str, Any]:
    """Run ``steps`` optimizer steps in the current process group; return losses and grad norms.

    Must be called inside a process that already joined its gloo group (or alone).
    ``save_init_to`` writes the freshly initialised weights (a re-shardable checkpoint) and
    ``init_from`` loads such a checkpoint before training: random initialisation depends on the
    pipeline layout (each stage draws its own layers), a checkpoint does not.
    """
    from megatron.core import parallel_state
    from megatron.core.distributed import finalize_model_grads
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from igrpo_megatron.runtime.cpu_mode import enable_cpu_mode
    from igrpo_megatron.runtime.parallel import destroy_distributed, init_distributed
    from igrpo_megatron.training.checkpoint import load_model_weights, save_model_weights
    from igrpo_megatron.training.megatron_setup import build_model_chunks, build_optimizer

    enable_cpu_mode()
    layout = init_distributed(parallel_cfg, seed=seed)
    chunks = build_model_chunks(model_cfg, parallel_cfg)
    if save_init_to:
        save_model_weights(chunks, save_init_to)
    if init_from:
        load_model_weights(chunks, init_from)
    optimizer = build_optimizer(
        OptimizerConfig(lr=lr, weight_decay=0.0, clip_grad=1.0), model_cfg, parallel_cfg, chunks
    )
    for chunk in chunks:
        chunk.config.finalize_model_grads_func = finalize_model_grads
        chunk.config.no_sync_func = [c.no_sync for c in chunks] if len(chunks) > 1 else chunks[0].no_sync
        chunk.config.grad_scale_func = optimizer.scale_loss

    dp_rank = parallel_state.get_data_parallel_rank()
    local_batch = global_batch // layout.dp
    num_micro = local_batch // micro_batch
    losses, grad_norms = [], []
    for tokens in _batches(model_cfg.vocab_size, global_batch, seq_len, steps, seed):
        local = tokens[dp_rank * local_batch:(dp_rank + 1) * local_batch]
        micro = list(local.split(micro_batch))
        iterators = [iter(micro) for _ in chunks] if len(chunks) > 1 else iter(micro)
        for chunk in chunks:
            chunk.zero_grad_buffer()
        optimizer.zero_grad()
        out = get_forward_backward_func()(
            forward_step_func=_forward_step, data_iterator=iterators, model=chunks,
            num_microbatches=num_micro, seq_length=seq_len, micro_batch_size=micro_batch, forward_only=False,
        )
        _, grad_norm, _ = optimizer.step()
        grad_norms.append(float(grad_norm))
        loss = torch.zeros(1)
        if parallel_state.is_pipeline_last_stage(ignore_virtual=True):
            loss += sum(d["loss"] for d in out) / num_micro
        # Average over DP, then share the last stage's value with every pipeline stage.
        torch.distributed.all_reduce(loss, group=parallel_state.get_data_parallel_group())
        loss /= layout.dp
        torch.distributed.all_reduce(loss, group=parallel_state.get_pipeline_model_parallel_group())
        losses.append(float(loss))
    result = {"losses": losses, "grad_norms": grad_norms, "layout": dataclasses.asdict(layout)}
    destroy_distributed()
    return result


def rank_entry(rank: int, world_size: int, model_cfg: ModelConfig, parallel_cfg: ParallelConfig,
               kwargs: dict[str, Any]) -> dict[str, Any]:
    """``run_on_ranks`` entry point."""
    return train_steps(model_cfg, parallel_cfg, **kwargs)


def run_layout(model_cfg: ModelConfig, world_size: int, **parallel: Any) -> list[dict[str, Any]]:
    """Run :func:`train_steps` on ``world_size`` gloo ranks with the given parallel sizes."""
    from tests.helpers.distributed import run_on_ranks

    kwargs = parallel.pop("train_kwargs", {})
    return run_on_ranks(rank_entry, world_size,
                        args=(model_cfg, ParallelConfig(**parallel), kwargs))
