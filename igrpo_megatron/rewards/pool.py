"""A pool of math-verify worker processes with a hard per-item deadline.

Why not ``multiprocessing.Pool`` or ``concurrent.futures``: neither can kill one worker stuck in a
sympy computation and carry on. Here the parent sends items in chunks (few messages, little IPC), each
worker publishes the sequence number and start time of the item it is on in a shared array, and the
parent wakes only when a chunk comes back or when the earliest possible deadline passes. A worker past
its deadline is killed (SIGKILL works even inside C code) and replaced; the item it was on scores 0 and
counts as a timeout; the other items it held go back to the queue. The pool starts once and is reused.

The deadline is wall-clock time, except that a worker starved of CPU by other processes is judged by
the CPU time it actually got (up to STARVED_WALL_FACTOR deadlines of wall time), so that a loaded
machine does not turn slow-but-fine items into timeouts.
"""

from __future__ import annotations

import logging
import math
import multiprocessing as mp
import os
import pickle
import threading
import time
import weakref
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from multiprocessing.connection import wait
from typing import NamedTuple

from igrpo_megatron.config.reward import MathVerifyConfig
from igrpo_megatron.rewards import _verify_worker as W

logger = logging.getLogger(__name__)

_STATUS = {W.CORRECT: "correct", W.WRONG: "wrong", W.GOLD_UNPARSED: "gold_unparsed",
           W.ANSWER_UNPARSED: "answer_unparsed", W.ERROR: "error"}
MAX_CHUNKS_IN_FLIGHT = 2  # per worker: the next chunk waits in the pipe, so a worker never idles
PIPELINE_MAX_BYTES = 16 * 1024  # never queue a chunk bigger than this behind a busy (maybe stuck) worker
MAX_IDLE_WAIT_S = 1.0
MAX_FRUITLESS_RESTARTS = 8  # workers dying before touching any item: a broken setup, not a bad item
# A worker past its wall-clock deadline that has had less than the deadline in CPU time was starved by
# other processes, not stuck: it gets until it has used the deadline in CPU, or this many deadlines of
# wall time, whichever comes first. Keeps a busy machine from turning slow items into false timeouts.
STARVED_WALL_FACTOR = 3.0
_WARM_UP_MODULE = "igrpo_megatron.rewards._verify_warmup"
_CLOCK_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


class VerifyOutcome(NamedTuple):
    """Verdict for one (gold, answer) pair: correct, wrong, gold_unparsed, answer_unparsed, timeout, error."""

    status: str
    error: str | None = None

    @property
    def correct(self) -> bool:
        return self.status == "correct"

    @property
    def timed_out(self) -> bool:
        return self.status == "timeout"


@dataclass
class PoolStats:
    """Cumulative counters since the pool started (for logs and tests)."""

    items: int = 0
    timeouts: int = 0
    crashes: int = 0
    restarts: int = 0


@dataclass
class _Chunk:
    chunk_id: int
    indices: list[int]
    first_seq: int  # worker-side sequence number of indices[0]


@dataclass
class _Worker:
    proc: mp.process.BaseProcess
    conn: mp.connection.Connection
    progress: object  # RawArray('d', PROGRESS_SLOTS): [seq, started, cpu_at_start]
    next_seq: int = 0
    grace_for: float = W.IDLE  # the start time of the item that was given starvation grace...
    grace_until: float = 0.0  # ...and when to look at it again
    outstanding: deque[_Chunk] = field(default_factory=deque)


class _WorkerList(list):
    """The pool's workers, plus the flag its finalizer sets (the finalizer cannot hold the pool itself)."""

    closed = False


