"""policy_loss: clipping, aggregation modes, KL estimators, GSPO, truncated IS, normalisers."""

import math

import pytest
import torch

from igrpo_megatron.algorithms import loss_normalizers, needs_reference, policy_loss
from igrpo_megatron.algorithms.kl import kl_penalty
from igrpo_megatron.config.algorithm import KLConfig, PolicyLossConfig, TruncatedISConfig


def _leaf(x):
    return torch.tensor(x, dtype=torch.float32, requires_grad=True)


def _clip_batch():
    # Two copies of one sequence with token ratios r = [1.5, 0.5, 1.1, 1.0]; old log-prob -1 everywhere.
    old = torch.full((2, 4), -1.0)
    logp = (old + torch.log(torch.tensor([1.5, 0.5, 1.1, 1.0]))).clone().requires_grad_(True)
    return logp, old, torch.ones(2, 4, dtype=torch.bool)


def test_clip_low_and_high():
    logp, old, mask = _clip_batch()
    cfg = PolicyLossConfig(clip_low=0.2, clip_high=0.28)
    loss, m = policy_loss(logp, old, torch.tensor([1.0, -1.0]), mask, cfg)
    # A = +1: -min(r, clip(r, 0.8, 1.28)) = [-1.28, -0.5, -1.1, -1.0] -> mean -0.97 (1.5 is high-clipped)
    # A = -1: -min(-r, -clip(r))        = [ 1.5,  0.8,  1.1,  1.0] -> mean  1.10 (0.5 is low-clipped)
    # seq_mean_token_mean: (-0.97 + 1.10) / 2 = 0.065
    assert loss.item() == pytest.approx(0.065, abs=1e-6)
    assert m.clip_frac_high.item() == pytest.approx(1 / 8)
    assert m.clip_frac_low.item() == pytest.approx(1 / 8)
    assert m.ratio_mean.item() == pytest.approx(1.025, abs=1e-6)  # (1.5 + 0.5 + 1.1 + 1.0) / 4
    loss.backward()
    # d l / d logp = -A r where unclipped, 0 where clipped; divided by 4 tokens and 2 sequences.
    expected = torch.tensor([[0.0, -0.5, -1.1, -1.0], [1.5, 0.0, 1.1, 1.0]]) / 8
    torch.testing.assert_close(logp.grad, expected)


def test_symmetric_clip():
    logp, old, mask = _clip_batch()
    loss, _ = policy_loss(logp[:1], old[:1], torch.tensor([1.0]), mask[:1], PolicyLossConfig())
    # clip 0.2 both sides: [-1.2, -0.5, -1.1, -1.0] -> mean -0.95
    assert loss.item() == pytest.approx(-0.95, abs=1e-6)


# On-policy (old = None so r = 1): every valid token's loss is -A_i.
# mask rows: 3 tokens, 1 token, 0 tokens (an empty sequence); A = [1, -2, 5].
MASK = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0], [0, 0, 0, 0]], dtype=torch.bool)
ADV = torch.tensor([1.0, -2.0, 5.0])


@pytest.mark.parametrize("aggregation, max_len, expected_loss, expected_grad_row0, expected_grad_row1", [
    # per sequence: mean(-1) = -1, mean(2) = 2; empty sequence not counted -> (-1 + 2) / 2 = 0.5
    # grad: -A / (|y_i| * 2): row0 -1/6, row1 2/2 = 1
    ("seq_mean_token_mean", None, 0.5, -1 / 6, 1.0),
    # all tokens: (3 * -1 + 2) / 4 = -0.25; grad -A / 4
    ("token_mean", None, -0.25, -0.25, 0.5),
    # Dr.GRPO, L = 8: (-3/8 + 2/8) / 2 = -0.0625; grad -A / (8 * 2)
    ("seq_mean_token_sum_norm", 8, -0.0625, -1 / 16, 2 / 16),
])
def test_aggregation_modes(aggregation, max_len, expected_loss, expected_grad_row0, expected_grad_row1):
    logp = torch.full((3, 4), -0.7, requires_grad=True)
    cfg = PolicyLossConfig(aggregation=aggregation, max_length_normalizer=max_len)
    loss, m = policy_loss(logp, None, ADV, MASK, cfg)
    assert loss.item() == pytest.approx(expected_loss, abs=1e-6)
    loss.backward()
    assert logp.grad[0, :3].tolist() == pytest.approx([expected_grad_row0] * 3, abs=1e-6)
    assert logp.grad[1, 0].item() == pytest.approx(expected_grad_row1, abs=1e-6)
    assert logp.grad[MASK.logical_not()].abs().max().item() == 0.0
    assert m.num_tokens.item() == 4 and m.num_seqs.item() == 2


def test_dr_grpo_without_max_length_names_the_key():
    with pytest.raises(ValueError, match="max_length_normalizer"):
        policy_loss(torch.zeros(1, 2), None, torch.ones(1), torch.ones(1, 2),
                    PolicyLossConfig(aggregation="seq_mean_token_sum_norm"))


