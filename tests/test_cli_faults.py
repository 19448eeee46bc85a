"""User errors reach the user as one line and exit code 2, not a traceback (issue 22, item 7).

Before: `igrpo` caught only RecipeError; a data error, a layout error or a benchmark error came out
as a traceback. (Layout: tests/config/test_faults.py; damaged checkpoint: tests/e2e/test_faults_sidecar.py.)
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.faults


def igrpo(*args: str) -> subprocess.CompletedProcess:
    exe = shutil.which("igrpo", path=str(Path(sys.executable).parent))
    assert exe, "the igrpo console script is not installed next to this Python"
    return subprocess.run([exe, *args], capture_output=True, text=True, cwd=ROOT, timeout=600)


def _one_line(out: subprocess.CompletedProcess) -> str:
    assert out.returncode == 2, out.stderr[-3000:]
    assert "Traceback" not in out.stderr, out.stderr[-3000:]
    starts = [m.start() for m in re.finditer(r"^igrpo( eval)?: ", out.stderr, re.MULTILINE)]
    assert len(starts) == 1, out.stderr[-3000:]
    return out.stderr[starts[0]:]  # the message (a list of problems may follow it)


@pytest.mark.parametrize("content, message", [
    (json.dumps(["1+1?", "2"]) + "\n", "line 1: expected an object with named fields"),
    ('{"problem": "1+1?", \n', "line 1: not valid JSON"),
    (None, "file not found"),
], ids=["array-line", "invalid-json", "missing-file"])
def test_train_with_bad_training_data(tmp_path, content, message):
    path = tmp_path / "train.jsonl"
    if content is not None:
        path.write_text(content)
    line = _one_line(igrpo("train", "recipes/tiny_cpu.yaml", f"run.output_dir={tmp_path / 'runs'}",
                           f"data.train_path={path}", "trainer.prompts_per_step=1"))
    assert (f"{path}, {message}" if content is not None else message) in line and str(path) in line


def test_eval_with_a_misspelled_benchmark(tmp_path):
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text("{}")
    line = _one_line(igrpo("eval", str(hf), "--benchmarks", "aime2"))
    assert "unknown benchmark 'aime2'" in line
