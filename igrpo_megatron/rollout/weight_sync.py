"""Push fresh policy weights into the running vLLM sidecar between requests.

``WeightSynchronizer.sync(named_tensors)`` pauses the client (no new requests, running ones
finish), hands the HF-named tensors to a ``WeightTransport``, and advances the policy version so
every later rollout is stamped with it. ``SharedMemoryReloadTransport`` is the CPU path measured in
DESIGN.md section 4: safetensors shards in a shared-memory directory, then vLLM's
``reload_weights`` through ``/collective_rpc`` and a prefix-cache reset (cached KV blocks were
computed by the old weights).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
import tempfile
import time
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch

from igrpo_megatron.config.rollout import WeightSyncConfig
from igrpo_megatron.rollout.client import RolloutClient
from igrpo_megatron.rollout.interfaces import SidecarError, WeightSyncError, WeightTransport

logger = logging.getLogger(__name__)

INDEX_FILE = "model.safetensors.index.json"


def _buckets(named_tensors: Iterable[tuple[str, torch.Tensor]],
             bucket_bytes: int) -> Iterator[dict[str, torch.Tensor]]:
    """Group tensors, in order, into dicts of at most ``bucket_bytes`` (a bigger tensor goes alone)."""
    bucket: dict[str, torch.Tensor] = {}
    size = 0
    seen: set[str] = set()
    for name, tensor in named_tensors:
        if name in seen:
            raise WeightSyncError(f"weight {name!r} was given twice; each HF parameter name must appear once.")
        seen.add(name)
        t = tensor.detach().to("cpu").contiguous()
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


def write_weight_dir(named_tensors: Iterable[tuple[str, torch.Tensor]], out_dir: str | Path,
                     bucket_bytes: int) -> list[Path]:
    """Write HF-named tensors as safetensors shards plus an index into an existing ``out_dir``."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    weight_map: dict[str, str] = {}
    shards: list[Path] = []
    total = 0
    for i, bucket in enumerate(_buckets(named_tensors, bucket_bytes)):
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
            await self._reset_prefix_cache()
            await self.client.post("/update_weight_version", {"new_version": str(version)})
        except SidecarError as exc:
            raise WeightSyncError(f"pushing weights version {version} to {self.client.base_url} failed: {exc}. "
                                  "The server may hold old or partly replaced weights: push again.") from exc
        finally:
            if not self.keep_files:
                shutil.rmtree(staged, ignore_errors=True)
        logger.info("weights version %d pushed to %s (write %.2f s, total %.2f s)", version,
                    self.client.base_url, t_write, time.monotonic() - t0)

    async def _reset_prefix_cache(self, attempts: int = 20) -> None:
        """Drop cached KV blocks computed with the old weights; retried while blocks are still held."""
        for _ in range(attempts):
            body = await self.client.post("/reset_prefix_cache")
            if body is None or body.get("success", True):
                return
            await asyncio.sleep(0.25)
        raise WeightSyncError(f"{self.client.base_url} refused to reset its prefix cache {attempts} times "
                              "(requests still running?); outputs could mix old and new weights.")


class WeightSynchronizer:
    """Swaps weights in between requests and advances the client's policy version."""

    def __init__(self, client: RolloutClient, transport: WeightTransport):
        self.client = client
        self.transport = transport

    async def sync(self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: int | None = None) -> int:
        """Push the weights; returns the new policy version (default: current + 1).

        New requests wait and running ones finish first, so no request straddles two versions. On
        failure the version does not advance and ``WeightSyncError`` is raised.
        """
        async with self.client.weight_update() as update:
            new_version = update.previous + 1 if version is None else version
            if new_version <= update.previous:
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
