"""The ``arithmetic_chain`` task (issue 18): long chains where a draft helps a refinement.

Answers are recomputed from the problem text independently of the generator; slips are counted
by re-evaluating each worked line; the property that favours refinement (a refinement copies the
checked lines before a draft's slip and computes only the rest) is checked on the warm-start's
draft-conditioned examples.
"""

from __future__ import annotations

import random

import pytest

from igrpo_megatron.data.synthetic import ArithmeticChainTask, ArithmeticTask, build_task


def _evaluate(problem: str) -> list[int]:
    """Every intermediate value of a problem, recomputed from its text."""
    words = [w.strip() for w in problem.replace("What is the result?", "").split(".") if w.strip()]
    values = [int(words[0].split()[-1])]
    for w in words[1:]:
        n, v = int(w.split()[-1]), values[-1]
        values.append(v + n if w.startswith("Add") else v - n if w.startswith("Subtract") else v * n)
    return values


def _lines(solution: str) -> list[tuple[str, int]]:
    """(left-hand side, written result) per worked line."""
    body = solution.removeprefix("<think>").split("</think>")[0]
    return [(lhs, int(rhs)) for lhs, rhs in (line.split(" = ") for line in body.split("\n"))]


def _wrong_lines(solution: str) -> list[int]:
    return [i for i, (lhs, rhs) in enumerate(_lines(solution)) if eval(lhs) != rhs]  # noqa: S307 (a op b)


def _ops(solution: str) -> list[str]:
    """The operation of each worked line ('+ 4'), without the value it is applied to."""
    return [lhs.split(" ", 1)[1] for lhs, _ in _lines(solution)]


def _final(solution: str) -> int:
    return int(solution.split("<answer>")[1].split("</answer>")[0])


def test_answers_are_correct_and_values_stay_in_range():
    task = ArithmeticChainTask(min_steps=4, max_steps=6, max_value=99)
    for p in task.generate(300, "train", seed=0):
        values = _evaluate(p.problem)
        assert int(p.answer) == values[-1]
        assert 4 <= len(values) - 1 <= 6
        assert all(0 <= v <= 99 for v in values)
        assert len(_lines(p.solution)) == len(values) - 1


def test_generation_is_deterministic_by_seed_and_splits_are_disjoint():
    task = ArithmeticChainTask()
    assert task.generate(40, "train", seed=5) == task.generate(40, "train", seed=5)
    assert [p.problem for p in task.generate(40, "train", seed=5)] != [p.problem for p in task.generate(40, "train", 6)]
    train = {p.problem for p in task.generate(1000, "train", seed=1)}
    assert not train & {p.problem for p in task.generate(100, "heldout", seed=2)}
    ex = [task.refinement_example(p, task.generate(50, "train", 1), random.Random(3)) for p in task.generate(5, "train", 1)]
    again = [task.refinement_example(p, task.generate(50, "train", 1), random.Random(3))
             for p in task.generate(5, "train", 1)]
    assert ex == again


def test_worked_solutions_slip_per_computed_line():
    # 8% per line, 4-6 lines: about 1 - 0.92^5 ~ 34% of solutions carry at least one slip.
    task = ArithmeticChainTask(slip_percent=8)
    items = task.generate(2000, "train", seed=0)
    slipped = [p for p in items if _wrong_lines(p.solution)]
    assert 0.27 < len(slipped) / len(items) < 0.41
    lines = sum(len(p.ops) for p in items)
    wrong = sum(len(_wrong_lines(p.solution)) for p in items)
    assert 0.06 < wrong / lines < 0.10
    assert all(_final(p.solution) != int(p.answer) for p in slipped if len(_wrong_lines(p.solution)) == 1)
    assert not any(_wrong_lines(p.solution) for p in ArithmeticChainTask(slip_percent=0).generate(200, "train", 0))


def test_a_near_miss_has_one_local_slip_and_the_rest_right():
    task = ArithmeticChainTask()
    rng = random.Random(0)
    for p in task.generate(200, "train", seed=0):
        draft = task.near_miss(p, rng)
        (at,) = _wrong_lines(draft)  # exactly one line is wrong; the later ones compute right from it
        assert _final(draft) != int(p.answer)
        assert _ops(draft) == [f"{s} {n}" for s, n in p.ops]  # every line applies the problem's operation
        correct = ArithmeticChainTask(slip_percent=0).worked(p, rng)
        assert _lines(draft)[:at] == _lines(correct)[:at]  # before the slip: the true lines


def test_a_refinement_copies_the_checked_prefix_and_computes_only_the_rest():
    """The property that favours refinement: from a near miss slipped at line i, only L - i lines are
    computed (and can slip); a fresh sample computes all L."""
    task = ArithmeticChainTask(slip_percent=100)  # every *computed* line slips: copied lines show themselves
    rng = random.Random(1)
    for p in task.generate(200, "train", seed=0):
        draft = task.near_miss(p, rng)
        (at,) = _wrong_lines(draft)
        written = task.worked(p, rng, draft=draft)
        assert _lines(written)[:at] == _lines(draft)[:at]  # the checked prefix copied exactly
        assert _wrong_lines(written) == list(range(at, len(p.ops)))  # every computed line slipped
        fresh = task.worked(p, rng)
        assert _wrong_lines(fresh) == list(range(len(p.ops)))
        # A correct draft is copied whole, even at 100% slips.
        correct = ArithmeticChainTask(slip_percent=0).worked(p, rng)
        assert task.worked(p, rng, draft=correct) == correct


def test_refinement_examples_mix_near_misses_correct_drafts_and_other_problems():
    task = ArithmeticChainTask(slip_percent=0)
    items = task.generate(300, "train", seed=0)
    rng = random.Random(2)
    kinds = {"near_miss": 0, "correct": 0, "other": 0}
    for p in items:
        draft, target = task.refinement_example(p, items, rng)
        assert _final(target) == int(p.answer) and not _wrong_lines(target)  # no slips at 0%: always right
        if draft == p.solution:
            kinds["correct"] += 1
        elif _ops(draft) == _ops(p.solution) and len(_wrong_lines(draft)) == 1:
            kinds["near_miss"] += 1
        else:
            kinds["other"] += 1
    assert 0.5 < kinds["near_miss"] / 300 < 0.7 and 0.12 < kinds["correct"] / 300 < 0.28, kinds


def test_the_arithmetic_task_keeps_its_warm_start_examples():
    # The tiny recipe's warm-start draws exactly what it drew before the task chose the examples.
    task = ArithmeticTask(slip_percent=30)
    items = task.generate(20, "train", seed=0)
    a, b = random.Random(7), random.Random(7)
    for p in items:
        draft = p.solution if b.random() < 0.3 else b.choice(items).solution
        assert task.refinement_example(p, items, a) == (draft, p.solution)


def test_selected_by_name_and_bad_options_name_the_key():
    assert isinstance(build_task("arithmetic_chain", {"min_steps": 4, "max_steps": 5}), ArithmeticChainTask)
    with pytest.raises(ValueError, match="arithmetic_chain task: .*slip_percent"):
        build_task("arithmetic_chain", {"slip_percent": 150})
    with pytest.raises(ValueError, match="max_start <= max_value"):
        ArithmeticChainTask(max_start=120, max_value=99)
    with pytest.raises(ValueError, match="does not fit the 'arithmetic_chain' task"):
        build_task("arithmetic_chain", {"bogus": 1})
