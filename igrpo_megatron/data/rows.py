"""Reading and checking the rows of a problem set: one reader and one row check for every loader.

Training prompts (:mod:`igrpo_megatron.data.datasets`) and evaluation benchmarks
(:mod:`igrpo_megatron.evaluation.benchmarks`) read the same JSONL/Parquet files and apply the same
rules to a row, so a row one accepts the other does too. Every message names the file and the
1-based line (JSONL; blank lines count, as in an editor) or row (Parquet). What a loader does with a
bad row is its own policy: training skips and counts it, evaluation refuses the benchmark.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from igrpo_megatron.config.errors import UserError

TABLE_FORMATS = (".jsonl", ".json", ".parquet")


class DataError(UserError, ValueError):
    """A data file or one of its rows cannot be used; the message names the file and the line or row."""


@dataclass(frozen=True)
class Row:
    """One row of a problem set and where it is: ``where`` reads "FILE, line N" (JSONL) or "FILE, row N"."""

    where: str
    number: int  # N: the 1-based line (JSONL) or row (Parquet)
    fields: dict[str, Any]


def read_rows(path: str | Path) -> list[Row]:
    """Every row of a JSONL or Parquet file, each an object with named fields; :class:`DataError` otherwise."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: dataset file not found; check the path")
    if path.suffix not in TABLE_FORMATS:
        raise DataError(f"{path}: unsupported dataset format {path.suffix!r}; use .jsonl or .parquet")
    rows = _parquet_rows(path) if path.suffix == ".parquet" else _jsonl_rows(path)
    if not rows:
        raise DataError(f"{path}: the file holds no rows")
    return rows


def _jsonl_rows(path: Path) -> list[Row]:
    rows = []
    with path.open("rb") as fh:
        for lineno, raw in enumerate(fh, start=1):
            where = f"{path}, line {lineno}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise DataError(f"{where}: not UTF-8 (byte 0x{raw[exc.start]:02x} at column {exc.start + 1}); "
                                "re-encode the file as UTF-8") from None
            if not line.strip():
                continue
            try:
                value = json.loads(line.rstrip("\r\n"))
            except json.JSONDecodeError as exc:
                raise DataError(f"{where}: not valid JSON ({exc.msg}, column {exc.colno})") from None
            rows.append(_row(where, lineno, value))
    return rows


def _parquet_rows(path: Path) -> list[Row]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except (OSError, pa.ArrowException) as exc:
        raise DataError(f"{path}: cannot read it as Parquet ({exc})") from None
    return [_row(f"{path}, row {i}", i, value) for i, value in enumerate(table.to_pylist(), start=1)]


def _row(where: str, number: int, value: Any) -> Row:
    if not isinstance(value, dict):
        raise DataError(f"{where}: expected an object with named fields (e.g. {{\"problem\": ..., \"answer\": ...}}), "
                        f"got a JSON {type(value).__name__}")
    return Row(where, number, value)


def answer_text(value: Any, where: str) -> str:
    """A gold answer as text: strings stripped, integral numbers without '.0' (AMC's 27.0 -> '27').

    Missing, empty, boolean, non-finite and non-scalar (list, object) answers raise :class:`DataError`.
    """
    if value is None or isinstance(value, bool) or (isinstance(value, str) and not value.strip()):
        raise DataError(f"{where}: no answer (got {value!r}); every row needs a gold answer. Fix the row "
                        "or point the answer field at the right column.")
    if isinstance(value, (int, float)):
        if not math.isfinite(value):
            raise DataError(f"{where}: answer {value!r} is not a finite number.")
        return str(int(value)) if isinstance(value, int) or value.is_integer() else repr(float(value))
    if isinstance(value, str):
        return value.strip()
    raise DataError(f"{where}: answer must be a string or a number, got {type(value).__name__} {value!r}.")


def check_row(row: Row, problem_field: str, answer_field: str) -> tuple[str, str]:
    """The row's problem text and gold answer text, or :class:`DataError` naming the file, line and field."""
    problem = row.fields.get(problem_field)
    if not isinstance(problem, str) or not problem.strip():
        got = "missing" if problem is None else f"{type(problem).__name__} {problem!r}"
        raise DataError(f"{row.where}, field {problem_field!r}: no problem text ({got}); every row needs one "
                        "(fix the row, or name the right problem field).")
    return problem, answer_text(row.fields.get(answer_field), f"{row.where}, field {answer_field!r}")
