"""The loss seam: what the trainer calls, so that it depends on a signature, not on losses.py."""

from __future__ import annotations

from typing import Protocol

import torch

from igrpo_megatron.algorithms.losses import PolicyLossMetrics
from igrpo_megatron.config.algorithm import PolicyLossConfig


class PolicyLossFn(Protocol):
    """``policy_loss``'s signature: per-token tensors ``[B, T]``, advantages ``[B]``."""

    def __call__(
        self,
        logprobs: torch.Tensor,
        old_logprobs: torch.Tensor | None,
        advantages: torch.Tensor,
        mask: torch.Tensor,
        cfg: PolicyLossConfig,
        ref_logprobs: torch.Tensor | None = None,
        rollout_logprobs: torch.Tensor | None = None,
        *,
        num_global_tokens: float | int | torch.Tensor | None = None,
        num_global_seqs: float | int | torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, PolicyLossMetrics]: ...
