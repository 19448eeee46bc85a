"""The synthetic task, prompt files (JSONL/Parquet) and the epoch loader."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from igrpo_megatron.data.datasets import PromptLoader, PromptRecord, load_prompts
from igrpo_megatron.data.synthetic import ArithmeticTask, build_task


def _evaluate(problem: str) -> int:
    """Recompute an arithmetic problem from its text, independently of the generator."""
    words = problem.replace("What is the result?", "").split(".")
    value = int(words[0].split()[-1])
    for w in (w.strip() for w in words[1:] if w.strip()):
        n = int(w.split()[-1])
        value = value + n if w.startswith("Add") else value - n if w.startswith("Subtract") else value * n
    return value


def test_answers_are_correct_and_solutions_end_with_them():
    for p in ArithmeticTask().generate(200, "train", seed=0):
        assert int(p.answer) == _evaluate(p.problem)
        assert p.solution.endswith(f"<answer>{p.answer}</answer>") and p.solution.startswith("<think>")


def test_slips_change_some_worked_solutions_but_never_problems_or_answers():
    clean = ArithmeticTask().generate(1000, "train", seed=0)
    slipped = ArithmeticTask(slip_percent=30).generate(1000, "train", seed=0)
    assert [(p.problem, p.answer) for p in clean] == [(p.problem, p.answer) for p in slipped]
    changed = [(c, s) for c, s in zip(clean, slipped, strict=True) if c.solution != s.solution]
    assert 0.25 < len(changed) / 1000 < 0.35
    for c, s in changed:
        final = int(s.solution.split("<answer>")[1].split("</answer>")[0])
        assert final != int(c.answer)  # the slip reaches the final answer: an incorrect demonstration
        # Exactly one line has a wrong result; the lines after it compute correctly from it.
        wrong = 0
        for line in s.solution.removeprefix("<think>").split("</think>")[0].split("\n"):
            lhs, rhs = line.split(" = ")
            wrong += eval(lhs) != int(rhs)  # noqa: S307 (digits and one operator)
        assert wrong == 1
    assert ArithmeticTask(slip_percent=30).generate(50, "train", seed=0) == slipped[:50]  # deterministic
    with pytest.raises(ValueError, match="slip_percent"):
        ArithmeticTask(slip_percent=101)


def test_splits_are_disjoint_and_deterministic():
    task = ArithmeticTask()
    train = {p.problem for p in task.generate(1000, "train", seed=1)}
    held = {p.problem for p in task.generate(100, "heldout", seed=2)}
    assert not train & held
    assert [p.problem for p in task.generate(50, "train", seed=1)] == [p.problem for p in task.generate(50, "train", seed=1)]
    assert [p.problem for p in task.generate(50, "train", seed=1)] != [p.problem for p in task.generate(50, "train", seed=3)]


def test_task_options_and_errors():
    easy = build_task("arithmetic", {"max_steps": 1, "min_steps": 1, "max_operand": 3, "max_start": 5})
    for p in easy.generate(30, "train", seed=0):
        assert p.problem.count(".") == 2  # "Start with a." + one operation
    with pytest.raises(ValueError, match="data.synthetic_task='nope' is not known"):
        build_task("nope")
    with pytest.raises(ValueError, match="does not fit the 'arithmetic' task"):
        build_task("arithmetic", {"digits": 3})
    with pytest.raises(ValueError, match="could not find 500 distinct"):
        build_task("arithmetic", {"max_steps": 1, "min_steps": 1, "max_operand": 2, "max_start": 1}).generate(500, "train", 0)
    with pytest.raises(ValueError, match="max_operand must be >= 2"):
        build_task("arithmetic", {"max_operand": 1})


def test_jsonl_rows_without_answer_are_skipped_and_counted(tmp_path, caplog):
    path = tmp_path / "train.jsonl"
    rows = [{"question": "1+1?", "final": 2}, {"question": "no answer"}, {"question": "", "final": 3},
            {"question": "AMC-style float", "final": 27.0}]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    records, report = load_prompts(path, problem_field="question", answer_field="final")
    assert [r.answer for r in records] == ["2", "27"]  # 27.0 -> "27"
    assert (report.rows, report.skipped, report.skipped_rows) == (4, 2, [2, 3])  # 1-based line numbers
    assert f"{path}, line 2, field 'final': no answer" in caplog.text


def test_parquet_and_bad_files(tmp_path):
    pq.write_table(pa.table({"problem": ["a", "b"], "answer": ["1", "2"]}), tmp_path / "t.parquet")
    records, _ = load_prompts(tmp_path / "t.parquet")
    assert [r.problem for r in records] == ["a", "b"]
    (tmp_path / "bad.jsonl").write_text('{"problem": "x", "answer": "1"}\n{not json\n')
    with pytest.raises(ValueError, match=r"bad.jsonl, line 2: not valid JSON"):
        load_prompts(tmp_path / "bad.jsonl")
    with pytest.raises(ValueError, match="none of its 2 rows is usable"):
        load_prompts(tmp_path / "t.parquet", answer_field="solution")
    with pytest.raises(ValueError, match="dataset file not found"):
        load_prompts(tmp_path / "missing.jsonl")


def test_loader_epochs_shuffle_and_resume():
    records = [PromptRecord(str(i), str(i)) for i in range(10)]
    loader = PromptLoader(records, batch_size=4, seed=7)
    first = [loader.next_batch() for _ in range(3)]  # 2 batches of epoch 0, then epoch 1 (tail of 2 dropped)
    assert loader.state_dict() == {"epoch": 1, "index": 4}
    seen = [r.problem for b in first[:2] for r in b]
    assert len(set(seen)) == 8 and seen != [str(i) for i in range(8)]  # shuffled, no repeats in an epoch
    resumed = PromptLoader(records, batch_size=4, seed=7)
    resumed.load_state_dict(loader.state_dict())
    assert resumed.next_batch() == loader.next_batch()
    with pytest.raises(ValueError, match="prompts_per_step=11"):
        PromptLoader(records, batch_size=11, seed=0)
