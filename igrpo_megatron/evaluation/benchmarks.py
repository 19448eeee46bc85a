"""Benchmarks: the built-in public math sets, custom JSONL/Parquet files, and loading with field mapping.

The built-in names know the field names and answer types of the public files (kept outside the
project; README says where to get them) and read them from ``evaluation.data_dir`` or
``$IGRPO_EVAL_DATA_DIR``. Any other JSONL or Parquet file works by naming its problem and answer
fields.

Rows without a usable answer are an **error** naming the file, the row and the field, never a silent
skip: a benchmark whose denominator quietly shrinks reports a score that cannot be compared with
anyone else's. Gold answers are normalised by answer type so that, e.g., AMC's float ``27.0``
becomes ``"27"`` and matches an integer prediction.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from igrpo_megatron.config.errors import UserError
from igrpo_megatron.config.evaluation import (
    ANSWER_TYPES,
    EVAL_DATA_DIR_ENV,
    HELDOUT_BENCHMARK,
    EvaluationConfig,
    benchmark_kind,
    dataset_errors,
    known_benchmarks,
)
from igrpo_megatron.config.training import DataConfig
from igrpo_megatron.data.rows import DataError, Row, answer_text, check_row
from igrpo_megatron.data.rows import read_rows as read_table_rows

logger = logging.getLogger(__name__)

DATA_DIR_ENV = EVAL_DATA_DIR_ENV  # one name, shared with `igrpo plan`'s check
SYNTHETIC_HELDOUT_SIZE = 200  # problems generated for 'heldout' of a synthetic task (evaluation.limit overrides)


class BenchmarkError(UserError, ValueError):
    """A benchmark could not be found or read; the message names the file, row or key and the fix."""


@dataclass(frozen=True)
class BenchmarkSpec:
    """Where a benchmark's rows are and which fields hold what.

    ``file_name`` is set for built-ins (looked up in the data directory); ``path`` for everything else.
    """

    name: str
    problem_field: str = "problem"
    answer_field: str = "answer"
    id_field: str | None = None
    answer_type: str = "auto"  # 'integer' | 'number' | 'latex' | 'auto' (see normalize_gold)
    path: str | None = None
    file_name: str | None = None
    default_samples: int | None = None  # the paper's k for built-ins
    synthetic_task: str | None = None  # 'heldout' of a generated task (data.synthetic_task): no file
    synthetic_seed: int = 0
    synthetic_options: dict[str, int] | None = None  # data.synthetic_options


BUILTIN_BENCHMARKS: dict[str, BenchmarkSpec] = {
    "aime24": BenchmarkSpec("aime24", answer_field="expected_answer", id_field="id", answer_type="integer",
                            file_name="aime24.jsonl", default_samples=64),
    "aime25": BenchmarkSpec("aime25", answer_field="expected_answer", id_field="id", answer_type="integer",
                            file_name="aime25.jsonl", default_samples=64),
    "math500": BenchmarkSpec("math500", answer_field="answer", id_field="unique_id", answer_type="latex",
                             file_name="math500.jsonl", default_samples=8),
    "amc23": BenchmarkSpec("amc23", answer_field="answer", id_field="id", answer_type="number",
                           file_name="amc23.jsonl", default_samples=8),
}


@dataclass(frozen=True)
class Problem:
    """One benchmark row: its position in the file, a stable id, the problem text and the gold answer."""

    index: int
    id: str
    problem: str
    gold: str


@dataclass
class Benchmark:
    """A loaded benchmark: its spec, the file it came from and its problems (in file order)."""

    spec: BenchmarkSpec
    path: Path
    problems: list[Problem]

    @property
    def name(self) -> str:
        return self.spec.name

    def __len__(self) -> int:
        return len(self.problems)

    def subset(self, positions: list[int]) -> Benchmark:
        """The problems at ``positions`` (indices into ``problems``), in the order given."""
        return Benchmark(self.spec, self.path, [self.problems[i] for i in positions])


def eval_data_dir(configured: str | None) -> Path:
    """The built-ins' directory: ``evaluation.data_dir``, else ``$IGRPO_EVAL_DATA_DIR``; must exist."""
    value = configured or os.environ.get(DATA_DIR_ENV)
    if not value:
        raise BenchmarkError(
            f"built-in benchmarks need their files, and neither evaluation.data_dir nor ${DATA_DIR_ENV} is set. "
            f"Put aime24.jsonl, aime25.jsonl, math500.jsonl and amc23.jsonl in a directory (README: 'Evaluation "
            f"data') and set evaluation.data_dir=DIR or export {DATA_DIR_ENV}=DIR.")
    path = Path(value).expanduser()
    if not path.is_dir():
        source = "evaluation.data_dir" if configured else f"${DATA_DIR_ENV}"
        raise BenchmarkError(f"{source} = {value!r} is not a directory; point it at the folder holding "
                             "aime24.jsonl, aime25.jsonl, math500.jsonl and amc23.jsonl.")
    return path


