"""Scaling entry: the real RL step of the recipe's model on gloo at 1 rank, DP=2, TP=2 and PP=2.

Each layout runs ``MegatronPolicy.train_step`` on the same synthetic batch (the two-rank layouts
one after the other in the same two spawned ranks, one thread each); profiled steps give the
communication share: CPU time inside gloo collectives and point-to-point calls (their waits
included) over the step time, on rank 0. On a 2-core machine two ranks share the cores with
everything else running, so DP=2 cannot halve the step: the table shows what the layouts cost
here, not what they gain on a cluster.
"""

from __future__ import annotations

import statistics

from bench.common import EntryResult, Figure
from bench.train_step import bench_recipe, rank_timing

TWO_RANKS = {"DP=2": {}, "TP=2": {"tensor_model_parallel_size": 2}, "PP=2": {"pipeline_model_parallel_size": 2}}


def bench_scaling(ctx) -> EntryResult:
    from tests.helpers.distributed import run_on_ranks

    r, quick = bench_recipe(ctx.recipe), ctx.quick
    r.parallel.tensor_model_parallel_size = r.parallel.pipeline_model_parallel_size = 1
    r.parallel.backend = "gloo"
    steps = 2 if quick else 3
    one = run_on_ranks(rank_timing, 1, args=(r, steps, True, False), timeout=1200)[0]
    two = run_on_ranks(rank_timing, 2, args=(r, steps, True, False, list(TWO_RANKS.values())), timeout=1800)
    runs = {"1 rank": one} | {name: [two[0][i], two[1][i]] for i, name in enumerate(TWO_RANKS)}
    figures, details, base = [], {}, None
    for name, out in runs.items():
        step = max(o["median_s"] for o in out)  # a step ends when its slowest rank does
        comm = statistics.median(out[0]["comm_s"]) / statistics.median(out[0]["seconds"])
        base = base or step
        figures.append(Figure(f"step time, {name}", step, "s", None if name == "1 rank" else base,
                              "" if name == "1 rank" else "1 rank", note=f"communication {comm:.0%} of rank 0's step"))
        details[name] = {"per_rank_s": [o["seconds"] for o in out], "comm_s": [o["comm_s"] for o in out],
                         "comm_share": comm}
    return EntryResult(figures, details)
