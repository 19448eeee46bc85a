"""A verifiable math task generated on the fly: multi-step integer arithmetic.

Each problem chains a few operations on small integers, e.g. "Start with 7. Add 5. Multiply by 3.
Subtract 4. What is the result?", so the answer is a unique integer that math-verify can check.
Worked solutions (one line per step, inside ``<think>``, then ``<answer>``) are what the tiny
recipe's supervised warm-start learns from; RL then only sees problem and answer.

Train and held-out problems never overlap: a problem belongs to the held-out split when a hash
of its text falls in the held-out bucket, whatever seed generated it.

Two tasks, chosen by ``data.synthetic_task``:

* ``arithmetic`` (:class:`ArithmeticTask`): 1-3 operations; ``slip_percent`` of worked solutions
  carry one slip. The tiny recipe's task.
* ``arithmetic_chain`` (:class:`ArithmeticChainTask`): longer chains (4-6 operations, values kept
  in 0..``max_value``) where a draft carries information a refinement can use and a fresh sample
  cannot get as cheaply. Worked solutions slip per *computed* line, and a line copied from a draft
  after checking it is exact: a fresh sample computes all L lines and is right with probability
  (1 - q)^L; a refinement of a draft whose first slip is on line i copies the i checked lines
  before it and computes only L - i, so it is right with probability (1 - q)^(L - i) — and a
  correct draft is copied whole. The slip is local (one line) and the rest of the draft is right
  (the later lines apply the right operations, to the slipped value). The warm-start's
  draft-conditioned examples (``refinement_example``) show such near-miss drafts of the same
  problem, so the model is taught to use a draft, not only to copy it. ``recipes/tiny_cpu_chain.yaml``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

_OPS = (
    ("Add {n}.", "+", lambda x, n: x + n),
    ("Subtract {n}.", "-", lambda x, n: x - n),
    ("Multiply by {n}.", "*", lambda x, n: x * n),
)


@dataclass(frozen=True)
class Problem:
    """One task item: the question, its integer answer and a worked solution."""

    problem: str
    answer: str
    solution: str
    start: int = 0
    ops: tuple[tuple[str, int], ...] = ()  # (symbol, operand) per step, in order


class SyntheticTask(Protocol):
    """What the data sources, the warm-start and the held-out benchmark need from a generated task."""

    def generate(self, n: int, split: str, seed: int) -> list[Problem]: ...

    def refinement_example(self, item: Problem, items: Sequence[Problem], rng: random.Random) -> tuple[str, str]:
        """(draft shown in the prompt, target solution) of one draft-conditioned warm-start example."""
        ...


def _split_of(text: str, heldout_percent: int) -> str:
    bucket = int(hashlib.sha1(text.encode()).hexdigest()[:8], 16) % 100
    return "heldout" if bucket < heldout_percent else "train"


@dataclass
class ArithmeticTask:
    """Generator of :class:`Problem` items. ``steps`` operations on numbers up to ``max_operand``."""

    min_steps: int = 2
    max_steps: int = 3
    max_operand: int = 9
    max_start: int = 20
    heldout_percent: int = 10
    # Percent of worked solutions with one arithmetic slip (a line's result off by 1-3, carried on to
    # the final answer), as in distilled or hand-written traces. Only the supervised warm-start reads
    # solutions: it learns to slip now and then, and RL's correctness reward is what teaches it not to.
    # The gold answers are always right.
    slip_percent: int = 0

    def __post_init__(self) -> None:
        if not 1 <= self.min_steps <= self.max_steps:
            raise ValueError(f"arithmetic task: need 1 <= min_steps <= max_steps (got {self.min_steps}, "
                             f"{self.max_steps}); fix data.synthetic_options")
        if not 0 <= self.slip_percent <= 100:
            raise ValueError(f"arithmetic task: slip_percent must be in [0, 100] (got {self.slip_percent}); "
                             f"fix data.synthetic_options")
        if self.max_operand < 2 or self.max_start < 0:
            raise ValueError(f"arithmetic task: max_operand must be >= 2 and max_start >= 0 (got "
                             f"{self.max_operand}, {self.max_start}); fix data.synthetic_options")

    def _make(self, rng: random.Random) -> Problem:
        start = rng.randint(0, self.max_start)
        steps = rng.randint(self.min_steps, self.max_steps)
        words, ops = [f"Start with {start}."], []
        value = start
        for _ in range(steps):
            template, symbol, fn = rng.choice(_OPS)
            n = rng.randint(2 if symbol == "*" else 1, self.max_operand)
            words.append(template.format(n=n))
            ops.append((symbol, n, fn))
            value = fn(value, n)
        problem = " ".join(words) + " What is the result?"
        return Problem(problem=problem, answer=str(value), solution=self._solution(problem, start, ops),
                       start=start, ops=tuple((symbol, n) for symbol, n, _ in ops))

    def _solution(self, problem: str, start: int, ops: list) -> str:
        """The worked solution, with a slip in ``slip_percent`` of them (seeded by the problem text, so the
        problems themselves, and the train/held-out split, do not depend on the slip setting)."""
        slip = random.Random(problem)
        slip_line = slip.randrange(len(ops)) if slip.randrange(100) < self.slip_percent else -1
        lines, value = [], start
        for i, (symbol, n, fn) in enumerate(ops):
            new = fn(value, n) + (slip.choice((-3, -2, -1, 1, 2, 3)) if i == slip_line else 0)
            lines.append(f"{value} {symbol} {n} = {new}")
            value = new
        return "<think>" + "\n".join(lines) + f"</think><answer>{value}</answer>"

    def generate(self, n: int, split: str, seed: int) -> list[Problem]:
        """``n`` distinct problems of ``split`` ('train' or 'heldout'), deterministic in ``seed``."""
        return _generate(self._make, self.heldout_percent, n, split, seed)

    def refinement_example(self, item: Problem, items: Sequence[Problem], rng: random.Random) -> tuple[str, str]:
        """The problem's own worked solution (30%) or another problem's as the draft; the target is its own."""
        draft = item.solution if rng.random() < 0.3 else rng.choice(items).solution
        return draft, item.solution


def _generate(make, heldout_percent: int, n: int, split: str, seed: int) -> list[Problem]:
    """``n`` distinct problems from ``make(rng)`` that fall in ``split``, deterministic in ``seed``."""
    if split not in ("train", "heldout"):
        raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
    rng = random.Random(f"{seed}:{split}")
    seen: set[str] = set()
    out: list[Problem] = []
    attempts = 0
    while len(out) < n:
        attempts += 1
        if attempts > 200 * n + 1000:
            raise ValueError(f"could not find {n} distinct {split} problems; widen the task's ranges")
        item = make(rng)
        if item.problem in seen or _split_of(item.problem, heldout_percent) != split:
            continue
        seen.add(item.problem)
        out.append(item)
    return out


_APPLY = {"+": lambda x, n: x + n, "-": lambda x, n: x - n, "*": lambda x, n: x * n}
_WORDS = {"+": "Add {n}.", "-": "Subtract {n}.", "*": "Multiply by {n}."}
_SLIPS = (-3, -2, -1, 1, 2, 3)


@dataclass
class ArithmeticChainTask:
    """Long chains where a draft helps a refinement (see the module doc). Values stay in 0..max_value.

    ``slip_percent`` here is per *computed line* of a worked solution (not per solution): the chance
    that its result is off by 1-3 (the slipped value is carried on). Lines copied from a draft
    after checking them are never slipped.
    """

    min_steps: int = 4
    max_steps: int = 6
    max_operand: int = 9
    max_start: int = 20
    max_value: int = 99
    heldout_percent: int = 10
    slip_percent: int = 8
    max_multiplier: int = 3  # 'Multiply by n' for n in 2..max_multiplier (when the result stays <= max_value)

    def __post_init__(self) -> None:
        problems = []
        if not 1 <= self.min_steps <= self.max_steps:
            problems.append(f"need 1 <= min_steps <= max_steps (got {self.min_steps}, {self.max_steps})")
        if not 0 <= self.slip_percent <= 100:
            problems.append(f"slip_percent must be in [0, 100] (got {self.slip_percent})")
        if self.max_operand < 1 or self.max_multiplier < 2:
            problems.append(f"max_operand must be >= 1 and max_multiplier >= 2 (got {self.max_operand}, "
                            f"{self.max_multiplier})")
        if not 0 <= self.max_start <= self.max_value or self.max_value < self.max_operand:
            problems.append(f"need 0 <= max_start <= max_value and max_value >= max_operand (got {self.max_start}, "
                            f"{self.max_value}, {self.max_operand})")
        if problems:
            raise ValueError(f"arithmetic_chain task: {'; '.join(problems)}; fix data.synthetic_options")

    def _choices(self, value: int) -> list[tuple[str, int]]:
        """Every (symbol, operand) whose result stays in 0..max_value."""
        out = [("+", n) for n in range(1, self.max_operand + 1) if value + n <= self.max_value]
        out += [("-", n) for n in range(1, self.max_operand + 1) if value - n >= 0]
        out += [("*", n) for n in range(2, self.max_multiplier + 1) if value * n <= self.max_value and value > 1]
        return out

    def _make(self, rng: random.Random) -> Problem:
        start = rng.randint(0, self.max_start)
        ops, value = [], start
        for _ in range(rng.randint(self.min_steps, self.max_steps)):
            symbol, n = rng.choice(self._choices(value))
            ops.append((symbol, n))
            value = _APPLY[symbol](value, n)
        problem = " ".join([f"Start with {start}.", *(_WORDS[s].format(n=n) for s, n in ops)]) + " What is the result?"
        item = Problem(problem=problem, answer=str(value), solution="", start=start, ops=tuple(ops))
        # Slips seeded by the problem text: the problems and the split do not depend on the slip setting.
        return dataclasses.replace(item, solution=self.worked(item, random.Random(problem)))

    def worked(self, item: Problem, rng: random.Random, draft: str | None = None) -> str:
        """A worked solution: each computed line slips with ``slip_percent``; with a ``draft``, its lines
        are copied (exactly) while each one checks out, from the first line until the first that does not."""
        shown = _lines(draft) if draft is not None else []
        lines, value, copying = [], item.start, True
        for i, (symbol, n) in enumerate(item.ops):
            right = f"{value} {symbol} {n} = {_APPLY[symbol](value, n)}"
            copying = copying and i < len(shown) and shown[i] == right
            if copying:
                lines.append(right)
                value = _APPLY[symbol](value, n)
                continue
            slip = rng.choice(_SLIPS) if rng.randrange(100) < self.slip_percent else 0
            new = _APPLY[symbol](value, n) + slip
            lines.append(f"{value} {symbol} {n} = {new}")
            value = new
        return "<think>" + "\n".join(lines) + f"</think><answer>{value}</answer>"

    def near_miss(self, item: Problem, rng: random.Random) -> str:
        """A draft with exactly one slip, on a random line, carried on: every other line is computed right."""
        at, off = rng.randrange(len(item.ops)), rng.choice(_SLIPS)
        return _chain_text(item, lambda i: off if i == at else 0)

    def generate(self, n: int, split: str, seed: int) -> list[Problem]:
        """``n`` distinct problems of ``split`` ('train' or 'heldout'), deterministic in ``seed``."""
        return _generate(self._make, self.heldout_percent, n, split, seed)

    def refinement_example(self, item: Problem, items: Sequence[Problem], rng: random.Random) -> tuple[str, str]:
        """A draft and the solution written from it: a near miss of this problem (60%; the checked lines
        before its slip are copied, the rest computed), its correct solution (20%; copied whole), or
        another problem's worked solution (20%; nothing checks out, all computed)."""
        pick = rng.random()
        if pick < 0.6:
            draft = self.near_miss(item, rng)
        elif pick < 0.8:
            draft = _chain_text(item, lambda i: 0)
        else:
            draft = rng.choice(items).solution
        return draft, self.worked(item, rng, draft=draft)