def available_cores() -> int:
    """CPU cores this process may run on (its affinity mask), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


_DEFAULTS = MathVerifyConfig()  # the one place math-verify's settings have defaults: reward.math


class VerifyPool:
    """Verifies (gold, answer) pairs with math-verify in ``num_workers`` processes; see module docstring.

    Use as a context manager or call ``close()``; an unclosed pool is shut down at interpreter exit.
    ``verify`` may be called from any thread (calls are serialised).
    """

    def __init__(self, num_workers: int | None = None, item_timeout_s: float = _DEFAULTS.item_timeout_s,
                 chunk_size: int = _DEFAULTS.chunk_size, start_method: str = _DEFAULTS.start_method,
                 float_rounding: int = _DEFAULTS.float_rounding, numeric_precision: int = _DEFAULTS.numeric_precision,
                 strict: bool = _DEFAULTS.strict):
        if item_timeout_s <= 0 or chunk_size <= 0:
            raise ValueError("reward.math.item_timeout_s and reward.math.chunk_size must be > 0.")
        self.num_workers = num_workers or available_cores()
        self.item_timeout_s = item_timeout_s
        self.chunk_size = chunk_size
        self.start_method = start_method
        self._options = (float_rounding, numeric_precision, strict)
        self._ctx = mp.get_context(start_method)
        self._workers = _WorkerList()
        self._lock = threading.Lock()
        self._next_chunk_id = 0
        self.stats = PoolStats()
        self._finalizer = weakref.finalize(self, _shutdown_workers, self._workers, True)

    @classmethod
    def from_config(cls, cfg: MathVerifyConfig) -> VerifyPool:
        return cls(num_workers=cfg.num_workers, item_timeout_s=cfg.item_timeout_s, chunk_size=cfg.chunk_size,
                   start_method=cfg.start_method, float_rounding=cfg.float_rounding,
                   numeric_precision=cfg.numeric_precision, strict=cfg.strict)

    # -- lifecycle --------------------------------------------------------------------------------

    def start(self) -> None:
        """Start the workers (no-op when running). ``verify`` calls it on first use."""
        if self._workers.closed:
            raise RuntimeError("this VerifyPool was closed; build a new one.")
        if self._workers:
            return
        if self.start_method == "forkserver":
            # The fork server imports math-verify and runs the warm-up once; every worker (and every
            # replacement of a killed one) is forked from it warm. No effect if the server already runs.
            self._ctx.set_forkserver_preload(["__main__", W.__name__, "math_verify", _WARM_UP_MODULE])
        t0 = time.monotonic()
        for _ in range(self.num_workers):
            self._workers.append(self._spawn())
        logger.info("started %d math-verify workers (%s) in %.2f s, item deadline %.1f s", self.num_workers,
                    self.start_method, time.monotonic() - t0, self.item_timeout_s)

    def _spawn(self) -> _Worker:
        parent_conn, child_conn = self._ctx.Pipe(duplex=True)
        progress = self._ctx.RawArray("d", W.PROGRESS_SLOTS)
        args = (child_conn, progress, self._options, self.start_method == "forkserver")
        proc = self._ctx.Process(target=W.worker_main, args=args, name="igrpo-math-verify", daemon=True)
        proc.start()
        child_conn.close()  # the worker holds the only other end: its death shows up as EOF here
        return _Worker(proc=proc, conn=parent_conn, progress=progress)

    def close(self) -> None:
        """Stop all workers (idempotent)."""
        self._workers.closed = True  # before taking the lock: a verify() in flight stops replacing workers
        with self._lock:
            self._finalizer()

    def __enter__(self) -> VerifyPool:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- scoring ----------------------------------------------------------------------------------

    def verify(self, pairs: Sequence[tuple[str, str]]) -> list[VerifyOutcome]:
        """One outcome per (gold, answer) pair, in order. ``answer`` should already be wrapped for LaTeX."""
        with self._lock:
            self.start()
            results: list[VerifyOutcome | None] = [None] * len(pairs)
            queue, risky = dispatch_order(pairs)
            chunk_len = max(1, min(self.chunk_size, math.ceil(len(pairs) / (4 * self.num_workers))))
            remaining = len(pairs)
            fruitless = 0
            try:
                while remaining:
                    self._dispatch(queue, pairs, chunk_len, risky)
                    done, died_empty = self._collect(results, queue)
                    remaining -= done
                    fruitless = 0 if done else fruitless + died_empty
                    if fruitless > MAX_FRUITLESS_RESTARTS:
                        raise RuntimeError("math-verify workers keep dying before verifying anything; check "
                                           "that math_verify imports in a fresh process (see stderr).")
            except BaseException:
                # Interrupted (Ctrl-C, a bug): workers may hold half-done chunks, so start afresh next call.
                _shutdown_workers(self._workers, final=False)
                raise
            self.stats.items += len(pairs)
            return results  # type: ignore[return-value]  (every slot is filled when remaining == 0)

    def _dispatch(self, queue: deque[int], pairs: Sequence[tuple[str, str]], chunk_len: int,
                  risky: set[int]) -> None:
        """Top every worker up to MAX_CHUNKS_IN_FLIGHT chunks, the least loaded first."""
        for depth in range(MAX_CHUNKS_IN_FLIGHT):
            for w in self._workers:
                if not queue or len(w.outstanding) > depth:
                    continue
                indices = take_chunk(queue, chunk_len, risky)
                chunk = _Chunk(self._next_chunk_id, indices, w.next_seq)
                payload = pickle.dumps((chunk.chunk_id, [pairs[i] for i in indices]),
                                       protocol=pickle.HIGHEST_PROTOCOL)
                if w.outstanding and len(payload) > PIPELINE_MAX_BYTES:
                    queue.extendleft(reversed(indices))  # too big to park behind a possibly stuck worker
                    continue
                try:
                    w.conn.send_bytes(payload)
                except OSError:  # the worker died; _collect sees its sentinel and requeues this chunk
                    logger.debug("send to math-verify worker pid %s failed", w.proc.pid)
                self._next_chunk_id += 1
                w.next_seq += len(indices)
                w.outstanding.append(chunk)

    def _collect(self, results: list, queue: deque[int]) -> tuple[int, int]:
        """Wait for replies or the next deadline; returns (items finished, workers that died idle-handed)."""
        busy = [w for w in self._workers if w.outstanding]
        ready = wait([w.conn for w in busy] + [w.proc.sentinel for w in busy], timeout=self._wait_time(busy))
        done = died_empty = 0
        for w in busy:
            if w.conn in ready or w.proc.sentinel in ready:
                n, alive = self._drain(w, results)
                done += n
                if not alive:
                    n, attributed = self._replace(w, results, queue, "crash")
                    done += n
                    died_empty += not attributed
        now = time.monotonic()
        for w in busy:
            started = w.progress[W.STARTED]
            if w.outstanding and self._overdue(w, started, now):
                n, alive = self._drain(w, results)  # a reply may have landed since wait() returned
                done += n
                if not alive:
                    done += self._replace(w, results, queue, "crash")[0]
                elif w.outstanding and w.progress[W.STARTED] == started:
                    done += self._replace(w, results, queue, "timeout")[0]
        return done, died_empty

    def _overdue(self, w: _Worker, started: float, now: float) -> bool:
        """Whether the item ``w`` is on has used up its deadline (see STARVED_WALL_FACTOR)."""
        limit = self.item_timeout_s
        if started == W.IDLE or now - started <= limit:
            return False
        if now - started >= STARVED_WALL_FACTOR * limit:
            return True
        cpu = _process_cpu_seconds(w.proc.pid)
        if cpu is None:  # no /proc: wall-clock deadline only
            return True
        used = cpu - w.progress[W.CPU_AT_START]
        if used >= limit - 1.0 / _CLOCK_TICKS:
            return True
        w.grace_for, w.grace_until = started, now + (limit - used)
        return False

    def _next_check(self, w: _Worker) -> float | None:
        started = w.progress[W.STARTED]
        if started == W.IDLE:
            return None
        if w.grace_for == started:
            return min(w.grace_until, started + STARVED_WALL_FACTOR * self.item_timeout_s)
        return started + self.item_timeout_s

    def _wait_time(self, busy: list[_Worker]) -> float:
        checks = [t for t in map(self._next_check, busy) if t is not None]
        if not checks:
            return MAX_IDLE_WAIT_S
        return min(MAX_IDLE_WAIT_S, max(0.0, min(checks) - time.monotonic()) + 1e-3)

    def _drain(self, w: _Worker, results: list) -> tuple[int, bool]:
        """Read every reply waiting on ``w``'s pipe; returns (items finished, worker still alive)."""
        done = 0
        try:
            while w.outstanding and w.conn.poll():
                chunk_id, outs = w.conn.recv()
                chunk = w.outstanding.popleft()
                if chunk_id != chunk.chunk_id:
                    raise RuntimeError(f"verification worker answered chunk {chunk_id}, expected "
                                       f"{chunk.chunk_id}: protocol out of step (bug).")
                for idx, (code, err) in zip(chunk.indices, outs, strict=True):
                    results[idx] = VerifyOutcome(_STATUS[code], err)
                done += len(chunk.indices)
        except (EOFError, OSError):
            return done, False
        return done, w.proc.is_alive()

    def _replace(self, w: _Worker, results: list, queue: deque[int], reason: str) -> tuple[int, bool]:
        """Kill ``w``; fail the item it was on, requeue its other items, start a replacement.

        Returns (items failed, whether the item it was on could be identified).
        """
        seq, started = int(w.progress[W.SEQ]), w.progress[W.STARTED]
        _stop(w, kill=True)
        failed = 0
        requeue: list[int] = []
        for chunk in w.outstanding:
            for offset, idx in enumerate(chunk.indices):
                if started != W.IDLE and chunk.first_seq + offset == seq:
                    status = "timeout" if reason == "timeout" else "error"
                    results[idx] = VerifyOutcome(status, f"worker {reason} after "
                                                         f"{time.monotonic() - started:.1f} s")
                    failed += 1
                else:
                    requeue.append(idx)
        queue.extendleft(reversed(requeue))
        w.outstanding.clear()
        if reason == "timeout":
            self.stats.timeouts += 1
            logger.warning("math-verify item exceeded %.1f s; worker pid %s killed and replaced",
                           self.item_timeout_s, w.proc.pid)
        else:
            self.stats.crashes += 1
            logger.error("math-verify worker pid %s died (exit code %s); replacing it", w.proc.pid,
                         w.proc.exitcode)
        if self._workers.closed:
            raise RuntimeError("the VerifyPool was closed while verifying.")
        self._workers[self._workers.index(w)] = self._spawn()
        self.stats.restarts += 1
        return failed, failed > 0


