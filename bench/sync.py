"""Weight-sync entry: bench/weight_sync.py (seconds per full push into the real vLLM sidecar, per
transport, against the same bytes moved by the bare medium), run as a script; its last line is JSON.
Sized from the recipe's model (hidden size and layers)."""

from __future__ import annotations

from bench.common import EntryResult, Figure, last_json_line, python, run_logged


def bench_weight_sync(ctx) -> EntryResult:
    m = ctx.recipe.model
    args = ["--pushes", "2" if ctx.quick else "4", "--hidden", str(m.hidden_size), "--layers", str(m.num_layers),
            "--workdir", str(ctx.work / "weight_sync")]
    out = last_json_line(run_logged([python(), "bench/weight_sync.py", *args], ctx.work / "weight_sync.log",
                                    timeout_s=900), "bench/weight_sync.py")
    figures = [Figure(f"full push, {r['transport']}", r["median_s"], "s", r["ceiling_s"],
                      f"{r['bytes'] / 1e6:.2f} MB by {r['ceiling_medium']}", goal=1.5, goal_op="<=",
                      note=f"min-max {r['min_s']:.3f}-{r['max_s']:.3f} s")
               for r in out["rows"]]
    return EntryResult(figures, {"args": args, **out})