def _chain_text(item: Problem, slip) -> str:
    """The worked solution of ``item`` with ``slip(i)`` added to line i's result (and carried on)."""
    lines, value = [], item.start
    for i, (symbol, n) in enumerate(item.ops):
        new = _APPLY[symbol](value, n) + slip(i)
        lines.append(f"{value} {symbol} {n} = {new}")
        value = new
    return "<think>" + "\n".join(lines) + f"</think><answer>{value}</answer>"


def _lines(solution: str) -> list[str]:
    """The reasoning lines of a worked solution (inside <think>...</think>), stripped."""
    body = solution.split("<think>", 1)[-1].split("</think>", 1)[0]
    return [line.strip() for line in body.splitlines() if line.strip()]


SYNTHETIC_TASKS: dict[str, type] = {"arithmetic": ArithmeticTask, "arithmetic_chain": ArithmeticChainTask}


def build_task(name: str, options: dict[str, int] | None = None) -> SyntheticTask:
    """The built-in generated task called ``name`` (``data.synthetic_task``, ``data.synthetic_options``)."""
    if name not in SYNTHETIC_TASKS:
        raise ValueError(f"data.synthetic_task={name!r} is not known; built-in tasks: {sorted(SYNTHETIC_TASKS)}")
    cls = SYNTHETIC_TASKS[name]
    try:
        return cls(**(options or {}))
    except TypeError:  # an unknown option name
        known = sorted(f.name for f in dataclasses.fields(cls))
        raise ValueError(f"data.synthetic_options={options!r} does not fit the {name!r} task; its settings are "
                         f"{known}") from None