def looks_slow(answer: str) -> bool:
    """Whether an answer has what usually makes sympy slow: a tower of powers or factorials."""
    return answer.count("^") >= 2 or answer.count("!") >= 2


def dispatch_order(pairs: Sequence[tuple[str, str]]) -> tuple[deque[int], set[int]]:
    """The order to hand items out in, and which items look slow.

    Likely-slow items go first (longest-processing-time-first): a hang then overlaps the rest of the
    batch on the other workers instead of stalling the batch's tail.
    """
    risky = {i for i, (_, answer) in enumerate(pairs) if looks_slow(answer)}
    return deque(sorted(range(len(pairs)), key=lambda i: i not in risky)), risky


def take_chunk(queue: deque[int], chunk_len: int, risky: set[int]) -> list[int]:
    """Pop the next chunk: up to ``chunk_len`` ordinary items, or one risky item alone (so that two
    hangs land on two workers and a hang holds up no other item)."""
    indices = [queue.popleft()]
    if indices[0] not in risky:
        while queue and len(indices) < chunk_len and queue[0] not in risky:
            indices.append(queue.popleft())
    return indices


def _process_cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds of process ``pid`` from /proc (None where there is no /proc)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS
    except (OSError, IndexError, ValueError):
        return None


def _stop(w: _Worker, kill: bool, grace_s: float = 2.0) -> None:
    """End one worker: politely when idle (``kill`` false), with SIGKILL otherwise or after ``grace_s``."""
    if not kill:
        _ask_to_exit(w)
        w.proc.join(grace_s)
    if w.proc.is_alive():
        w.proc.kill()
        w.proc.join(grace_s)
    w.conn.close()


def _ask_to_exit(w: _Worker) -> None:
    try:
        w.conn.send(None)
    except (OSError, ValueError):
        pass


def _shutdown_workers(workers: _WorkerList, final: bool) -> None:
    """Ask idle workers to exit, kill busy ones. As the finalizer (``final``) it also runs at interpreter
    exit, and marks the list closed so that a verify() still running in another thread starts no more."""
    if final:
        workers.closed = True
    for w in workers:
        if not w.outstanding:
            _ask_to_exit(w)  # all at once, so they exit in parallel
    for w in workers:
        try:
            _stop(w, kill=bool(w.outstanding))
        except Exception:  # shutting down: keep going for the other workers
            logger.debug("error stopping a math-verify worker", exc_info=True)
    workers.clear()
