"""Stopping a run on a signal without losing work: finish the step in flight, save, stop, exit 75.

Slurm sends SIGUSR1 before a job's time limit (``--signal``) and SIGTERM when it cancels or
preempts one; a closed terminal sends SIGHUP. :class:`StopRequest` turns the first of these into a
flag; the loop asks :func:`stop_agreed` at every step boundary, a collective, so every rank stops at
the same step even when only one of them was signalled. The trainer then saves a checkpoint, stops
the vLLM sidecar, writes the summary and ``igrpo train`` exits with :data:`PREEMPTED_EXIT_CODE`,
which tells a job script to requeue (the next run resumes with ``checkpoint.resume: auto``).

A second signal while stopping means "now": outside the clean-up it raises ``SystemExit(128 +
signal)`` at once (no checkpoint for the unfinished step); the clean-up that unwinding runs still
stops the sidecar. During the clean-up itself further signals are only logged.
"""

from __future__ import annotations

import logging
import signal
from types import FrameType

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)

# EX_TEMPFAIL from sysexits.h ("temporary failure; try again later"): the run stopped on a signal
# after saving a checkpoint and is meant to be requeued. 0 is a finished run; 2 bad input; else a failure.
PREEMPTED_EXIT_CODE = 75
STOP_SIGNALS = (signal.SIGUSR1, signal.SIGTERM, signal.SIGHUP)


class StopRequest:
    """Catches :data:`STOP_SIGNALS` in the main thread (use as a context manager; handlers restored on exit)."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self.cleaning_up = False  # set by the trainer's clean-up: later signals must not interrupt it
        self._previous: dict[int, object] = {}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    @property
    def signal_name(self) -> str:
        return signal.Signals(self.signum).name if self.signum is not None else ""

    def __enter__(self) -> StopRequest:
        self._previous = {sig: signal.signal(sig, self._handle) for sig in STOP_SIGNALS}
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        if self.signum is None:
            self.signum = signum
            logger.warning("%s received: finishing the step in flight, then saving a checkpoint and stopping "
                           "(send it again to stop at once, without a checkpoint)", name)
            return
        if self.cleaning_up:
            logger.warning("%s received again while cleaning up; still stopping the vLLM sidecar", name)
            return
        logger.warning("%s received again: stopping now, without a checkpoint of the unfinished step", name)
        raise SystemExit(128 + signum)


def stop_agreed(stop: StopRequest | None) -> bool:
    """Whether any rank was asked to stop (collective: every rank calls it at the same point)."""
    local = stop is not None and stop.requested
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return local
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
    flag = torch.tensor([int(local)], dtype=torch.int32, device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item())
