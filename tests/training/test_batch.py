"""Cutting a TrainBatch: DP shards balanced by tokens, micro-batches by a token budget, alignment."""

import pytest
import torch

from igrpo_megatron.training.batch import (
    Sequence,
    TrainBatch,
    build_micro_batch,
    completion_values,
    plan_micro_batches,
    shard_for_rank,
)


def test_micro_batches_respect_the_token_budget():
    # lengths 5, 5, 9, 3 with budget 12: [5, 5] (2 x 5 = 10), [9] (2 x 9 = 18 > 12), [3 joins 9? 2 x 9 = 18] -> alone
    assert plan_micro_batches([5, 5, 9, 3], 12) == [[0, 1], [2], [3]]
    assert plan_micro_batches([20], 12) == [[0]]  # too long for the budget: alone
    assert plan_micro_batches([3, 3, 3, 3], 12) == [[0, 1, 2, 3]]


def test_dp_shards_cover_everything_once_and_balance_tokens():
    seqs = [Sequence([1] * p, [2] * c, 0.0) for p, c in [(3, 9), (2, 2), (4, 4), (1, 1), (5, 6), (2, 3)]]
    batch = TrainBatch(seqs)
    shards = [shard_for_rank(batch, r, 2) for r in range(2)]
    assert sorted(shards[0] + shards[1]) == list(range(6))
    loads = [sum(seqs[i].length for i in s) for s in shards]
    assert abs(loads[0] - loads[1]) <= max(s.length for s in seqs)


def test_alignment_of_targets_mask_and_logprobs():
    s = Sequence(prompt_ids=[10, 11, 12], completion_ids=[20, 21], advantage=0.5, rollout_logprobs=[-1.0, -2.0])
    batch = TrainBatch([s, Sequence([7], [8, 9, 30], -1.0, rollout_logprobs=[-0.1, -0.2, -0.3])],
                       old_logprobs=[torch.tensor([-1.5, -2.5]), torch.tensor([-0.5, -0.6, -0.7])])
    mb = build_micro_batch(batch, [0, 1])
    # Sequence 0: tokens 10 11 12 20 -> targets 11 12 20 21; completion targets at positions 2 and 3.
    assert mb.tokens[0].tolist() == [10, 11, 12, 20] and mb.targets[0].tolist() == [11, 12, 20, 21]
    assert mb.loss_mask[0].tolist() == [False, False, True, True]
    assert mb.rollout_logprobs[0].tolist() == [0.0, 0.0, -1.0, -2.0]
    assert mb.old_logprobs[1].tolist() == pytest.approx([-0.5, -0.6, -0.7, 0.0])
    assert mb.loss_mask[1].tolist() == [True, True, True, False]  # right padding is masked
    back = completion_values(mb, mb.old_logprobs)
    assert back[0].tolist() == [-1.5, -2.5] and back[1].tolist() == pytest.approx([-0.5, -0.6, -0.7])
    assert mb.advantages.tolist() == [0.5, -1.0]
