"""Does a parallel layout fit the model and the number of processes? Checked before anything is built.

Megatron-Core splits attention heads, key/value groups, the MLP and the vocabulary over the
tensor-parallel ranks and the layers over the pipeline stages; it asserts divisibility deep inside
model construction, on every rank, in its own words. :func:`layout_errors` states the same rules
up front, naming the recipe keys. The vocabulary is never padded (vLLM and the trainer must share
one softmax), so ``model.vocab_size`` itself must divide by TP. ``igrpo`` checks the model rules
when a recipe loads and the world-size rule when the processes start (:func:`check_world_size`).
"""

from __future__ import annotations

import math

from igrpo_megatron.config.errors import LayoutError
from igrpo_megatron.config.model import (
    FP8_PAD_MULTIPLE,
    HYBRID_LAYER_SYMBOLS,
    HYBRID_PIPE,
    ModelConfig,
    ParallelConfig,
)
from igrpo_megatron.config.sizing import stage_chunks

_TP = "parallel.tensor_model_parallel_size"
_PP = "parallel.pipeline_model_parallel_size"
_VP = "parallel.virtual_pipeline_model_parallel_size"


def mamba_num_heads(model: ModelConfig) -> int:
    """Mamba2 heads: ``model.mamba_num_heads``, or Megatron's default 2 * hidden / head size."""
    if model.mamba_num_heads is not None:
        return model.mamba_num_heads
    return 2 * model.hidden_size // model.mamba_head_dim


def layout_errors(model: ModelConfig, parallel: ParallelConfig, world_size: int | None = None) -> list[str]:
    """Every rule the layout breaks, one message each naming the keys (empty when it fits).

    ``world_size`` (the number of trainer processes) is checked when given.
    """
    p = parallel
    errs = [f"parallel.{k} = {getattr(p, k)}: must be >= 1." for k in
            ("tensor_model_parallel_size", "pipeline_model_parallel_size", "context_parallel_size")
            if getattr(p, k) < 1]
    if errs:
        return errs
    tp, pp = p.tensor_model_parallel_size, p.pipeline_model_parallel_size
    if p.sequence_parallel and tp == 1:
        errs.append(f"parallel.sequence_parallel=true needs {_TP} > 1; set it to false or raise TP.")
    if p.virtual_pipeline_model_parallel_size is not None:
        if p.virtual_pipeline_model_parallel_size < 1 or pp < 2:
            errs.append(f"{_VP} = {p.virtual_pipeline_model_parallel_size} needs {_PP} >= 2 and a value >= 1; "
                        "set it to null for no interleaving.")
    if model.architecture == "nemotron_h":
        errs += _hybrid_errors(model, p)
    else:
        errs += _attention_errors(model, tp)
        stages = pp * (p.virtual_pipeline_model_parallel_size or 1)
        if model.num_layers % stages:
            errs.append(f"model.num_layers = {model.num_layers} does not divide by {_PP} ({pp})"
                        + (f" x {_VP} ({p.virtual_pipeline_model_parallel_size})" if stages != pp else "")
                        + "; every pipeline stage needs the same number of layers: change one of them.")
    has_mlp = model.architecture != "nemotron_h" or "-" in (model.hybrid_pattern or "")
    for key in ("vocab_size", "ffn_hidden_size") if has_mlp else ("vocab_size",):
        if getattr(model, key) % tp:
            errs.append(f"model.{key} = {getattr(model, key)} does not divide by {_TP} ({tp})"
                        + ("; the vocabulary is not padded (vLLM and the trainer share one softmax): pad the "
                           "tokenizer's vocabulary or change TP." if key == "vocab_size" else "; change one of them."))
    errs += recompute_errors(model, p)
    if world_size is not None:
        errs += world_size_errors(p, world_size)
    return errs


def recompute_errors(model: ModelConfig, parallel: ParallelConfig) -> list[str]:
    """Full recomputation against the layers of each model chunk (Megatron applies the method per chunk)."""
    n, method = model.recompute_num_layers, model.recompute_method
    if model.recompute_granularity != "full" or n is None or method is None or n < 1:
        return []  # missing or contradictory keys are ModelConfig.errors' to report
    sizes = sorted({len(chunk) for chunks in stage_chunks(model, parallel) for chunk in chunks})
    where = f"the layers per pipeline stage ({', '.join(map(str, sizes))})"
    if method == "uniform" and any(size % n for size in sizes):
        return [f"model.recompute_num_layers = {n} must divide {where} with model.recompute_method=uniform "
                "(each run of that many layers is recomputed together); e.g. 1."]
    if method == "block" and n > min(sizes):
        return [f"model.recompute_num_layers = {n} exceeds {where} with model.recompute_method=block; "
                f"at most {min(sizes)} (every layer of the stage)."]
    return []


