"""Gated, grouped RMSNorm in plain PyTorch (stand-in for ``mamba_ssm.ops.triton.layernorm_gated``).

Mamba2 normalises the scan output ``y`` [..., D] in groups of ``group_size`` channels (one group
per B/C group, so the result does not depend on how heads are split over TP ranks) and gates it
with ``z``:

    norm_before_gate=False:  out = RMS_g(y * silu(z)) * weight        (what Megatron uses)
    norm_before_gate=True:   out = RMS_g(y) * weight * silu(z)

with ``RMS_g(v) = v / sqrt(mean_over_group(v^2) + eps)``. Statistics are computed in at least
fp32 and the result is cast back to the input dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def rmsnorm_fn(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    eps: float = 1e-6,
    group_size: int | None = None,
    norm_before_gate: bool = True,
) -> torch.Tensor:
    """Grouped RMSNorm of ``x`` [..., D] with optional SiLU gate ``z`` [..., D] (see module doc)."""
    dim = x.shape[-1]
    group_size = dim if group_size is None else group_size
    if dim % group_size:
        raise ValueError(f"rmsnorm_fn: hidden size {dim} is not divisible by group_size={group_size}")
    compute = torch.promote_types(x.dtype, torch.float32)
    y = x.to(compute)
    gate = None if z is None else F.silu(z.to(compute))
    if gate is not None and not norm_before_gate:
        y = y * gate
    grouped = y.reshape(*y.shape[:-1], dim // group_size, group_size)  # [..., G, D/G]
    rstd = torch.rsqrt(grouped.pow(2).mean(dim=-1, keepdim=True) + eps)
    y = (grouped * rstd).reshape(y.shape) * weight.to(compute)
    if bias is not None:
        y = y + bias.to(compute)
    if gate is not None and norm_before_gate:
        y = y * gate
    return y.to(x.dtype)


class RMSNormGated(nn.Module):
    """``RMSNorm(hidden_size, eps, group_size, norm_before_gate)`` with ``forward(x, z=None)``.

    Same constructor, parameters (``weight``, ``bias`` registered as None) and call as the
    Triton module Megatron's Mamba mixer subclasses, so its checkpoints and sharding apply as-is.
    """

    def __init__(self, hidden_size: int, eps: float = 1e-5, group_size: int | None = None,
                 norm_before_gate: bool = True, device=None, dtype=None):
        super().__init__()
        self.eps = eps
        self.group_size = group_size
        self.norm_before_gate = norm_before_gate
        self.weight = nn.Parameter(torch.empty(hidden_size, device=device, dtype=dtype))
        self.register_parameter("bias", None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)

    def forward(self, x: torch.Tensor, z: torch.Tensor | None = None) -> torch.Tensor:
        return rmsnorm_fn(x, self.weight, self.bias, z=z, eps=self.eps, group_size=self.group_size,
                          norm_before_gate=self.norm_before_gate)
