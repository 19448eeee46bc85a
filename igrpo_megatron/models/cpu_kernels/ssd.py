"""Mamba2 state-space scan in plain PyTorch (stand-in for ``mamba_ssm.ops.triton.ssd_combined``).

The recurrence, per batch ``b``, head ``h`` (B/C group ``g = h // (H/G)``), time ``t``:

    dt_t  = clamp(softplus(dt_t + dt_bias))            (softplus and clamp optional)
    S_t   = exp(dt_t * A) * S_{t-1} + dt_t * x_t B_t^T   S: [P, N] per head, S_0 = initial state
    y_t   = S_t C_t + D * x_t                            optionally gated: y_t * silu(z_t)

is evaluated in chunks of ``chunk_size`` steps ("state-space duality"): inside a chunk the output
is a masked attention-like product with decay weights exp(cumsum(dt*A)_i - cumsum(dt*A)_j);
across chunks the state is carried by a short sequential loop over chunks. The sequence is
zero-padded to a multiple of the chunk (a zero ``dt`` step neither decays nor feeds the state),
so any length works. Everything is plain autograd, computed in at least fp32.

Not supported (raise NotImplementedError): ``seq_idx``/``cu_seqlens`` (packed sequences and
variable-length states), which Megatron only uses for sequence packing and dynamic inference.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from igrpo_megatron.models.cpu_kernels.conv1d import causal_conv1d_fn
from igrpo_megatron.models.cpu_kernels.gated_norm import rmsnorm_fn

_NO_LIMIT = (0.0, float("inf"))


def _no_packing(name: str, **packing_args) -> None:
    given = sorted(k for k, v in packing_args.items() if v is not None and v is not False)
    if given:
        raise NotImplementedError(
            f"{name}({', '.join(given)}=...) (packed sequences / variable-length states) is not supported "
            "by the CPU reference kernels; train with padded sequences (no packed_seq_params) on CPU")


def _discretize_dt(dt: torch.Tensor, dt_bias: torch.Tensor | None, softplus: bool,
                   dt_limit: tuple[float, float], compute: torch.dtype) -> torch.Tensor:
    """Step sizes: bias, softplus, then clamp to ``dt_limit`` (when it is not (0, inf))."""
    dt = dt.to(compute)
    if dt_bias is not None:
        dt = dt + dt_bias.to(compute)
    if softplus:
        dt = F.softplus(dt)
    if tuple(dt_limit) != _NO_LIMIT:
        dt = dt.clamp(min=dt_limit[0], max=dt_limit[1])
    return dt


def _to_chunks(t: torch.Tensor, chunk: int) -> torch.Tensor:
    """[B, L, ...] -> [B, L/chunk, chunk, ...], zero-padding L up to a multiple of ``chunk``."""
    pad = (-t.shape[1]) % chunk
    if pad:
        t = F.pad(t, (0, 0) * (t.dim() - 2) + (0, pad))
    return t.reshape(t.shape[0], t.shape[1] // chunk, chunk, *t.shape[2:])


def ssd_scan(x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
             chunk_size: int, initial_states: torch.Tensor | None = None
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """The chunked scan on discretised inputs (no D, no gate); returns ``(y, final_state)``.

    x [B, L, H, P], dt [B, L, H] (already softplus'ed), A [H], B and C [B, L, H, N] (already
    expanded from groups to heads), initial_states [B, H, P, N]. y [B, L, H, P], state [B, H, P, N].
    """
    batch, seqlen, nheads, headdim = x.shape
    dstate = B.shape[-1]
    xc, dtc, Bc, Cc = (_to_chunks(t, chunk_size) for t in (x, dt, B, C))  # [B, c, Q, ...]
    log_decay = (dtc * A).permute(0, 1, 3, 2).cumsum(dim=-1)  # [B, c, H, Q], cumulative log decay
    # Within a chunk: position i receives from j <= i with weight exp(cum_i - cum_j) (C_i . B_j).
    causal = torch.ones(chunk_size, chunk_size, dtype=torch.bool, device=x.device).tril()
    pair = log_decay.unsqueeze(-1) - log_decay.unsqueeze(-2)  # [B, c, H, Q_i, Q_j]
    decay = torch.exp(pair.masked_fill(~causal, float("-inf")))
    scores = torch.einsum("bcihn,bcjhn->bchij", Cc, Bc) * decay
    y_intra = torch.einsum("bchij,bcjhp->bcihp", scores, xc * dtc.unsqueeze(-1))
    # State each chunk adds by its end: sum_j exp(cum_last - cum_j) dt_j x_j B_j^T.
    to_end = torch.exp(log_decay[..., -1:] - log_decay)  # [B, c, H, Q]
    chunk_states = torch.einsum("bchj,bcjhp,bcjhn->bchpn", to_end, xc * dtc.unsqueeze(-1), Bc)
    chunk_decay = torch.exp(log_decay[..., -1])  # [B, c, H]: decay across a whole chunk
    state = (x.new_zeros(batch, nheads, headdim, dstate) if initial_states is None
             else initial_states.to(x.dtype))
    entering = []
    for c in range(xc.shape[1]):
        entering.append(state)
        state = chunk_decay[:, c, :, None, None] * state + chunk_states[:, c]
    entering_states = torch.stack(entering, dim=1)  # [B, c, H, P, N]: state before each chunk
    # Across chunks: position i also sees the entering state, decayed by exp(cum_i).
    y_inter = torch.einsum("bcihn,bchpn,bchi->bcihp", Cc, entering_states, torch.exp(log_decay))
    y = (y_intra + y_inter).reshape(batch, -1, nheads, headdim)[:, :seqlen]
    return y, state


def _heads_from_groups(t: torch.Tensor, nheads: int) -> torch.Tensor:
    """B/C [B, L, G, N] -> [B, L, H, N]: head h reads group h // (H / G)."""
    ngroups = t.shape[2]
    if nheads % ngroups:
        raise ValueError(f"number of heads {nheads} is not divisible by number of B/C groups {ngroups}")
    return t.repeat_interleave(nheads // ngroups, dim=2)


def _skip(D: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """D * x with D [H] or [H, P] against x [..., H, P]."""
    return x * (D.unsqueeze(-1) if D.dim() == 1 else D)


def mamba_chunk_scan_combined(
    x, dt, A, B, C, chunk_size, D=None, z=None, dt_bias=None, initial_states=None, seq_idx=None,
    chunk_indices=None, chunk_offsets=None, cu_seqlens=None, dt_softplus=False, dt_limit=_NO_LIMIT,
    return_final_states=False, return_varlen_states=False, state_dtype=None,
):
    """Full Mamba2 SSD: x [B, L, H, P], dt [B, L, H], A [H], B/C [B, L, G, N] -> y [B, L, H, P].

    Adds ``D * x`` (D [H] or [H, P]), gates by ``silu(z)`` when ``z`` is given, and with
    ``return_final_states`` returns ``(y, final_state [B, H, P, N])``.
    """
    _no_packing("mamba_chunk_scan_combined", seq_idx=seq_idx, chunk_indices=chunk_indices,
                chunk_offsets=chunk_offsets, cu_seqlens=cu_seqlens, return_varlen_states=return_varlen_states)
    compute = torch.promote_types(x.dtype, torch.float32)
    nheads = x.shape[2]
    dt = _discretize_dt(dt, dt_bias, dt_softplus, dt_limit, compute)
    xf = x.to(compute)
    y, final_state = ssd_scan(
        xf, dt, A.to(compute), _heads_from_groups(B.to(compute), nheads),
        _heads_from_groups(C.to(compute), nheads), chunk_size,
        None if initial_states is None else initial_states.to(compute),
    )
    if D is not None:
        y = y + _skip(D.to(compute), xf)
    if z is not None:
        y = y * F.silu(z.to(compute))
    y = y.to(x.dtype)
    if not return_final_states:
        return y
    return y, final_state.to(state_dtype or compute)


def _split_sizes(zxbcdt: torch.Tensor, conv1d_weight: torch.Tensor, D: torch.Tensor,
                 headdim: int | None, ngroups: int) -> tuple[int, int, int, int, int]:
    """Infer (d_nonssm, dim, dstate, nheads, headdim) of the fused projection like the fused kernel."""
    if D.dim() == 1:
        if headdim is None:
            raise ValueError("mamba_split_conv1d_scan_combined: headdim is required when D has shape [H]")
        nheads = D.shape[0]
    else:
        nheads, headdim = D.shape
    dim = nheads * headdim
    dstate = (conv1d_weight.shape[0] - dim) // (2 * ngroups)
    d_nonssm = (zxbcdt.shape[-1] - 2 * dim - 2 * ngroups * dstate - nheads) // 2
    expected = 2 * d_nonssm + 2 * dim + 2 * ngroups * dstate + nheads
    if d_nonssm < 0 or dstate <= 0 or zxbcdt.shape[-1] != expected:
        raise ValueError(
            f"mamba_split_conv1d_scan_combined: projection width {zxbcdt.shape[-1]} does not split into "
            f"z, x ({dim}), B, C ({ngroups} groups x {dstate}) and dt ({nheads}); check headdim/ngroups")
    return d_nonssm, dim, dstate, nheads, headdim


def mamba_split_conv1d_scan_combined(
    zxbcdt, conv1d_weight, conv1d_bias, dt_bias, A, D, chunk_size, initial_states=None, seq_idx=None,
    dt_limit=_NO_LIMIT, return_final_states=False, activation="silu", rmsnorm_weight=None,
    rmsnorm_eps=1e-6, outproj_weight=None, outproj_bias=None, headdim=None, ngroups=1,
    norm_before_gate=True, state_dtype=None,
):
    """Split the fused in-projection, conv + SiLU, scan, gate (and optionally norm + out-projection).

    ``zxbcdt`` [B, L, 2*d_nonssm + 2*dim + 2*G*N + H] is split into ``zx0`` (a SwiGLU side branch
    of width d_nonssm, usually empty), ``z`` [dim], ``xBC`` [dim + 2*G*N] and ``dt`` [H]. ``xBC``
    goes through the causal conv ``conv1d_weight`` [dim + 2*G*N, W]. Without ``rmsnorm_weight`` the
    result is ``scan(...) * silu(z)`` (Megatron applies its grouped RMSNorm afterwards); with it,
    the gated grouped RMSNorm of :mod:`gated_norm` is applied here. Returns [B, L, dim] (or the
    out-projection of it), plus the final state when ``return_final_states``.
    """
    _no_packing("mamba_split_conv1d_scan_combined", seq_idx=seq_idx)
    d_nonssm, dim, dstate, nheads, headdim = _split_sizes(zxbcdt, conv1d_weight, D, headdim, ngroups)
    batch, seqlen, _ = zxbcdt.shape
    zx0, z, xBC, dt = torch.split(zxbcdt, [2 * d_nonssm, dim, dim + 2 * ngroups * dstate, nheads], dim=-1)
    xBC = causal_conv1d_fn(xBC.transpose(1, 2), conv1d_weight, conv1d_bias, activation=activation)
    x, B, C = torch.split(xBC.transpose(1, 2), [dim, ngroups * dstate, ngroups * dstate], dim=-1)
    x = x.reshape(batch, seqlen, nheads, headdim)
    B = B.reshape(batch, seqlen, ngroups, dstate)
    C = C.reshape(batch, seqlen, ngroups, dstate)
    z = z.reshape(batch, seqlen, nheads, headdim)
    scanned = mamba_chunk_scan_combined(
        x, dt, A, B, C, chunk_size, D=D, z=z if rmsnorm_weight is None else None, dt_bias=dt_bias,
        initial_states=initial_states, dt_softplus=True, dt_limit=dt_limit,
        return_final_states=return_final_states, state_dtype=state_dtype,
    )
    y, final_state = scanned if return_final_states else (scanned, None)
    out = y.reshape(batch, seqlen, dim)
    if rmsnorm_weight is not None:
        out = rmsnorm_fn(out, rmsnorm_weight, None, z=z.reshape(batch, seqlen, dim), eps=rmsnorm_eps,
                         group_size=dim // ngroups, norm_before_gate=norm_before_gate)
    if d_nonssm > 0:
        x0, z0 = zx0.chunk(2, dim=-1)
        out = torch.cat([F.silu(x0) * z0, out], dim=-1)
    if outproj_weight is not None:
        out = F.linear(out, outproj_weight.to(out.dtype),
                       None if outproj_bias is None else outproj_bias.to(out.dtype))
    return (out, final_state) if return_final_states else out


def selective_state_update(state, x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False,
                           state_batch_indices=None):
    """One recurrence step for decoding; updates ``state`` in place and returns y like ``x``.

    Head form: state [B_s, H, P, N], x/dt/z [B, H, P], A [H, P, N], B/C [B, G, N], D/dt_bias [H, P].
    Flat form (no head axis): state [B_s, D, N], x/dt/z [B, D], A [D, N], B/C [B, N], D/dt_bias [D].
    ``state_batch_indices`` [B] picks each entry's state row (dynamic batching).
    """
    if x.dim() == 2:  # flat form: one head of width D
        out = selective_state_update(
            state.unsqueeze(1), x.unsqueeze(1), dt.unsqueeze(1), A.unsqueeze(0), B.unsqueeze(1),
            C.unsqueeze(1), None if D is None else D.unsqueeze(0), None if z is None else z.unsqueeze(1),
            None if dt_bias is None else dt_bias.unsqueeze(0), dt_softplus, state_batch_indices)
        return out.squeeze(1)
    compute = torch.promote_types(x.dtype, torch.float32)
    nheads = x.shape[1]
    rows = state if state_batch_indices is None else state[state_batch_indices.long()]
    dt = _discretize_dt(dt, dt_bias, dt_softplus, _NO_LIMIT, compute)  # [B, H, P]
    Bh = _heads_from_groups(B.unsqueeze(1).to(compute), nheads).squeeze(1)  # [B, H, N]
    Ch = _heads_from_groups(C.unsqueeze(1).to(compute), nheads).squeeze(1)
    xf = x.to(compute)
    new_state = (rows.to(compute) * torch.exp(dt.unsqueeze(-1) * A.to(compute))
                 + (dt * xf).unsqueeze(-1) * Bh.unsqueeze(2))  # [B, H, P, N]
    y = torch.einsum("bhpn,bhn->bhp", new_state, Ch)
    if D is not None:
        y = y + xf * D.to(compute)
    if z is not None:
        y = y * F.silu(z.to(compute))
    with torch.no_grad():
        if state_batch_indices is None:
            state.copy_(new_state.to(state.dtype))
        else:
            state[state_batch_indices.long()] = new_state.to(state.dtype)
    return y.to(x.dtype)
