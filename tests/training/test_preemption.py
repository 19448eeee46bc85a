"""Signals stop a run at a step boundary every rank agrees on (issue 22 item 1; issue 13 item 2).

The whole path (a real `igrpo train` with its sidecar, SIGUSR1 and a second signal) is in
tests/e2e/test_faults_sidecar.py; here the handler with real signals, and the agreement on 2 ranks.
"""

from __future__ import annotations

import os
import signal

import pytest

from igrpo_megatron.training.preemption import PREEMPTED_EXIT_CODE, STOP_SIGNALS, StopRequest, stop_agreed
from tests.helpers.distributed import run_on_ranks

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
