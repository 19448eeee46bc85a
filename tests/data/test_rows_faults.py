"""Bad rows in problem sets (issue 22, item 5): one reader and one row check for training and evaluation.

Before: a non-UTF-8 byte raised ``UnicodeDecodeError ... position 196`` naming no file; a JSON array
line raised ``AttributeError: 'list' object has no attribute 'get'``; an empty file said to fix the
field names; training accepted a whitespace-only problem and list/dict/bool/NaN answers that the
evaluation loader refused; skip warnings counted rows from 0, evaluation errors from 1.
"""

from __future__ import annotations

import json
import re

import pytest

from igrpo_megatron.data.datasets import load_prompts
from igrpo_megatron.data.rows import DataError, read_rows
from igrpo_megatron.evaluation.benchmarks import BenchmarkError, BenchmarkSpec, load_benchmark

pytestmark = pytest.mark.faults

GOOD = json.dumps({"problem": "1+1?", "answer": "2"})


def _both_fail(path, pattern: str) -> None:
    """The training loader and the evaluation loader refuse the file with the same message."""
    with pytest.raises(DataError, match=pattern) as train:
        load_prompts(path)
    with pytest.raises(BenchmarkError, match=pattern) as evaluation:
        load_benchmark(BenchmarkSpec("b", path=str(path)))
    assert str(train.value) in str(evaluation.value)


def test_non_utf8_byte_names_file_and_line(tmp_path):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes((GOOD + "\n" + '{"problem": "caf\xe9", "answer": "1"}\n').encode("latin-1"))
    _both_fail(path, re.escape(f"{path}, line 2: not UTF-8 (byte 0xe9 at column 17)"))


def test_a_line_holding_an_array_names_file_and_line(tmp_path):
    path = tmp_path / "array.jsonl"
    path.write_text(GOOD + "\n\n" + json.dumps(["1+1?", "2"]) + "\n")  # the blank line counts: line 3
    _both_fail(path, re.escape(f"{path}, line 3: expected an object with named fields") + ".*got a JSON list")


def test_invalid_json_names_file_line_and_column(tmp_path):
    path = tmp_path / "broken.jsonl"
    path.write_text(GOOD + '\n{"problem": \n')
    _both_fail(path, re.escape(f"{path}, line 2: not valid JSON (Expecting value, column 13)"))


def test_an_empty_file_says_it_is_empty(tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_text("\n  \n")
    _both_fail(path, re.escape(f"{path}: the file holds no rows"))


@pytest.mark.parametrize("row, message", [
    ({"problem": "   ", "answer": "3"}, "field 'problem': no problem text (str '   ')"),
    ({"problem": 7, "answer": "3"}, "field 'problem': no problem text (int 7)"),
    ({"problem": "p", "answer": [1, 2]}, "field 'answer': answer must be a string or a number, got list"),
    ({"problem": "p", "answer": {"a": 1}}, "field 'answer': answer must be a string or a number, got dict"),
    ({"problem": "p", "answer": True}, "field 'answer': no answer (got True)"),
    ({"problem": "p", "answer": float("nan")}, "field 'answer': answer nan is not a finite number"),
    ({"problem": "p", "answer": "  "}, "field 'answer': no answer"),
], ids=["blank-problem", "number-problem", "list", "dict", "bool", "nan", "blank-answer"])
def test_training_skips_what_evaluation_refuses_with_one_message(tmp_path, caplog, row, message):
    path = tmp_path / "rows.jsonl"
    path.write_text(GOOD + "\n" + json.dumps(row) + "\n" + GOOD + "\n")
    expected = f"{path}, line 2, {message}"
    records, report = load_prompts(path)
    assert len(records) == 2 and report.skipped_rows == [2]  # 1-based, as in an editor
    assert expected in caplog.text
    with pytest.raises(BenchmarkError, match=re.escape(expected)):
        load_benchmark(BenchmarkSpec("b", path=str(path)))


def test_parquet_rows_are_numbered_from_1(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "t.parquet"
    pq.write_table(pa.table({"problem": ["a", "b"], "answer": ["1", ""]}), path)
    assert [r.where for r in read_rows(path)] == [f"{path}, row 1", f"{path}, row 2"]
    records, report = load_prompts(path)
    assert [r.source for r in records] == [f"{path}, row 1"] and report.skipped_rows == [2]


def test_all_rows_unusable_quotes_the_first_problem(tmp_path):
    path = tmp_path / "fields.jsonl"
    path.write_text(json.dumps({"question": "1+1?", "final": "2"}) + "\n")
    with pytest.raises(DataError, match=r"none of its 1 rows is usable.*line 1, field 'problem'.*data.problem_field"):
        load_prompts(path)
