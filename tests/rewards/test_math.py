"""The math reward on real math-verify in the worker pool: equivalences, failures, hard deadlines.

The pool has 2 worker processes (the CI machine's 2 cores); the hanging input is
``9^{9^{9^{9}}}`` against gold 3, which keeps sympy busy for > 15 s with math-verify's own
timeouts off (checked when this test was written), so only the pool's deadline ends it.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections import deque

import pytest

from igrpo_megatron.config.reward import AnswerExtractionConfig
from igrpo_megatron.rewards.interfaces import RewardItem
from igrpo_megatron.rewards.math import MathReward
from igrpo_megatron.rewards.pool import VerifyPool

DEADLINE_S = 2.0
HANG = "9^{9^{9^{9}}}"


@pytest.fixture(scope="module")
def math_reward():
    reward = MathReward(AnswerExtractionConfig(), VerifyPool(num_workers=2, item_timeout_s=DEADLINE_S))
    yield reward
    reward.close()


def _boxed(answer: str) -> str:
    return f"<think>some work</think><answer>The answer is \\boxed{{{answer}}}.</answer>"


def _score(reward: MathReward, pairs: list[tuple[str, str]]):
    return reward.score([RewardItem("p", gold, completion) for gold, completion in pairs])


EQUIVALENT = [
    ("\\frac{1}{2}", "0.5"),                 # fraction vs decimal
    ("-\\frac{1}{2}", "-0.5"),
    ("0.25", "\\frac14"),
    ("\\frac{1}{3}", "0.333333"),             # rounded to math-verify's 6 places
    ("\\frac{3}{4}", "3/4"),                  # \frac vs /
    ("\\frac{\\sqrt{3}}{2}", "\\frac{1}{2}\\sqrt{3}"),
    ("2\\sqrt{3}", "\\sqrt{12}"),
    ("x^2+2x+1", "(x+1)^2"),
    ("\\{1,2,3\\}", "\\{3,1,2\\}"),           # a set in another order
    ("1, 2", "2, 1"),                         # an unordered list of answers
    ("(3, \\frac{\\pi}{2})", "\\left(3, \\frac{\\pi}{2}\\right)"),  # an ordered pair, same order
    ("(1,2,3)", "(1, 2, 3)"),
    ("[1, 3)", "[1,3)"),                      # intervals
    ("(-\\infty, 2]", "(-\\infty,2]"),
    ("(-\\infty,-1)\\cup(1,\\infty)", "(1,\\infty)\\cup(-\\infty,-1)"),  # a union in either order
    ("5", "5\\text{ cm}"),                    # units and \text{}
    ("10", "10^\\circ"),
    ("5", "\\$5"),
    ("50\\%", "50"),
    ("\\text{(B)}", "B"),
    ("x=3", "3"),
    ("1000", "1,000"),
]

NOT_EQUIVALENT = [
    ("3", "4"),
    ("\\frac{1}{3}", "0.33"),                  # too coarse
    ("(3, \\frac{\\pi}{2})", "(\\frac{\\pi}{2}, 3)"),  # tuple order matters
    ("(1,2,3)", "(3,2,1)"),
    ("[1,3)", "[1,3]"),                        # closed vs half-open
    ("\\pi", "3.14159"),
    ("2\\sqrt{3}", "3\\sqrt{2}"),
]


def test_equivalent_forms_score_one(math_reward):
    result = _score(math_reward, [(gold, _boxed(ans)) for gold, ans in EQUIVALENT])
    wrong = [pair for pair, r in zip(EQUIVALENT, result.rewards, strict=True) if r != 1.0]
    assert not wrong, f"scored 0 but equivalent: {wrong}"
    assert all(i.correct and not i.no_answer and not i.timed_out for i in result.info)
    assert result.info[0].answer == "0.5" and result.info[0].components == {"math": 1.0}


def test_wrong_answers_score_zero(math_reward):
    result = _score(math_reward, [(gold, _boxed(ans)) for gold, ans in NOT_EQUIVALENT])
    right = [pair for pair, r in zip(NOT_EQUIVALENT, result.rewards, strict=True) if r != 0.0]
    assert not right, f"scored 1 but not equivalent: {right}"
    assert not any(i.correct or i.no_answer or i.timed_out for i in result.info)


def test_missing_truncated_and_multiple_answers(math_reward):
    pairs = [
        ("3", "<think>work</think>I am not sure."),                 # no answer
        ("3", "<think>the answer is \\boxed{3} but let me check"),   # cut off while thinking
        ("3", "<think>work</think><answer>\\boxed{3"),                # cut off inside the answer
        ("4", "<think>work</think>\\boxed{3}, no wait: \\boxed{4}"),  # last box counts...
        ("3", "<think>work</think>\\boxed{3}, no wait: \\boxed{4}"),  # ...not the first
    ]
    result = _score(math_reward, pairs)
    assert result.rewards == [0.0, 0.0, 0.0, 1.0, 0.0]
    assert [i.no_answer for i in result.info] == [True, True, True, False, False]
    assert result.counts()["no_answer"] == 3


def test_repeated_answers_in_a_group_are_verified_once(math_reward):
    items_before = math_reward.pool.stats.items
    # A group of 5 completions to one problem: 3 distinct answers ("0.5" written twice in the same way).
    pairs = [("\\frac{1}{2}", _boxed(a)) for a in ("0.5", "0.5", "1/2", "0.25", "0.5")]
    result = _score(math_reward, pairs)
    assert result.rewards == [1.0, 1.0, 1.0, 0.0, 1.0]
    assert math_reward.pool.stats.items - items_before == 3


def test_unparseable_gold_scores_zero_and_says_why(math_reward):
    result = _score(math_reward, [("", _boxed("3"))])
    assert result.rewards == [0.0]
    assert "did not parse" in result.info[0].error


def test_hanging_item_is_killed_at_the_deadline_and_the_batch_still_scores(math_reward):
    # 12 good items around 2 hanging ones (they may land in the same chunk of the same worker).
    good = [(str(k), _boxed(str(k))) for k in range(6)] + [(str(k), _boxed(str(k + 1))) for k in range(6)]
    pairs = good[:5] + [("3", _boxed(HANG))] + good[5:9] + [("7", _boxed(HANG))] + good[9:]
    timeouts_before = math_reward.pool.stats.timeouts
    result = _score(math_reward, pairs)
    hung = [5, 10]
    assert [i for i, info in enumerate(result.info) if info.timed_out] == hung
    assert all(result.rewards[i] == 0.0 and "timeout" in result.info[i].error for i in hung)
    expected_good = [1.0] * 6 + [0.0] * 6
    assert [r for i, r in enumerate(result.rewards) if i not in hung] == expected_good
    assert math_reward.pool.stats.timeouts - timeouts_before == 2
    # No wall-clock bound here (tests never depend on time): the pool's own timeout count above shows
    # both hangs were cut at the deadline rather than waited out.
    # The pool is reused: the replacement workers score the next batch normally.
    assert _score(math_reward, [("2", _boxed("2"))]).rewards == [1.0]


def test_scoring_from_another_thread(math_reward):
    # math-verify's own timeouts (signal.alarm) fail outside the main thread; the pool's do not.
    out = {}
    t = threading.Thread(target=lambda: out.update(r=_score(math_reward, [("\\frac{1}{2}", _boxed("0.5"))])))
    t.start()
    t.join(60)
    assert out["r"].rewards == [1.0]


def test_worker_that_dies_mid_item_costs_one_item():
    pool = VerifyPool(num_workers=2, item_timeout_s=60.0)
    try:
        pairs = [("1", "$1$"), ("3", f"${HANG}$")] + [(str(k), f"${k}$") for k in range(8)]
        out = {}
        t = threading.Thread(target=lambda: out.update(r=pool.verify(pairs)))
        t.start()
        pid = _pid_of_worker_on_item(pool, 1, seconds=0.5, within=60.0)
        os.kill(pid, signal.SIGKILL)  # as if the OOM killer had struck
        t.join(120)
        outcomes = out["r"]
        assert outcomes[1].status == "error" and "crash" in outcomes[1].error
        assert [o.status for i, o in enumerate(outcomes) if i != 1] == ["correct"] * 9
        assert pool.stats.crashes == 1 and pool.stats.timeouts == 0
    finally:
        pool.close()


def _pid_of_worker_on_item(pool: VerifyPool, index: int, seconds: float, within: float) -> int:
    """Pid of the worker that has been verifying item ``index`` for ``seconds`` (pool internals)."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            for w in list(pool._workers):
                for chunk in list(w.outstanding):
                    if index in chunk.indices:
                        on_it = w.progress[0] == chunk.first_seq + chunk.indices.index(index)
                        started = w.progress[1]
                        if on_it and started and time.monotonic() - started > seconds:
                            return w.proc.pid
        except RuntimeError:  # a deque changed under us: look again
            pass
        time.sleep(0.05)
    raise AssertionError(f"no worker got stuck on item {index}")


