"""What an evaluation produces: every sample with its score, per-problem records, per-benchmark metrics.

These are plain dataclasses so that ``results.json`` is ``dataclasses.asdict`` of an :class:`EvalRun`;
the report layer (Markdown, plots, ``--compare``) reads that JSON form, so a fresh run and a run
loaded from disk go through the same code.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from igrpo_megatron.evaluation.passk import Interval

RESULTS_FORMAT_VERSION = 1


@dataclass
class SampleRecord:
    """One sampled completion and how it scored."""

    text: str
    answer: str | None  # the extracted final answer (None: none found)
    correct: bool
    reward: float  # the correctness reward's value (1.0 / 0.0 for math)
    finish_reason: str  # 'stop', 'length' (hit max_tokens) or 'abort'
    num_tokens: int
    error: str | None = None  # why the reward could not score it normally (timeout, bad gold, ...)


@dataclass
class RefineRoundRecord:
    """One test-time refinement round of one problem."""

    round: int
    picked: int  # index of the conditioning sample in the previous round's pool (drafts for round 1)
    picked_answer: str | None
    picked_correct: bool
    vote_share: float  # fraction of the pool sharing the picked answer (0 when it has none)
    used_draft: bool  # False: refined from the plain prompt (no draft fitted, or no_answer_policy)
    draft_truncated: bool
    prompt_tokens: int
    samples: list[SampleRecord]


@dataclass
class ProblemRecord:
    """Everything sampled for one problem."""

    index: int  # row in the benchmark file
    id: str
    problem: str
    gold: str
    prompt_tokens: int
    samples: list[SampleRecord]
    extra_drafts: list[SampleRecord] = field(default_factory=list)  # refine.num_drafts beyond the k samples
    refine: list[RefineRoundRecord] = field(default_factory=list)


@dataclass
class BenchmarkResult:
    """One benchmark: metrics with intervals, per-problem metric values (for paired comparisons), samples."""

    name: str
    path: str
    num_problems: int
    samples_per_problem: int
    metrics: dict[str, Interval]
    per_problem: dict[str, list[float]]  # metric -> value per problem, aligned with `problems`
    problems: list[ProblemRecord]
    wall_s: float


@dataclass
class EvalRun:
    """A whole ``igrpo eval`` run (what results.json holds)."""

    label: str
    created: str
    model: str | None
    settings: dict[str, Any]  # the evaluation section and sampling actually used
    benchmarks: dict[str, BenchmarkResult]
    format_version: int = RESULTS_FORMAT_VERSION

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def flat_metrics(result: BenchmarkResult | dict[str, Any], prefix: str = "") -> dict[str, float]:
    """``{prefix}{metric}: value`` of one benchmark (for metric loggers)."""
    metrics = result["metrics"] if isinstance(result, dict) else {k: asdict(v) for k, v in result.metrics.items()}
    return {f"{prefix}{name}": float(m["value"]) for name, m in metrics.items()}
