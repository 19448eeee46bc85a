"""Throughput of the math reward (answer extraction + math-verify worker pool), 1 worker vs all cores.

    .venv/bin/python bench/reward_throughput.py                 # 10,000 items, 1 worker then all cores
    .venv/bin/python bench/reward_throughput.py --items 2000 --timeout 1.0 --pathological 2

Scores a seeded, realistic mix of (gold, completion) pairs: integers, decimals, fractions in several
spellings, expressions, sets/tuples/intervals, wrong answers, completions without an answer or cut off
mid-thought, and a few pathological answers that hang sympy (they must be killed at the deadline).
Prints items per second for each pool size, the speed-up, and checks that no item is lost and that
both pools agree item by item. The two pools run in interleaved rounds so that background load on a
shared machine hits both alike. Goal: speed-up >= 0.85 x cores.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import random
import sys
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from igrpo_megatron.config.reward import AnswerExtractionConfig  # noqa: E402
from igrpo_megatron.rewards.interfaces import RewardItem  # noqa: E402
from igrpo_megatron.rewards.math import MathReward  # noqa: E402
from igrpo_megatron.rewards.pool import VerifyPool, available_cores  # noqa: E402

FILLER = ("Let us compute carefully.", "First we simplify the expression.", "We check the boundary cases.",
          "Substituting back gives a consistent result.", "So the total follows.", "Hence we conclude.")
PATHOLOGICAL = "9^{9^{9^{9}}}"


# Each maker draws a problem's gold answer from ``rng`` and one model answer to it from ``pick`` (so a
# group of completions to one problem shares the gold and repeats some answers, as in RL rollouts).
def _number(rng: random.Random, pick: random.Random) -> tuple[str, str]:
    n = rng.randint(-9999, 999999)
    return str(n), pick.choice([str(n), f"{n}.0", f"{n} \\text{{ units}}", str(n + pick.randint(1, 9))])


def _decimal(rng: random.Random, pick: random.Random) -> tuple[str, str]:
    x = rng.randint(1, 999999) / 100
    return f"{x:g}", pick.choice([f"{x:g}", f"{x:.2f}", f"{x + 0.5:g}"])


def _fraction(rng: random.Random, pick: random.Random) -> tuple[str, str]:
    p, q = rng.randint(1, 997), rng.choice([2, 3, 4, 5, 7, 8, 9, 11, 13, 16, 25, 32, 64, 125])
    forms = [f"\\frac{{{p}}}{{{q}}}", f"{p}/{q}", f"\\dfrac{{{p}}}{{{q}}}", f"{p / q:.6f}",
             f"\\frac{{{p + 1}}}{{{q}}}"]
    return f"\\frac{{{p}}}{{{q}}}", pick.choice(forms)


def _expression(rng: random.Random, pick: random.Random) -> tuple[str, str]:
    a, b = rng.randint(2, 40), rng.randint(2, 99)
    options = [
        (f"{a}\\sqrt{{{b}}}", [f"{a}\\sqrt{{{b}}}", f"\\sqrt{{{a * a * b}}}", f"{a + 1}\\sqrt{{{b}}}"]),
        (f"\\frac{{{a}\\pi}}{{{b}}}", [f"\\frac{{{a}\\pi}}{{{b}}}", f"{a}\\pi/{b}", f"\\frac{{\\pi}}{{{b}}}"]),
        (f"x^2+{2 * a}x+{a * a}", [f"(x+{a})^2", f"x^2+{2 * a}x+{a * a}", f"(x+{a + 1})^2"]),
        (f"{a}+{b}i", [f"{a}+{b}i", f"{b}i+{a}", f"{a}-{b}i"]),
    ]
    gold, answers = rng.choice(options)
    return gold, pick.choice(answers)


def _collection(rng: random.Random, pick: random.Random) -> tuple[str, str]:
    xs = rng.sample(range(-200, 400), rng.randint(2, 4))
    lo, hi = sorted(rng.sample(range(-500, 500), 2))
    shuffled = pick.sample(xs, len(xs))
    options = [
        ("\\{" + ", ".join(map(str, xs)) + "\\}", "\\{" + ", ".join(map(str, shuffled)) + "\\}"),
        (", ".join(map(str, xs)), ", ".join(map(str, shuffled))),
        (f"({xs[0]}, {xs[1]})", pick.choice([f"({xs[0]}, {xs[1]})", f"({xs[1]}, {xs[0]})"])),
        (f"[{lo}, {hi})", pick.choice([f"[{lo}, {hi})", f"[{lo}, {hi}]"])),
    ]
    gold, answer = rng.choice(options)
    return gold, answer


def _completion(pick: random.Random, answer: str) -> str:
    thinking = " ".join(pick.choice(FILLER) for _ in range(pick.randint(5, 40)))
    kind = pick.random()
    if kind < 0.03:  # cut off while thinking
        return f"<think>{thinking}"
    if kind < 0.06:  # finished thinking, gave no answer
        return f"<think>{thinking}</think><answer>I could not solve it.</answer>"
    return f"<think>{thinking} Maybe \\boxed{{0}}?</think><answer>The answer is \\boxed{{{answer}}}.</answer>"


def make_items(n: int, pathological: int, seed: int = 0, group_size: int = 8) -> list[RewardItem]:
    """A seeded mix in groups of ``group_size`` completions per problem (consecutive, as rollouts
    return them); ``pathological`` items are spread evenly through the batch."""
    rng = random.Random(seed)
    pick = random.Random(seed + 1)
    makers = [_number, _decimal, _fraction, _expression, _collection]
    items = []
    while len(items) < n:
        maker, problem_seed, problem = rng.choice(makers), rng.random(), f"problem {len(items) // group_size}"
        for _ in range(min(group_size, n - len(items))):
            gold, answer = maker(random.Random(problem_seed), pick)
            items.append(RewardItem(problem=problem, gold=gold, completion=_completion(pick, answer)))
    step = max(1, n // max(pathological, 1))
    for k in range(pathological):
        i = min(n - 1, k * step + step // 2)
        items[i] = RewardItem(f"problem {i}", "3", f"<think>x</think><answer>\\boxed{{{PATHOLOGICAL}}}</answer>")
    return items


def _spin(n: int) -> int:
    """Trivially parallel pure-Python work: what the machine gives N processes, for comparison."""
    total = 0
    for i in range(n):
        total += i * i
    return total


def _control_round(pool, cores: int, n: int) -> tuple[float, float]:
    """(seconds for cores*n iterations in this process, seconds for n iterations in each of cores processes)."""
    t0 = time.perf_counter()
    _spin(cores * n)
    serial = time.perf_counter() - t0
    t0 = time.perf_counter()
    pool.map(_spin, [n] * cores)
    return serial, time.perf_counter() - t0


def _score_timed(reward: MathReward, items: list[RewardItem]) -> tuple[float, float, list]:
    """(wall seconds, this process's CPU seconds, infos) of one score() call."""
    t0, cpu0 = time.perf_counter(), time.process_time()
    result = reward.score(items)
    elapsed, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    if len(result.info) != len(items):
        raise SystemExit(f"LOST ITEMS: {len(items)} in, {len(result.info)} out")
    return elapsed, cpu, result.info


def run(items: list[RewardItem], cores: int, rounds: int, timeout_s: float, chunk_size: int,
        control_iterations: int) -> dict:
    """Score ``items`` with a 1-worker and a ``cores``-worker pool, both warm, in interleaved rounds.

    Interleaving (1 then N, N then 1, ...) exposes both pool sizes to the same background load on a
    shared machine; each round's slice of items is scored by both. Each round also times a trivially
    parallel control (the best speed-up the machine offers right now).
    """
    rewards = {n: MathReward(AnswerExtractionConfig(), VerifyPool(num_workers=n, item_timeout_s=timeout_s,
                                                                  chunk_size=chunk_size)) for n in (1, cores)}
    out = {n: {"elapsed": 0.0, "info": [], "round_s": []} for n in rewards}
    control = {"serial": 0.0, "parallel": 0.0}
    parent_cpu = 0.0
    spinners = None
    try:
        for reward in rewards.values():
            reward.score(items[: 8 * cores])  # warm-up: start workers, first sympy imports
        # After the reward pools: the first user of the fork server decides what it preloads, and the
        # verification pool wants it warm (see rewards/_verify_warmup.py).
        spinners = mp.get_context("forkserver").Pool(cores)
        size = -(-len(items) // rounds)
        for r in range(rounds):
            part = items[r * size:(r + 1) * size]
            for n in ((1, cores) if r % 2 == 0 else (cores, 1)):
                elapsed, cpu, info = _score_timed(rewards[n], part)
                parent_cpu += cpu
                out[n]["elapsed"] += elapsed
                out[n]["round_s"].append(elapsed)
                out[n]["info"] += info
            serial, parallel = _control_round(spinners, cores, control_iterations)
            control["serial"] += serial
            control["parallel"] += parallel
    finally:
        for reward in rewards.values():
            reward.close()
        if spinners is not None:
            spinners.terminate()
            spinners.join()
    out["parent_cpu"] = parent_cpu
    out["control"] = control["serial"] / control["parallel"]
    out["timeouts"] = {n: reward.pool.stats.timeouts for n, reward in rewards.items()}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--items", type=int, default=10_000)
    ap.add_argument("--pathological", type=int, default=4)
    ap.add_argument("--group-size", type=int, default=8, help="completions per problem")
    ap.add_argument("--timeout", type=float, default=2.0, help="per-item deadline (s)")
    ap.add_argument("--chunk-size", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=10, help="interleaved rounds (slices of the items)")
    ap.add_argument("--control-iterations", type=int, default=2_000_000,
                    help="loop length per process of the trivially parallel control, per round")
    ap.add_argument("--workers", type=int, default=None, help="pool size for the parallel run (default: cores)")
    args = ap.parse_args()
    cores = args.workers or available_cores()
    items = make_items(args.items, args.pathological, group_size=args.group_size)
    load_before = os.getloadavg()[0]
    res = run(items, cores, args.rounds, args.timeout, args.chunk_size, args.control_iterations)
    one, many = res[1], res[cores]
    mismatches = sum(a.correct != b.correct or a.timed_out != b.timed_out
                     for a, b in zip(one["info"], many["info"], strict=True))
    tally = Counter("timeout" if i.timed_out else "no_answer" if i.no_answer else
                    "correct" if i.correct else "wrong" for i in many["info"])
    ratios = sorted(a / b for a, b in zip(one["round_s"], many["round_s"], strict=True))

    print(f"items: {len(items)} ({dict(tally)}); deadline {args.timeout:g} s; chunk {args.chunk_size}; "
          f"{args.rounds} interleaved rounds; load average {load_before:.1f} before, "
          f"{os.getloadavg()[0]:.1f} after, on {available_cores()} cores")
    print(f"{'workers':>8} {'items/s':>10} {'wall s':>8} {'timeouts':>9}")
    for n, r in ((1, one), (cores, many)):
        print(f"{n:>8} {len(r['info']) / r['elapsed']:>10.1f} {r['elapsed']:>8.1f} {res['timeouts'][n]:>9}")
    speedup = one["elapsed"] / many["elapsed"]
    goal = 0.85 * cores
    print(f"speed-up: {speedup:.2f}x on {cores} workers (median of rounds {ratios[len(ratios) // 2]:.2f}x; "
          f"goal >= {goal:.2f}x: {'met' if speedup >= goal else 'MISSED'})")
    print(f"per round, seconds (1 worker / {cores} workers): "
          + "  ".join(f"{x:.1f}/{y:.1f}" for x, y in zip(one["round_s"], many["round_s"], strict=True)))
    print(f"control (pure-Python loop, same rounds): {res['control']:.2f}x on {cores} processes; "
          f"pool efficiency relative to it: {speedup / res['control']:.2f}")
    print(f"parent CPU: {res['parent_cpu']:.2f} s for {2 * len(items)} items scored")
    print(f"items lost: 0; verdicts differing between the two pools: {mismatches}")


if __name__ == "__main__":
    main()
