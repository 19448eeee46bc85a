"""The pure-PyTorch Mamba2 kernels against references written out step by step here.

The references are deliberately the slowest, plainest form of the maths (a Python loop over time
for the scan, ``torch.nn.functional.conv1d`` for the convolution, the RMS formula by hand), so a
match means the chunked / fused versions compute the same thing.
"""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from igrpo_megatron.models.cpu_kernels import (
    RMSNormGated,
    causal_conv1d_fn,
    causal_conv1d_update,
    causal_conv1d_varlen_states,
    install_cpu_mamba_kernels,
    mamba_chunk_scan_combined,
    mamba_split_conv1d_scan_combined,
    rmsnorm_fn,
    selective_state_update,
)
from igrpo_megatron.models.cpu_kernels import install as install_mod

ATOL = 1e-5
ROOT = Path(__file__).resolve().parents[2]


def naive_ssm(x, dt, A, B, C, D=None, z=None, dt_bias=None, softplus=True, dt_limit=None, init=None):
    """h_t = exp(dt_t A) h_{t-1} + dt_t x_t B_t^T; y_t = h_t C_t + D x_t; y *= silu(z). One step at a time."""
    batch, seqlen, nheads, headdim = x.shape
    per_group = nheads // B.shape[2]
    Bh, Ch = B.repeat_interleave(per_group, 2), C.repeat_interleave(per_group, 2)  # [b, l, h, n]
    step = dt + (0 if dt_bias is None else dt_bias)
    step = F.softplus(step) if softplus else step
    if dt_limit is not None:
        step = step.clamp(*dt_limit)
    state = torch.zeros(batch, nheads, headdim, B.shape[-1], dtype=x.dtype) if init is None else init.clone()
    ys = []
    for t in range(seqlen):
        decay = torch.exp(step[:, t] * A)[:, :, None, None]  # [b, h, 1, 1]
        state = decay * state + (step[:, t, :, None] * x[:, t])[..., None] * Bh[:, t, :, None, :]
        ys.append(torch.einsum("bhpn,bhn->bhp", state, Ch[:, t]))
    y = torch.stack(ys, dim=1)
    if D is not None:
        y = y + x * (D[:, None] if D.dim() == 1 else D)
    if z is not None:
        y = y * F.silu(z)
    return y, state


