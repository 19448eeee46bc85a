"""Run a function on several gloo ranks and collect what each rank returns.

Multi-process tests use this instead of torchrun so that a test is a plain pytest function:
``results = run_on_ranks(_body, world_size=2, args=(...))``. ``_body(rank, world_size, *args)``
must be a module-level function (it is pickled into freshly spawned processes).
"""

from __future__ import annotations

import io
import os
import traceback
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.multiprocessing as mp

from igrpo_megatron.config.ports import free_port


def _rank_main(fn, rank, world_size, port, args, env, queue):
    import torch
    import torch.distributed as dist

    os.environ.update(env)
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world_size),
    )
    torch.set_num_threads(1)  # ranks share 2 cores in CI
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world_size)
        result = fn(rank, world_size, *args)
        # Serialise with torch.save: tensors sent through the queue as-is would be shared by file
        # descriptor, which dies with this process before the parent reads it.
        buf = io.BytesIO()
        torch.save(result, buf)
        queue.put((rank, "ok", buf.getvalue()))
    except BaseException:  # report any failure to the parent, with its traceback
        queue.put((rank, "error", traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_on_ranks(
    fn: Callable[..., Any],
    world_size: int,
    args: Sequence[Any] = (),
    env: dict[str, str] | None = None,
    timeout: float = 600.0,
) -> list[Any]:
    """Spawn ``world_size`` processes with a gloo process group and return their results by rank."""
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    port = free_port()
    procs = [
        ctx.Process(target=_rank_main, args=(fn, r, world_size, port, tuple(args), dict(env or {}), queue))
        for r in range(world_size)
    ]
    for p in procs:
        p.start()
    results: dict[int, Any] = {}
    errors: list[str] = []
    import time

    deadline = time.monotonic() + timeout
    while len(results) + len(errors) < world_size:
        if not queue.empty():
            rank, status, payload = queue.get()
            if status == "ok":
                results[rank] = torch.load(io.BytesIO(payload), weights_only=False)
            else:
                errors.append(f"rank {rank} failed:\n{payload}")
                break
        elif time.monotonic() > deadline:
            errors.append(f"timed out after {timeout:.0f}s waiting for ranks")
            break
        elif any(p.exitcode not in (None, 0) for p in procs) and queue.empty():
            dead = [i for i, p in enumerate(procs) if p.exitcode not in (None, 0)]
            errors.append(f"ranks {dead} died with exit codes {[procs[i].exitcode for i in dead]}")
            break
        else:
            time.sleep(0.05)
    for p in procs:
        p.join(timeout=5 if errors else 60)
        if p.is_alive():
            p.kill()
    if errors:
        raise RuntimeError("\n".join(errors))
    return [results[r] for r in range(world_size)]