@pytest.mark.parametrize("aggregation", ["seq_mean_token_mean", "token_mean", "seq_mean_token_sum_norm"])
def test_global_normalisers_make_micro_batching_invisible(aggregation):
    torch.manual_seed(0)
    logp = torch.randn(3, 4, requires_grad=True)
    old = logp.detach() + 0.1 * torch.randn(3, 4)
    cfg = PolicyLossConfig(aggregation=aggregation, max_length_normalizer=4)
    full, _ = policy_loss(logp, old, ADV, MASK, cfg)
    (g_full,) = torch.autograd.grad(full, logp)
    # Split into micro-batches [row 0] and [rows 1, 2]; normalisers are summed over both.
    parts = [slice(0, 1), slice(1, 3)]
    counts = [loss_normalizers(MASK[p]) for p in parts]
    n_tok, n_seq = sum(c[0] for c in counts), sum(c[1] for c in counts)
    total = sum(policy_loss(logp[p], old[p], ADV[p], MASK[p], cfg, num_global_tokens=n_tok,
                            num_global_seqs=n_seq)[0] for p in parts)
    (g_split,) = torch.autograd.grad(total, logp)
    assert total.item() == pytest.approx(full.item(), abs=1e-6)
    torch.testing.assert_close(g_split, g_full)


# KL: logp = -1 everywhere, ref = [-0.5, -1.5, -1.0] -> x = ref - logp = [0.5, -0.5, 0]
#   k1 = -x = [-0.5, 0.5, 0]                           mean 0
#   k2 = x^2 / 2 = [0.125, 0.125, 0]                   mean 0.0833333
#   k3 = e^x - x - 1 = [0.1487213, 0.1065307, 0]       mean 0.0850840
# d/dlogp: k1 -> 1; k2 -> -x; k3 -> 1 - e^x
@pytest.mark.parametrize("estimator, mean, grad0", [
    ("k1", 0.0, 1.0), ("k2", 0.25 / 3, -0.5), ("k3", (0.1487213 + 0.1065307) / 3, 1 - math.exp(0.5)),
])
def test_kl_estimators(estimator, mean, grad0):
    logp = torch.full((1, 3), -1.0, requires_grad=True)
    ref = torch.tensor([[-0.5, -1.5, -1.0]])
    cfg = PolicyLossConfig(kl=KLConfig(coef=0.1, estimator=estimator))
    # A = 0 so the surrogate is 0 and the loss is 0.1 * mean KL
    loss, m = policy_loss(logp, None, torch.zeros(1), torch.ones(1, 3), cfg, ref_logprobs=ref)
    assert m.kl_mean.item() == pytest.approx(mean, abs=1e-6)
    assert loss.item() == pytest.approx(0.1 * mean, abs=1e-7)
    assert m.kl_loss.item() == pytest.approx(mean, abs=1e-6)
    loss.backward()
    assert logp.grad[0, 0].item() == pytest.approx(0.1 * grad0 / 3, abs=1e-6)
    assert kl_penalty(logp.detach(), ref, estimator).mean().item() == pytest.approx(mean, abs=1e-6)


def test_kl_coefficient_zero_never_needs_the_reference():
    cfg = PolicyLossConfig()
    assert not needs_reference(cfg)
    loss, m = policy_loss(torch.zeros(1, 2, requires_grad=True), None, torch.ones(1), torch.ones(1, 2), cfg)
    assert m.kl_mean is None and "kl_mean" not in m.as_dict()
    assert loss.item() == pytest.approx(-1.0)
    with pytest.raises(ValueError, match=r"algorithm\.loss\.kl\.coef"):
        policy_loss(torch.zeros(1, 2), None, torch.ones(1), torch.ones(1, 2),
                    PolicyLossConfig(kl=KLConfig(coef=0.01)))


def test_gspo_sequence_ratio():
    # log ratios [0.2, -0.1, 0.5] on 3 valid tokens (+1 padded token with a wild value):
    # s = exp(mean) = exp(0.2) = 1.2214028; A = +1.
    old = torch.tensor([[-1.0, -1.0, -1.0, -1.0]])
    logp = (old + torch.tensor([[0.2, -0.1, 0.5, 30.0]])).requires_grad_(True)
    mask = torch.tensor([[1, 1, 1, 0]], dtype=torch.bool)
    loss, m = policy_loss(logp, old, torch.ones(1), mask,
                          PolicyLossConfig(ratio_level="sequence", clip_low=0.3, clip_high=0.3))
    s = math.exp(0.2)
    assert loss.item() == pytest.approx(-s, abs=1e-6)
    assert m.ratio_mean.item() == pytest.approx(s, abs=1e-6)
    loss.backward()
    # every token gets the same gradient -A * s / |y| = -0.4071343, unlike the token-level ratio
    torch.testing.assert_close(logp.grad, torch.tensor([[-s / 3, -s / 3, -s / 3, 0.0]]))
    # GSPO's own clip range (3e-4 / 4e-4): s is high-clipped -> loss -(1 + 4e-4), no gradient
    logp.grad = None
    loss, m = policy_loss(logp, old, torch.ones(1), mask,
                          PolicyLossConfig(ratio_level="sequence", clip_low=3e-4, clip_high=4e-4))
    assert loss.item() == pytest.approx(-1.0004, abs=1e-6)
    assert m.clip_frac_high.item() == 1.0
    loss.backward()
    assert logp.grad.abs().max().item() == 0.0