def test_close_stops_workers_and_a_closed_pool_refuses_work():
    pool = VerifyPool(num_workers=2, item_timeout_s=5.0)
    assert [o.status for o in pool.verify([("1", "$1$"), ("1", "$2$")])] == ["correct", "wrong"]
    procs = [w.proc for w in pool._workers]
    pool.close()
    pool.close()  # idempotent
    assert not any(p.is_alive() for p in procs)
    with pytest.raises(RuntimeError, match="closed"):
        pool.verify([("1", "$1$")])


def test_empty_and_small_batches_are_exact_on_reused_workers():
    with VerifyPool(num_workers=2, item_timeout_s=5.0) as pool:
        assert pool.verify([]) == []
        pairs = [(str(k), f"${k if k % 3 else k + 1}$") for k in range(1, 40)]
        expected = ["correct" if k % 3 else "wrong" for k in range(1, 40)]
        pids = [w.proc.pid for w in pool._workers]
        assert [o.status for o in pool.verify(pairs)] == expected
        assert pool.stats.items == 39
        # Started once, reused: the same two processes served both calls.
        assert [w.proc.pid for w in pool._workers] == pids and pool.stats.restarts == 0


_ORPHAN_SCRIPT = textwrap.dedent("""
    import os, signal, sys, threading, time
    from igrpo_megatron.rewards.pool import VerifyPool

    if __name__ == "__main__":
        pool = VerifyPool(num_workers=2, item_timeout_s=600.0)
        pool.verify([("1", "$1$")] * 4)
        print(" ".join(str(w.proc.pid) for w in pool._workers), flush=True)
        # Leave one worker stuck on a hanging item, then end without close().
        threading.Thread(target=pool.verify, args=([("3", "$__HANG__$")],), daemon=True).start()
        time.sleep(1.0)
        if sys.argv[1] == "sigkill":
            os.kill(os.getpid(), signal.SIGKILL)  # no atexit handlers run
""").replace("__HANG__", HANG)