def resolve_spec(name: str, cfg: EvaluationConfig, data: DataConfig | None = None, *,
                 problem_field: str = "problem", answer_field: str = "answer", seed: int = 0) -> BenchmarkSpec:
    """The spec for a benchmark name, looked up in :func:`benchmark_kind`'s order (recipe datasets, built-ins,
    'heldout', file paths).

    'heldout' is ``data.eval_path`` when set, else the held-out split of ``data.synthetic_task``
    generated with ``seed`` (the recipe's run seed). ``problem_field`` / ``answer_field`` apply to a
    bare file path (``--benchmarks my/set.parquet``).
    """
    kind = benchmark_kind(name, cfg.datasets)
    if kind == "dataset":
        entry = cfg.datasets[name]
        errs = dataset_errors(name, entry, f"evaluation.datasets.{name}")
        if errs:
            raise BenchmarkError("\n".join(errs))
        return BenchmarkSpec(name, problem_field=entry.get("problem_field") or "problem",
                             answer_field=entry.get("answer_field") or "answer", id_field=entry.get("id_field"),
                             answer_type=entry.get("answer_type") or "auto", path=entry["path"],
                             default_samples=entry.get("samples_per_problem"))
    if kind == "builtin":
        return BUILTIN_BENCHMARKS[name]
    if kind == "heldout":
        if data is not None and data.eval_path is not None:
            return BenchmarkSpec(HELDOUT_BENCHMARK, problem_field=data.problem_field,
                                 answer_field=data.answer_field, path=data.eval_path)
        if data is not None and data.synthetic_task is not None:
            return BenchmarkSpec(HELDOUT_BENCHMARK, answer_type="integer", synthetic_task=data.synthetic_task,
                                 synthetic_seed=seed, synthetic_options=dict(data.synthetic_options))
        raise BenchmarkError("benchmark 'heldout' reads data.eval_path (or the held-out split of "
                             "data.synthetic_task), and neither is set; set data.eval_path to the held-out "
                             "JSONL/Parquet file, or name another benchmark.")
    if kind == "file":
        return BenchmarkSpec(Path(name).stem, problem_field=problem_field, answer_field=answer_field, path=name)
    raise BenchmarkError(f"unknown benchmark {name!r}: use one of {known_benchmarks(cfg.datasets)}, a path to a "
                         f".jsonl/.parquet file, or define it under evaluation.datasets.{name} (path, problem_field, "
                         "answer_field).")


def samples_per_problem(spec: BenchmarkSpec, cfg: EvaluationConfig) -> int:
    """k for a benchmark: evaluation.samples_per_problem[name], else the spec's default, else the global default."""
    if spec.name in cfg.samples_per_problem:
        return cfg.samples_per_problem[spec.name]
    return spec.default_samples or cfg.default_samples_per_problem


def spec_path(spec: BenchmarkSpec, data_dir: str | None) -> Path:
    """The file a spec reads (built-ins: inside the data directory; generated sets: a pseudo path)."""
    if spec.synthetic_task is not None:
        return Path(f"synthetic:{spec.synthetic_task}/heldout/seed{spec.synthetic_seed}")
    if spec.file_name is not None:
        return eval_data_dir(data_dir) / spec.file_name
    if spec.path is None:
        raise BenchmarkError(f"benchmark {spec.name!r} has neither a path nor a built-in file name; set its path.")
    return Path(spec.path).expanduser()


def load_benchmark(spec: BenchmarkSpec, data_dir: str | None = None, limit: int | None = None) -> Benchmark:
    """Read and check every row of a benchmark (or its first ``limit`` rows)."""
    if spec.answer_type not in ANSWER_TYPES:
        raise BenchmarkError(f"benchmark {spec.name!r}: answer_type {spec.answer_type!r} must be one of "
                             f"{list(ANSWER_TYPES)}.")
    path = spec_path(spec, data_dir)
    rows = _synthetic_rows(spec, limit) if spec.synthetic_task is not None else read_rows(path)
    if not rows:
        raise BenchmarkError(f"{path}: no rows; benchmark {spec.name!r} would be empty.")
    _check_columns(path, rows[0].fields, spec)
    if limit is not None:
        rows = rows[:limit]
    problems = [_problem(i, row, spec) for i, row in enumerate(rows)]
    ids = [p.id for p in problems]
    if len(set(ids)) != len(ids):
        dup = next(i for i in ids if ids.count(i) > 1)
        raise BenchmarkError(f"{path}: id {dup!r} (field {spec.id_field!r}) appears more than once; ids must be "
                             "unique to pair runs in `igrpo eval --compare`. Fix the file or set id_field: null.")
    logger.info("benchmark %s: %d problems from %s", spec.name, len(problems), path)
    return Benchmark(spec, path, problems)


