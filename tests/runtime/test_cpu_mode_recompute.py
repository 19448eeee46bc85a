"""CPU mode reaches into backward for Megatron's activation recomputation (single process, no ranks).

Torch does not carry torch-function modes into backward, and a checkpointed function runs again
there: Megatron's unfused attention makes its causal mask with ``device="cuda"`` at that point.
"""

import torch

from igrpo_megatron.runtime.cpu_mode import cpu_mode


def _masked(x: torch.Tensor) -> torch.Tensor:
    # What Megatron's get_default_causal_mask does, inside a recomputed region.
    mask = torch.triu(torch.ones(x.shape[0], x.shape[0], device="cuda"), diagonal=1).bool()
    return (x @ x.T).masked_fill(mask, 0.0).sum(dim=1)


def test_recomputed_backward_runs_and_matches_the_plain_gradient():
    from megatron.core import tensor_parallel
    from megatron.core.tensor_parallel.random import CheckpointFunction

    from igrpo_megatron.runtime.cpu_mode import cpu_mode_active

    was_on = cpu_mode_active()
    original = CheckpointFunction.backward
    x = torch.randn(4, 3, dtype=torch.float64)
    with cpu_mode() as on:
        if not on:  # CUDA present: nothing to stand in for
            return
        assert was_on or CheckpointFunction.backward is not original  # wrapped to enter the mode
        plain = x.clone().requires_grad_(True)
        _masked(plain).pow(2).sum().backward()
        recomputed = x.clone().requires_grad_(True)
        tensor_parallel.checkpoint(_masked, False, recomputed).pow(2).sum().backward()
    torch.testing.assert_close(recomputed.grad, plain.grad, rtol=0, atol=0)
    assert recomputed.grad.abs().sum() > 0
    assert was_on or CheckpointFunction.backward is original  # switched off again: Megatron's own backward