def micro_batch_pad_multiple(model: ModelConfig, parallel: ParallelConfig) -> int:
    """What every micro-batch's sequence length is padded up to (padding is masked out of the loss).

    Sequence parallelism splits the sequence over the TP ranks (so a multiple of TP); FP8 GEMMs need
    a multiple of 16 (32 for mxfp8). 1 when neither applies.
    """
    fp8 = FP8_PAD_MULTIPLE.get(model.fp8, 1)
    sp = parallel.tensor_model_parallel_size if parallel.sequence_parallel else 1
    return math.lcm(fp8, max(sp, 1))


def _attention_errors(model: ModelConfig, tp: int) -> list[str]:
    errs = []
    heads, groups = model.num_attention_heads, model.num_query_groups
    if heads < 1 or groups < 1:
        return [f"model.num_attention_heads = {heads} and model.num_query_groups = {groups}: both must be >= 1."]
    if heads % groups:
        errs.append(f"model.num_attention_heads = {heads} does not divide by model.num_query_groups = {groups} "
                    "(each key/value group serves the same number of query heads).")
    if heads % tp:
        errs.append(f"model.num_attention_heads = {heads} does not divide by {_TP} ({tp}); tensor parallelism "
                    "splits the heads over the ranks: lower TP or change the model.")
    if groups % tp and tp % groups:  # fewer groups than ranks: each group is replicated on tp / groups ranks
        errs.append(f"model.num_query_groups = {groups} is neither a multiple nor a divisor of {_TP} ({tp}); "
                    "lower TP or change the model.")
    return errs


def _hybrid_errors(model: ModelConfig, p: ParallelConfig) -> list[str]:
    pattern = model.hybrid_pattern
    if not pattern:
        return ["model.hybrid_pattern is required for model.architecture=nemotron_h, "
                "e.g. 'M-M*-M-' ('M' Mamba2, '*' attention, '-' MLP)"]
    layers = pattern.replace(HYBRID_PIPE, "")
    errs = []
    unknown = sorted(set(layers) - set(HYBRID_LAYER_SYMBOLS))
    if unknown:
        errs.append(f"model.hybrid_pattern={pattern!r} has unknown symbols {unknown}; "
                    f"use only {sorted(HYBRID_LAYER_SYMBOLS)} (and '|' between pipeline stages)")
    if model.num_layers != len(layers):
        errs.append(f"model.num_layers={model.num_layers} but model.hybrid_pattern={pattern!r} has "
                    f"{len(layers)} layers; set model.num_layers={len(layers)}")
    if "*" in layers:
        errs += _attention_errors(model, p.tensor_model_parallel_size)
    tp, heads, groups = p.tensor_model_parallel_size, mamba_num_heads(model), model.mamba_num_groups
    if heads <= 0 or groups <= 0 or heads % groups or heads % tp or groups % tp:
        errs.append(f"Mamba2 heads ({heads}: model.mamba_num_heads, or 2*hidden_size/mamba_head_dim) must be a "
                    f"multiple of model.mamba_num_groups ({groups}), and both must divide by {_TP} ({tp}); "
                    "change the sizes")
    pp = p.pipeline_model_parallel_size
    if pp > 1 and HYBRID_PIPE not in pattern and len(layers) % pp:
        errs.append(f"model.hybrid_pattern has {len(layers)} layers, not divisible by {_PP}={pp}; change one, "
                    "or mark stages with '|'")
    return errs


def world_size_errors(parallel: ParallelConfig, world_size: int) -> list[str]:
    """The world-size rule: TP x PP x CP must divide the number of trainer processes."""
    model_parallel = (parallel.tensor_model_parallel_size * parallel.pipeline_model_parallel_size
                      * parallel.context_parallel_size)
    if model_parallel >= 1 and world_size % model_parallel == 0:
        return []
    return [f"world size {world_size} is not divisible by {_TP} ({parallel.tensor_model_parallel_size}) x "
            f"{_PP} ({parallel.pipeline_model_parallel_size}) x parallel.context_parallel_size "
            f"({parallel.context_parallel_size}); change the sizes or the number of processes"]


def check_layout(model: ModelConfig, parallel: ParallelConfig, world_size: int | None = None) -> None:
    """Raise :class:`LayoutError` listing every rule of :func:`layout_errors` the layout breaks."""
    errs = layout_errors(model, parallel, world_size)
    if errs:
        raise LayoutError("; ".join(errs) if len(errs) == 1 else "\n".join(f"  - {e}" for e in errs))


def check_world_size(parallel: ParallelConfig, world_size: int) -> int:
    """The data-parallel size for ``world_size`` processes; :class:`LayoutError` when the layout does not fit."""
    errs = world_size_errors(parallel, world_size)
    if parallel.sequence_parallel and parallel.tensor_model_parallel_size == 1:
        errs.append(f"parallel.sequence_parallel=true needs {_TP} > 1")
    if parallel.virtual_pipeline_model_parallel_size is not None and parallel.pipeline_model_parallel_size < 2:
        errs.append(f"{_VP} needs pipeline_model_parallel_size >= 2")
    if errs:
        raise LayoutError("; ".join(errs))
    return world_size // (parallel.tensor_model_parallel_size * parallel.pipeline_model_parallel_size
                          * parallel.context_parallel_size)