def read_rows(path: Path) -> list[Row]:
    """Rows of a JSONL or Parquet file (the data package's reader), as BenchmarkError on failure."""
    if not path.is_file():
        raise BenchmarkError(f"{path}: benchmark file not found; check the path (or evaluation.data_dir for "
                             "built-in benchmarks).")
    try:
        return read_table_rows(path)
    except DataError as exc:
        raise BenchmarkError(f"cannot read benchmark file: {exc}") from None


def _synthetic_rows(spec: BenchmarkSpec, limit: int | None) -> list[dict[str, Any]]:
    """The held-out split of a generated task as rows (the generator keeps it disjoint from training)."""
    from igrpo_megatron.data.synthetic import build_task

    try:
        task = build_task(spec.synthetic_task, spec.synthetic_options)
    except ValueError as exc:
        raise BenchmarkError(f"benchmark {spec.name!r}: {exc}") from None
    items = task.generate(limit or SYNTHETIC_HELDOUT_SIZE, "heldout", spec.synthetic_seed)
    where = spec_path(spec, None)
    return [Row(f"{where}, row {i}", i, {"problem": p.problem, "answer": p.answer})
            for i, p in enumerate(items, start=1)]


def _check_columns(path: Path, first: dict[str, Any], spec: BenchmarkSpec) -> None:
    for key, field in (("problem_field", spec.problem_field), ("answer_field", spec.answer_field),
                       ("id_field", spec.id_field)):
        if field is not None and field not in first:
            raise BenchmarkError(f"{path}: the first row has no field {field!r} (benchmark {spec.name!r}, "
                                 f"{key}); its fields are {sorted(first)}. Set {key} to the right one.")


def _problem(i: int, row: Row, spec: BenchmarkSpec) -> Problem:
    """The row as a Problem: the shared row check (data.rows), then the benchmark's answer type."""
    try:
        text, answer = check_row(row, spec.problem_field, spec.answer_field)
    except DataError as exc:
        raise BenchmarkError(str(exc)) from None
    gold = _typed_answer(answer, spec.answer_type, f"{row.where}, field {spec.answer_field!r}")
    pid = row.fields.get(spec.id_field) if spec.id_field else None
    return Problem(index=i, id=str(pid) if pid is not None else f"{spec.name}-{i}", problem=text, gold=gold)


_INT = re.compile(r"[+-]?\d+")
_DECIMAL = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")


def normalize_gold(value: Any, answer_type: str, where: str) -> str:
    """The gold answer as the string the reward compares against.

    The shared check (:func:`igrpo_megatron.data.rows.answer_text`) first: missing, empty, boolean,
    non-finite or non-scalar values raise BenchmarkError; integral numbers lose their '.0'. Then the
    type: 'integer' (AIME) must be a whole number ('027' and 27.0 both become '27'); 'number' (AMC)
    any decimal; 'latex' / 'auto' keep strings as written.
    """
    try:
        text = answer_text(value, where)
    except DataError as exc:
        raise BenchmarkError(str(exc)) from None
    return _typed_answer(text, answer_type, where)


def _typed_answer(text: str, answer_type: str, where: str) -> str:
    if answer_type == "integer":
        if _INT.fullmatch(text):
            return str(int(text))
        if _DECIMAL.fullmatch(text) and float(text).is_integer():
            return str(int(float(text)))
        raise BenchmarkError(f"{where}: answer {text!r} is not a whole number, but this benchmark's answer_type "
                             "is 'integer'; fix the row or use answer_type 'auto'.")
    if answer_type == "number":
        if not _DECIMAL.fullmatch(text):
            raise BenchmarkError(f"{where}: answer {text!r} is not a number, but this benchmark's answer_type is "
                                 "'number'; fix the row or use answer_type 'auto'.")
        return answer_text(float(text), where) if not _INT.fullmatch(text) else str(int(text))
    return text


def load_benchmarks(names: list[str], cfg: EvaluationConfig, data: DataConfig | None = None, *,
                    problem_field: str = "problem", answer_field: str = "answer", seed: int = 0) -> list[Benchmark]:
    """Resolve and load every named benchmark (all errors surface before any sampling starts)."""
    specs = [resolve_spec(n, cfg, data, problem_field=problem_field, answer_field=answer_field, seed=seed)
             for n in names]
    seen: set[str] = set()
    for i, spec in enumerate(specs):
        if spec.name in seen:  # two files with the same stem: keep both, distinguishable
            specs[i] = replace(spec, name=f"{spec.name}-{i}")
        seen.add(specs[i].name)
    return [load_benchmark(s, cfg.data_dir, cfg.limit) for s in specs]
