"""The real Megatron RL step (``MegatronPolicy.train_step``) timed on a synthetic batch, its model
FLOPs, and the matmul ceiling it is compared with. Shared by the training-step, scaling and GPU entries.

Model FLOPs of one step (stated in every report that uses them), per sequence of s input tokens:

    6 * N * s  +  12 * L * d_attn * s^2

N: parameters that take part in matmuls (everything but the input embedding table, output layer
included); L: layers; d_attn = heads x head size. 6 = 2 (multiply-add) x 3 (forward + backward
for inputs and weights); the second term is QK^T and AV counted over the full s x s square (as
Megatron and PaLM count it), forward 4 * L * d_attn * s^2, times 3. Padding tokens are not
counted: they are work the planner added, not work the model needed.
"""

from __future__ import annotations

import random
import statistics
import time
from typing import Any

import torch

from igrpo_megatron.config.schema import RecipeConfig
from igrpo_megatron.training.batch import Sequence, TrainBatch

FLOP_FORMULA = "6*N*s + 12*L*d_attn*s^2 per sequence of s tokens (N: matmul parameters, no input embedding)"
COMM_OPS = ("gloo:", "nccl:", "c10d::", "record_param_comms")


def synthetic_batch(vocab: int, sequences: int, prompt: tuple[int, int], completion: tuple[int, int],
                    seed: int = 0) -> TrainBatch:
    """Random token sequences with rollout-like shape: groups of 8, advantages of both signs."""
    rng = random.Random(seed)
    seqs = []
    for i in range(sequences):
        p = [rng.randrange(vocab) for _ in range(rng.randint(*prompt))]
        c = [rng.randrange(vocab) for _ in range(rng.randint(*completion))]
        seqs.append(Sequence(p, c, advantage=rng.uniform(-1.5, 1.5), group=i // 8,
                             rollout_logprobs=[-rng.uniform(1, 6) for _ in c]))
    return TrainBatch(seqs)


def step_flops(n_matmul_params: int, layers: int, d_attn: int, lengths: list[int]) -> float:
    """Model FLOPs of one training step over sequences of ``lengths`` (input tokens; see module doc)."""
    return float(sum(6 * n_matmul_params * s + 12 * layers * d_attn * s * s for s in lengths))


def input_lengths(batch: TrainBatch) -> list[int]:
    return [s.length - 1 for s in batch.sequences]  # position t predicts t + 1: the last token is no input


def matmul_params(chunks: list[torch.nn.Module]) -> int:
    """Parameters of these chunks that take part in matmuls (the input embedding table does not)."""
    return sum(p.numel() for c in chunks for name, p in c.named_parameters() if "word_embeddings" not in name)


def matmul_ceiling(m: int, k: int, n: int, dtype: torch.dtype, device: str, min_seconds: float = 1.0) -> dict:
    """FLOP/s of ``torch.matmul`` of [m, k] x [k, n] in ``dtype`` on ``device`` (best of timed batches)."""
    a = torch.randn(m, k, device=device).to(dtype)
    b = torch.randn(k, n, device=device).to(dtype)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    for _ in range(3):
        torch.matmul(a, b)
    sync()
    best, spent, reps = float("inf"), 0.0, 1
    while spent < min_seconds:
        t0 = time.perf_counter()
        for _ in range(reps):
            torch.matmul(a, b)
        sync()
        dt = (time.perf_counter() - t0) / reps
        spent += dt * reps
        best = min(best, dt)
        reps = min(reps * 2, 64)
    return {"shape": [m, k, n], "dtype": str(dtype).replace("torch.", ""), "device": device,
            "flops_per_s": 2.0 * m * k * n / best, "threads": torch.get_num_threads()}


def comm_seconds(prof) -> float:
    """CPU time of the communication calls a torch.profiler trace recorded (gloo/nccl collectives,
    point-to-point and their waits), counted once: nested events of the same call are not added."""
    events = sorted((e for e in prof.events() if any(e.name.startswith(k) or k in e.name for k in COMM_OPS)),
                    key=lambda e: e.time_range.start)
    total, end = 0.0, -1.0
    for e in events:  # union of intervals: a collective and its inner gloo op overlap
        start, stop = e.time_range.start, e.time_range.end
        if stop <= end:
            continue
        total += stop - max(start, end)
        end = stop
    return total / 1e6


def time_train_steps(recipe: RecipeConfig, batch: TrainBatch, steps: int, warmup: int = 1,
                     profile: bool = False, after_setup=None) -> dict[str, Any]:
    """Build ``MegatronPolicy`` from ``recipe`` (distributed already initialised) and time ``steps``
    optimizer steps on ``batch`` after ``warmup`` untimed ones (``after_setup(policy)`` runs first). Returns seconds per step, the
    communication seconds (with ``profile``), this rank's matmul parameters and the step's loss."""
    import torch.distributed as dist

    from igrpo_megatron.training.policy import MegatronPolicy

    policy = MegatronPolicy(recipe, total_optimizer_steps=steps + warmup + 1)
    policy.setup()
    if after_setup is not None:
        after_setup(policy)
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    for _ in range(warmup):
        policy.train_step(batch)
    seconds, comm, metrics = [], [], {}
    for _ in range(steps):
        dist.barrier()
        sync()
        if profile:
            from torch.profiler import ProfilerActivity
            from torch.profiler import profile as torch_profile

            with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
                t0 = time.perf_counter()
                metrics = policy.train_step(batch)
                sync()
                seconds.append(time.perf_counter() - t0)
            comm.append(comm_seconds(prof))
        else:
            t0 = time.perf_counter()
            metrics = policy.train_step(batch)
            sync()
            seconds.append(time.perf_counter() - t0)
    return {"seconds": seconds, "median_s": statistics.median(seconds), "comm_s": comm,
            "matmul_params": matmul_params(policy.chunks), "loss": metrics.get("loss"), "policy": policy}
