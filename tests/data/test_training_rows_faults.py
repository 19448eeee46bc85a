"""Bad training rows (issue 17, item 1): skipped with a counted warning naming file and line, or an
error with ``data.strict: true``; never a crash mid-epoch.

Injected: duplicate ids, an empty problem, an empty answer, a prompt longer than
``data.max_prompt_length`` (measured with the prompt the rollout sends: template and chat wrapping),
through :func:`training_records`, the function the training loop calls (with the loop's own
``PromptFormatter.encode_problem``). Missing fields, non-UTF-8 bytes and malformed lines are issue
22's tests (tests/data/test_rows_faults.py). The count reaches the step metrics as
``data/skipped_rows`` (tests/training/test_step_faults.py checks the loop's step metrics carry it).
"""

from __future__ import annotations

import json
import re

import pytest

from igrpo_megatron.config.schema import RecipeConfig
from igrpo_megatron.data.prompts import PromptFormatter
from igrpo_megatron.data.rows import DataError
from igrpo_megatron.data.sources import training_records

pytestmark = pytest.mark.faults

ROWS = [
    {"id": "a", "problem": "1+1?", "answer": "2"},                       # line 1: fine
    {"id": "a", "problem": "2+2?", "answer": "4"},                       # line 2: duplicate id
    {"id": "b", "problem": "   ", "answer": "4"},                        # line 3: empty problem
    {"id": "c", "problem": "3+3?", "answer": ""},                        # line 4: empty answer
    {"id": "d", "problem": "what is " + "seven plus " * 400 + "1?", "answer": "9"},  # line 5: too long
    {"id": "e", "problem": "4+4?", "answer": "8"},                       # line 6: fine
    {"problem": "5+5?", "answer": "10"},                                 # line 7: no id: not checked
]


@pytest.fixture(scope="module")
def formatter(tiny_tokenizer):
    return lambda data: PromptFormatter(tiny_tokenizer, data)


def _recipe(tmp_path, rows, strict=False) -> RecipeConfig:
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    r = RecipeConfig()
    r.data.train_path, r.data.strict, r.data.max_prompt_length = str(path), strict, 256
    return r


def test_bad_rows_are_skipped_counted_and_named(tmp_path, formatter, caplog):
    r = _recipe(tmp_path, ROWS)
    fmt = formatter(r.data)
    records, skipped = training_records(r, lambda p: len(fmt.encode_problem(p)))
    assert [rec.problem for rec in records] == ["1+1?", "4+4?", "5+5?"]
    assert skipped == 4
    log = caplog.text
    path = re.escape(r.data.train_path)
    assert re.search(rf"{path}, line 2, field 'id': duplicate id 'a' \(first at {path}, line 1\)", log)
    assert re.search(rf"{path}, line 3, field 'problem': no problem text", log)
    assert re.search(rf"{path}, line 4, field 'answer': no answer", log)
    assert re.search(rf"{path}, line 5: the prompt is \d+ tokens, longer than data.max_prompt_length = 256", log)
    # The loader the loop builds from them runs epoch after epoch without meeting a bad row.
    from igrpo_megatron.data.datasets import PromptLoader

    loader = PromptLoader(records, 2, seed=0)
    assert all(rec.problem for _ in range(5) for rec in loader.next_batch())


@pytest.mark.parametrize("bad_line, message", [
    (1, r"line 2, field 'id': duplicate id 'a'"),
    (2, r"line 2, field 'problem': no problem text"),
    (3, r"line 2, field 'answer': no answer"),
    (4, r"line 2: the prompt is \d+ tokens, longer than data.max_prompt_length = 256"),
])
def test_strict_data_stops_at_the_first_bad_row_naming_it(tmp_path, formatter, bad_line, message):
    r = _recipe(tmp_path, [ROWS[0], ROWS[bad_line]], strict=True)
    fmt = formatter(r.data)
    with pytest.raises(DataError, match=message) as info:
        training_records(r, lambda p: len(fmt.encode_problem(p)))
    assert r.data.train_path in str(info.value) and "data.strict" in str(info.value)


def test_strict_is_a_typed_field_with_help(tmp_path):
    from igrpo_megatron.config.fields import field_docs
    from igrpo_megatron.config.loader import load_recipe
    from igrpo_megatron.config.training import DataConfig

    docs = {key: help_text for key, _, help_text in field_docs(DataConfig())}
    assert "skipped" in docs["strict"] and "earlier row" in docs["id_field"]
    (tmp_path / "r.yaml").write_text("data:\n  strict: true\n")
    assert load_recipe(tmp_path / "r.yaml").data.strict is True
