"""Log-probs and entropy on one process (unsharded): values and gradients against autograd."""

import pytest
import torch

from igrpo_megatron.algorithms import (
    vocab_parallel_entropy,
    vocab_parallel_logprobs,
    vocab_parallel_logprobs_and_entropy,
)


def _reference(logits, targets, temperature, vocab_size=None):
    v = logits.shape[-1] if vocab_size is None else vocab_size
    logp_all = torch.log_softmax(logits[..., :v].float() / temperature, dim=-1)
    logp = logp_all.gather(-1, targets[..., None]).squeeze(-1)
    entropy = -(logp_all.exp() * logp_all).sum(-1)
    return logp, entropy


@pytest.mark.parametrize("temperature, chunk_size", [(1.0, None), (0.7, 3), (1.3, 1)])
def test_matches_log_softmax_with_gradients(temperature, chunk_size):
    torch.manual_seed(0)
    logits = (3 * torch.randn(2, 7, 13)).requires_grad_(True)  # [B, T, V]
    targets = torch.randint(0, 13, (2, 7))
    g_lp, g_h = torch.randn(2, 7), torch.randn(2, 7)  # upstream gradients
    logp, ent = vocab_parallel_logprobs_and_entropy(logits, targets, temperature=temperature,
                                                    chunk_size=chunk_size)
    (grad,) = torch.autograd.grad((logp * g_lp).sum() + (ent * g_h).sum(), logits)
    ref_lp, ref_h = _reference(logits, targets, temperature)
    (ref_grad,) = torch.autograd.grad((ref_lp * g_lp).sum() + (ref_h * g_h).sum(), logits)
    torch.testing.assert_close(logp, ref_lp, atol=1e-6, rtol=0)
    torch.testing.assert_close(ent, ref_h, atol=1e-6, rtol=0)
    torch.testing.assert_close(grad, ref_grad, atol=1e-6, rtol=0)


def test_gradcheck_float64():
    torch.manual_seed(1)
    logits = torch.randn(3, 4, 9, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, 7, (3, 4))
    assert torch.autograd.gradcheck(
        lambda x: vocab_parallel_logprobs_and_entropy(x, targets, temperature=0.6, vocab_size=7, chunk_size=5),
        (logits,))
    assert torch.autograd.gradcheck(lambda x: vocab_parallel_entropy(x, chunk_size=2), (logits,))


def test_single_output_functions_and_padded_vocab():
    torch.manual_seed(2)
    logits = torch.randn(5, 12, requires_grad=True)
    targets = torch.randint(0, 10, (5,))
    logp = vocab_parallel_logprobs(logits, targets, vocab_size=10)
    ent = vocab_parallel_entropy(logits, vocab_size=10)
    ref_lp, ref_h = _reference(logits, targets, 1.0, vocab_size=10)
    torch.testing.assert_close(logp, ref_lp, atol=1e-6, rtol=0)
    torch.testing.assert_close(ent, ref_h, atol=1e-6, rtol=0)
    (grad,) = torch.autograd.grad(logp.sum() + ent.sum(), logits)
    assert grad[:, 10:].abs().max().item() == 0.0  # padding columns carry no mass, no gradient


def test_bfloat16_logits_give_float32_results():
    torch.manual_seed(3)
    logits = torch.randn(4, 16).to(torch.bfloat16).requires_grad_(True)
    targets = torch.randint(0, 16, (4,))
    logp = vocab_parallel_logprobs(logits, targets)
    assert logp.dtype == torch.float32
    torch.testing.assert_close(logp, _reference(logits.detach().float(), targets, 1.0)[0], atol=1e-6, rtol=0)
    logp.sum().backward()
    assert logits.grad.dtype == torch.bfloat16


def test_extreme_and_infinite_logits():
    logits = torch.tensor([[1e30, -1e30, 0.0, 5.0], [float("-inf"), 2.0, float("-inf"), 2.0]],
                          requires_grad=True)
    targets = torch.tensor([1, 3])
    logp, ent = vocab_parallel_logprobs_and_entropy(logits, targets)
    # row 0: all mass on token 0 -> log p(1) = -2e30, H = 0; row 1: two equal tokens -> log 1/2, H = log 2
    torch.testing.assert_close(logp, torch.tensor([-2e30, -0.6931472]))
    torch.testing.assert_close(ent, torch.tensor([0.0, 0.6931472]))
    (grad,) = torch.autograd.grad(logp.sum() + ent.sum(), logits)
    assert torch.isfinite(grad).all()
    # row 1: d log p(3) = onehot - p = [0, -0.5, 0, 0.5]; dH = -p (z - E z) = 0 (equal logits)
    torch.testing.assert_close(grad[1], torch.tensor([0.0, -0.5, 0.0, 0.5]))


@pytest.mark.parametrize("kwargs, match", [
    (dict(temperature=0.0), "temperature"),
    (dict(vocab_size=20), "vocab_size"),
    (dict(chunk_size=0), "chunk_size"),
])
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        vocab_parallel_logprobs(torch.zeros(2, 8), torch.zeros(2, dtype=torch.long), **kwargs)
    with pytest.raises(ValueError, match="targets"):
        vocab_parallel_logprobs(torch.zeros(2, 8), torch.zeros(3, dtype=torch.long))


def test_temporaries_are_bounded_by_the_chunk():
    """Peak single allocation of the math is one chunk, not the whole [N, V] (gradient buffer aside)."""
    from torch.profiler import ProfilerActivity, profile

    n, v, chunk = 1024, 256, 64
    full_bytes, chunk_bytes = n * v * 4, chunk * v * 4  # 1 MiB vs 64 KiB
    logits = torch.randn(n, v, requires_grad=True)
    targets = torch.randint(0, v, (n,))
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as fwd:
        logp, ent = vocab_parallel_logprobs_and_entropy(logits, targets, chunk_size=chunk)
    assert max(e.cpu_memory_usage for e in fwd.events()) <= 2 * chunk_bytes
    loss = logp.sum() + ent.sum()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as bwd:
        loss.backward()
    math_ops = {"aten::exp", "aten::where", "aten::mul", "aten::sub", "aten::div", "aten::sum"}
    sizes = [e.cpu_memory_usage for e in bwd.events() if e.name in math_ops]
    assert sizes and max(sizes) <= 2 * chunk_bytes < full_bytes
