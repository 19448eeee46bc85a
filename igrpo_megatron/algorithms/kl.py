"""Per-token estimators of KL(pi_theta || pi_ref) from log-probs of the sampled tokens.

With x = log pi_ref(y_t) - log pi_theta(y_t) and y_t sampled from pi_theta (J. Schulman,
"Approximating KL divergence", 2020):

    k1 = -x                      unbiased, can be negative per token
    k2 = x^2 / 2                 biased, low variance, non-negative
    k3 = exp(x) - x - 1          unbiased, non-negative (the iGRPO paper's choice)

A new estimator is one function registered with :func:`register_kl_estimator`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

KLEstimator = Callable[[torch.Tensor], torch.Tensor]  # x [B, T] -> per-token KL [B, T]

_KL_ESTIMATORS: dict[str, KLEstimator] = {}


def register_kl_estimator(name: str) -> Callable[[KLEstimator], KLEstimator]:
    """Decorator: make ``fn(x) -> kl`` selectable as ``algorithm.loss.kl.estimator: name``."""

    def deco(fn: KLEstimator) -> KLEstimator:
        _KL_ESTIMATORS[name] = fn
        return fn

    return deco


@register_kl_estimator("k1")
def kl_k1(x: torch.Tensor) -> torch.Tensor:
    """k1 = -x = log pi_theta - log pi_ref."""
    return -x


@register_kl_estimator("k2")
def kl_k2(x: torch.Tensor) -> torch.Tensor:
    """k2 = x^2 / 2."""
    return 0.5 * x * x


@register_kl_estimator("k3")
def kl_k3(x: torch.Tensor) -> torch.Tensor:
    """k3 = exp(x) - x - 1 (>= 0 for every x)."""
    return torch.expm1(x) - x


def kl_estimator_names() -> tuple[str, ...]:
    return tuple(_KL_ESTIMATORS)


def kl_estimator(name: str) -> KLEstimator:
    """The registered estimator called ``name`` (ValueError naming the recipe key otherwise)."""
    try:
        return _KL_ESTIMATORS[name]
    except KeyError:
        raise ValueError(f"algorithm.loss.kl.estimator = {name!r} is not registered; use one of "
                         f"{sorted(_KL_ESTIMATORS)}.") from None


def kl_penalty(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: str,
               log_ratio_clamp: float = 20.0) -> torch.Tensor:
    """Per-token KL estimate ``[B, T]``; x is clamped to [-c, c] so k2/k3 stay finite."""
    x = (ref_logprobs - logprobs).clamp(-log_ratio_clamp, log_ratio_clamp)  # [B, T]
    return kl_estimator(estimator)(x)
