"""Training-step entry: tokens/s and achieved model FLOP/s of the real Megatron RL step
(``MegatronPolicy.train_step``, the recipe's model, loss and optimizer, one rank) against a
``torch.matmul`` ceiling of the same dtype, an MLP-shaped [micro-batch tokens, hidden] x
[hidden, ffn], measured in the same process with the same thread count. FLOPs: see
bench/policy_step.py (``FLOP_FORMULA``).
"""

from __future__ import annotations

import copy

import torch

from bench.common import EntryResult, Figure
from bench.policy_step import FLOP_FORMULA, input_lengths, matmul_ceiling, step_flops, synthetic_batch
from igrpo_megatron.config.schema import RecipeConfig

SEQUENCES = 64  # 8 prompts x 8 samples
PROMPT = (30, 90)


def bench_recipe(recipe: RecipeConfig) -> RecipeConfig:
    """The recipe's model and loss, trained from fresh weights (no warm-start, no HF checkpoint)."""
    r = copy.deepcopy(recipe)
    r.model.hf_path = None
    r.trainer.warmstart.enabled = False
    return r


def recipe_batch(recipe: RecipeConfig, sequences: int = SEQUENCES, seed: int = 0):
    return synthetic_batch(recipe.model.vocab_size, sequences, PROMPT, (8, recipe.rollout.sampling.max_tokens), seed)


def rank_timing(rank: int, world: int, recipe: RecipeConfig, steps: int, profile: bool, ceiling: bool,
                layouts: list[dict] | None = None) -> list[dict]:
    """``run_on_ranks`` entry: one process per rank, gloo group already joined. Times the step at each
    of ``layouts`` (parallel-config overrides; None: the recipe's own) one after the other."""
    from bench.policy_step import time_train_steps
    from igrpo_megatron.runtime.cpu_mode import enable_cpu_mode
    from igrpo_megatron.runtime.parallel import destroy_distributed, init_distributed

    enable_cpu_mode()
    torch.set_num_threads(recipe.run.cpu_threads or 1)
    results = []
    for overrides in layouts or [{}]:
        r = copy.deepcopy(recipe)
        for key, value in overrides.items():
            setattr(r.parallel, key, value)
        init_distributed(r.parallel, seed=r.run.seed)  # re-initialises Megatron's groups for this layout
        out = time_train_steps(r, recipe_batch(r), steps, warmup=1, profile=profile)
        out.pop("policy")
        results.append(out)
    if ceiling and rank == 0:
        m = recipe.model
        dtype = getattr(torch, m.params_dtype)
        results[0]["ceiling"] = matmul_ceiling(recipe.trainer.micro_batch_tokens, m.hidden_size, m.ffn_hidden_size,
                                               dtype, "cpu")
    destroy_distributed()
    return results


def bench_train_step(ctx) -> EntryResult:
    recipe, quick = ctx.recipe, ctx.quick
    from tests.helpers.distributed import run_on_ranks

    r = bench_recipe(recipe)
    for key in ("tensor_model_parallel_size", "pipeline_model_parallel_size"):
        setattr(r.parallel, key, 1)
    out = run_on_ranks(rank_timing, 1, args=(r, 2 if quick else 4, False, True), timeout=1200)[0][0]
    batch = recipe_batch(r)
    m = r.model
    d_attn = m.num_attention_heads * (m.kv_channels or m.hidden_size // m.num_attention_heads)
    flops = step_flops(out["matmul_params"], m.num_layers, d_attn, input_lengths(batch))
    tokens = sum(input_lengths(batch))
    ceiling = out["ceiling"]
    figures = [
        Figure("RL step tokens/s", tokens / out["median_s"], "tok/s",
               note=f"{len(batch)} sequences, {tokens} tokens, median of {len(out['seconds'])} steps"),
        Figure("RL step model FLOP/s", flops / out["median_s"], "FLOP/s", ceiling["flops_per_s"],
               f"torch.matmul {ceiling['dtype']} {'x'.join(map(str, ceiling['shape']))}, "
               f"{ceiling['threads']} thread(s)", note="ratio = MFU-like"),
    ]
    return EntryResult(figures, {"formula": FLOP_FORMULA, "matmul_params": out["matmul_params"],
                                 "step_flops": flops, "tokens": tokens, "seconds": out["seconds"], "ceiling": ceiling,
                                 "threads": r.run.cpu_threads or 1, "loss": out["loss"]})
