"""Reward entry: math-reward items/s with 1 worker and with all cores (bench/reward_throughput.py's run)."""

from __future__ import annotations

from bench.common import EntryResult, Figure
from bench.reward_throughput import make_items, run
from igrpo_megatron.rewards.pool import available_cores

ITEMS = 2000
ROUNDS = 4


def bench_reward(ctx) -> EntryResult:
    recipe, quick = ctx.recipe, ctx.quick
    cores = available_cores()
    items = make_items(400 if quick else ITEMS, pathological=1 if quick else 2, group_size=recipe.algorithm.group_size)
    m = recipe.reward.math
    res = run(items, cores, rounds=2 if quick else ROUNDS, timeout_s=m.item_timeout_s, chunk_size=32,
              control_iterations=500_000)
    one, many = res[1], res[cores]
    rate1, rate_n = len(one["info"]) / one["elapsed"], len(many["info"]) / many["elapsed"]
    lost = 2 * len(items) - len(one["info"]) - len(many["info"])
    speedup = one["elapsed"] / many["elapsed"]
    figures = [
        Figure("items/s, 1 worker", rate1, "items/s"),
        Figure(f"items/s, {cores} workers", rate_n, "items/s", rate1, "1 worker"),
        Figure("speed-up", speedup, "x", float(cores), "cores", goal=0.85),
        Figure("speed-up vs pure-Python control", speedup, "x", res["control"],
               "trivially parallel loop, same rounds", note="what the machine gave N processes meanwhile"),
        Figure("items lost", float(lost), "items", goal=0.0, goal_op="<=", goal_on="value"),
    ]
    return EntryResult(figures, {"items": len(items), "cores": cores, "timeouts": res["timeouts"],
                                 "round_s_1": one["round_s"], "round_s_n": many["round_s"], "control": res["control"]})
