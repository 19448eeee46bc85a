"""Evaluation: pass@k on AIME24/25, MATH-500, AMC23 and custom sets, test-time refinement, reports.

``igrpo eval`` runs :func:`~igrpo_megatron.evaluation.cli.run_eval_command`; training calls
:class:`~igrpo_megatron.evaluation.hook.PeriodicEvaluator` on its live sidecar. The pieces:
``passk`` (estimator and intervals), ``benchmarks`` (files and field mapping), ``runner`` (sampling
and scoring over a ``RolloutEngine``), ``refine`` (draft-then-refine), ``report`` (JSON, Markdown,
plots, comparisons).
"""

from igrpo_megatron.evaluation.benchmarks import (
    BUILTIN_BENCHMARKS,
    Benchmark,
    BenchmarkError,
    BenchmarkSpec,
    Problem,
    load_benchmark,
    load_benchmarks,
    resolve_spec,
)
from igrpo_megatron.evaluation.passk import Interval, difference_interval, mean_interval, pass_at_k
from igrpo_megatron.evaluation.records import BenchmarkResult, EvalRun, ProblemRecord, SampleRecord
from igrpo_megatron.evaluation.runner import EvaluationError, Evaluator, run_sync

__all__ = [
    "BUILTIN_BENCHMARKS", "Benchmark", "BenchmarkError", "BenchmarkResult", "BenchmarkSpec", "EvalRun",
    "EvaluationError", "Evaluator", "Interval", "Problem", "ProblemRecord", "SampleRecord",
    "difference_interval", "load_benchmark", "load_benchmarks", "mean_interval", "pass_at_k", "resolve_spec",
    "run_sync",
]
