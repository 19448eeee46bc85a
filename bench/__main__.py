"""One bench suite: each phase of an iGRPO step measured against its ceiling (or baseline).

    python -m bench RECIPE [--only NAME ...] [--json OUT] [--workdir DIR] [--quick] [KEY=VALUE ...]

Entries (``--only`` picks some, in this order):

- reward:   math-reward items/s, 1 worker and all cores; speed-up against the core count
- rollout:  sidecar tokens/s against the same vLLM driven directly; iGRPO/GRPO wall ratios
- train:    tokens/s and model FLOP/s of the Megatron RL step against a torch.matmul ceiling
- sync:     seconds per full weight push per transport against bytes / the medium's speed
- padding:  padded fraction of the planner's micro-batches in a real run of the recipe
- step:     time per phase of a real iGRPO step from the loop's own timers, and each share
- scaling:  RL step time on gloo at 1 rank, DP=2, TP=2, PP=2, with the communication share

Prints progress, then one table (every figure beside its ceiling or baseline and their ratio,
with the issue's goal where there is one), and writes all figures and details as JSON
(``--json``, default WORKDIR/bench.json; written atomically after every entry). ``KEY=VALUE`` overrides apply to
the recipe as in ``igrpo train``. Exit code 0 when every entry ran, 1 when one failed (the others
still run and are reported), 2 for a bad recipe or entry name. bench/RESULTS.md holds a run's figures.
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import platform
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

from bench.common import EntryResult, load_average

logger = logging.getLogger("bench")


@dataclass
class Context:
    """What every entry gets: the recipe (loaded and as given), a work directory, and ``quick``
    (smaller sizes: for the suite's own test)."""

    recipe_path: Path
    overrides: list[str]
    recipe: object
    work: Path
    quick: bool = False
    results: dict = field(default_factory=dict)


def _entries() -> dict:
    from bench.loop_entries import bench_padding, bench_step_breakdown
    from bench.reward import bench_reward
    from bench.rollout import bench_rollout
    from bench.scaling import bench_scaling
    from bench.sync import bench_weight_sync
    from bench.train_step import bench_train_step

    return {"reward": bench_reward, "rollout": bench_rollout, "train": bench_train_step, "sync": bench_weight_sync,
            "padding": bench_padding, "step": bench_step_breakdown, "scaling": bench_scaling}


NAMES = ("reward", "rollout", "train", "sync", "padding", "step", "scaling")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    p.add_argument("recipe", help="Recipe YAML (e.g. recipes/tiny_cpu.yaml).")
    p.add_argument("overrides", nargs="*", help="KEY=VALUE recipe overrides.")
    p.add_argument("--only", nargs="+", metavar="NAME", help=f"Run only these entries: {', '.join(NAMES)}.")
    p.add_argument("--json", help="Where the JSON goes (default: WORKDIR/bench.json).")
    p.add_argument("--workdir", default=str(Path(tempfile.gettempdir()) / "igrpo-bench"),
                   help="Built models, logs and the recorded run (kept: later runs reuse models and warm-starts).")
    p.add_argument("--quick", action="store_true", help="Smaller sizes everywhere (a smoke test, not figures).")
    return p.parse_args(argv)


def _fmt(x: float | None, unit: str) -> str:
    if x is None:
        return "-"
    if unit == "":
        return f"{x:.1%}"
    if unit in ("FLOP/s",):
        return f"{x / 1e9:.2f} GFLOP/s"
    if abs(x) >= 1000:
        return f"{x:,.0f} {unit}"
    return f"{x:.3g} {unit}".strip()


def table(results: dict[str, dict]) -> str:
    """Markdown table: entry, figure, value, ceiling or baseline, ratio, goal (met or MISSED)."""
    rows = ["| entry | figure | value | ceiling / baseline | ratio | goal | note |", "|---|---|---|---|---|---|---|"]
    for name, res in results.items():
        if "error" in res:
            rows.append(f"| {name} | FAILED | - | - | - | - | {res['error'].splitlines()[0][:120]} |")
            continue
        for f in res["figures"]:
            ceiling = "-" if f["ceiling"] is None else f"{_fmt(f['ceiling'], f['unit'] if f['unit'] else '')} ({f['ceiling_label']})"
            ratio = "-" if f["ratio"] is None else f"{f['ratio']:.3g}"
            goal = "-"
            if f["goal"] is not None:
                target = _fmt(f["goal"], f["unit"]) if f["goal_on"] == "value" else f"{f['goal']:g}"
                goal = f"{f['goal_on']} {f['goal_op']} {target}: {'met' if f['goal_met'] else 'MISSED'}"
            rows.append(f"| {name} | {f['name']} | {_fmt(f['value'], f['unit'])} | {ceiling} | {ratio} | {goal} | "
                        f"{f['note']} |")
    return "\n".join(rows)


def write_json(path: Path, payload: dict) -> None:
    from igrpo_megatron.evaluation.report import write_text

    write_text(path, json.dumps(payload, indent=1, default=str))


def run(ctx: Context, names: list[str], on_entry=None) -> dict[str, dict]:
    """Run the entries in order; ``on_entry(results)`` after each (the JSON is rewritten as they finish)."""
    entries = _entries()
    start = time.perf_counter()
    for i, name in enumerate(names, 1):
        logger.info("[%d/%d] %s ... (%.0f s so far; load average %s)", i, len(names), name,
                    time.perf_counter() - start, load_average())
        t0 = time.perf_counter()
        try:
            res: EntryResult = entries[name](ctx)
            ctx.results[name] = {"figures": [f.as_dict() for f in res.figures], "details": res.details}
        except Exception as exc:  # one failed entry must not hide the others' figures
            logger.error("%s failed: %s", name, str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
            ctx.results[name] = {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()}
        ctx.results[name]["seconds"] = time.perf_counter() - t0
        logger.info("[%d/%d] %s done in %.0f s", i, len(names), name, ctx.results[name]["seconds"])
        if on_entry is not None:
            on_entry(ctx.results)
    return ctx.results


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    from igrpo_megatron.config import RecipeError, load_recipe

    names = args.only or list(NAMES)
    unknown = [n for n in names if n not in NAMES]
    if unknown:
        print(f"python -m bench: unknown entry {', '.join(unknown)}; choose from {', '.join(NAMES)}", file=sys.stderr)
        return 2
    try:
        recipe = load_recipe(args.recipe, args.overrides)
    except (RecipeError, FileNotFoundError) as exc:
        print(f"python -m bench: {exc}", file=sys.stderr)
        return 2
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    ctx = Context(Path(args.recipe), list(args.overrides), recipe, work, quick=args.quick)
    started = datetime.datetime.now(datetime.UTC)
    load_start = load_average()
    t0 = time.perf_counter()
    out = Path(args.json) if args.json else work / "bench.json"

    def payload(results: dict, done: bool) -> dict:
        return {"command": " ".join(["python -m bench", *(argv if argv is not None else sys.argv[1:])]),
                "started_utc": started.isoformat(timespec="seconds"), "seconds": time.perf_counter() - t0,
                "complete": done, "machine": {"host": platform.node(), "cpus": os.cpu_count(),
                                              "python": platform.python_version(), "load_average_start": load_start,
                                              "load_average_end": load_average()},
                "entries": results, "table": table(results)}

    # Rewritten after every entry, so a run cut short keeps what it measured.
    results = run(ctx, [n for n in NAMES if n in names], on_entry=lambda r: write_json(out, payload(r, False)))
    final = payload(results, True)
    write_json(out, final)
    print("\n" + final["table"])
    print(f"\nJSON: {out}  ({final['seconds']:.0f} s; load average {load_start} at start, "
          f"{final['machine']['load_average_end']} at end, {os.cpu_count()} CPUs)")
    return 1 if any("error" in r for r in results.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
