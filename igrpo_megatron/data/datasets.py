"""Prompt datasets: JSONL or Parquet files with configurable field names, and the epoch loader.

Training goes on past a bad row: a row without a problem or an answer is skipped, counted and
logged with its file and row number. A file that cannot be read at all is an error naming it.
"""

from __future__ import annotations

import json
import logging
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class PromptRecord:
    """One prompt of a dataset: problem text, reference answer, and where it came from."""

    problem: str
    answer: str
    source: str = ""


@dataclass
class LoadReport:
    rows: int = 0
    skipped: int = 0
    skipped_rows: list[int] = field(default_factory=list)


def _answer_text(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, float) and value.is_integer():
        return str(int(value))  # 27.0 -> "27": integer answers stored as floats (AMC)
    text = str(value).strip()
    return text or None


def read_rows(path: str | Path) -> list[dict[str, Any]]:
    """All rows of a JSONL or Parquet file as dicts (JSONL errors name the line)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: dataset file not found")
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist()
    if path.suffix not in (".jsonl", ".json"):
        raise ValueError(f"{path}: unsupported dataset format {path.suffix!r}; use .jsonl or .parquet")
    rows = []
    with path.open() as fh:
        for lineno, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}: line {lineno} is not valid JSON ({exc.msg})") from None
    return rows


def load_prompts(path: str | Path, problem_field: str = "problem", answer_field: str = "answer"
                 ) -> tuple[list[PromptRecord], LoadReport]:
    """Records with a problem and an answer; rows missing either are skipped and counted."""
    report = LoadReport()
    records = []
    for i, row in enumerate(read_rows(path)):
        report.rows += 1
        problem, answer = row.get(problem_field), _answer_text(row.get(answer_field))
        if not problem or answer is None:
            report.skipped += 1
            report.skipped_rows.append(i)
            missing = problem_field if not problem else answer_field
            logger.warning("%s: row %d has no %r; skipped", path, i, missing)
            continue
        records.append(PromptRecord(problem=str(problem), answer=answer, source=f"{path}:{i}"))
    if not records:
        raise ValueError(f"{path}: no usable rows (fields {problem_field!r} and {answer_field!r}); "
                         f"set data.problem_field / data.answer_field to the file's column names")
    if report.skipped:
        logger.warning("%s: skipped %d of %d rows without %r or %r", path, report.skipped, report.rows,
                       problem_field, answer_field)
    return records, report


class PromptLoader:
    """Batches of prompts, epoch after epoch, shuffled by (seed, epoch) so a resumed run sees the same order.

    ``state_dict()``/``load_state_dict()`` carry the position (epoch, index) through checkpoints.
    """

    def __init__(self, records: list[PromptRecord], batch_size: int, seed: int, shuffle: bool = True):
        if batch_size < 1 or batch_size > len(records):
            raise ValueError(f"trainer.prompts_per_step={batch_size} must be between 1 and the dataset size "
                             f"({len(records)})")
        self.records = records
        self.batch_size = batch_size
        self.seed = seed
        self.shuffle = shuffle
        self.epoch = 0
        self.index = 0
        self._order = self._order_for(0)

    def _order_for(self, epoch: int) -> list[int]:
        order = list(range(len(self.records)))
        if self.shuffle:
            random.Random(f"{self.seed}:{epoch}").shuffle(order)
        return order

    def next_batch(self) -> list[PromptRecord]:
        """The next ``batch_size`` prompts; an epoch's tail that does not fill a batch is dropped."""
        if self.index + self.batch_size > len(self._order):
            self.epoch += 1
            self.index = 0
            self._order = self._order_for(self.epoch)
        batch = [self.records[i] for i in self._order[self.index:self.index + self.batch_size]]
        self.index += self.batch_size
        return batch

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "index": self.index}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.index = int(state["epoch"]), int(state["index"])
        self._order = self._order_for(self.epoch)