def test_truncated_importance_weight():
    # old - rollout = [0.5, -0.8] -> raw w = [1.6487213, 0.4493290]; cap 1.5 -> [1.5, 0.4493290]
    # on-policy ratio 1, A = 1 -> per-token -w -> mean -(1.5 + 0.4493290) / 2 = -0.9746645
    old = torch.tensor([[-1.0, -1.0]])
    rollout = torch.tensor([[-1.5, -0.2]])
    logp = old.clone().requires_grad_(True)
    cfg = PolicyLossConfig(truncated_is=TruncatedISConfig(enabled=True, cap=1.5))
    loss, m = policy_loss(logp, old, torch.ones(1), torch.ones(1, 2), cfg, rollout_logprobs=rollout)
    assert loss.item() == pytest.approx(-0.9746645, abs=1e-6)
    assert m.tis_weight_mean.item() == pytest.approx(0.9746645, abs=1e-6)
    assert m.tis_clip_frac.item() == 0.5
    assert m.logprob_mismatch.item() == pytest.approx(0.65, abs=1e-6)  # (0.5 + 0.8) / 2
    # k3 of the gap: (e^0.5 - 1.5 + e^-0.8 - 0.2) / 2 = (0.1487213 + 0.2493290) / 2
    assert m.rollout_kl.item() == pytest.approx(0.1990251, abs=1e-6)
    loss.backward()
    torch.testing.assert_close(logp.grad, torch.tensor([[-1.5, -0.4493290]]) / 2)


def test_mismatch_is_logged_without_tis_and_tis_needs_rollout():
    old = torch.tensor([[-1.0, -1.0]])
    loss, m = policy_loss(old.clone(), old, torch.ones(1), torch.ones(1, 2), PolicyLossConfig(),
                          rollout_logprobs=torch.tensor([[-1.5, -0.2]]))
    assert loss.item() == pytest.approx(-1.0)  # not weighted
    assert m.logprob_mismatch.item() == pytest.approx(0.65, abs=1e-6) and m.tis_weight_mean is None
    with pytest.raises(ValueError, match="truncated_is"):
        policy_loss(old, old, torch.ones(1), torch.ones(1, 2),
                    PolicyLossConfig(truncated_is=TruncatedISConfig(enabled=True)))


def test_garbage_on_padding_does_not_leak():
    logp = torch.tensor([[-1.0, float("nan"), float("-inf")], [float("inf"), -2.0, float("nan")]],
                        requires_grad=True)
    mask = torch.tensor([[1, 0, 0], [0, 1, 0]], dtype=torch.bool)
    cfg = PolicyLossConfig(kl=KLConfig(coef=0.1, estimator="k2"))
    ref = torch.full((2, 3), float("nan"))
    ref[0, 0], ref[1, 1] = -1.0, -2.0
    loss, m = policy_loss(logp, None, torch.tensor([1.0, -1.0]), mask, cfg, ref_logprobs=ref,
                          rollout_logprobs=ref)
    assert torch.isfinite(loss) and all(math.isfinite(v) for v in m.as_dict().values())
    loss.backward()
    assert torch.isfinite(logp.grad).all() and logp.grad[~mask].abs().max().item() == 0.0


def test_all_empty_batch_is_zero_not_nan():
    logp = torch.randn(2, 3, requires_grad=True)
    loss, m = policy_loss(logp, None, torch.ones(2), torch.zeros(2, 3), PolicyLossConfig())
    assert loss.item() == 0.0 and m.num_seqs.item() == 0
    loss.backward()
    assert logp.grad.abs().max().item() == 0.0


@pytest.mark.parametrize("kwargs, match", [
    (dict(logprobs=torch.zeros(2, 3), mask=torch.ones(2, 4)), r"\[B, T\]"),
    (dict(advantages=torch.ones(3)), "advantages"),
    (dict(old_logprobs=torch.zeros(2, 4)), "old_logprobs"),
])
def test_shape_errors(kwargs, match):
    args = dict(logprobs=torch.zeros(2, 3), old_logprobs=None, advantages=torch.ones(2),
                mask=torch.ones(2, 3), cfg=PolicyLossConfig())
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        policy_loss(**args)


def test_metrics_as_dict_are_floats():
    logp, old, mask = _clip_batch()
    _, m = policy_loss(logp, old, torch.tensor([1.0, -1.0]), mask, PolicyLossConfig())
    d = m.as_dict()
    assert {"loss", "pg_loss", "kl_loss", "ratio_mean", "clip_frac_low", "clip_frac_high"} <= set(d)
    assert all(isinstance(v, float) for v in d.values())
