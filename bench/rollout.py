"""Rollout entry: the sidecar's generated tokens/s against the same vLLM driven directly, and the
iGRPO/GRPO wall ratios of bench/rollout_overlap.py (run as a script; its last line is JSON).

Sidecar: ``RolloutServer`` started from the recipe's ``rollout.server`` settings, requests sent by
``RolloutClient.generate`` (what the rollouts call) with the recipe's sampling settings and
n = algorithm.group_size. Ceiling: one offline ``LLM.generate`` over the same prompts, seeds and
settings, engine arguments parsed from the sidecar's own command line (bench/vllm_direct.py). The
model is a random-init Qwen2 of the recipe's sizes (built once under the work directory).
"""

from __future__ import annotations

import asyncio
import copy
import json
import random
import statistics
import time
from pathlib import Path

from bench.common import EntryResult, Figure, last_json_line, python, run_logged
from igrpo_megatron.config.schema import RecipeConfig
from igrpo_megatron.rollout.client import RolloutClient
from igrpo_megatron.rollout.interfaces import SamplingParams
from igrpo_megatron.rollout.server import RolloutServer

PROMPTS = 8
PROMPT_LEN = 40
REPEATS = 2


def _model(recipe: RecipeConfig, work: Path) -> Path:
    from tests.helpers.tiny_models import build_tiny_qwen2

    m = recipe.model
    path = work / f"qwen2-h{m.hidden_size}-l{m.num_layers}-f{m.ffn_hidden_size}"
    if not (path / "config.json").exists():
        build_tiny_qwen2(path, hidden=m.hidden_size, heads=m.num_attention_heads, kv_heads=m.num_query_groups or 1,
                         layers=m.num_layers, intermediate=m.ffn_hidden_size,
                         max_position=max(m.max_position_embeddings, 512))
    return path


async def _sidecar_rounds(url: str, prompts: list[list[int]], sampling: SamplingParams, seeds: list[int],
                          repeats: int) -> list[dict]:
    async with RolloutClient(url, max_concurrency=len(prompts)) as client:
        await client.generate(prompts[:1], sampling, seeds[:1])  # warm-up
        rounds = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            groups = await client.generate(prompts, sampling, seeds)
            seconds = time.perf_counter() - t0
            rounds.append({"seconds": seconds, "tokens": sum(len(c.token_ids) for g in groups for c in g.completions)})
    return rounds


def _rate(rounds: list[dict]) -> float:
    return statistics.median(r["tokens"] / r["seconds"] for r in rounds)


def sidecar_vs_direct(recipe: RecipeConfig, work: Path, quick: bool) -> tuple[list[Figure], dict]:
    model = _model(recipe, work)
    rng = random.Random(0)
    n_prompts = 4 if quick else PROMPTS
    prompts = [[rng.randrange(10, recipe.model.vocab_size - 10) for _ in range(PROMPT_LEN)] for _ in range(n_prompts)]
    seeds = [1000 + i for i in range(n_prompts)]
    sampling = SamplingParams.from_config(recipe.rollout.sampling, n=recipe.algorithm.group_size)
    cfg = copy.deepcopy(recipe.rollout.server)
    cfg.port, cfg.url = 0, None
    server = RolloutServer(cfg, model_path=str(model), log_dir=work / "sidecar")
    server.start()
    try:
        sidecar = asyncio.run(_sidecar_rounds(server.url, prompts, sampling, seeds, REPEATS))
        server_args = server.command()[3:]  # after: python -m vllm.entrypoints.openai.api_server
        env = server.environment()
    finally:
        server.close()
    spec = {"server_args": server_args, "prompts": prompts, "seeds": seeds, "repeats": REPEATS,
            "sampling": {"n": sampling.n, "temperature": sampling.temperature, "top_p": sampling.top_p,
                         "top_k": sampling.top_k, "max_tokens": sampling.max_tokens,
                         "logprobs": 0 if sampling.logprobs else None}}
    (work / "direct_spec.json").write_text(json.dumps(spec))
    run_logged([python(), "-m", "bench.vllm_direct", str(work / "direct_spec.json"), str(work / "direct_out.json")],
               work / "vllm_direct.log", timeout_s=900, env={k: v for k, v in env.items() if k.startswith("VLLM")})
    direct = json.loads((work / "direct_out.json").read_text())["rounds"]
    fig = Figure("sidecar generated tokens/s", _rate(sidecar), "tok/s", _rate(direct),
                 "same vLLM, offline LLM.generate", goal=0.9,
                 note=f"{n_prompts} prompts x n={sampling.n}, max_tokens {sampling.max_tokens}")
    return [fig], {"sidecar_rounds": sidecar, "direct_rounds": direct, "server_args": server_args}


def overlap(work: Path, quick: bool) -> tuple[list[Figure], dict]:
    """bench/rollout_overlap.py at a size that fits the suite's budget."""
    args = ["--prompts", "4" if quick else "8", "--repeats", "1" if quick else "2", "--warmup", "1",
            "--max-tokens", "64", "--max-num-seqs", "16", "--sft-steps", "20" if quick else "100",
            "--workdir", str(work / "overlap")]
    out = last_json_line(run_logged([python(), "bench/rollout_overlap.py", *args], work / "rollout_overlap.log",
                                    timeout_s=1200), "bench/rollout_overlap.py")
    modes = out["modes"]
    figures = []
    for mode, goal in (("igrpo_barrier", None), ("igrpo_pipelined", 1.05)):
        r = modes[mode]["wall_ratio"]
        figures.append(Figure(f"{mode} / grpo wall per step", r["median"], "x", 1.0, "GRPO step, matched budget",
                              goal=goal, goal_op="<=", note=f"95% CI [{r['lo']:.3f}, {r['hi']:.3f}]"))
        t = modes[mode]["per_token_ratio"]
        figures.append(Figure(f"{mode} / grpo wall per generated token", t["median"], "x", 1.0, "GRPO",
                              note=f"95% CI [{t['lo']:.3f}, {t['hi']:.3f}]"))
    return figures, {"overlap_args": args, "overlap": out}


def bench_rollout(ctx) -> EntryResult:
    figs, details = sidecar_vs_direct(ctx.recipe, ctx.work, ctx.quick)
    more, details2 = overlap(ctx.work, ctx.quick)
    return EntryResult(figs + more, {**details, **details2})
