"""Results on disk and for people: results.json (every sample), a Markdown table, a plot, run comparisons.

Everything here reads the JSON form of an :class:`~igrpo_megatron.evaluation.records.EvalRun` (a
dict), so a run just finished and one loaded from disk are reported by the same code. Files are
written to a temporary name and renamed, so a crash never leaves half a report.
"""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from igrpo_megatron.config.files import write_figure, write_text
from igrpo_megatron.evaluation.passk import difference_interval
from igrpo_megatron.evaluation.records import RESULTS_FORMAT_VERSION

logger = logging.getLogger(__name__)

RESULTS_NAME = "results.json"
TABLE_NAME = "report.md"
PLOT_NAME = "report.png"
COUNT_METRICS = ("mean_tokens",)  # shown as plain numbers, not percentages
SCORE_PREFIXES = ("pass@", "maj@", "pick_correct")  # shown with their confidence interval


def write_results(run: dict[str, Any], path: str | os.PathLike) -> Path:
    """results.json: the run's settings, metrics with intervals, per-problem values and every sample."""
    return write_text(path, json.dumps(run, indent=1, ensure_ascii=False, allow_nan=True))


def load_results(path: str | os.PathLike) -> dict[str, Any]:
    """A results.json, given the file or the directory holding it."""
    p = Path(path)
    if p.is_dir():
        p = p / RESULTS_NAME
    if not p.is_file():
        raise FileNotFoundError(f"{p}: no evaluation results here; pass a results.json written by `igrpo eval` "
                                "or the directory holding it.")
    try:
        run = json.loads(p.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{p}: not valid JSON ({exc.msg} at line {exc.lineno}); was the file cut short?") from None
    version = run.get("format_version") if isinstance(run, dict) else None
    if version != RESULTS_FORMAT_VERSION or "benchmarks" not in run:
        raise ValueError(f"{p}: not an igrpo evaluation results file (format_version {version!r}, expected "
                         f"{RESULTS_FORMAT_VERSION}).")
    return run


def _metric_order(names: set[str]) -> list[str]:
    """pass@k by k, then maj@n, then refine.* likewise, then the rates and token counts."""
    def key(name: str) -> tuple:
        base = name.split(".")[-1]
        group = 0 if not name.startswith("refine.") else (2 if name.count(".") > 1 else 1)
        kind = (0 if base.startswith("pass@") else 1 if base.startswith("maj@") else 2 if base == "pick_correct"
                else 4 if base in COUNT_METRICS else 3)
        num = int(base.split("@")[1]) if "@" in base else 0
        return (group, kind, num, name)
    return sorted(names, key=key)


def _fmt(name: str, m: dict[str, Any]) -> str:
    if m is None or m.get("value") is None or (isinstance(m["value"], float) and math.isnan(m["value"])):
        return "–"
    base = name.split(".")[-1]
    if base in COUNT_METRICS:
        return f"{m['value']:.1f}"
    if not base.startswith(SCORE_PREFIXES):  # descriptive rates: no interval, to keep the table narrow
        return f"{100 * m['value']:.1f}"
    return f"{100 * m['value']:.1f} [{100 * m['ci_low']:.1f}, {100 * m['ci_high']:.1f}]"


def markdown_table(run: dict[str, Any]) -> str:
    """Benchmarks as rows, metrics as columns: 'value [CI low, CI high]' in percent."""
    benches = run["benchmarks"]
    names = _metric_order({m for b in benches.values() for m in b["metrics"]})
    conf = next((m["confidence"] for b in benches.values() for m in b["metrics"].values()), 0.95)
    lines = [f"# Evaluation: {run.get('label', '')}", "",
             f"Model: `{run.get('model')}`. Scores in %, pass@k / maj@n with {100 * conf:.0f}% confidence intervals "
             f"over problems ({next((m['method'] for b in benches.values() for m in b['metrics'].values()), 'normal')});"
             " rates in %; mean_tokens in tokens per completion.", "",
             "| benchmark | problems | k | " + " | ".join(names) + " |",
             "|---|---:|---:|" + "---:|" * len(names)]
    for bname, b in benches.items():
        cells = [_fmt(n, b["metrics"].get(n)) for n in names]
        lines.append(f"| {bname} | {b['num_problems']} | {b['samples_per_problem']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _pass_curve(b: dict[str, Any], prefix: str = "") -> tuple[list[int], list[dict[str, Any]]]:
    ks = sorted(int(n[len(prefix) + 5:]) for n in b["metrics"] if n.startswith(prefix + "pass@")
                and "." not in n[len(prefix):])
    return ks, [b["metrics"][f"{prefix}pass@{k}"] for k in ks]


def plot_results(run: dict[str, Any], path: str | os.PathLike) -> Path:
    """Left: pass@k against k per benchmark (error bars: CI); right: pass@1, maj@n, refine.pass@1 bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    benches = run["benchmarks"]
    fig, (ax_k, ax_b) = plt.subplots(1, 2, figsize=(11, 4))
    for name, b in benches.items():
        ks, ms = _pass_curve(b)
        ax_k.errorbar(ks, [100 * m["value"] for m in ms], yerr=_yerr(ms), marker="o", capsize=3, label=name)
    ax_k.set_xscale("log", base=2)
    ax_k.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
    ax_k.set_xlabel("k")
    ax_k.set_ylabel("pass@k (%)")
    ax_k.set_title("unbiased pass@k")
    ax_k.legend(fontsize=8)
    bars = [("pass@1", lambda b: b["metrics"].get("pass@1")),
            ("maj@n", lambda b: next((v for k, v in b["metrics"].items() if k.startswith("maj@")), None)),
            ("refine pass@1", lambda b: b["metrics"].get("refine.pass@1"))]
    bars = [(label, get) for label, get in bars if any(get(b) for b in benches.values())]
    width = 0.8 / max(len(bars), 1)
    for j, (label, get) in enumerate(bars):
        ms = [get(b) or {"value": 0.0, "ci_low": 0.0, "ci_high": 0.0} for b in benches.values()]
        xs = [i + j * width for i in range(len(benches))]
        ax_b.bar(xs, [100 * m["value"] for m in ms], width, yerr=_yerr(ms), capsize=3, label=label)
    ax_b.set_xticks([i + width * (len(bars) - 1) / 2 for i in range(len(benches))], list(benches))
    ax_b.set_ylabel("score (%)")
    ax_b.set_title(f"{run.get('label', '')}: accuracy per benchmark")
    ax_b.legend(fontsize=8)
    fig.tight_layout()
    return write_figure(path, fig, dpi=110)


def _yerr(ms: list[dict[str, Any]]) -> list[list[float]]:
    return [[100 * (m["value"] - m["ci_low"]) for m in ms], [100 * (m["ci_high"] - m["value"]) for m in ms]]


def write_report(run: dict[str, Any], out_dir: str | os.PathLike, *, plot: bool = True) -> dict[str, Path]:
    """results.json, report.md and (with ``plot``) report.png in ``out_dir``; returns their paths."""
    out = Path(out_dir)
    paths = {"results": write_results(run, out / RESULTS_NAME), "table": write_text(out / TABLE_NAME,
                                                                                    markdown_table(run))}
    if plot:
        paths["plot"] = plot_results(run, out / PLOT_NAME)
    logger.info("evaluation report written to %s", out)
    return paths


# -- comparing two runs -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Comparison:
    """One benchmark x metric of run A against run B: values, difference B - A and its interval."""

    benchmark: str
    metric: str
    a: float
    b: float
    diff: float
    ci_low: float
    ci_high: float
    paired: bool

    @property
    def significant(self) -> bool:
        """The difference's interval excludes 0."""
        return self.ci_low > 0 or self.ci_high < 0


def compare_runs(run_a: dict[str, Any], run_b: dict[str, Any], *, confidence: float | None = None,
                 metrics: list[str] | None = None) -> list[Comparison]:
    """Every benchmark and metric present in both runs (token counts left out).

    Paired when both runs scored the same problem ids in the same order (the interval of the per-problem
    differences), unpaired otherwise (see ``passk.difference_interval``).
    """
    rows = []
    for bname in [n for n in run_a["benchmarks"] if n in run_b["benchmarks"]]:
        a, b = run_a["benchmarks"][bname], run_b["benchmarks"][bname]
        ids_a = [p["id"] for p in a["problems"]]
        ids_b = [p["id"] for p in b["problems"]]
        paired = ids_a == ids_b
        conf = confidence or next(iter(a["metrics"].values()), {}).get("confidence", 0.95)
        shared = set(a["per_problem"]) & set(b["per_problem"])
        names = [n for n in _metric_order(shared) if (metrics is None or n in metrics)
                 and n.split(".")[-1] not in COUNT_METRICS]
        for name in names:
            d = difference_interval(a["per_problem"][name], b["per_problem"][name], paired=paired, confidence=conf)
            rows.append(Comparison(bname, name, a["metrics"][name]["value"], b["metrics"][name]["value"], d.value,
                                   d.ci_low, d.ci_high, paired))
    return rows


def compare_markdown(rows: list[Comparison], label_a: str, label_b: str) -> str:
    """A table of A, B, B - A with its interval, and whether the interval excludes 0."""
    lines = [f"# Comparison: A = {label_a}, B = {label_b}", "",
             "Scores in %. 'outside CI' = the interval of B - A excludes 0 (paired over problems when both runs "
             "scored the same problems).", "",
             "| benchmark | metric | A | B | B - A | CI of B - A | outside CI |",
             "|---|---|---:|---:|---:|---|:---:|"]
    for r in rows:
        lines.append(f"| {r.benchmark} | {r.metric} | {100 * r.a:.1f} | {100 * r.b:.1f} | {100 * r.diff:+.1f} | "
                     f"[{100 * r.ci_low:+.1f}, {100 * r.ci_high:+.1f}]{'' if r.paired else ' (unpaired)'} | "
                     f"{'yes' if r.significant else 'no'} |")
    if not rows:
        lines.append("| – | no benchmark and metric in common | | | | | |")
    return "\n".join(lines) + "\n"


def plot_comparison(rows: list[Comparison], label_a: str, label_b: str, path: str | os.PathLike,
                    metric: str = "pass@1") -> Path:
    """Bars of A and B per benchmark for one metric, with the difference's CI printed above."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sel = [r for r in rows if r.metric == metric]
    fig, ax = plt.subplots(figsize=(max(4, 1.6 * len(sel) + 2), 3.6))
    xs = list(range(len(sel)))
    ax.bar([x - 0.2 for x in xs], [100 * r.a for r in sel], 0.4, label=f"A: {label_a}")
    ax.bar([x + 0.2 for x in xs], [100 * r.b for r in sel], 0.4, label=f"B: {label_b}")
    for x, r in zip(xs, sel, strict=True):
        ax.annotate(f"{100 * r.diff:+.1f}{'*' if r.significant else ''}", (x, 100 * max(r.a, r.b)),
                    ha="center", va="bottom", fontsize=8)
    ax.set_xticks(xs, [r.benchmark for r in sel])
    ax.set_ylabel(f"{metric} (%)")
    ax.set_title(f"{metric}: B - A (* = outside the CI)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return write_figure(path, fig, dpi=110)