def ssm_inputs(batch=2, seqlen=37, nheads=4, headdim=3, ngroups=2, dstate=5, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return torch.randn(*shape, generator=g, dtype=dtype)

    return dict(
        x=rand(batch, seqlen, nheads, headdim), dt=rand(batch, seqlen, nheads),
        A=-(torch.rand(nheads, generator=g, dtype=dtype) * 2 + 0.5),  # A < 0: the state decays
        B=rand(batch, seqlen, ngroups, dstate), C=rand(batch, seqlen, ngroups, dstate),
    )


@pytest.mark.parametrize("chunk_size", [1, 4, 8, 16, 64])  # 37 steps: 10, 5, 3 chunks (last partial), 1
def test_chunked_scan_equals_sequential_recurrence(chunk_size):
    inp = ssm_inputs()
    g = torch.Generator().manual_seed(1)
    D, dt_bias = torch.randn(4, generator=g), torch.randn(4, generator=g)
    z = torch.randn(inp["x"].shape, generator=g)
    init = torch.randn(2, 4, 3, 5, generator=g)
    y, final = mamba_chunk_scan_combined(
        **inp, chunk_size=chunk_size, D=D, z=z, dt_bias=dt_bias, initial_states=init, dt_softplus=True,
        return_final_states=True)
    y_ref, final_ref = naive_ssm(**inp, D=D, z=z, dt_bias=dt_bias, init=init)
    assert y.shape == (2, 37, 4, 3) and final.shape == (2, 4, 3, 5)
    torch.testing.assert_close(y, y_ref, atol=ATOL, rtol=ATOL)
    torch.testing.assert_close(final, final_ref, atol=ATOL, rtol=ATOL)


def test_scan_with_per_channel_D_dt_limit_and_no_softplus():
    inp = ssm_inputs(seqlen=20, seed=2)
    inp["dt"] = inp["dt"].abs()  # no softplus: steps must already be positive
    D = torch.randn(4, 3)  # [H, P]: one skip weight per channel
    y = mamba_chunk_scan_combined(**inp, chunk_size=8, D=D, dt_limit=(0.1, 0.6))
    y_ref, _ = naive_ssm(**inp, D=D, softplus=False, dt_limit=(0.1, 0.6))
    torch.testing.assert_close(y, y_ref, atol=ATOL, rtol=ATOL)
    # The clamp matters: without it the outputs differ.
    y_unclamped, _ = naive_ssm(**inp, D=D, softplus=False)
    assert not torch.allclose(y, y_unclamped, atol=1e-3)


def test_scan_in_two_halves_with_carried_state_equals_one_pass():
    inp = ssm_inputs(seqlen=30, seed=3)
    first = {k: (v[:, :13] if v.dim() > 1 else v) for k, v in inp.items()}
    second = {k: (v[:, 13:] if v.dim() > 1 else v) for k, v in inp.items()}
    y_full = mamba_chunk_scan_combined(**inp, chunk_size=8, dt_softplus=True)
    y1, state = mamba_chunk_scan_combined(**first, chunk_size=8, dt_softplus=True, return_final_states=True)
    y2 = mamba_chunk_scan_combined(**second, chunk_size=8, dt_softplus=True, initial_states=state)
    torch.testing.assert_close(torch.cat([y1, y2], dim=1), y_full, atol=ATOL, rtol=ATOL)


def test_scan_keeps_input_dtype_and_rejects_packed_sequences():
    inp = {k: v.to(torch.bfloat16) for k, v in ssm_inputs(seqlen=9).items()}
    assert mamba_chunk_scan_combined(**inp, chunk_size=4).dtype == torch.bfloat16
    with pytest.raises(NotImplementedError, match="seq_idx"):
        mamba_chunk_scan_combined(**inp, chunk_size=4, seq_idx=torch.zeros(2, 9, dtype=torch.int32))


def reference_conv(x, weight, bias, activation=True):
    """Causal depthwise conv via F.conv1d: pad both sides by W-1, keep the first L outputs."""
    width = weight.shape[-1]
    out = F.conv1d(x, weight.unsqueeze(1), bias, padding=width - 1, groups=x.shape[1])[..., : x.shape[-1]]
    return F.silu(out) if activation else out


@pytest.mark.parametrize("activation", [None, "silu"])
def test_causal_conv1d_equals_torch_conv1d(activation):
    g = torch.Generator().manual_seed(4)
    x, w, b = torch.randn(3, 6, 11, generator=g), torch.randn(6, 4, generator=g), torch.randn(6, generator=g)
    out = causal_conv1d_fn(x, w, b, activation=activation)
    torch.testing.assert_close(out, reference_conv(x, w, b, activation is not None), atol=ATOL, rtol=ATOL)
    # Causal: changing the last input leaves every earlier output unchanged.
    x2 = x.clone()
    x2[..., -1] += 10.0
    torch.testing.assert_close(causal_conv1d_fn(x2, w, b, activation=activation)[..., :-1], out[..., :-1])


def test_causal_conv1d_initial_and_final_states_split_a_sequence():
    g = torch.Generator().manual_seed(5)
    x, w, b = torch.randn(2, 5, 12, generator=g), torch.randn(5, 4, generator=g), torch.randn(5, generator=g)
    full = causal_conv1d_fn(x, w, b, activation="silu")
    head, state = causal_conv1d_fn(x[..., :7], w, b, activation="silu", return_final_states=True)
    torch.testing.assert_close(state, x[..., 4:7])  # the last W-1 = 3 inputs
    tail = causal_conv1d_fn(x[..., 7:], w, b, initial_states=state, activation="silu")
    torch.testing.assert_close(torch.cat([head, tail], dim=-1), full, atol=ATOL, rtol=ATOL)


def test_causal_conv1d_update_steps_match_full_convolution():
    g = torch.Generator().manual_seed(6)
    x, w, b = torch.randn(2, 5, 9, generator=g), torch.randn(5, 4, generator=g), torch.randn(5, generator=g)
    full = causal_conv1d_fn(x, w, b, activation="silu")
    # Three state rows; batch entries 0 and 1 live in rows 2 and 0 (dynamic batching).
    conv_state = torch.zeros(3, 5, 4)
    rows = torch.tensor([2, 0])
    steps = [causal_conv1d_update(x[..., t], conv_state, w, b, "silu", conv_state_indices=rows) for t in range(9)]
    torch.testing.assert_close(torch.stack(steps, dim=-1), full, atol=ATOL, rtol=ATOL)
    torch.testing.assert_close(conv_state[2], x[0, :, -4:])
    torch.testing.assert_close(conv_state[0], x[1, :, -4:])
    assert conv_state[1].abs().sum() == 0  # the unused row is untouched


def test_causal_conv1d_varlen_states_by_hand():
    x = torch.arange(12, dtype=torch.float32).reshape(6, 2)  # 6 tokens, 2 channels
    states = causal_conv1d_varlen_states(x, torch.tensor([0, 1, 6]), state_len=3)
    # Sequence 0 = token 0 only (left-padded); sequence 1 = tokens 1..5, keeps tokens 3, 4, 5.
    expected = torch.tensor([[[0, 0, 0], [0, 0, 1]], [[6, 8, 10], [7, 9, 11]]], dtype=torch.float32)
    torch.testing.assert_close(states, expected)


def test_selective_state_update_steps_match_scan():
    inp = ssm_inputs(batch=2, seqlen=6, seed=7)
    nheads, headdim, dstate = 4, 3, 5
    g = torch.Generator().manual_seed(8)
    D, dt_bias, z = torch.randn(nheads, generator=g), torch.randn(nheads, generator=g), torch.randn(2, 6, 4, 3, generator=g)
    y_ref, final_ref = naive_ssm(**inp, D=D, z=z, dt_bias=dt_bias)
    state = torch.zeros(2, nheads, headdim, dstate)
    # Megatron's call: dt, dt_bias, D broadcast over the head dimension, A over (P, N).
    A = inp["A"][:, None, None].expand(nheads, headdim, dstate)
    outs = [
        selective_state_update(
            state, inp["x"][:, t], inp["dt"][:, t, :, None].expand(-1, -1, headdim), A, inp["B"][:, t],
            inp["C"][:, t], D=D[:, None].expand(-1, headdim), z=z[:, t],
            dt_bias=dt_bias[:, None].expand(-1, headdim), dt_softplus=True)
        for t in range(6)
    ]
    torch.testing.assert_close(torch.stack(outs, dim=1), y_ref, atol=ATOL, rtol=ATOL)
    torch.testing.assert_close(state, final_ref, atol=ATOL, rtol=ATOL)


def test_selective_state_update_flat_form_is_one_head_of_width_d():
    g = torch.Generator().manual_seed(12)
    batch, width, dstate = 2, 6, 4
    x, dt, z = (torch.randn(batch, width, generator=g) for _ in range(3))
    A, B, C = -torch.rand(width, dstate, generator=g), torch.randn(batch, dstate, generator=g), torch.randn(batch, dstate, generator=g)
    D, dt_bias, start = torch.randn(width, generator=g), torch.randn(width, generator=g), torch.randn(batch, width, dstate, generator=g)
    flat_state, head_state = start.clone(), start.clone().unsqueeze(1)
    flat = selective_state_update(flat_state, x, dt, A, B, C, D=D, z=z, dt_bias=dt_bias, dt_softplus=True)
    head = selective_state_update(head_state, x[:, None], dt[:, None], A[None], B[:, None], C[:, None], D=D[None],
                                  z=z[:, None], dt_bias=dt_bias[None], dt_softplus=True)
    torch.testing.assert_close(flat, head[:, 0])
    torch.testing.assert_close(flat_state, head_state[:, 0])
    assert not torch.equal(flat_state, start)  # the state was updated in place


def hand_gated_rmsnorm(x, weight, z, group, eps, before_gate):
    """Grouped RMSNorm written out: gate, split into groups, divide by the RMS, scale."""
    if z is not None and not before_gate:
        x = x * z * torch.sigmoid(z)
    xs = x.reshape(*x.shape[:-1], -1, group)
    y = (xs / torch.sqrt((xs * xs).sum(-1, keepdim=True) / group + eps)).reshape(x.shape) * weight
    if z is not None and before_gate:
        y = y * z * torch.sigmoid(z)
    return y


@pytest.mark.parametrize("norm_before_gate", [False, True])
@pytest.mark.parametrize("group_size", [None, 4])
def test_gated_rmsnorm_equals_hand_formula(norm_before_gate, group_size):
    g = torch.Generator().manual_seed(9)
    x, z = torch.randn(3, 5, 8, generator=g), torch.randn(3, 5, 8, generator=g)
    norm = RMSNormGated(8, eps=1e-5, group_size=group_size, norm_before_gate=norm_before_gate)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(8, generator=g))
    expected = hand_gated_rmsnorm(x, norm.weight, z, group_size or 8, 1e-5, norm_before_gate)
    torch.testing.assert_close(norm(x, z), expected, atol=ATOL, rtol=ATOL)
    torch.testing.assert_close(norm(x), hand_gated_rmsnorm(x, norm.weight, None, group_size or 8, 1e-5, False),
                               atol=ATOL, rtol=ATOL)
    assert [name for name, _ in norm.named_parameters()] == ["weight"]  # bias is registered as None


