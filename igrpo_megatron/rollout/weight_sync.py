"""Push fresh policy weights into the running vLLM sidecar between requests.

``WeightSynchronizer.sync(named_tensors)`` pauses the client (no new requests, running ones
finish), hands the HF-named tensors to a ``WeightTransport``, and advances the policy version so
every later rollout is stamped with it. ``SharedMemoryReloadTransport`` is the CPU path measured in
DESIGN.md section 4: safetensors shards in a shared-memory directory, then vLLM's
``reload_weights`` through ``/collective_rpc`` and a prefix-cache reset (cached KV blocks were
computed by the old weights): it needs the server on the trainer's machine. ``EngineTransport``
streams the weights over the network through vLLM's weight-transfer engine API (``gloo`` or
``nccl``), for a server anywhere. ``build_transport`` picks one from ``rollout.weight_sync``.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import logging
import os
import shutil
import tempfile
import time
import urllib.request
import uuid
from collections.abc import Iterable
from pathlib import Path
from urllib.parse import urlsplit

import torch

from igrpo_megatron.config.rollout import RolloutConfig, WeightSyncConfig
from igrpo_megatron.rollout.client import RolloutClient
from igrpo_megatron.rollout.interfaces import SidecarError, WeightSyncError, WeightTransport
from igrpo_megatron.rollout.weight_channels import (
    CHANNELS,
    StreamStats,
    iter_buckets,
    local_address_towards,
    stream_buckets,
)

logger = logging.getLogger(__name__)

INDEX_FILE = "model.safetensors.index.json"


def write_weight_dir(named_tensors: Iterable[tuple[str, torch.Tensor]], out_dir: str | Path,
                     bucket_bytes: int) -> list[Path]:
    """Write HF-named tensors as safetensors shards plus an index into an existing ``out_dir``."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    weight_map: dict[str, str] = {}
    shards: list[Path] = []
    total = 0
    for i, bucket in enumerate(iter_buckets(named_tensors, bucket_bytes)):
        shard = out / f"model-{i + 1:05d}.safetensors"
        save_file(bucket, str(shard), metadata={"format": "pt"})
        shards.append(shard)
        total += sum(t.numel() * t.element_size() for t in bucket.values())
        weight_map.update({name: shard.name for name in bucket})
    (out / INDEX_FILE).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    return shards


