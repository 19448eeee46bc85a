"""Seconds per full weight push into the real vLLM sidecar, per transport, against the transport's ceiling.

    .venv/bin/python bench/weight_sync.py                         # the tiny model (~1.5 MB fp32), ~2 min
    .venv/bin/python bench/weight_sync.py --hidden 512 --layers 8 --pushes 5   # ~40 MB: bandwidth shows

One vLLM server (started with the ``gloo`` weight-transfer engine, so both transports work on it)
takes ``--pushes`` full pushes per transport through ``WeightSynchronizer.sync``, the call the
training loop makes, alternating two weight sets so every push changes every tensor:

- ``gloo``: ``EngineTransport`` (buckets over a gloo group, vLLM's weight-transfer engine API);
- ``shm_reload``: ``SharedMemoryReloadTransport`` (safetensors under /dev/shm, vLLM's reload_weights).

A push's time includes its fixed costs (HTTP round trips, pause/resume, the layerwise reload, the
prefix-cache reset), which dominate for the tiny model. The ceiling is what the medium alone
allows for the same byte count: for gloo, a raw broadcast of one buffer of that size between two
processes over loopback (the group set up once, median of several); for shm_reload, writing a file
of that size into /dev/shm and reading it back. ratio = push time / ceiling time. Prints a table
and one JSON line.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import logging
import multiprocessing as mp
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from igrpo_megatron.config.rollout import RolloutServerConfig  # noqa: E402
from igrpo_megatron.rollout.client import RolloutClient  # noqa: E402
from igrpo_megatron.rollout.server import RolloutServer  # noqa: E402
from igrpo_megatron.rollout.weight_channels import GlooGroup, GlooInitInfo  # noqa: E402
from igrpo_megatron.rollout.weight_sync import (  # noqa: E402
    EngineTransport,
    SharedMemoryReloadTransport,
    WeightSynchronizer,
)
from tests.helpers.tiny_models import build_tiny_qwen2, load_state_dict, perturbed_state_dict  # noqa: E402

TRANSPORTS = ("gloo", "shm_reload")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--pushes", type=int, default=5, help="Timed pushes per transport (after one untimed).")
    p.add_argument("--hidden", type=int, default=128, help="Hidden size of the built Qwen2 (heads of 64).")
    p.add_argument("--layers", type=int, default=2, help="Layers of the built Qwen2.")
    p.add_argument("--bucket-mb", type=int, default=512, help="rollout.weight_sync.bucket_size_mb for both.")
    p.add_argument("--ceiling-repeats", type=int, default=5, help="Timed raw transfers per ceiling.")
    p.add_argument("--workdir", default=str(Path(tempfile.gettempdir()) / "igrpo-bench-weight-sync"),
                   help="Where the model and the server log go.")
    return p.parse_args(argv)


# ----------------------------------------------------------------------------------- pushes
async def time_pushes(url: str, transport_name: str, states: list[dict[str, torch.Tensor]], pushes: int,
                      bucket_bytes: int) -> list[float]:
    async with RolloutClient(url) as client:
        if transport_name == "gloo":
            transport = EngineTransport(client, backend="gloo", bucket_bytes=bucket_bytes)
        else:
            transport = SharedMemoryReloadTransport(client, bucket_bytes=bucket_bytes)
        sync = WeightSynchronizer(client, transport)
        seconds = []
        for i in range(pushes + 1):  # the first push (and for gloo the group set-up) is not timed
            t0 = time.perf_counter()
            await sync.sync(states[i % 2].items())
            if i:
                seconds.append(time.perf_counter() - t0)
        sync.close()
    return seconds


# ----------------------------------------------------------------------------------- ceilings
def _broadcast_rank(rank: int, port: int, nbytes: int, repeats: int, out: mp.Queue) -> None:
    info = GlooInitInfo("127.0.0.1", port, 2, group_name="bench", timeout_s=300)
    group = GlooGroup(info, rank)
    buf = torch.ones(nbytes, dtype=torch.uint8) if rank == 0 else torch.empty(nbytes, dtype=torch.uint8)
    group.broadcast(buf)  # warm-up: connections made, pages touched
    seconds = []
    for _ in range(repeats):
        group.broadcast(torch.empty(1, dtype=torch.uint8))  # line both ranks up before timing
        t0 = time.perf_counter()
        group.broadcast(buf)
        seconds.append(time.perf_counter() - t0)
    if rank == 1:
        out.put(statistics.median(seconds))


def gloo_ceiling(nbytes: int, repeats: int) -> float:
    """Median seconds of a raw gloo broadcast of ``nbytes`` between two processes (loopback)."""
    import torch.distributed as dist

    store = dist.TCPStore("127.0.0.1", 0, 2, True, timeout=datetime.timedelta(seconds=60), wait_for_workers=False)
    port = store.port
    del store  # the ranks open their own store on that port
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=_broadcast_rank, args=(r, port, nbytes, repeats, out)) for r in range(2)]
    for p in procs:
        p.start()
    result = out.get(timeout=600)
    for p in procs:
        p.join()
    return result


def shm_ceiling(nbytes: int, repeats: int) -> float:
    """Median seconds to write ``nbytes`` to a /dev/shm file and read them back."""
    data = os.urandom(min(nbytes, 1 << 20)) * (nbytes // (1 << 20) + 1)
    data = data[:nbytes]
    seconds = []
    for _ in range(repeats + 1):
        path = Path("/dev/shm") / f"igrpo-bench-{os.getpid()}"
        t0 = time.perf_counter()
        with open(path, "wb") as f:
            f.write(data)
        with open(path, "rb") as f:
            back = f.read()
        seconds.append(time.perf_counter() - t0)
        path.unlink()
        assert len(back) == nbytes
    return statistics.median(seconds[1:])


# ----------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    model_dir = build_tiny_qwen2(work / f"qwen2-h{args.hidden}-l{args.layers}", hidden=args.hidden,
                                 heads=args.hidden // 64, kv_heads=1, layers=args.layers,
                                 intermediate=2 * args.hidden)
    base = load_state_dict(model_dir)
    states = [perturbed_state_dict(base, 0.01, seed=s) for s in (1, 2)]
    nbytes = sum(t.numel() * t.element_size() for t in base.values())
    cfg = RolloutServerConfig(port=0, dtype="float32", kv_cache_space_gib=1, enforce_eager=True, max_model_len=512,
                              start_timeout_s=300.0)
    server = RolloutServer(cfg, model_path=model_dir, log_dir=work, weight_transfer_backend="gloo")
    server.start()
    try:
        pushes = {name: asyncio.run(time_pushes(server.url, name, states, args.pushes, args.bucket_mb << 20))
                  for name in TRANSPORTS}
    finally:
        server.close()
    ceilings = {"gloo": gloo_ceiling(nbytes, args.ceiling_repeats), "shm_reload": shm_ceiling(nbytes, args.ceiling_repeats)}
    media = {"gloo": "raw gloo broadcast, 2 processes, loopback", "shm_reload": "/dev/shm write + read"}
    rows = []
    for name in TRANSPORTS:
        median = statistics.median(pushes[name])
        rows.append({"transport": name, "median_s": median, "min_s": min(pushes[name]), "max_s": max(pushes[name]),
                     "bytes": nbytes, "ceiling_medium": media[name], "ceiling_s": ceilings[name],
                     "ceiling_gb_per_s": nbytes / ceilings[name] / 1e9, "ratio": median / ceilings[name]})
    print(f"\nmodel: Qwen2 hidden {args.hidden}, {args.layers} layers, {len(base)} tensors, {nbytes / 1e6:.2f} MB fp32; "
          f"{args.pushes} timed pushes per transport; load average {os.getloadavg()[1]:.1f} on {os.cpu_count()} cores")
    print("| transport | s per push (median; min-max) | MB moved | ceiling medium | ceiling GB/s | "
          "ceiling s | push / ceiling |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['transport']} | {r['median_s']:.3f} ({r['min_s']:.3f}-{r['max_s']:.3f}) | {r['bytes'] / 1e6:.2f} | "
              f"{r['ceiling_medium']} | {r['ceiling_gb_per_s']:.2f} | {r['ceiling_s']:.4f} | {r['ratio']:.1f}x |")
    print(json.dumps({"bench": "weight_sync", "config": {k: v for k, v in vars(args).items() if k != "workdir"},
                      "pushes_s": pushes, "rows": rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
