"""Depthwise causal 1-D convolution in plain PyTorch (stand-in for the ``causal_conv1d`` package).

Mamba2 runs a short (width ``w``, usually 4) depthwise convolution over ``xBC`` before the scan.
Channel ``d`` at time ``t`` sees only inputs ``t - w + 1 .. t``:

    out[b, d, t] = bias[d] + sum_k weight[d, k] * x_pad[b, d, t + k],   k = 0 .. w-1

where ``x_pad`` is ``x`` with ``w - 1`` steps of history (zeros, or the caller's initial states)
in front. The sum over shifted slices is differentiable through autograd and needs no kernel.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

_ACTIVATIONS = (None, "silu", "swish")


def _check_activation(activation: str | None) -> None:
    if activation not in _ACTIVATIONS:
        raise ValueError(f"activation={activation!r} is not supported; use None, 'silu' or 'swish'")


def _depthwise_causal(x_pad: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                      out_len: int) -> torch.Tensor:
    """Weighted sum of the ``w`` shifted windows of ``x_pad`` [B, D, out_len + w - 1] -> [B, D, out_len]."""
    width = weight.shape[-1]
    out = x_pad[..., 0:out_len] * weight[:, 0, None]
    for k in range(1, width):
        out = out + x_pad[..., k:k + out_len] * weight[:, k, None]
    if bias is not None:
        out = out + bias[:, None]
    return out


def causal_conv1d_fn(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    seq_idx: torch.Tensor | None = None,
    initial_states: torch.Tensor | None = None,
    return_final_states: bool = False,
    final_states_out: torch.Tensor | None = None,
    activation: str | None = None,
):
    """Causal depthwise conv over ``x`` [B, D, L] with ``weight`` [D, W], optional SiLU.

    ``initial_states`` [B, D, W-1] replaces the zero history; with ``return_final_states`` the
    last ``W - 1`` inputs (the history the next call needs) come back as ``(out, final_states)``.
    ``seq_idx`` (packed sequences) is not supported: pad sequences instead.
    """
    if seq_idx is not None:
        raise NotImplementedError(
            "causal_conv1d_fn(seq_idx=...) (packed sequences) is not supported by the CPU reference "
            "kernels; train with padded sequences (no packed_seq_params) on CPU")
    _check_activation(activation)
    batch, dim, seqlen = x.shape
    width = weight.shape[-1]
    if weight.shape != (dim, width):
        raise ValueError(f"causal_conv1d_fn: weight has shape {tuple(weight.shape)}, expected ({dim}, W)")
    if initial_states is None:
        history = x.new_zeros(batch, dim, width - 1)
    else:
        history = initial_states.to(x.dtype)
    x_pad = torch.cat([history, x], dim=-1)  # [B, D, W-1+L]
    out = _depthwise_causal(x_pad, weight.to(x.dtype), None if bias is None else bias.to(x.dtype), seqlen)
    if activation is not None:
        out = F.silu(out)
    if not return_final_states:
        return out
    final_states = x_pad[..., x_pad.shape[-1] - (width - 1):]  # [B, D, W-1]
    if final_states_out is not None:
        final_states_out.copy_(final_states.detach())
        final_states = final_states_out
    return out, final_states


def causal_conv1d_update(
    x: torch.Tensor,
    conv_state: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    activation: str | None = None,
    cache_seqlens: torch.Tensor | None = None,
    conv_state_indices: torch.Tensor | None = None,
) -> torch.Tensor:
    """One decoding step (or a few): convolve ``x`` [B, D] / [B, D, L] against ``conv_state``.

    ``conv_state`` [B_state, D, S] (S >= W - 1) holds the last S inputs and is updated in place;
    ``conv_state_indices`` [B] picks the state row of each batch entry (dynamic batching).
    """
    if cache_seqlens is not None:
        raise NotImplementedError("causal_conv1d_update(cache_seqlens=...) (circular state buffer) "
                                  "is not supported by the CPU reference kernels")
    _check_activation(activation)
    squeeze = x.dim() == 2
    if squeeze:
        x = x.unsqueeze(-1)  # [B, D, 1]
    seqlen = x.shape[-1]
    width = weight.shape[-1]
    state_len = conv_state.shape[-1]
    if state_len < width - 1:
        raise ValueError(f"causal_conv1d_update: conv_state holds {state_len} steps, needs >= {width - 1}")
    rows = conv_state if conv_state_indices is None else conv_state[conv_state_indices.long()]
    window = torch.cat([rows.to(x.dtype), x], dim=-1)  # [B, D, S+L]
    x_pad = window[..., state_len - (width - 1):]  # [B, D, W-1+L]
    out = _depthwise_causal(x_pad, weight.to(x.dtype), None if bias is None else bias.to(x.dtype), seqlen)
    if activation is not None:
        out = F.silu(out)
    new_state = window[..., seqlen:].to(conv_state.dtype)  # the last S inputs
    with torch.no_grad():
        if conv_state_indices is None:
            conv_state.copy_(new_state)
        else:
            conv_state[conv_state_indices.long()] = new_state
    return out.squeeze(-1) if squeeze else out


def causal_conv1d_varlen_states(x: torch.Tensor, cu_seqlens: torch.Tensor, state_len: int) -> torch.Tensor:
    """Conv states after each packed sequence: ``x`` [T, D], ``cu_seqlens`` [N+1] -> [N, D, state_len].

    Row ``i`` holds the last ``state_len`` inputs of sequence ``i``, left-padded with zeros.
    """
    bounds = cu_seqlens.tolist()
    states = x.new_zeros(len(bounds) - 1, x.shape[-1], state_len)
    for i, (start, end) in enumerate(zip(bounds[:-1], bounds[1:], strict=True)):
        tail = x[max(start, end - state_len):end]  # [<=state_len, D]
        if tail.shape[0]:
            states[i, :, state_len - tail.shape[0]:] = tail.transpose(0, 1)
    return states
