"""Reports: results.json with every sample, the Markdown table, the plot, and comparing two runs."""

from __future__ import annotations

import json
import math

import pytest

from igrpo_megatron.config.evaluation import EvaluationConfig, RefinementEvalConfig
from igrpo_megatron.evaluation.records import EvalRun
from igrpo_megatron.evaluation.report import (
    compare_markdown,
    compare_runs,
    load_results,
    markdown_table,
    plot_comparison,
    write_report,
)
from tests.evaluation.conftest import ScriptedEngine
from tests.evaluation.test_runner import BENCH, SCRIPT, make_evaluator

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
Z95 = 1.959963984540054


@pytest.fixture(scope="module")
def run_dict(tiny_tokenizer):
    cfg = EvaluationConfig(pass_at_k=[1, 2, 4], refine=RefinementEvalConfig(enabled=True))
    result = make_evaluator(tiny_tokenizer, cfg).evaluate(ScriptedEngine(tiny_tokenizer, SCRIPT), BENCH, 4)
    return EvalRun(label="toy-run", created="2026-01-01T00:00:00", model="/models/toy", settings={},
                   benchmarks={"toy": result}).to_dict()


def test_results_json_keeps_every_sample_and_loads_back(run_dict, tmp_path):
    paths = write_report(run_dict, tmp_path / "out")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["report.md", "report.png", "results.json"]
    loaded = load_results(tmp_path / "out")  # the directory or the file both work
    assert loaded == json.loads(paths["results"].read_text())
    toy = loaded["benchmarks"]["toy"]
    assert toy["num_problems"] == 3 and toy["samples_per_problem"] == 4
    assert [len(p["samples"]) for p in toy["problems"]] == [4, 4, 4]
    assert toy["problems"][0]["samples"][2] == {"text": "<think>work</think> First we work through the steps one at a time. "
                                                        "The answer is \\boxed{3}.",
                                                "answer": "3", "correct": False, "reward": 0.0,
                                                "finish_reason": "stop", "num_tokens": 5, "error": None}
    assert toy["problems"][1]["refine"][0]["picked_answer"] == "2"
    assert toy["metrics"]["pass@1"]["value"] == pytest.approx(0.25)
    assert paths["plot"].read_bytes()[:8] == PNG_MAGIC


def test_markdown_table_rows_are_benchmarks_and_columns_metrics(run_dict):
    table = markdown_table(run_dict)
    header = next(line for line in table.splitlines() if line.startswith("| benchmark"))
    cols = [c.strip() for c in header.strip("|").split("|")]
    assert cols[:7] == ["benchmark", "problems", "k", "pass@1", "pass@2", "pass@4", "maj@4"]
    assert "refine.pass@1" in cols and "refine.pick_correct" in cols
    row = next(line for line in table.splitlines() if line.startswith("| toy"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    # pass@1 = 25.0% with per-problem values .5, .25, 0: se = .25 / sqrt(3) = 0.1443 -> [0, 53.3]
    assert cells[3] == f"25.0 [0.0, {100 * (0.25 + Z95 * 0.25 / math.sqrt(3)):.1f}]" == "25.0 [0.0, 53.3]"
    assert cells[cols.index("mean_tokens")] == "5.0"


def _run(values_by_metric: dict[str, list[float]], ids: list[str], label: str) -> dict:
    metrics = {name: {"value": sum(v) / len(v), "ci_low": 0.0, "ci_high": 1.0, "stderr": 0.0,
                      "num_problems": len(v), "confidence": 0.95, "method": "normal"}
               for name, v in values_by_metric.items()}
    bench = {"name": "b", "path": "b.jsonl", "num_problems": len(ids), "samples_per_problem": 4, "metrics": metrics,
             "per_problem": values_by_metric, "problems": [{"id": i} for i in ids], "wall_s": 1.0}
    return {"format_version": 1, "label": label, "model": None, "created": "", "settings": {},
            "benchmarks": {"b": bench}}


def test_compare_paired_difference_and_significance(tmp_path):
    ids = ["q1", "q2", "q3", "q4", "q5"]
    a = _run({"pass@1": [0, 0, 0, 0, 1], "maj@4": [1, 0, 1, 0, 1], "mean_tokens": [5] * 5}, ids, "A")
    b = _run({"pass@1": [1, 1, 1, 1, 1], "maj@4": [1, 0, 1, 0, 1], "mean_tokens": [9] * 5}, ids, "B")
    rows = {r.metric: r for r in compare_runs(a, b)}
    assert set(rows) == {"pass@1", "maj@4"}  # token counts are not compared
    p1 = rows["pass@1"]
    # paired diffs 1,1,1,1,0: mean .8, se .2 -> [0.408, 1] excludes 0
    assert p1.paired and p1.diff == pytest.approx(0.8) and p1.ci_low == pytest.approx(0.8 - Z95 * 0.2)
    assert p1.significant
    assert rows["maj@4"].diff == 0.0 and not rows["maj@4"].significant
    text = compare_markdown(list(rows.values()), "A", "B")
    assert "| b | pass@1 | 20.0 | 100.0 | +80.0 | [+40.8, +100.0] | yes |" in text
    assert "| b | maj@4 | 60.0 | 60.0 | +0.0 | [+0.0, +0.0] | no |" in text
    assert plot_comparison(list(rows.values()), "A", "B", tmp_path / "c.png").read_bytes()[:8] == PNG_MAGIC
    # Different problems: unpaired, and said so.
    c = _run({"pass@1": [1, 1, 1, 1, 1]}, ["x1", "x2", "x3", "x4", "x5"], "C")
    (row,) = compare_runs(a, c)
    assert not row.paired and "(unpaired)" in compare_markdown([row], "A", "C")


def test_load_results_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no evaluation results"):
        load_results(tmp_path)
    (tmp_path / "results.json").write_text('{"format_version": 1, "benchmarks"')
    with pytest.raises(ValueError, match="not valid JSON"):
        load_results(tmp_path)
    (tmp_path / "results.json").write_text('{"something": "else"}')
    with pytest.raises(ValueError, match="not an igrpo evaluation results file"):
        load_results(tmp_path / "results.json")
