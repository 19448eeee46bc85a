"""Prompt datasets: JSONL or Parquet files with configurable field names, and the epoch loader.

Training goes on past a bad row: a row that fails the shared row check (:func:`check_row`) is
skipped, counted and logged with its file and line. A file that cannot be read at all (not UTF-8,
invalid JSON, a line that is not an object, no rows) is a :class:`DataError` naming the file and line.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass, field
from pathlib import Path

from igrpo_megatron.data.rows import DataError, check_row, read_rows

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


def load_prompts(path: str | Path, problem_field: str = "problem", answer_field: str = "answer"
                 ) -> tuple[list[PromptRecord], LoadReport]:
    """Records with a problem and an answer; rows failing :func:`check_row` are skipped, logged and counted.

    ``LoadReport.skipped_rows`` holds 1-based line (JSONL) or row (Parquet) numbers.
    """
    report = LoadReport()
    records = []
    first_problem = None
    for row in read_rows(path):
        report.rows += 1
        try:
            problem, answer = check_row(row, problem_field, answer_field)
        except DataError as exc:
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
