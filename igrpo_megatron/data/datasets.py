"""Prompt datasets: JSONL or Parquet files with configurable field names, and the epoch loader.

Training goes on past a bad row: a row that fails the shared row check (:func:`check_row`), repeats
an earlier row's id, or makes a prompt longer than ``data.max_prompt_length`` is skipped, counted and
logged with its file and line (``data.strict: true`` makes it an error instead). A file that cannot be read at all (not UTF-8,
invalid JSON, a line that is not an object, no rows) is a :class:`DataError` naming the file and line.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from igrpo_megatron.data.rows import DataError, Row, check_row, read_rows

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


def load_prompts(path: str | Path, problem_field: str = "problem", answer_field: str = "answer", *,
                 id_field: str = "id", strict: bool = False) -> tuple[list[PromptRecord], LoadReport]:
    """Records with a problem and an answer; rows failing :func:`check_row`, or repeating an earlier
    row's ``id_field`` value, are skipped, logged and counted (``strict``: the first one is raised).

    ``LoadReport.skipped_rows`` holds 1-based line (JSONL) or row (Parquet) numbers.
    """
    report = LoadReport()
    records = []
    first_problem = None
    seen_ids: dict[str, str] = {}  # id -> where it was first seen
    for row in read_rows(path):
        report.rows += 1
        try:
            problem, answer = check_row(row, problem_field, answer_field)
            _check_unique_id(row, id_field, seen_ids)
        except DataError as exc:
            if strict:
                raise DataError(f"{exc} (data.strict is true; set it to false to skip such rows)") from None
            report.skipped += 1
            report.skipped_rows.append(row.number)
            first_problem = first_problem or str(exc)
            logger.warning("skipping a row: %s", exc)
            continue
        records.append(PromptRecord(problem=problem, answer=answer, source=row.where))
    if not records:
        raise DataError(f"{path}: none of its {report.rows} rows is usable (fields {problem_field!r} and "
                        f"{answer_field!r}); the first: {first_problem}. If the file names them differently, "
                        "set data.problem_field / data.answer_field to its column names")
    if report.skipped:
        logger.warning("%s: skipped %d of %d rows (see the warnings above)", path, report.skipped, report.rows)
    return records, report


def _check_unique_id(row: Row, id_field: str, seen: dict[str, str]) -> None:
    """A row whose ``id_field`` repeats an earlier row's is a :class:`DataError` (rows without one pass)."""
    value = row.fields.get(id_field)
    if value is None:
        return
    key = str(value)
    if key in seen:
        raise DataError(f"{row.where}, field {id_field!r}: duplicate id {value!r} (first at {seen[key]})")
    seen[key] = row.where


def drop_long_prompts(records: list[PromptRecord], prompt_tokens: Callable[[str], int], max_prompt_length: int,
                      *, strict: bool = False) -> tuple[list[PromptRecord], int]:
    """Records whose prompt (as sampled: template and chat wrapping included) fits ``max_prompt_length``.

    Longer ones are skipped with a warning naming their file and line and counted (``strict``: a
    :class:`DataError`). Returns the kept records and the number skipped.
    """
    kept = []
    for record in records:
        n = prompt_tokens(record.problem)
        if n <= max_prompt_length:
            kept.append(record)
            continue
        message = (f"{record.source}: the prompt is {n} tokens, longer than data.max_prompt_length = "
                   f"{max_prompt_length}")
        if strict:
            raise DataError(f"{message} (data.strict is true; raise data.max_prompt_length or drop the row)")
        logger.warning("skipping a row: %s", message)
    if not kept:
        raise DataError(f"every one of the {len(records)} training prompts is longer than data.max_prompt_length = "
                        f"{max_prompt_length}; raise it")
    return kept, len(records) - len(kept)


class PromptLoader:
    """Batches of prompts, epoch after epoch, shuffled by (seed, epoch) so a resumed run sees the same order.

    ``state_dict()``/``load_state_dict()`` carry the position (epoch, index) through checkpoints.
    """

    def __init__(self, records: list[PromptRecord], batch_size: int, seed: int, shuffle: bool = True):
        if batch_size < 1 or batch_size > len(records):
            raise DataError(f"trainer.prompts_per_step={batch_size} must be between 1 and the dataset size "
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