def stage_weights(named_tensors: Iterable[tuple[str, torch.Tensor]], root: str | Path, bucket_bytes: int,
                  version: int) -> Path:
    """Write the weights into a fresh directory under ``root``, visible only once complete.

    The files go to a hidden temporary directory that is renamed at the end, so the server can
    never read a half-written set. Returns the final directory.
    """
    root = Path(root)
    if not root.is_dir():
        raise WeightSyncError(f"rollout.weight_sync.shm_root = {str(root)!r} is not a directory; point it at "
                              "/dev/shm or another directory the server can read.")
    tmp = Path(tempfile.mkdtemp(prefix=".igrpo-weights-", suffix=".tmp", dir=root))
    final = root / f"igrpo-weights-v{version}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        write_weight_dir(named_tensors, tmp, bucket_bytes)
        os.rename(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


class SharedMemoryReloadTransport:
    """CPU weight transport: shared-memory safetensors + vLLM ``reload_weights`` (implements WeightTransport).

    Needs the server started with ``VLLM_SERVER_DEV_MODE=1`` (``RolloutServer`` sets it), a
    filesystem both sides see (``root``), and the full set of weights on every push. The model must
    have untied embeddings on CPU (DESIGN.md section 4: tied output layers stay stale).
    """

    def __init__(self, client: RolloutClient, *, root: str | Path = "/dev/shm", bucket_bytes: int = 512 << 20,
                 rpc_timeout_s: float = 600.0, keep_files: bool = False):
        self.client = client
        self.root = Path(root)
        self.bucket_bytes = bucket_bytes
        self.rpc_timeout_s = rpc_timeout_s
        self.keep_files = keep_files

    @classmethod
    def from_config(cls, cfg: WeightSyncConfig, client: RolloutClient) -> SharedMemoryReloadTransport:
        return cls(client, root=cfg.shm_root, bucket_bytes=cfg.bucket_size_mb << 20,
                   rpc_timeout_s=cfg.rpc_timeout_s, keep_files=cfg.keep_files)

    async def push(self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: int) -> None:
        """Stage the tensors under ``root``, reload them into the server, label them ``version``.

        The iterable is consumed in a worker thread (the event loop stays free). A generator that
        issues collectives works as long as the caller's thread waits meanwhile, as it does with
        ``BlockingRolloutClient.run``.
        """
        t0 = time.monotonic()
        staged = await asyncio.to_thread(stage_weights, named_tensors, self.root, self.bucket_bytes, version)
        t_write = time.monotonic() - t0
        try:
            await self.client.post("/collective_rpc", {
                "method": "reload_weights", "kwargs": {"weights_path": str(staged)},
                "timeout": self.rpc_timeout_s}, timeout_s=self.rpc_timeout_s + 30)
            await reset_prefix_cache(self.client)
            await self.client.post("/update_weight_version", {"new_version": str(version)})
        except SidecarError as exc:
            raise WeightSyncError(f"pushing weights version {version} to {self.client.base_url} failed: {exc}. "
                                  "The server may hold old or partly replaced weights: push again.") from exc
        finally:
            if not self.keep_files:
                shutil.rmtree(staged, ignore_errors=True)
        logger.info("weights version %d pushed to %s (write %.2f s, total %.2f s)", version,
                    self.client.base_url, t_write, time.monotonic() - t0)


async def reset_prefix_cache(client: RolloutClient, *, running: bool = False, attempts: int = 20) -> None:
    """Drop cached KV blocks computed with the old weights; retried while blocks are still held.

    ``running=True`` also preempts requests the server holds (paused with ``mode=keep``): they
    recompute their prompt and what they generated so far with the new weights when resumed.
    """
    path = "/reset_prefix_cache?reset_running_requests=true" if running else "/reset_prefix_cache"
    for _ in range(attempts):
        body = await client.post(path)
        if body is None or body.get("success", True):
            return
        await asyncio.sleep(0.25)
    raise WeightSyncError(f"{client.base_url} refused to reset its prefix cache {attempts} times "
                          "(requests still running?); outputs could mix old and new weights.")


class EngineTransport:
    """Weight transport through vLLM's weight-transfer engine API (implements WeightTransport).

    The bytes travel over a collective group between this process (rank 0) and every vLLM worker:
    ``gloo`` (the engine in :mod:`igrpo_megatron.rollout.vllm_gloo`, any machine) or vLLM's own
    ``nccl`` (GPUs). The server must run with ``--weight-transfer-config '{"backend": ...}'``
    (``RolloutServer`` adds it, see :func:`engine_backend`) and ``VLLM_SERVER_DEV_MODE=1``.

    The group forms at the first push, and again after the server restarted. A push pauses the
    server (``mode=keep``: another client's requests freeze), calls ``/start_weight_update``, then for
    each bucket of at most ``bucket_bytes`` posts its names/dtypes/shapes to ``/update_weights`` while
    broadcasting its bytes, ``/finish_weight_update`` with the version, resets the prefix cache
    (frozen requests recompute with the new weights) and resumes. Only one bucket is held at a time.
    """

    def __init__(self, client: RolloutClient, *, backend: str = "gloo", bucket_bytes: int = 512 << 20,
                 master_address: str | None = None, master_port: int = 0, interface: str | None = None,
                 timeout_s: float = 600.0):
        if backend not in CHANNELS:
            raise ValueError(f"unknown weight-transfer backend {backend!r}; known: {sorted(CHANNELS)}")
        self.client = client
        self.backend = backend
        self.bucket_bytes = bucket_bytes
        # The address the workers dial: by default ours on the route to the server.
        self.master_address = master_address or local_address_towards(urlsplit(client.base_url).hostname)
        self.master_port = master_port
        self.interface = interface
        self.timeout_s = timeout_s
        self.channel = None
        self.last_push: StreamStats | None = None
        self._pushed: str | None = None  # the version label the server should report

    @classmethod
    def from_config(cls, cfg: WeightSyncConfig, client: RolloutClient, backend: str) -> EngineTransport:
        return cls(client, backend=backend, bucket_bytes=cfg.bucket_size_mb << 20, master_address=cfg.master_address,
                   master_port=cfg.master_port, interface=cfg.socket_ifname, timeout_s=cfg.rpc_timeout_s)

    async def push(self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: int) -> None:
        """Stream the tensors into the server's workers and label them ``version``."""
        t0 = time.monotonic()
        await self._ensure_group()
        await self.client.post("/pause?mode=keep")
        started = False
        try:
            await self.client.post("/start_weight_update", retry=False)
            started = True
            loop = asyncio.get_running_loop()

            def announce(info: dict):
                return asyncio.run_coroutine_threadsafe(self.client.post(
                    "/update_weights", {"update_info": info}, timeout_s=self.timeout_s, retry=False), loop)

            # The iterable is consumed in a worker thread: it may issue collectives (the Megatron export).
            stats = await asyncio.to_thread(stream_buckets, named_tensors, self.channel, announce, self.timeout_s)
            started = False
            await self.client.post("/finish_weight_update", {"weight_version": str(version)}, retry=False)
            self._pushed = str(version)
            await reset_prefix_cache(self.client, running=True)
        except Exception as exc:
            await self._abandon(started)
            raise WeightSyncError(f"pushing weights version {version} to {self.client.base_url} over {self.backend} "
                                  f"failed: {exc}. The server may hold old or partly replaced weights: push "
                                  "again.") from exc
        await self.client.post("/resume")
        self.last_push = stats
        logger.info("weights version %d pushed to %s over %s: %d tensors, %.1f MB in %d buckets, %.2f s", version,
                    self.client.base_url, self.backend, stats.tensors, stats.bytes / 1e6, stats.buckets,
                    time.monotonic() - t0)

    async def _ensure_group(self) -> None:
        """Form the group with the workers, unless it exists and the server did not restart since."""
        if self.channel is not None:
            body = await self.client.get("/weight_info")
            if self._pushed is None or str(body["weight_version"]) == self._pushed:
                return
            logger.warning("the server at %s restarted (weights %s, expected %s): forming the %s group again",
                           self.client.base_url, body["weight_version"], self._pushed, self.backend)
            self._close_channel()
        body = await self.client.get("/get_world_size")
        channel = CHANNELS[self.backend](master_address=self.master_address, master_port=self.master_port,
                                         interface=self.interface, timeout_s=self.timeout_s,
                                         bucket_bytes=self.bucket_bytes)
        init_info = channel.listen(int(body["world_size"]))
        # The server's call blocks until the group has formed, so it runs while we join as rank 0.
        joined = asyncio.ensure_future(self.client.post("/init_weight_transfer_engine", {"init_info": init_info},
                                                        timeout_s=self.timeout_s, retry=False))
        try:
            await asyncio.to_thread(channel.connect)
            await joined
        except BaseException as exc:
            joined.cancel()
            channel.close()
            if not isinstance(exc, Exception):  # cancellation, interpreter exit: not a transfer failure
                raise
            raise WeightSyncError(f"could not form the {self.backend} weight-transfer group with the workers of "
                                  f"{self.client.base_url} at {init_info['master_address']}:{init_info['master_port']}"
                                  f": {exc}. The workers must reach that address (rollout.weight_sync.master_address, "
                                  "master_port; GLOO_SOCKET_IFNAME on both sides).") from exc
        self.channel = channel
        self._pushed = None
        logger.info("%s weight-transfer group formed with %s (%s workers)", self.backend, self.client.base_url,
                    body["world_size"])

    async def _abandon(self, started: bool) -> None:
        """After a failed push: close the server's update session (best effort), drop the group, resume."""
        for path, wanted in (("/finish_weight_update", started), ("/resume", True)):
            if wanted:
                try:
                    await self.client.post(path, timeout_s=30.0, retry=False)
                except SidecarError as exc:
                    logger.warning("after a failed weight push, POST %s failed too: %s", path, exc)
        self._close_channel()

    def _close_channel(self) -> None:
        if self.channel is not None:
            self.channel.close()
            self.channel = None

    def close(self) -> None:
        """Tell the server to drop the group (best effort, it may be gone) and close our end."""
        if self.channel is None:
            return
        try:
            req = urllib.request.Request(f"{self.client.base_url}/shutdown_weight_transfer_engine", method="POST")
            urllib.request.urlopen(req, timeout=10).close()
        except OSError as exc:
            logger.info("could not shut down the server's weight-transfer engine: %s", exc)
        self._close_channel()


def transport_name(cfg: RolloutConfig, local_server: bool) -> str:
    """``rollout.weight_sync.transport`` with ``auto`` resolved.

    ``auto``: ``shm_reload`` when the trainer starts the server on its own machine, otherwise
    ``nccl`` where CUDA and vLLM are both importable in this Python (the trainer's side of vLLM's
    NCCL engine needs vLLM), else ``gloo``. ``igrpo serve-rollout`` resolves it the same way, so
    the two sides agree when they run the same environment (one container image).
    """
    name = cfg.weight_sync.transport
    if name != "auto":
        return name
    if local_server:
        return "shm_reload"
    return "nccl" if torch.cuda.is_available() and vllm_importable() else "gloo"


def vllm_importable() -> bool:
    return importlib.util.find_spec("vllm") is not None


def engine_backend(cfg: RolloutConfig, local_server: bool) -> str | None:
    """The weight-transfer engine the server must be started with (None: the transport needs none)."""
    name = transport_name(cfg, local_server)
    return name if name in CHANNELS else None


def build_transport(cfg: RolloutConfig, client: RolloutClient, local_server: bool) -> WeightTransport:
    """The recipe's weight transport for ``client``'s server (``local_server``: started by this process)."""
    name = transport_name(cfg, local_server)
    if name == "shm_reload":
        return SharedMemoryReloadTransport.from_config(cfg.weight_sync, client)
    return EngineTransport.from_config(cfg.weight_sync, client, backend=name)


class WeightSynchronizer:
    """Swaps weights in between requests and advances the client's policy version."""

    def __init__(self, client: RolloutClient, transport: WeightTransport):
        self.client = client
        self.transport = transport

    def close(self) -> None:
        """Release what the transport holds (the engine transports' group with the workers)."""
        close = getattr(self.transport, "close", None)
        if close is not None:
            close()

    async def sync(self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: int | None = None,
                   resend: bool = False) -> int:
        """Push the weights; returns the new policy version (default: current + 1).

        New requests wait and running ones finish first, so no request straddles two versions. On
        failure the version does not advance and ``WeightSyncError`` is raised. ``resend``: the
        version may equal the current one (the same weights again, after a restart or a stale rollout).
        """
        async with self.client.weight_update() as update:
            new_version = update.previous + 1 if version is None else version
            if new_version < update.previous or (new_version == update.previous and not resend):
                raise WeightSyncError(f"policy version must increase: {new_version} <= current {update.previous}.")
            await self.transport.push(named_tensors, new_version)
            update.commit(new_version)
        return new_version

    async def server_version(self) -> str:
        """The version label the server reports ('default' for a freshly started server)."""
        body = await self.client.get("/weight_info")
        return str(body["weight_version"])

    async def server_in_sync(self) -> bool:
        """False after the server restarted from its initial checkpoint: the caller must push again."""
        if self.client.policy_version == 0:
            return True
        return await self.server_version() == str(self.client.policy_version)
