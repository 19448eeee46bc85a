"""Step-breakdown and padding entries, both from one short real run of the recipe through the
training loop (bench/loop_run.py, in its own process; the run is shared by the two entries).

Step breakdown: the loop's own timers (``time/*`` in metrics.jsonl), median over the timed steps
(the first step is left out when there are more), each phase as a share of ``time/step``. With
pipelined iGRPO rollouts (the loop's mode) Stage 1, scoring and Stage 2 overlap, so the loop has
one ``time/rollout``; the scoring calls' wall time is given summed over the concurrent calls.
Evaluation and checkpointing run after ``time/step`` is taken and are shown against it.

Padding: the fraction of padded positions in the micro-batches the planner
(``training/batch.plan_micro_batches``) built for the train step of that run, against the same
sequences planned longest-first, and a packed layout (first-fit-decreasing into rows of
``trainer.micro_batch_tokens``, the lower bound a packing planner could reach; the project has no
packed path).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import statistics
import time

from bench.common import EntryResult, Figure, python, run_logged
from igrpo_megatron.config.layout import micro_batch_pad_multiple
from igrpo_megatron.training.batch import Sequence, TrainBatch, build_micro_batch, plan_micro_batches

LOOP_OVERRIDES = ["trainer.num_steps=3", "trainer.eval_every=3", "evaluation.hook.num_problems=32",
                  "trainer.save_every=0", "trainer.warmstart.steps=300"]
QUICK_OVERRIDES = ["trainer.num_steps=2", "trainer.eval_every=2", "evaluation.hook.num_problems=4",
                   "trainer.save_every=0", "trainer.warmstart.steps=20", "trainer.prompts_per_step=4"]
PHASES = ("rollout", "logprob", "train", "sync")
_RUNS: dict[str, dict] = {}


def loop_record(ctx) -> dict:
    """The recorded run (made once per suite and reused by both entries)."""
    overrides = (QUICK_OVERRIDES if ctx.quick else LOOP_OVERRIDES) + list(ctx.overrides)
    key = hashlib.sha1(json.dumps([str(ctx.recipe_path), overrides]).encode()).hexdigest()[:10]
    if key in _RUNS:
        return _RUNS[key]
    cache = ctx.work / "loop_cache" / key  # tokenizer and warm-start, reused by later suite runs
    root = ctx.work / "loop_runs" / time.strftime("%Y%m%d-%H%M%S")
    run_dir = root / ctx.recipe.run.name
    run_dir.mkdir(parents=True)
    for name in ("tokenizer", "warmstart"):
        if (cache / name / "config.json").exists() or (cache / name / "tokenizer.json").exists():
            shutil.copytree(cache / name, run_dir / name)
    out = root / "record.json"
    run_logged([python(), "-m", "bench.loop_run", str(ctx.recipe_path), str(out), str(root), *overrides],
               root / "loop_run.log", timeout_s=1800)
    for name in ("tokenizer", "warmstart"):
        if not (cache / name).exists() and (run_dir / name).exists():
            shutil.copytree(run_dir / name, cache / name)
    record = json.loads(out.read_text())
    record["metrics"] = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    record["overrides"] = overrides
    _RUNS[key] = record
    return record


def bench_step_breakdown(ctx) -> EntryResult:
    rec = loop_record(ctx)
    steps = [m for m in rec["metrics"] if "time/step" in m]
    timed = steps[1:] if len(steps) > 1 else steps

    def med(key: str) -> float | None:
        values = [m[key] for m in timed if m.get(key) is not None]
        return statistics.median(values) if values else None

    step = med("time/step")
    figures, shown = [], 0.0
    for phase in PHASES:
        value = med(f"time/{phase}") or 0.0
        shown += value
        figures.append(Figure(f"{phase}", value, "s", step, "time/step", note="share of the step"))
    figures.append(Figure("other (batch building, broadcast, version check)", step - shown, "s", step, "time/step"))
    for phase in ("eval", "checkpoint"):
        value = med(f"time/{phase}") or statistics.median([m[f"time/{phase}"] for m in steps if f"time/{phase}" in m]
                                                          or [0.0])
        figures.append(Figure(phase, value, "s", step, "time/step", note="after the step (not inside it)"))
    stage1 = med("time/rollout_stage1")
    details = {"steps": len(steps), "timed_steps": [m["step"] for m in timed], "time_step_s": step,
               "rollout_stage1_s": stage1, "score_calls_summed_s": rec["score_call_s"],
               "overrides": rec["overrides"], "run_dir": rec["run_dir"],
               "times": [{k: v for k, v in m.items() if k.startswith("time/")} for m in steps]}
    return EntryResult(figures, details)


def _padding(batch: TrainBatch, plans: list[list[int]], pad_to: int) -> tuple[int, int]:
    real = total = 0
    for plan in plans:
        mb = build_micro_batch(batch, plan, pad_to=pad_to)
        total += mb.tokens.numel()
        real += sum(batch.sequences[i].length - 1 for i in plan)
    return real, total


def _packed_positions(lengths: list[int], width: int) -> int:
    """Positions a packed layout needs: first-fit-decreasing into rows of ``width`` (a longer
    sequence gets a row of its own length); every row full width except the least-filled one, which
    is cut to its content."""
    rows: list[list[int]] = []  # [capacity, filled]
    for n in sorted(lengths, reverse=True):
        for row in rows:
            if row[0] - row[1] >= n:
                row[1] += n
                break
        else:
            rows.append([max(width, n), n])
    last = min(range(len(rows)), key=lambda i: rows[i][1])
    return sum(cap for i, (cap, _) in enumerate(rows) if i != last) + rows[last][1]


def bench_padding(ctx) -> EntryResult:
    rec = loop_record(ctx)
    budget, pad_to = rec["micro_batch_tokens"], micro_batch_pad_multiple(ctx.recipe.model, ctx.recipe.parallel)
    real = planned = sorted_total = packed_total = 0
    for s in rec["steps"]:
        real += sum(mb["real_tokens"] for mb in s["micro_batches"])
        planned += sum(mb["shape"][0] * mb["shape"][1] for mb in s["micro_batches"])
        batch = TrainBatch([Sequence([0] * p, [0] * c, 0.0) for p, c in zip(s["prompt_lengths"],
                                                                              s["completion_lengths"], strict=True)])
        order = sorted(range(len(batch)), key=lambda i: -batch.sequences[i].length)
        by_length = TrainBatch([batch.sequences[i] for i in order])
        plans = plan_micro_batches([q.length for q in by_length.sequences], budget, pad_to=pad_to)
        sorted_total += _padding(by_length, plans, pad_to)[1]
        inputs = [q.length - 1 for q in batch.sequences]
        packed_total += _packed_positions(inputs, budget)
    lengths = [p + c for s in rec["steps"] for p, c in zip(s["prompt_lengths"], s["completion_lengths"], strict=True)]
    q = statistics.quantiles(lengths, n=10)
    figures = [
        Figure("padded fraction, planner (as trained)", 1 - real / planned, "", goal=0.05, goal_op="<=",
               goal_on="value", note=f"{len(rec['steps'])} train steps, budget {budget} tokens"),
        Figure("positions, planner (as trained)", float(planned), "tokens", float(real), "real tokens"),
        Figure("positions, longest-first plan", float(sorted_total), "tokens", float(real), "real tokens",
               note=f"same planner, sorted input: {1 - real / sorted_total:.1%} padded"),
        Figure("positions, packed rows", float(packed_total), "tokens", float(real), "real tokens",
               note=f"first-fit decreasing, a lower bound: {1 - real / packed_total:.1%} padded"),
    ]
    return EntryResult(figures, {"sequences": len(lengths), "length_p10_p50_p90": [q[0], q[4], q[8]],
                                 "length_min_max": [min(lengths), max(lengths)], "real_tokens": real,
                                 "planned": planned, "sorted_plan": sorted_total, "packed": packed_total})
