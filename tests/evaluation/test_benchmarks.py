"""Benchmark loading: the four public files, custom JSONL/Parquet with field mapping, clear errors.

The public files' row counts and answer fields are listed in shared/data/eval/SOURCES.md: aime24 30
rows (expected_answer), aime25 30 (expected_answer), math500 500 (answer), amc23 40 (answer, floats).
Tests asking for ``eval_data_dir`` read those files and skip without them (tests/conftest.py says
when they fail instead); the built-in names are also tested on small files written here in the same
fields and types, so a fresh clone covers the loaders too.
"""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from igrpo_megatron.config.evaluation import BUILTIN_BENCHMARK_NAMES, EvaluationConfig
from igrpo_megatron.config.reward import AnswerExtractionConfig
from igrpo_megatron.config.training import DataConfig
from igrpo_megatron.evaluation.benchmarks import (
    BenchmarkError,
    BenchmarkSpec,
    load_benchmark,
    load_benchmarks,
    normalize_gold,
    resolve_spec,
    samples_per_problem,
)
from igrpo_megatron.rewards.interfaces import RewardItem
from igrpo_megatron.rewards.math import MathReward
from igrpo_megatron.rewards.pool import VerifyPool


@pytest.mark.parametrize("name, rows, answer_field, first_gold, first_id, k", [
    ("aime24", 30, "expected_answer", "73", "aime24-0", 64),
    ("aime25", 30, "expected_answer", "70", "aime25-0", 64),
    ("math500", 500, "answer", "\\left( 3, \\frac{\\pi}{2} \\right)", "test/precalculus/807.json", 8),
    ("amc23", 40, "answer", "27", "0", 8),  # the file holds 27.0
])
def test_builtin_benchmarks_load(eval_data_dir, name, rows, answer_field, first_gold, first_id, k):
    cfg = EvaluationConfig(data_dir=str(eval_data_dir))
    spec = resolve_spec(name, cfg)
    assert spec.answer_field == answer_field
    bench = load_benchmark(spec, cfg.data_dir)
    assert len(bench) == rows
    assert bench.problems[0].gold == first_gold and bench.problems[0].id == first_id
    assert all(p.problem.strip() and p.gold for p in bench.problems)
    assert len({p.id for p in bench.problems}) == rows
    assert samples_per_problem(spec, cfg) == k  # the paper's k: 64 for AIME, 8 for the rest
    if name.startswith("aime"):  # integer answers, leading zeros gone ('073' would be '73')
        assert all(p.gold == str(int(p.gold)) for p in bench.problems)


def test_amc_float_answers_become_integers(eval_data_dir):
    raw = [json.loads(line)["answer"] for line in (eval_data_dir / "amc23.jsonl").read_text().splitlines()]
    bench = load_benchmark(resolve_spec("amc23", EvaluationConfig()), str(eval_data_dir))
    assert all(isinstance(v, float) for v in raw)
    # Every AMC23 answer is integral: 27.0 -> '27', 3159.0 -> '3159'.
    assert [p.gold for p in bench.problems] == [str(int(v)) for v in raw]


@pytest.fixture(scope="module")
def math_reward():
    reward = MathReward(AnswerExtractionConfig(require_think_close=False),
                        VerifyPool(num_workers=1, item_timeout_s=5.0))
    yield reward
    reward.close()


def test_amc_golds_score_integer_predictions_correctly(eval_data_dir, math_reward):
    bench = load_benchmark(resolve_spec("amc23", EvaluationConfig()), str(eval_data_dir))
    first = bench.problems[0]  # gold 27 (stored as 27.0)
    completions = ["so \\boxed{27}", "so \\boxed{27.0}", "so \\boxed{28}", "so 27"]
    result = math_reward.score([RewardItem(first.problem, first.gold, c) for c in completions])
    # integer and float forms of 27 are right, 28 is wrong, no box is no answer.
    assert result.correct == [True, True, False, False]
    assert result.info[3].no_answer
    # The raw float string as gold would also have to match an integer prediction.
    raw = math_reward.score([RewardItem(first.problem, "27.0", "\\boxed{27}")])
    assert raw.correct == [True]


def test_math500_latex_gold_scores_equivalent_forms(eval_data_dir, math_reward):
    bench = load_benchmark(resolve_spec("math500", EvaluationConfig()), str(eval_data_dir), limit=3)
    assert len(bench) == 3
    gold = bench.problems[2].gold  # \frac{14}{3}
    assert gold == "\\frac{14}{3}"
    result = math_reward.score([RewardItem("p", gold, c) for c in ("\\boxed{\\dfrac{14}{3}}", "\\boxed{14/3}",
                                                                 "\\boxed{4.6}")])
    assert result.correct == [True, True, False]


