"""A verifiable math task generated on the fly: multi-step integer arithmetic.

Each problem chains a few operations on small integers, e.g. "Start with 7. Add 5. Multiply by 3.
Subtract 4. What is the result?", so the answer is a unique integer that math-verify can check.
Worked solutions (one line per step, inside ``<think>``, then ``<answer>``) are what the tiny
recipe's supervised warm-start learns from; RL then only sees problem and answer.

Train and held-out problems never overlap: a problem belongs to the held-out split when a hash
of its text falls in the held-out bucket, whatever seed generated it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import random
from dataclasses import dataclass

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
        return Problem(problem=problem, answer=str(value), solution=self._solution(problem, start, ops))

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
            item = self._make(rng)
            if item.problem in seen or _split_of(item.problem, self.heldout_percent) != split:
                continue
            seen.add(item.problem)
            out.append(item)
        return out


SYNTHETIC_TASKS = {"arithmetic": ArithmeticTask}


def build_task(name: str, options: dict[str, int] | None = None) -> ArithmeticTask:
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
