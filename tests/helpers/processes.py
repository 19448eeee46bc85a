"""Holding a real process still while a test signals another one.

A signal test needs the trainer to be *inside* a step when the signal lands. Tiny steps can take
a third of a second (a step whose groups all score the same makes no update), so sleeping and
hoping is a race. Freezing the vLLM sidecar's process group (SIGSTOP) holds the trainer in its
next request to it, for as long as the test needs; SIGCONT lets the step finish as it would have.
"""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Iterator


@contextlib.contextmanager
def frozen_group(pgid: int) -> Iterator[None]:
    """Stop every process of group ``pgid`` (the sidecar and its engine) until the block ends."""
    os.killpg(pgid, signal.SIGSTOP)
    try:
        yield
    finally:
        with contextlib.suppress(ProcessLookupError):  # the trainer may already have stopped it
            os.killpg(pgid, signal.SIGCONT)
