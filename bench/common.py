"""What every benchmark entry returns (figures beside their ceiling), and how entries run scripts."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
logger = logging.getLogger("bench")


@dataclass
class Figure:
    """One measured figure beside its ceiling (or baseline): ratio = value / ceiling.

    ``goal`` is the issue's target for the ratio (or for the value, when ``goal_on`` is 'value'),
    with ``goal_op`` '>=' or '<='; None: no goal stated.
    """

    name: str
    value: float
    unit: str
    ceiling: float | None = None
    ceiling_label: str = ""
    goal: float | None = None
    goal_op: str = ">="
    goal_on: str = "ratio"
    note: str = ""

    @property
    def ratio(self) -> float | None:
        if self.ceiling in (None, 0):
            return None
        return self.value / self.ceiling

    def goal_met(self) -> bool | None:
        if self.goal is None:
            return None
        x = self.ratio if self.goal_on == "ratio" else self.value
        if x is None:
            return None
        return x >= self.goal if self.goal_op == ">=" else x <= self.goal

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "ratio": self.ratio, "goal_met": self.goal_met()}


@dataclass
class EntryResult:
    """What one entry measured: its figures and the details behind them (any JSON-able values)."""

    figures: list[Figure] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)


def run_logged(cmd: list[str], log_path: Path, timeout_s: float, env: dict[str, str] | None = None) -> str:
    """Run ``cmd`` from the repository root, its output into ``log_path``; return the output.

    Raises RuntimeError naming the log (and its tail) when the command fails or runs past ``timeout_s``.
    """
    log_path.parent.mkdir(parents=True, exist_ok=True)
    logger.info("  running %s (output: %s)", " ".join(cmd[1:4]) + " ...", log_path)
    t0 = time.perf_counter()
    with open(log_path, "w") as log:
        try:
            proc = subprocess.run(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, timeout=timeout_s,
                                  env={**os.environ, **(env or {})})
            code = proc.returncode
        except subprocess.TimeoutExpired:
            code = None
    text = log_path.read_text(errors="replace")
    if code != 0:
        why = f"ran past {timeout_s:.0f} s" if code is None else f"exit code {code}"
        raise RuntimeError(f"{' '.join(cmd)}: {why} after {time.perf_counter() - t0:.0f} s; see {log_path}:\n"
                           + text[-3000:])
    return text


def last_json_line(text: str, source: str) -> dict[str, Any]:
    """The last line of ``text`` that parses as a JSON object (the scripts end with one)."""
    for line in reversed(text.splitlines()):
        line = line.strip()
        if line.startswith("{"):
            try:
                return json.loads(line)
            except json.JSONDecodeError:
                continue
    raise RuntimeError(f"{source}: no JSON line in its output")


def python() -> str:
    return sys.executable


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]
