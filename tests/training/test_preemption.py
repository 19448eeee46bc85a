"""Signals stop a run at a step boundary every rank agrees on (issue 22 item 1; issue 13 item 2).

The whole path (a real `igrpo train` with its sidecar, SIGUSR1 and a second signal) is in
tests/e2e/test_faults_sidecar.py; here the handler with real signals, the agreement on 2 ranks, and
`igrpo compare` stopping with the run in flight.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from igrpo_megatron.training.preemption import PREEMPTED_EXIT_CODE, STOP_SIGNALS, StopRequest, stop_agreed
from tests.helpers.distributed import run_on_ranks

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.faults


def test_first_signal_asks_to_stop_a_second_stops_at_once():
    before = {sig: signal.getsignal(sig) for sig in STOP_SIGNALS}
    with StopRequest() as stop:
        assert not stop.requested and not stop_agreed(stop)
        os.kill(os.getpid(), signal.SIGUSR1)
        assert stop.requested and stop.signal_name == "SIGUSR1" and stop_agreed(stop)
        with pytest.raises(SystemExit) as info:
            os.kill(os.getpid(), signal.SIGTERM)
        assert info.value.code == 128 + signal.SIGTERM
        stop.cleaning_up = True  # while the trainer cleans up, further signals only log
        os.kill(os.getpid(), signal.SIGHUP)
    assert {sig: signal.getsignal(sig) for sig in STOP_SIGNALS} == before
    assert PREEMPTED_EXIT_CODE not in (0, 1, 2) and PREEMPTED_EXIT_CODE < 128


def _agree(rank, world_size, signalled_ranks):
    stop = StopRequest()
    if rank in signalled_ranks:
        stop.signum = signal.SIGUSR1  # as the handler sets it; only this rank got the signal
    return stop_agreed(stop)


@pytest.mark.multiprocess
def test_ranks_agree_when_only_one_was_signalled():
    assert run_on_ranks(_agree, 2, args=((1,),)) == [True, True]
    assert run_on_ranks(_agree, 2, args=((),)) == [False, False]


def _stop_during_warmstart(rank, world_size, run_root):
    from igrpo_megatron.config import load_recipe
    from igrpo_megatron.training.loop import run_training

    recipe = load_recipe(ROOT / "recipes" / "tiny_cpu.yaml",
                         [f"run.output_dir={run_root}", "trainer.eval_every=0", "trainer.warmstart.steps=5"])
    stop = StopRequest()
    stop.signum = signal.SIGUSR1  # as the handler sets it: the signal came while the warm-start was due
    trainer = run_training(recipe, stop)
    run_dir = trainer.run_dir
    return trainer.preempted, (run_dir / "warmstart" / "config.json").exists(), (run_dir / "metrics.jsonl").exists()


@pytest.mark.multiprocess
def test_a_signal_during_the_warmstart_stops_it_without_exporting(tmp_path):
    """The warm-start asks at every step (collectively), so a signal does not wait out its minutes."""
    preempted, exported, logged = run_on_ranks(_stop_during_warmstart, 1, args=(str(tmp_path),))[0]
    assert preempted and not exported and not logged


def test_a_signal_stops_igrpo_compare_after_the_run_in_flight(tmp_path):
    """`igrpo compare` stops as `igrpo train` does (here during the first run's warm-start), exits 75 and
    starts no further arm; a second compare goes on from there (tests/training/test_compare.py)."""
    out = tmp_path / "cmp"
    cmd = [sys.executable, "-m", "igrpo_megatron.cli", "compare", "recipes/tiny_cpu.yaml", "trainer.eval_every=0",
           "trainer.warmstart.steps=100000", "trainer.warmstart.batch_size=1", "--seeds", "1,2", "--output", str(out)]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    for line in proc.stdout:  # the warm-start logs every 25 steps: it is under way
        lines.append(line)
        if "warm-start 25/100000" in line:
            proc.send_signal(signal.SIGUSR1)
            break
    lines.extend(proc.stdout)
    rc = proc.wait(timeout=300)
    output = "".join(lines)
    assert rc == PREEMPTED_EXIT_CODE, output[-4000:]
    assert f"compare stopped on a signal during {out / 'grpo-seed1'}" in output
    assert sorted(p.name for p in out.iterdir()) == ["grpo-seed1"]  # igrpo-seed1 and seed 2 never started
    assert not (out / "grpo-seed1" / "warmstart" / "config.json").exists()
