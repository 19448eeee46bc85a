"""DAPO's soft overlong punishment (arXiv 2503.14476, "Overlong Reward Shaping").

A completion that runs into the length limit is usually cut off, so its reward says more about its
length than about its reasoning. DAPO adds a penalty that grows linearly over the last L_cache tokens
before the limit L_max instead of a cliff at L_max:

    R_length(y) = 0                                   if |y| <= L_max - L_cache
                  ((L_max - L_cache) - |y|) / L_cache   if L_max - L_cache < |y| <= L_max
                  -1                                  if |y| > L_max

scaled by a penalty factor (DAPO: 1.0). L_max is the rollout's ``rollout.sampling.max_tokens``; the
settings are ``algorithm.overlong_penalty``. The rollout adds the penalty to every sample's reward
(``rollout.two_stage``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["overlong_penalty"]


def overlong_penalty(lengths: Sequence[int] | torch.Tensor, max_length: int, buffer: int,
                     factor: float = 1.0) -> torch.Tensor:
    """``factor * R_length(|y|)`` for every completion length ``|y|`` in ``lengths``: float64 ``[n]``, in
    ``[-factor, 0]``.

    Args:
        lengths: completion lengths in tokens, ``[n]``.
        max_length: L_max, the most completion tokens the rollout samples.
        buffer: L_cache, the tokens before ``max_length`` over which the penalty grows (1 .. max_length).
        factor: scale of the penalty (-factor at ``max_length`` and beyond).
    """
    if not 1 <= buffer <= max_length:
        raise ValueError(f"overlong buffer {buffer} must be between 1 and the maximum length {max_length} "
                         "(algorithm.overlong_penalty.overlong_buffer against rollout.sampling.max_tokens)")
    y = torch.as_tensor(lengths, dtype=torch.float64)  # [n]
    expected = max_length - buffer  # L_max - L_cache: the longest completion with no penalty
    r_length = ((expected - y) / buffer).clamp(min=-1.0, max=0.0)  # [n]: 0, linear in the buffer, -1 beyond
    return factor * r_length