@pytest.mark.parametrize("ending", ["exit", "sigkill"])
def test_no_worker_outlives_the_trainer(tmp_path, ending):
    # "exit": the pool's finalizer (and multiprocessing's) stop the workers at interpreter exit.
    # "sigkill": nothing runs in the trainer; the fork server exits and PR_SET_PDEATHSIG kills the
    # worker stuck in sympy's C code.
    script = tmp_path / "leave_pool_open.py"
    script.write_text(_ORPHAN_SCRIPT)
    env = dict(os.environ, PYTHONPATH=os.getcwd())
    done = subprocess.run([sys.executable, str(script), ending], capture_output=True, text=True, timeout=120,
                          env=env)
    assert done.returncode == (0 if ending == "exit" else -signal.SIGKILL), done.stderr
    pids = [int(p) for p in done.stdout.split()]
    assert len(pids) == 2
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and any(_alive(p) for p in pids):
        time.sleep(0.1)
    left = [p for p in pids if _alive(p)]
    for pid in left:  # do not leave a spinning process behind for the next test
        os.kill(pid, signal.SIGKILL)
    assert not left, f"verification workers left running after the trainer ended ({ending})"


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except OSError:
        return False


class _Proc:
    pid = os.getpid()  # /proc/self stands in for a worker: the test controls what it "used"


@pytest.mark.parametrize("wall_s, cpu_used_s, overdue", [
    (0.5, 0.5, False),  # within the 1 s deadline
    (1.5, 1.2, True),   # past it and it had the CPU: stuck, kill
    (1.5, 0.2, False),  # past it on the wall clock, but starved of CPU: grace
    (3.5, 0.2, True),   # starved, but past 3 deadlines of wall time: kill anyway
])
def test_deadline_counts_cpu_time_for_starved_workers(wall_s, cpu_used_s, overdue):
    from igrpo_megatron.rewards import _verify_worker as W
    from igrpo_megatron.rewards.pool import _process_cpu_seconds, _Worker

    pool = VerifyPool(num_workers=1, item_timeout_s=1.0)  # never started: only its deadline rule is used
    progress = [0.0] * W.PROGRESS_SLOTS
    w = _Worker(proc=_Proc(), conn=None, progress=progress)
    now = time.monotonic()
    progress[W.STARTED] = now - wall_s
    progress[W.CPU_AT_START] = _process_cpu_seconds(os.getpid()) - cpu_used_s
    assert pool._overdue(w, progress[W.STARTED], now) is overdue
    if wall_s > 1.0 and not overdue:
        # Looked at again once it could have used the rest of its CPU allowance (0.8 s from now).
        assert pool._next_check(w) == pytest.approx(now + 1.0 - cpu_used_s, abs=0.05)


def test_likely_slow_items_go_first_and_alone():
    from igrpo_megatron.rewards.pool import dispatch_order, looks_slow, take_chunk

    assert looks_slow("$9^{9^{9}}$") and looks_slow("$100!!$")
    assert not looks_slow("$x^2+1$") and not looks_slow("$5!$") and not looks_slow("$\\frac{1}{2}$")
    pairs = [("1", "$1$"), ("3", f"${HANG}$"), ("2", "$2$"), ("4", "$4$"), ("3", "$3^{3^{3}}$"), ("5", "$5$")]
    queue, risky = dispatch_order(pairs)
    assert list(queue) == [1, 4, 0, 2, 3, 5] and risky == {1, 4}
    chunks = []
    while queue:
        chunks.append(take_chunk(queue, 3, risky))
    assert chunks == [[1], [4], [0, 2, 3], [5]]
    # A risky item put back at the front (its worker was killed) still travels alone.
    queue = deque([0, 4, 2])
    assert take_chunk(queue, 3, risky) == [0] and take_chunk(queue, 3, risky) == [4]


def test_the_pool_defaults_are_the_recipe_defaults():
    """math-verify's settings have their defaults in one place (reward.math); the pool takes them from there."""
    from igrpo_megatron.config.reward import MathVerifyConfig

    d = MathVerifyConfig()
    pool = VerifyPool(num_workers=1)  # never started
    assert (pool.item_timeout_s, pool.chunk_size, pool.start_method) == (d.item_timeout_s, d.chunk_size,
                                                                         d.start_method)
    assert pool._options == (d.float_rounding, d.numeric_precision, d.strict)
