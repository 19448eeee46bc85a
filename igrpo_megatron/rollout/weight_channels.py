"""The data plane of the engine transports: weights cut into buckets and broadcast to vLLM's workers.

vLLM's weight-transfer engine API (``/init_weight_transfer_engine``, ``/update_weights``, ...) is a
control plane: each ``/update_weights`` call tells every inference worker the names, dtypes and
shapes of one bucket, and the worker then receives that bucket's bytes from the trainer over a
collective group in which the trainer is rank 0. This module holds both ends of that group for
the ``gloo`` backend (a standalone ``ProcessGroupGloo`` over its own ``TCPStore``: vLLM's workers
already own the default process group) and the trainer end for vLLM's own ``nccl`` engine.

A bucket travels as one flat byte buffer: tensors at 64-byte aligned offsets, so the receiver can
view each one in place. Both sides compute the offsets from the same ``update_info``
(:func:`bucket_layout`). Nothing here imports vLLM: the trainer may run without it.
"""

from __future__ import annotations

import datetime
import logging
import os
import socket
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass

import torch
import torch.distributed as dist

from igrpo_megatron.config.ports import free_port
from igrpo_megatron.rollout.interfaces import WeightSyncError

logger = logging.getLogger(__name__)

ALIGN_BYTES = 64  # every tensor starts at a multiple of this in a bucket buffer


def iter_buckets(named_tensors: Iterable[tuple[str, torch.Tensor]], bucket_bytes: int,
                 device: str | torch.device = "cpu") -> Iterator[dict[str, torch.Tensor]]:
    """Group tensors, in order, into dicts of at most ``bucket_bytes`` (a bigger tensor goes alone).

    Tensors are detached, moved to ``device`` and made contiguous with their own storage, so only
    one bucket (plus whatever the producer holds) is ever materialised.
    """
    bucket: dict[str, torch.Tensor] = {}
    size = 0
    seen: set[str] = set()
    for name, tensor in named_tensors:
        if name in seen:
            raise WeightSyncError(f"weight {name!r} was given twice; each HF parameter name must appear once.")
        seen.add(name)
        t = tensor.detach().to(device).contiguous()
        # safetensors refuses tensors that share storage (views, tied weights): give each its own.
        if t.untyped_storage().nbytes() != t.numel() * t.element_size():
            t = t.clone()
        nbytes = t.numel() * t.element_size()
        if bucket and size + nbytes > bucket_bytes:
            yield bucket
            bucket, size = {}, 0
        bucket[name] = t
        size += nbytes
    if bucket:
        yield bucket
    if not seen:
        raise WeightSyncError("no weights were given to push; pass (HF name, tensor) pairs.")


def update_info(bucket: dict[str, torch.Tensor]) -> dict[str, list]:
    """The ``/update_weights`` payload describing one bucket (the shape vLLM's nccl engine reads too)."""
    return {"names": list(bucket),
            "dtype_names": [str(t.dtype).removeprefix("torch.") for t in bucket.values()],
            "shapes": [list(t.shape) for t in bucket.values()]}


