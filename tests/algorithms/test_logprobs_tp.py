"""Vocab-parallel log-probs and entropy on 2 and 4 gloo ranks against log_softmax on full logits."""

import pytest
import torch

from tests.helpers.distributed import run_on_ranks

B, T, V = 2, 5, 24  # V divides by 2 and 4
REAL_V = 22  # the last shard holds 2 padding columns
TEMPERATURE = 0.7


def _inputs():
    g = torch.Generator().manual_seed(1234)
    logits = 4 * torch.randn(B, T, V, generator=g)
    targets = torch.randint(0, REAL_V, (B, T), generator=g)
    g_lp, g_h = torch.randn(B, T, generator=g), torch.randn(B, T, generator=g)
    return logits, targets, g_lp, g_h


def _shard_run(logits, targets, g_lp, g_h, group, tp_rank, tp):
    from igrpo_megatron.algorithms import vocab_parallel_logprobs_and_entropy

    v_local = V // tp
    shard = logits[..., tp_rank * v_local:(tp_rank + 1) * v_local].clone().requires_grad_(True)
    logp, ent = vocab_parallel_logprobs_and_entropy(shard, targets, group=group, temperature=TEMPERATURE,
                                                    vocab_size=REAL_V, chunk_size=3)
    ((logp * g_lp).sum() + (ent * g_h).sum()).backward()
    # plain lists: tensors sent through the result queue would share memory with an exited process
    return logp.tolist(), ent.tolist(), shard.grad.tolist()


def _body(rank, world_size):
    import torch.distributed as dist

    logits, targets, g_lp, g_h = _inputs()  # identical on every rank
    out = {"world": _shard_run(logits, targets, g_lp, g_h, dist.group.WORLD, rank, world_size)}
    if world_size == 4:  # two TP=2 groups side by side: {0, 1} and {2, 3}
        groups = [dist.new_group([0, 1]), dist.new_group([2, 3])]
        out["pairs"] = _shard_run(logits, targets, g_lp, g_h, groups[rank // 2], rank % 2, 2)
    return out


def _reference():
    logits, targets, g_lp, g_h = _inputs()
    logits.requires_grad_(True)
    logp_all = torch.log_softmax(logits[..., :REAL_V] / TEMPERATURE, dim=-1)
    logp = logp_all.gather(-1, targets[..., None]).squeeze(-1)
    ent = -(logp_all.exp() * logp_all).sum(-1)
    ((logp * g_lp).sum() + (ent * g_h).sum()).backward()
    return logp.detach(), ent.detach(), logits.grad


# 1e-6 absolute, plus 1e-6 relative: log-probs here reach -25, where one fp32 ulp is 1.9e-6.
TOL = dict(atol=1e-6, rtol=1e-6)


def _check(results, tp):
    ref_lp, ref_h, ref_grad = _reference()
    assert len(results) == tp
    for logp, ent, _ in results:
        torch.testing.assert_close(torch.tensor(logp), ref_lp, **TOL)
        torch.testing.assert_close(torch.tensor(ent), ref_h, **TOL)
    grad = torch.cat([torch.tensor(r[2]) for r in results], dim=-1)  # shards side by side = the full gradient
    torch.testing.assert_close(grad, ref_grad, **TOL)
    assert grad[..., REAL_V:].abs().max().item() == 0.0


@pytest.mark.multiprocess
def test_tp2_matches_full_log_softmax():
    _check([r["world"] for r in run_on_ranks(_body, world_size=2)], tp=2)


@pytest.mark.multiprocess
def test_tp4_and_two_tp2_subgroups():
    results = run_on_ranks(_body, world_size=4)
    _check([r["world"] for r in results], tp=4)
    _check([r["pairs"] for r in results[:2]], tp=2)
    _check([r["pairs"] for r in results[2:]], tp=2)
