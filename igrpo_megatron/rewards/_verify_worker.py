"""Code that runs inside a verification worker process (see ``pool.VerifyPool``).

math-verify's own timeouts use ``signal.alarm``; here they are off (``parsing_timeout=None``,
``timeout_seconds=None``) because the parent enforces a hard deadline by killing the worker. The
worker publishes which item it is on and when it started it in a small shared array, so the parent
needs no message per item.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import time
from collections.abc import Sequence
from functools import lru_cache

from igrpo_megatron.config.reward import MathVerifyConfig
from igrpo_megatron.rewards.extraction import to_latex_input

# Outcome codes sent back to the parent, one small int per item (cheap to pickle).
CORRECT = 1
WRONG = 0
GOLD_UNPARSED = 2
ANSWER_UNPARSED = 3
ERROR = 4

# Slots of the shared progress array: sequence number of the item being verified, its start time
# (time.monotonic, system-wide on Linux; IDLE between items) and this process's CPU seconds then.
SEQ, STARTED, CPU_AT_START = 0, 1, 2
PROGRESS_SLOTS = 3
IDLE = 0.0

# One pair per kind of answer: the first verification of each kind pays sympy's lazy imports and
# cache fills (~1 s of CPU in all). Paid before the first item, outside any deadline, so that a fresh
# worker on a busy machine does not time out on its first items.
WARM_UP = (("3", "$3$"), ("\\frac{1}{2}", "$0.5$"), ("\\{1,2\\}", "$\\{2,1\\}$"), ("[1,3)", "$[1,3)$"),
           ("x^2+2x+1", "$(x+1)^2$"), ("2\\sqrt{3}", "$\\sqrt{12}$"), ("(1,2)", "$(2,1)$"),
           ("5+3i", "$3i+5$"), ("\\frac{2\\pi}{3}", "$2\\pi/3$"), ("x=3", "$3$"), ("10", "$10^\\circ$"))


def _die_with_forkserver() -> None:
    """Make sure a worker stuck in C code cannot outlive a trainer that was SIGKILLed.

    A forkserver child inherits the write end of the server's "is my client alive" pipe, which keeps
    the server (our parent) alive as long as the child lives. Dropping it lets the server exit when
    the trainer dies; PR_SET_PDEATHSIG then kills this worker, even mid-computation. Not used with
    'spawn', where the death signal would follow the trainer *thread* that started the worker.
    """
    try:
        from multiprocessing import forkserver

        server = forkserver._forkserver  # private, but the only handle on that inherited descriptor
        if server._forkserver_alive_fd is not None:
            os.close(server._forkserver_alive_fd)
            server._forkserver_alive_fd = None
        parent = os.getppid()
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        if os.getppid() != parent:  # the server died before the request took effect
            os._exit(1)
    except (OSError, AttributeError):
        pass


class _Verifier:
    """Parses and compares with math-verify; gold parses are cached (a gold repeats across a group)."""

    def __init__(self, float_rounding: int, numeric_precision: int, strict: bool):
        from math_verify import parse, verify

        self._parse = parse
        self._verify = verify
        self.float_rounding = float_rounding
        self.numeric_precision = numeric_precision
        self.strict = strict
        self.parse_gold = lru_cache(maxsize=4096)(self._parse_gold)

    def _parse_gold(self, gold: str) -> list:
        # Gold strings in datasets are bare LaTeX ("\\frac{1}{2}", "(1,2)"): wrap them first, and try
        # the raw string too for golds written as prose or code ("1/2", "x = 3").
        return self._parse(to_latex_input(gold), parsing_timeout=None) or self._parse(gold, parsing_timeout=None)

    def check(self, gold: str, answer: str) -> tuple[int, str | None]:
        try:
            gold_parsed = self.parse_gold(gold)
            if not gold_parsed:
                return GOLD_UNPARSED, None
            answer_parsed = self._parse(answer, parsing_timeout=None)
            if not answer_parsed:
                return ANSWER_UNPARSED, None
            ok = self._verify(gold_parsed, answer_parsed, float_rounding=self.float_rounding,
                              numeric_precision=self.numeric_precision, strict=self.strict,
                              timeout_seconds=None)
            return (CORRECT if ok else WRONG), None
        except Exception as e:  # a bug in a parser must cost one item, not the worker
            return ERROR, f"{type(e).__name__}: {e}"[:300]


def warm_up(options: Sequence | None = None) -> _Verifier:
    """A verifier that has run every WARM_UP pair once (cheap when the fork server already did).

    ``options``: (float_rounding, numeric_precision, strict); None: ``reward.math``'s defaults.
    """
    if options is None:
        d = MathVerifyConfig()
        options = (d.float_rounding, d.numeric_precision, d.strict)
    for name in ("math_verify", "latex2sympy2_extended"):
        logging.getLogger(name).setLevel(logging.ERROR)  # "timeout is disabled" warnings are expected here
    verifier = _Verifier(*options)
    for gold, answer in WARM_UP:
        verifier.check(gold, answer)
    verifier.parse_gold.cache_clear()
    return verifier


def worker_main(conn, progress, options: Sequence, from_forkserver: bool) -> None:
    """Serve ``(chunk_id, [(gold, answer), ...])`` messages until ``None`` or the pipe closes."""
    if from_forkserver:
        _die_with_forkserver()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C goes to the trainer, which closes the pool
    verifier = warm_up(options)
    seq = 0
    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError):
            return
        if msg is None:
            return
        chunk_id, pairs = msg
        out = []
        for gold, answer in pairs:
            progress[SEQ] = seq
            progress[CPU_AT_START] = time.process_time()
            progress[STARTED] = time.monotonic()
            out.append(verifier.check(gold, answer))
            seq += 1
        progress[STARTED] = IDLE
        try:
            conn.send((chunk_id, out))
        except (BrokenPipeError, OSError):
            return