def _write_public_format_files(folder) -> None:
    """Two rows per built-in file, in the public files' own fields and types (see SOURCES.md)."""
    files = {
        "aime24": [{"id": "aime24-0", "problem": "Find N.", "expected_answer": "073", "reference_solution": "s"},
                   {"id": "aime24-1", "problem": "Find M.", "expected_answer": "204", "reference_solution": "s"}],
        "aime25": [{"id": "aime25-0", "problem": "Find b.", "expected_answer": "70", "reference_solution": "s"},
                   {"id": "aime25-1", "problem": "Find c.", "expected_answer": "0", "reference_solution": "s"}],
        "math500": [{"problem": "Simplify.", "solution": "s", "answer": "\\frac{14}{3}", "subject": "Algebra",
                     "level": 2, "unique_id": "test/algebra/1.json"},
                    {"problem": "Solve.", "solution": "s", "answer": "(3, 4)", "subject": "Algebra", "level": 3,
                     "unique_id": "test/algebra/2.json"}],
        "amc23": [{"id": 0, "problem": "How many miles?", "answer": 27.0, "url": "u", "question": "q"},
                  {"id": 1, "problem": "How many ways?", "answer": 3159.0, "url": "u", "question": "q"}],
    }
    for name, rows in files.items():
        (folder / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_builtin_names_read_small_files_in_the_public_formats(tmp_path, math_reward):
    _write_public_format_files(tmp_path)
    cfg = EvaluationConfig(data_dir=str(tmp_path))
    benches = {b.name: b for b in load_benchmarks(["aime24", "aime25", "math500", "amc23"], cfg)}
    got = {name: [(p.id, p.gold) for p in b.problems] for name, b in benches.items()}
    assert got == {"aime24": [("aime24-0", "73"), ("aime24-1", "204")],  # '073' loses its zero
                   "aime25": [("aime25-0", "70"), ("aime25-1", "0")],
                   "math500": [("test/algebra/1.json", "\\frac{14}{3}"), ("test/algebra/2.json", "(3, 4)")],
                   "amc23": [("0", "27"), ("1", "3159")]}  # 27.0 -> '27'
    assert [samples_per_problem(b.spec, cfg) for b in benches.values()] == [64, 64, 8, 8]
    amc, frac = benches["amc23"].problems[0], benches["math500"].problems[0]
    result = math_reward.score([RewardItem(amc.problem, amc.gold, "\\boxed{27}"),
                                RewardItem(amc.problem, amc.gold, "\\boxed{28}"),
                                RewardItem(frac.problem, frac.gold, "\\boxed{\\dfrac{14}{3}}")])
    assert result.correct == [True, False, True]
    # A row the built-in's answer type rejects names the file, the row and the field.
    (tmp_path / "aime25.jsonl").write_text(json.dumps({"id": "x", "problem": "p", "expected_answer": "4.5"}) + "\n")
    with pytest.raises(BenchmarkError, match=r"aime25\.jsonl, (row|line) 1, field 'expected_answer'.*whole number"):
        load_benchmarks(["aime25"], cfg)


def test_custom_jsonl_and_parquet_with_field_mapping(tmp_path):
    rows = [{"question": "What is 2+2?", "final": 4, "uid": "a"}, {"question": "3*3?", "final": "9", "uid": "b"}]
    jsonl = tmp_path / "mine.jsonl"
    jsonl.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")  # a trailing blank line is fine
    parquet = tmp_path / "mine.parquet"
    pq.write_table(pa.Table.from_pylist([{**r, "final": str(r["final"])} for r in rows]), parquet)
    cfg = EvaluationConfig(datasets={"mine": {"path": str(parquet), "problem_field": "question",
                                              "answer_field": "final", "id_field": "uid", "samples_per_problem": 3}})
    spec = resolve_spec("mine", cfg)
    bench = load_benchmark(spec)
    assert [(p.id, p.problem, p.gold) for p in bench.problems] == [("a", "What is 2+2?", "4"), ("b", "3*3?", "9")]
    assert samples_per_problem(spec, cfg) == 3
    # A bare path uses the field names given with it; its name is the file stem.
    by_path = load_benchmarks([str(jsonl)], EvaluationConfig(default_samples_per_problem=5),
                              problem_field="question", answer_field="final")[0]
    assert by_path.name == "mine" and [p.gold for p in by_path.problems] == ["4", "9"]
    assert by_path.problems[1].id == "mine-1"  # no id field: name-row
    assert samples_per_problem(by_path.spec, EvaluationConfig(default_samples_per_problem=5)) == 5


def test_row_without_answer_is_an_error_naming_file_and_row(tmp_path):
    path = tmp_path / "holes.jsonl"
    path.write_text(json.dumps({"problem": "a", "answer": "1"}) + "\n" + json.dumps({"problem": "b", "answer": None}) + "\n")
    with pytest.raises(BenchmarkError, match=r"holes\.jsonl, line 2, field 'answer': no answer"):
        load_benchmark(BenchmarkSpec("holes", path=str(path)))


def test_wrong_field_name_lists_the_fields(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_text(json.dumps({"question": "a", "answer": "1"}) + "\n")
    with pytest.raises(BenchmarkError, match=r"no field 'problem'.*\['answer', 'question'\]"):
        load_benchmark(BenchmarkSpec("x", path=str(path)))


def test_bad_json_line_and_missing_file(tmp_path):
    path = tmp_path / "broken.jsonl"
    path.write_text('{"problem": "a", "answer": "1"}\n{"problem": \n')
    with pytest.raises(BenchmarkError, match="line 2"):
        load_benchmark(BenchmarkSpec("broken", path=str(path)))
    with pytest.raises(BenchmarkError, match="not found"):
        load_benchmark(BenchmarkSpec("gone", path=str(tmp_path / "gone.jsonl")))


@pytest.mark.parametrize("value, answer_type, expected", [
    (27.0, "number", "27"), ("27.0", "number", "27"), (0.5, "number", "0.5"), ("027", "integer", "27"),
    (12, "integer", "12"), ("-3", "integer", "-3"), ("\\frac{1}{2}", "latex", "\\frac{1}{2}"),
    (" 5 ", "auto", "5"), (3.0, "auto", "3"),
])
def test_normalize_gold(value, answer_type, expected):
    assert normalize_gold(value, answer_type, "f.jsonl, row 1") == expected


@pytest.mark.parametrize("value, answer_type, message", [
    ("1.5", "integer", "not a whole number"), ("x+1", "number", "not a number"), ("", "auto", "no answer"),
    ([1, 2], "auto", "string or a number"), (float("nan"), "number", "not a finite"),
])
def test_normalize_gold_rejects(value, answer_type, message):
    with pytest.raises(BenchmarkError, match=message):
        normalize_gold(value, answer_type, "f.jsonl, row 7")


def test_every_builtin_name_resolves_to_its_file():
    # config's benchmark_kind (which `igrpo plan` uses too) and evaluation's BUILTIN_BENCHMARKS name the same sets
    files = [resolve_spec(name, EvaluationConfig()).file_name for name in BUILTIN_BENCHMARK_NAMES]
    assert files == [f"{name}.jsonl" for name in BUILTIN_BENCHMARK_NAMES]


def test_unknown_name_missing_data_dir_and_heldout(monkeypatch, tmp_path):
    with pytest.raises(BenchmarkError, match="unknown benchmark 'aime23'.*aime24"):
        resolve_spec("aime23", EvaluationConfig())
    monkeypatch.delenv("IGRPO_EVAL_DATA_DIR", raising=False)
    with pytest.raises(BenchmarkError, match="IGRPO_EVAL_DATA_DIR"):
        load_benchmarks(["aime24"], EvaluationConfig())
    monkeypatch.setenv("IGRPO_EVAL_DATA_DIR", str(tmp_path / "nowhere"))
    with pytest.raises(BenchmarkError, match="is not a directory"):
        load_benchmarks(["aime24"], EvaluationConfig())
    with pytest.raises(BenchmarkError, match="data.eval_path"):
        resolve_spec("heldout", EvaluationConfig(), DataConfig())
    # The generated task's held-out split: integer answers, disjoint from training, deterministic.
    held = load_benchmarks(["heldout"], EvaluationConfig(limit=5), DataConfig(synthetic_task="arithmetic"), seed=1)[0]
    again = load_benchmarks(["heldout"], EvaluationConfig(limit=5), DataConfig(synthetic_task="arithmetic"), seed=1)[0]
    assert len(held) == 5 and held.problems == again.problems
    assert all(p.problem.endswith("What is the result?") and p.gold.lstrip("-").isdigit() for p in held.problems)


def test_dataset_entries_are_validated():
    cfg = EvaluationConfig(datasets={"bad": {"path": "x.csv", "problem_feld": "q", "answer_type": "words"}})
    errs = cfg.errors()
    assert any("evaluation.datasets.bad.problem_feld: unknown key" in e for e in errs)
    assert any("evaluation.datasets.bad.path = 'x.csv'" in e for e in errs)
    assert any("answer_type = 'words'" in e for e in errs)
    with pytest.raises(BenchmarkError, match="unknown key"):
        resolve_spec("bad", cfg)