def bucket_layout(dtype_names: list[str], shapes: list[list[int]]) -> tuple[list[int], int]:
    """Byte offset of every tensor in a bucket buffer, and the buffer's size."""
    offsets, end = [], 0
    for dtype_name, shape in zip(dtype_names, shapes, strict=True):
        start = -(-end // ALIGN_BYTES) * ALIGN_BYTES
        offsets.append(start)
        numel = 1
        for d in shape:
            numel *= d
        end = start + numel * getattr(torch, dtype_name).itemsize
    return offsets, end


def pack_bucket(bucket: dict[str, torch.Tensor]) -> torch.Tensor:
    """One flat uint8 buffer holding the bucket's tensors at :func:`bucket_layout` offsets."""
    info = update_info(bucket)
    offsets, total = bucket_layout(info["dtype_names"], info["shapes"])
    buf = torch.zeros(total, dtype=torch.uint8)
    for off, t in zip(offsets, bucket.values(), strict=True):
        raw = t.reshape(-1).view(torch.uint8)
        buf[off:off + raw.numel()].copy_(raw)
    return buf


def unpack_bucket(buf: torch.Tensor, info: dict[str, list]) -> list[tuple[str, torch.Tensor]]:
    """``(name, tensor)`` views into ``buf`` (no copies), inverse of :func:`pack_bucket`."""
    offsets, total = bucket_layout(info["dtype_names"], info["shapes"])
    if buf.numel() != total:
        raise WeightSyncError(f"a weight bucket holds {buf.numel()} bytes where its update_info describes {total}.")
    out = []
    for name, dtype_name, shape, off in zip(info["names"], info["dtype_names"], info["shapes"], offsets, strict=True):
        dtype = getattr(torch, dtype_name)
        numel = 1
        for d in shape:
            numel *= d
        out.append((name, buf[off:off + numel * dtype.itemsize].view(dtype).view(shape)))
    return out


def local_address_towards(host: str) -> str:
    """This machine's address on the route to ``host`` (no packet is sent: a UDP connect picks the route)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect((host, 9))
            return s.getsockname()[0]
        except OSError:
            return "127.0.0.1"


def gloo_device(*, interface: str | None = None, towards: str | None = None):
    """The gloo network device: ``interface`` (or $GLOO_SOCKET_IFNAME), else the one that reaches ``towards``."""
    interface = interface or os.environ.get("GLOO_SOCKET_IFNAME")
    if interface:
        return dist.ProcessGroupGloo.create_device(interface=interface)
    return dist.ProcessGroupGloo.create_device(hostname=local_address_towards(towards or "127.0.0.1"))


@dataclass
class GlooInitInfo:
    """What a vLLM worker needs to join the trainer's gloo group (sent in ``/init_weight_transfer_engine``)."""

    master_address: str
    master_port: int
    world_size: int  # trainer rank 0 + every vLLM worker (TP x PP x DP)
    group_name: str
    rank_offset: int = 1  # workers take ranks rank_offset .. world_size-1
    timeout_s: float = 600.0


class GlooGroup:
    """A standalone gloo group for one trainer and the vLLM workers; rank 0 sends, the others receive."""

    def __init__(self, info: GlooInitInfo, rank: int, store: dist.TCPStore | None = None, device=None):
        self.info = info
        self.rank = rank
        timeout = datetime.timedelta(seconds=info.timeout_s)
        if store is None:
            store = dist.TCPStore(info.master_address, info.master_port, info.world_size, rank == 0,
                                  timeout=timeout, wait_for_workers=False)
        self.store = store
        opts = dist.ProcessGroupGloo._Options()
        opts._timeout = timeout
        opts._devices = [device if device is not None else gloo_device(towards=info.master_address)]
        # Blocks until every rank has joined (the trainer posts /init_weight_transfer_engine meanwhile).
        self.pg = dist.ProcessGroupGloo(dist.PrefixStore(info.group_name, store), rank, info.world_size, opts)

    def broadcast(self, buf: torch.Tensor) -> None:
        opts = dist.BroadcastOptions()
        opts.rootRank = 0
        self.pg.broadcast([buf], opts).wait()

    def close(self) -> None:
        self.pg = None
        self.store = None


class GlooChannel:
    """Trainer end of the ``gloo`` backend: listen, let the workers join, broadcast packed buckets."""

    backend = "gloo"
    device = "cpu"

    def __init__(self, *, master_address: str, master_port: int = 0, interface: str | None = None,
                 timeout_s: float = 600.0, bucket_bytes: int = 512 << 20):
        self.master_address = master_address
        self.master_port = master_port
        self.interface = interface
        self.timeout_s = timeout_s
        self.bucket_bytes = bucket_bytes
        self.group: GlooGroup | None = None
        self._store: dist.TCPStore | None = None
        self._info: GlooInitInfo | None = None

    def listen(self, num_workers: int) -> dict:
        """Open the store (port 0: a free one) and return the workers' init info."""
        timeout = datetime.timedelta(seconds=self.timeout_s)
        self._store = dist.TCPStore(self.master_address, self.master_port, num_workers + 1, True,
                                    timeout=timeout, wait_for_workers=False)
        self._info = GlooInitInfo(self.master_address, self._store.port, num_workers + 1,
                                  group_name=f"igrpo-weights-{os.getpid()}-{os.urandom(4).hex()}",
                                  timeout_s=self.timeout_s)
        return dict(vars(self._info))

    def connect(self) -> None:
        """Form the group (blocks until every worker joined)."""
        device = gloo_device(interface=self.interface, towards=self.master_address)
        self.group = GlooGroup(self._info, 0, store=self._store, device=device)

    def send(self, bucket: dict[str, torch.Tensor]) -> None:
        self.group.broadcast(pack_bucket(bucket))

    def close(self) -> None:
        if self.group is not None:
            self.group.close()
        self.group = self._store = None


class NcclChannel:
    """Trainer end of vLLM's own ``nccl`` engine (packed broadcast), through vLLM's trainer helpers.

    Needs CUDA and vLLM importable in the trainer. Not exercised on CPU-only machines.
    """

    backend = "nccl"

    def __init__(self, *, master_address: str, master_port: int = 0, interface: str | None = None,
                 timeout_s: float = 600.0, bucket_bytes: int = 512 << 20):
        del interface, timeout_s  # NCCL picks its interface from NCCL_SOCKET_IFNAME
        self.master_address = master_address
        self.master_port = master_port
        self.bucket_bytes = bucket_bytes
        self.comm = None
        self._world_size = 0

    @property
    def device(self) -> torch.device:
        return torch.device("cuda", torch.cuda.current_device())

    def listen(self, num_workers: int) -> dict:
        self._world_size = num_workers + 1
        if not self.master_port:  # vLLM's rendezvous opens the store itself: it needs a concrete port
            self.master_port = free_port(self.master_address)
        return {"master_address": self.master_address, "master_port": self.master_port, "rank_offset": 1,
                "world_size": self._world_size, "packed": True, "packed_buffer_size_bytes": self.bucket_bytes,
                "packed_num_buffers": 2}

    def connect(self) -> None:
        try:
            from vllm.distributed.weight_transfer.nccl_common import trainer_init
        except ImportError as exc:
            raise WeightSyncError("rollout.weight_sync.transport = 'nccl' needs vLLM importable in the trainer "
                                  f"({exc}); use 'gloo' or install vLLM next to the trainer.") from exc
        self.comm = trainer_init({"master_address": self.master_address, "master_port": self.master_port,
                                  "world_size": self._world_size})

    def send(self, bucket: dict[str, torch.Tensor]) -> None:
        from vllm.distributed.weight_transfer.packed_tensor import packed_nccl_broadcast_producer

        packed_nccl_broadcast_producer(iter(bucket.items()), self.comm, 0, lambda item: item[1],
                                       buffer_size_bytes=self.bucket_bytes, num_buffers=2)

    def close(self) -> None:
        if self.comm is not None:
            self.comm.destroy()
        self.comm = None


CHANNELS = {"gloo": GlooChannel, "nccl": NcclChannel}


@dataclass
class StreamStats:
    """What one push moved."""

    buckets: int = 0
    bytes: int = 0
    tensors: int = 0


def stream_buckets(named_tensors: Iterable[tuple[str, torch.Tensor]], channel: GlooChannel | NcclChannel,
                   post_update: Callable[[dict], Future], timeout_s: float) -> StreamStats:
    """Send every bucket: announce it (``post_update`` returns the pending ``/update_weights`` call),
    broadcast its bytes while the workers receive, then wait for the call to return.

    Runs in a worker thread; the iterable may issue collectives (the Megatron export) as it is consumed.
    """
    stats = StreamStats()
    for bucket in iter_buckets(named_tensors, channel.bucket_bytes, device=channel.device):
        pending = post_update(update_info(bucket))
        if pending.done():  # rejected before the workers joined the broadcast: do not wait for them
            pending.result()
        channel.send(bucket)
        pending.result(timeout=timeout_s)
        stats.buckets += 1
        stats.tensors += len(bucket)
        stats.bytes += sum(t.numel() * t.element_size() for t in bucket.values())
        del bucket
    return stats