def test_split_conv1d_scan_equals_conv_then_scan_then_gate():
    """The fused training kernel = conv + SiLU, scan with D and dt bias, then gate (or gated norm)."""
    g = torch.Generator().manual_seed(10)
    batch, seqlen, nheads, headdim, ngroups, dstate, width = 2, 19, 4, 3, 2, 5, 4
    dim, conv_dim = nheads * headdim, nheads * headdim + 2 * ngroups * dstate
    zxbcdt = torch.randn(batch, seqlen, 2 * dim + 2 * ngroups * dstate + nheads, generator=g)
    conv_w, conv_b = torch.randn(conv_dim, width, generator=g) * 0.5, torch.randn(conv_dim, generator=g)
    dt_bias, A, D = torch.randn(nheads, generator=g), -torch.rand(nheads, generator=g) - 0.5, torch.randn(nheads, generator=g)
    z, xBC, dt = torch.split(zxbcdt, [dim, conv_dim, nheads], dim=-1)
    xBC = reference_conv(xBC.transpose(1, 2), conv_w, conv_b).transpose(1, 2)
    x, B, C = torch.split(xBC, [dim, ngroups * dstate, ngroups * dstate], dim=-1)
    y_ref, _ = naive_ssm(x.reshape(batch, seqlen, nheads, headdim), dt, A, B.reshape(batch, seqlen, ngroups, dstate),
                         C.reshape(batch, seqlen, ngroups, dstate), D=D, dt_bias=dt_bias)
    y_ref = y_ref.reshape(batch, seqlen, dim)
    out = mamba_split_conv1d_scan_combined(zxbcdt, conv_w, conv_b, dt_bias, A, D, chunk_size=8,
                                           headdim=headdim, ngroups=ngroups)
    torch.testing.assert_close(out, y_ref * F.silu(z), atol=ATOL, rtol=ATOL)
    # With the norm weight the gated grouped RMSNorm (gate first) is applied inside.
    weight = torch.randn(dim, generator=g)
    normed = mamba_split_conv1d_scan_combined(zxbcdt, conv_w, conv_b, dt_bias, A, D, chunk_size=8, headdim=headdim,
                                              ngroups=ngroups, rmsnorm_weight=weight, rmsnorm_eps=1e-5,
                                              norm_before_gate=False)
    expected = hand_gated_rmsnorm(y_ref, weight, z, dim // ngroups, 1e-5, before_gate=False)
    torch.testing.assert_close(normed, expected, atol=ATOL, rtol=ATOL)


def test_split_conv1d_scan_rejects_a_projection_that_does_not_split():
    with pytest.raises(ValueError, match="does not split"):
        mamba_split_conv1d_scan_combined(torch.randn(1, 4, 7), torch.randn(22, 4), None, torch.zeros(4),
                                         -torch.ones(4), torch.ones(4), chunk_size=4, headdim=3, ngroups=2)


def test_gradients_of_scan_conv_and_norm_pass_gradcheck():
    g = torch.Generator().manual_seed(11)

    def leaf(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64).requires_grad_()

    x, dt, B, C = leaf(1, 5, 2, 2), leaf(1, 5, 2), leaf(1, 5, 1, 3), leaf(1, 5, 1, 3)
    A = (-torch.rand(2, generator=g, dtype=torch.float64) - 0.5).requires_grad_()
    D, z, dt_bias, init = leaf(2), leaf(1, 5, 2, 2), leaf(2), leaf(1, 2, 2, 3)

    def scan(x, dt, A, B, C, D, z, dt_bias, init):
        y, s = mamba_chunk_scan_combined(x, dt, A, B, C, 2, D=D, z=z, dt_bias=dt_bias, initial_states=init,
                                         dt_softplus=True, return_final_states=True)
        return y, s

    assert torch.autograd.gradcheck(scan, (x, dt, A, B, C, D, z, dt_bias, init))
    cx, cw, cb, cinit = leaf(1, 3, 6), leaf(3, 4), leaf(3), leaf(1, 3, 3)
    assert torch.autograd.gradcheck(
        lambda a, w, b, s: causal_conv1d_fn(a, w, b, initial_states=s, activation="silu"), (cx, cw, cb, cinit))
    nx, nz, nw = leaf(2, 6), leaf(2, 6), leaf(6)
    assert torch.autograd.gradcheck(
        lambda a, zz, w: rmsnorm_fn(a, w, None, z=zz, eps=1e-5, group_size=3, norm_before_gate=False), (nx, nz, nw))


def test_install_does_nothing_when_real_kernels_and_cuda_exist(monkeypatch):
    install_mod.uninstall_cpu_mamba_kernels()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(install_mod.importlib.util, "find_spec",
                        lambda name, *a: object() if name == "mamba_ssm" else None)
    assert install_cpu_mamba_kernels() is False
    assert "mamba_ssm" not in sys.modules and "causal_conv1d" not in sys.modules


def _python(code: str) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter (Megatron's mixer binds its kernels once per process)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=300, env=env, cwd=ROOT)


def test_installed_kernels_are_what_megatrons_mixer_binds():
    result = _python("""
        import sys
        import igrpo_megatron.models.cpu_kernels as k
        assert "mamba_ssm" not in sys.modules, "importing the package must not install anything"
        assert k.install_cpu_mamba_kernels() is True
        import megatron.core.ssm.mamba_mixer as m
        assert m.HAVE_MAMBA_SSM
        assert m.mamba_split_conv1d_scan_combined is k.mamba_split_conv1d_scan_combined
        assert m.mamba_chunk_scan_combined is k.mamba_chunk_scan_combined
        assert m.causal_conv1d_fn is k.causal_conv1d_fn
        # Decode kernels: the stand-ins (megatron-core <= 0.18), or None = the mixer's own PyTorch
        # step (0.19 binds its Triton ops instead; see models/compat.py).
        from igrpo_megatron.models import compat
        decode = compat.use_cpu_decode_kernels(m)
        want = {"reference": (k.causal_conv1d_update, k.selective_state_update),
                "megatron-fallback": (None, None)}[decode]
        assert (m.causal_conv1d_update, m.selective_state_update) == want, decode
        assert issubclass(m.ExtendedRMSNorm, k.RMSNormGated)
        assert k.install_cpu_mamba_kernels() is True  # idempotent
        print("BOUND")
    """)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "BOUND" in result.stdout


def test_install_after_megatron_imported_the_mixer_raises_a_clear_error():
    result = _python("""
        import megatron.core.ssm.mamba_mixer
        from igrpo_megatron.models.cpu_kernels import install_cpu_mamba_kernels
        install_cpu_mamba_kernels()
    """)
    assert result.returncode != 0
    assert "RuntimeError" in result.stderr
    assert "imported before install_cpu_mamba_kernels()" in result.stderr
