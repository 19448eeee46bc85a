"""The rollout boundary: what the training loop may rely on, whatever engine produces the samples.

The loop imports these types only. ``RolloutEngine`` is implemented by the vLLM HTTP client
(``client.RolloutClient``); ``WeightTransport`` by ``weight_sync.SharedMemoryReloadTransport`` and
``weight_sync.EngineTransport``.
Prompts and completions are token ids: the trainer never re-tokenizes text it did not produce.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol, runtime_checkable

if TYPE_CHECKING:
    import torch

    from igrpo_megatron.config.rollout import SamplingConfig


class SidecarError(RuntimeError):
    """Base class of every failure of the rollout sidecar."""


class SidecarUnavailableError(SidecarError):
    """The server could not be reached (or kept failing with 5xx) after all retries.

    ``results`` is set when a batch failed part-way: one entry per prompt, in order, either its
    ``CompletionGroup`` or the exception that ended it, so a caller can retry exactly the failures.
    """

    def __init__(self, message: str, *, url: str, results: list | None = None):
        super().__init__(message)
        self.url = url
        self.results = results


class SidecarStartError(SidecarError):
    """The server process exited or never became healthy while starting (message has its log tail)."""


class SidecarRestartLimitError(SidecarError):
    """The server crashed more often than ``rollout.server.max_restarts`` allows."""


class RolloutRequestError(SidecarError):
    """The server rejected a request (HTTP 4xx): a bug or a bad setting, so it is not retried."""


class StaleWeightsError(SidecarError):
    """The server restarted from its initial checkpoint after this client pushed newer weights.

    Its outputs are no longer those of ``policy_version``: push the current weights again
    (``WeightSynchronizer.sync``) and regenerate. ``results`` holds the suspect batch.
    """

    def __init__(self, message: str, *, url: str, results: list | None = None):
        super().__init__(message)
        self.url = url
        self.results = results


class WeightSyncError(SidecarError):
    """Pushing new weights failed; the server may hold the old or a partial set of weights."""


@dataclass(frozen=True)
class SamplingParams:
    """Sampling settings for one request; ``SamplingParams.from_config(recipe.rollout.sampling)``."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    max_tokens: int = 16
    stop: tuple[str, ...] = ()
    n: int = 1
    logprobs: bool = True
    seed: int | None = None

    @classmethod
    def from_config(cls, cfg: SamplingConfig, **overrides) -> SamplingParams:
        values = dict(temperature=cfg.temperature, top_p=cfg.top_p, top_k=cfg.top_k, max_tokens=cfg.max_tokens,
                      stop=tuple(cfg.stop), n=cfg.n, logprobs=cfg.logprobs, seed=cfg.seed)
        values.update(overrides)
        return cls(**values)


@dataclass(frozen=True)
class Completion:
    """One sampled continuation.

    ``token_ids`` are exactly the sampled tokens (a stop string's token included; the EOS token
    included when generation ended on it); ``logprobs[i]`` is the sampler's log-prob of
    ``token_ids[i]`` (empty when log-probs were not requested). ``text`` is the detokenized output
    with special tokens skipped and any stop string removed.
    """

    token_ids: list[int]
    logprobs: list[float]
    text: str
    finish_reason: str  # "stop" (EOS or stop string), "length" (max_tokens) or "abort"
    stop_reason: str | int | None  # the stop string or token id that ended it; None for EOS/length
    policy_version: int


@dataclass(frozen=True)
class CompletionGroup:
    """All samples for one prompt, produced by one policy version."""

    prompt_token_ids: list[int]
    completions: list[Completion]
    policy_version: int


@runtime_checkable
class RolloutEngine(Protocol):
    """Generates completions from the current policy and accepts new policy weights."""

    @property
    def policy_version(self) -> int:
        """Version of the weights new requests are served with (0: the initial weights)."""
        ...

    async def generate(self, prompts: Sequence[Sequence[int]], sampling: SamplingParams | None = None,
                       seeds: Sequence[int | None] | None = None) -> list[CompletionGroup]:
        """One ``CompletionGroup`` per prompt, in order; raises rather than drop any prompt."""
        ...


@runtime_checkable
class WeightTransport(Protocol):
    """Moves a full set of HF-named policy weights into a running inference server."""

    async def push(self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: int) -> None:
        """Install the weights and label them ``version``; raises ``WeightSyncError`` on failure."""
        ...
