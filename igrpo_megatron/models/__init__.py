"""Megatron-Core model builders and HF <-> Megatron weight mappings."""

from __future__ import annotations

from typing import Any

from igrpo_megatron.config.model import ModelConfig, ParallelConfig


def build_model(
    model: ModelConfig,
    parallel: ParallelConfig,
    *,
    pre_process: bool = True,
    post_process: bool = True,
    vp_stage: int | None = None,
) -> Any:
    """Build the policy (one pipeline chunk) named by ``model.architecture``.

    Imports are local so that importing this package costs nothing and the hybrid path can
    install its CPU kernels before Megatron's SSM modules are imported.
    """
    from igrpo_megatron.config.layout import check_layout

    check_layout(model, parallel)  # the recipe loader checked it already; builders may be called directly
    if model.architecture == "qwen2":
        from igrpo_megatron.models.gpt import build_gpt

        return build_gpt(model, parallel, pre_process=pre_process, post_process=post_process, vp_stage=vp_stage)
    if model.architecture == "nemotron_h":
        from igrpo_megatron.models.hybrid import build_hybrid

        return build_hybrid(model, parallel, pre_process=pre_process, post_process=post_process, vp_stage=vp_stage)
    raise ValueError(
        f"model.architecture={model.architecture!r} is not known; use 'qwen2' or 'nemotron_h'"
    )


def unwrap(chunk: Any) -> Any:
    """The Megatron model inside DDP (and any other ``.module`` wrappers) that :func:`build_model` built."""
    while hasattr(chunk, "module"):
        chunk = chunk.module
    return chunk
