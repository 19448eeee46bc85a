"""How per-token losses ``[B, T]`` become one scalar, with normalisers that may be global.

A trainer that splits a step into micro-batches (and data-parallel ranks) gets a loss that does
not depend on that layout when it passes the *global* counts from :func:`loss_normalizers`,
summed over every micro-batch and rank of the step, and then *sums* (not averages) the
micro-batch losses and gradients. A new mode is one function registered with
:func:`register_aggregation`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import torch


class Aggregation(Protocol):
    def __call__(self, per_token: torch.Tensor, mask: torch.Tensor, *, num_tokens: torch.Tensor,
                 num_seqs: torch.Tensor, max_length: int | None) -> torch.Tensor: ...


_AGGREGATIONS: dict[str, Aggregation] = {}


def register_aggregation(name: str) -> Callable[[Aggregation], Aggregation]:
    """Decorator: make a function selectable as ``algorithm.loss.aggregation: name``."""

    def deco(fn: Aggregation) -> Aggregation:
        _AGGREGATIONS[name] = fn
        return fn

    return deco


def aggregation_names() -> tuple[str, ...]:
    return tuple(_AGGREGATIONS)


def get_aggregation(name: str) -> Aggregation:
    """The registered aggregation called ``name`` (ValueError naming the recipe key otherwise)."""
    try:
        return _AGGREGATIONS[name]
    except KeyError:
        raise ValueError(f"algorithm.loss.aggregation = {name!r} is not registered; use one of "
                         f"{sorted(_AGGREGATIONS)}.") from None


def loss_normalizers(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(num_tokens, num_seqs)`` of a micro-batch as float32 scalars.

    num_tokens counts valid tokens; num_seqs counts sequences with at least one valid token
    (an empty sequence adds nothing to any mode). Sum these over all micro-batches and
    data-parallel ranks of a step and pass them to ``policy_loss`` as the global normalisers.
    """
    mask = mask.bool()
    return mask.sum().float(), mask.any(dim=-1).sum().float()


def _masked_sum_per_seq(per_token: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    # torch.where, not multiplication: padded positions may hold inf/NaN and must not leak.
    return torch.where(mask, per_token, torch.zeros_like(per_token)).sum(dim=-1)  # [B]


@register_aggregation("token_mean")
def token_mean(per_token, mask, *, num_tokens, num_seqs, max_length):
    """L = sum_{i,t} m_it l_it / N_tokens (DAPO): every token weighs the same."""
    return _masked_sum_per_seq(per_token, mask).sum() / num_tokens.clamp_min(1)


@register_aggregation("seq_mean_token_mean")
def seq_mean_token_mean(per_token, mask, *, num_tokens, num_seqs, max_length):
    """L = sum_i (sum_t m_it l_it / |y_i|) / N_seqs (GRPO, the iGRPO paper): every sequence weighs the same."""
    lengths = mask.sum(dim=-1).clamp_min(1)  # [B]
    return (_masked_sum_per_seq(per_token, mask) / lengths).sum() / num_seqs.clamp_min(1)


@register_aggregation("seq_mean_token_sum_norm")
def seq_mean_token_sum_norm(per_token, mask, *, num_tokens, num_seqs, max_length):
    """L = sum_i (sum_t m_it l_it / L_max) / N_seqs (Dr.GRPO): no per-sequence length bias."""
    if max_length is None or max_length < 1:
        raise ValueError("aggregation 'seq_mean_token_sum_norm' needs algorithm.loss.max_length_normalizer "
                         "(a positive int, normally the rollout's maximum completion length).")
    return (_masked_sum_per_seq(per_token, mask) / max_length).sum() / num_seqs.clamp_min(1)
