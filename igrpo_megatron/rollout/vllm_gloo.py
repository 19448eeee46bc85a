"""A ``gloo`` weight-transfer engine for vLLM, registered as a vLLM general plugin.

vLLM 0.32 moves trainer weights into its workers through a weight-transfer engine chosen by name
(``--weight-transfer-config '{"backend": ...}'``). Its ``nccl`` engine needs GPUs; this one speaks
the same protocol over ``torch.distributed`` gloo, so a CPU sidecar on another node (or in another
mount namespace) can take new weights over the network. The trainer's side lives in
``weight_sync.EngineTransport``; :class:`GlooTrainerWeightTransferEngine` is the same stream behind
vLLM's trainer-engine interface, for trainers that drive vLLM's ``WeightTransferTrainerFactory``.

This module imports vLLM: only the vLLM process loads it (through the ``vllm.general_plugins``
entry point in pyproject.toml, which calls :func:`register`).
"""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from vllm.distributed.weight_transfer.base import (
    TrainerInitInfo,
    TrainerWeightTransferEngine,
    WeightSource,
    WeightTransferEngine,
    WeightTransferInitInfo,
    WeightTransferUpdateInfo,
)

from igrpo_megatron.rollout.weight_channels import (
    GlooChannel,
    GlooGroup,
    GlooInitInfo,
    bucket_layout,
    stream_buckets,
    unpack_bucket,
)

logger = logging.getLogger(__name__)

BACKEND = "gloo"


@dataclass
class GlooWorkerInitInfo(GlooInitInfo, WeightTransferInitInfo):
    """``init_info`` of ``/init_weight_transfer_engine`` for the gloo backend."""


@dataclass
class GlooUpdateInfo(WeightTransferUpdateInfo):
    """One bucket: the tensors' HF names, dtypes and shapes, in buffer order."""

    names: list[str]
    dtype_names: list[str]
    shapes: list[list[int]]

    def __post_init__(self) -> None:
        if not len(self.names) == len(self.dtype_names) == len(self.shapes):
            raise ValueError(f"gloo update_info: {len(self.names)} names, {len(self.dtype_names)} dtype_names "
                             f"and {len(self.shapes)} shapes; give one of each per tensor.")


class GlooWeightTransferEngine(WeightTransferEngine[GlooWorkerInitInfo, GlooUpdateInfo]):
    """Worker side: join the trainer's gloo group, receive buckets, load them layer by layer.

    Loading goes through vLLM's layerwise reload (started in ``start_weight_update``, finished in
    ``finish_weight_update``): a plain ``model.load_weights`` fails on CPU once the linear weights
    have been repacked after the first load.
    """

    init_info_cls = GlooWorkerInitInfo
    update_info_cls = GlooUpdateInfo

    def __init__(self, config, vllm_config, device: torch.device, model: torch.nn.Module) -> None:
        super().__init__(config, vllm_config, device, model)
        self.group: GlooGroup | None = None

    def init_transfer_engine(self, init_info: GlooWorkerInitInfo) -> None:
        self.shutdown()  # a trainer that comes back (restart, resume) forms a new group
        p = self.parallel_config
        rank = p.data_parallel_index * p.world_size + p.rank + init_info.rank_offset
        logger.info("joining the trainer's gloo weight group at %s:%d as rank %d of %d", init_info.master_address,
                    init_info.master_port, rank, init_info.world_size)
        self.group = GlooGroup(init_info, rank)

    def start_weight_update(self) -> None:
        from vllm.model_executor.model_loader.reload import initialize_layerwise_reload

        initialize_layerwise_reload(self.model)

    def finish_weight_update(self) -> None:
        from vllm.model_executor.model_loader.reload import finalize_layerwise_reload

        finalize_layerwise_reload(self.model, self.model_config)

    def update_weights(self, update_info: dict[str, Any]) -> None:
        # The base class ends with torch.accelerator.synchronize(), which raises without an accelerator.
        self.receive_weights(self.parse_update_info(update_info))
        if torch.accelerator.is_available():
            torch.accelerator.synchronize()

    def receive_weights(self, update_info: GlooUpdateInfo) -> None:
        if self.group is None:
            raise RuntimeError("gloo weight transfer is not initialised: POST /init_weight_transfer_engine first.")
        _, total = bucket_layout(update_info.dtype_names, update_info.shapes)
        # A fresh buffer per bucket: the layerwise reload keeps references until a layer is complete.
        buf = torch.empty(total, dtype=torch.uint8)
        self.group.broadcast(buf)
        self.model.load_weights(unpack_bucket(buf, vars(update_info)))

    def shutdown(self) -> None:
        if self.group is not None:
            self.group.close()
            self.group = None


@dataclass
class GlooTrainerInitInfo(TrainerInitInfo):
    """Trainer-side init info: where rank 0 listens and how many vLLM workers will join."""

    backend: ClassVar[str] = BACKEND

    master_address: str
    num_workers: int
    master_port: int = 0
    bucket_bytes: int = 512 << 20
    timeout_s: float = 600.0
    interface: str | None = field(default=None)


class GlooTrainerWeightTransferEngine(TrainerWeightTransferEngine[GlooTrainerInitInfo]):
    """Trainer side behind vLLM's ``WeightTransferTrainerFactory``: one bucket per ``update_weights`` call."""

    init_info_cls = GlooTrainerInitInfo

    def __init__(self, *, client, source: WeightSource | None = None, is_sender: bool = True,
                 channel: GlooChannel | None = None) -> None:
        super().__init__(client=client, source=source, is_sender=is_sender)
        self.channel = channel

    @classmethod
    def trainer_init(cls, init_info: GlooTrainerInitInfo, *, client, source: WeightSource | None = None):
        if source is None:
            raise ValueError("the gloo trainer engine sends a full set of weights each round: pass a WeightSource.")
        engine = cls(client=client, source=source, is_sender=init_info.is_sender)
        if not engine.is_sender:
            return engine
        engine.channel = GlooChannel(master_address=init_info.master_address, master_port=init_info.master_port,
                                     interface=init_info.interface, timeout_s=init_info.timeout_s,
                                     bucket_bytes=init_info.bucket_bytes)
        worker_info = engine.channel.listen(init_info.num_workers)
        with ThreadPoolExecutor(max_workers=1) as pool:
            pending = pool.submit(client.init_weight_transfer_engine, worker_info)
            engine.channel.connect()
            pending.result()
        return engine

    def send_weights(self) -> None:
        if not self.is_sender:
            for _ in self.source:  # stay in the source's collectives
                pass
            return
        self.client.start_weight_update()
        with ThreadPoolExecutor(max_workers=1) as pool:
            stream_buckets(iter(self.source), self.channel, lambda info: pool.submit(self.client.update_weights, info),
                           self.channel.timeout_s)
        self.client.finish_weight_update()

    def shutdown(self) -> None:
        if self.channel is not None:
            self.channel.close()
            self.channel = None


def register() -> None:
    """vLLM general plugin: make ``gloo`` a weight-transfer backend on both sides (idempotent)."""
    from vllm.distributed.weight_transfer.factory import (
        WeightTransferEngineFactory,
        WeightTransferTrainerFactory,
    )

    # vLLM may load plugins more than once per process, and a second registration raises.
    for factory, class_name in ((WeightTransferEngineFactory, "GlooWeightTransferEngine"),
                                (WeightTransferTrainerFactory, "GlooTrainerWeightTransferEngine")):
        try:
            factory.register_engine(BACKEND, __name__, class_name)
        except ValueError:  # "... is already registered"
            logger.debug("weight-transfer backend %r already registered with %s", BACKEND, factory.__name__)
