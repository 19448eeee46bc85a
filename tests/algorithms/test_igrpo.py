"""iGRPO on the path training runs: ``TwoStageRollout`` -> ``build_train_batch`` -> ``policy_loss``.

The engine is scripted (tests/helpers/scripted_rollout.py): it implements the rollout-engine
interface and returns completions chosen here; rewards are the training ones (math-verify + format,
weight 1 each: a right answer scores 2, a wrong formatted one 1, no answer 0). K = 2 rounds,
N = 3 drafts, G = 2 refinements:

    prompt (gold)   drafts (round 0)         round 1          round 2
    P0 (5)          none right wrong  0 2 1  right none 2 0  right right 2 2
    P1 (7)          none none  none   0 0 0  none  right 0 2  none  none  0 0
    P2 (9)          right none none   2 0 0  none  none  0 0  right none  2 0

Selection 'best', tie-break 'first'. The tag [p r c] in a completion says which one a prompt shows.
"""

from __future__ import annotations

import math

import pytest
import torch

from igrpo_megatron.algorithms import LOSS_VARIANTS, policy_loss, with_variant
from igrpo_megatron.config.algorithm import AlgorithmConfig
from igrpo_megatron.config.schema import RecipeConfig
from igrpo_megatron.training.loop import build_train_batch
from tests.helpers.scripted_rollout import (
    RUN_SEED,
    STEP,
    ScriptedEngine,
    problems,
    run_step,
    seed_table,
    table_script,
    tag_of,
)

GOLDS = [5, 7, 9]
KINDS = {
    (0, 0): ["none", "right", "wrong"], (0, 1): ["right", "none"], (0, 2): ["right", "right"],
    (1, 0): ["none", "none", "none"], (1, 1): ["none", "right"], (1, 2): ["none", "none"],
    (2, 0): ["right", "none", "none"], (2, 1): ["none", "none"], (2, 2): ["right", "none"],
}


def algorithm(policy: str = "keep", rounds: int = 2, train_on: str = "all") -> AlgorithmConfig:
    alg = AlgorithmConfig()
    cfg = alg.igrpo
    cfg.num_drafts, cfg.num_refinements, cfg.num_rounds, cfg.train_on_rounds = 3, 2, rounds, train_on
    cfg.grpo_equivalent_budget = 3 + 2 * rounds
    cfg.selection.all_zero_policy = policy
    assert alg.errors() == []
    return alg


def rollout(fmt, rewards, alg, num_prompts):
    seeds = seed_table(RUN_SEED, STEP, num_prompts, alg.igrpo.num_rounds)
    engine = ScriptedEngine(fmt.tokenizer, table_script(KINDS, GOLDS, seeds))
    batch = run_step(engine, fmt, rewards, alg, problems(GOLDS[:num_prompts]))
    return batch, engine, seeds


def shown(batch, prompt: int, round_index: int) -> tuple[int, int, int] | None:
    """Tag of the completion that prompt's round-k refinements were conditioned on (None: plain prompt)."""
    group = next(g for g in batch.groups if (g.prompt_index, g.stage, g.round) == (prompt, "refine", round_index))
    sources = {batch.samples[i].draft_source for i in group.members}
    assert len(sources) == 1  # one prompt per group
    (src,) = sources
    return None if src is None else tag_of(batch.samples[src].text)


def trained(batch):
    return [(g.prompt_index, g.stage, g.round) for g in batch.training_groups()]


@pytest.mark.parametrize("train_on", ["all", "last"])
def test_two_rounds_condition_on_the_best_of_the_previous_round(fmt, rewards, train_on):
    batch, engine, seeds = rollout(fmt, rewards, algorithm(train_on=train_on), 2)
    # round 1: P0's best draft is c1 (2); P1's drafts all score 0 ('keep'): the tie goes to c0.
    assert shown(batch, 0, 1) == (0, 0, 1) and shown(batch, 1, 1) == (1, 0, 0)
    # round 2 conditions on round 1: P0 [2, 0] -> c0; P1 [0, 2] -> c1.
    assert shown(batch, 0, 2) == (0, 1, 0) and shown(batch, 1, 2) == (1, 1, 1)
    for req in engine.requests:
        p, k = seeds[req.seed]
        if k > 0:  # the prompt really shows that completion, without its reasoning
            assert f"[p{p} r{k - 1} c{shown(batch, p, k)[2]}]" in req.text and "scratchwork" not in req.text
    assert sorted((seeds[r.seed], r.n) for r in engine.requests) == [
        ((p, k), 3 if k == 0 else 2) for p in range(2) for k in range(3)]
    assert [s.reward for s in batch.samples if s.prompt_index == 0] == [0, 2, 1, 2, 0, 2, 2]
    if train_on == "all":
        assert trained(batch) == [(0, "refine", 1), (0, "refine", 2), (1, "refine", 1), (1, "refine", 2)]
    else:
        assert trained(batch) == [(0, "refine", 2), (1, "refine", 2)]
    # what the trainer gets: 2 sequences per trained group, advantages normalised within each group
    train_batch, m = build_train_batch(batch, RecipeConfig(algorithm=algorithm(train_on=train_on)))
    assert len(train_batch) == 2 * len(batch.training_groups())
    for gid in {s.group for s in train_batch.sequences}:
        adv = [s.advantage for s in train_batch.sequences if s.group == gid]
        assert sum(adv) == pytest.approx(0.0, abs=1e-6)


def test_step_metrics_by_hand(fmt, rewards):
    m = rollout(fmt, rewards, algorithm(), 2)[0].metrics
    assert m["draft_reward_mean"] == pytest.approx(0.5)  # (0 + 2 + 1 + 0 + 0 + 0) / 6
    assert m["best_draft_reward_mean"] == pytest.approx(1.0)  # (2 + 0) / 2
    assert m["selected_draft_reward_mean"] == pytest.approx(1.0)
    assert m["all_zero_rate"] == 0.5 and m["selection_tie_rate"] == 0.5  # P1: all drafts tied at 0
    assert m["draft/accuracy"] == pytest.approx(1 / 6)
    # round 1: P0 [2, 0] vs its draft's 2 -> 0 beat, 1 tie; P1 [0, 2] vs 0 -> 1 beat, 1 tie
    assert m["beats_draft_rate"] == 0.25 and m["ties_draft_rate"] == 0.5 and m["uniform_group_rate"] == 0.0
    assert m["refinement_reward_mean"] == 1.0 and m["conditioning_reward_mean"] == 1.0
    assert m["round1/beats_draft_rate"] == 0.25
    # round 2: P0 [2, 2] vs 2 -> 2 ties; P1 [0, 0] vs 2 -> 2 losses; both groups uniform
    assert m["round2/beats_draft_rate"] == 0.0 and m["round2/ties_draft_rate"] == 0.5
    assert m["round2/uniform_group_rate"] == 1.0 and m["round2/conditioning_reward_mean"] == 2.0
    assert m["draft_dropped_rate"] == 0.0 and m["skipped_rate"] == 0.0 and m["no_draft_rate"] == 0.0


@pytest.mark.parametrize("train_on", ["all", "last"])
def test_skip_policy_trains_the_group_it_stops_at(fmt, rewards, train_on):
    batch, engine, seeds = rollout(fmt, rewards, algorithm("skip", train_on=train_on), 3)
    # P1's drafts all score 0: no refinement, its drafts are its GRPO group. P2's round 1 scores
    # [0, 0]: no round 2, its round-1 group is its last one (trained under 'last' too).
    assert sorted(seeds[r.seed] for r in engine.requests) == [(0, 0), (0, 1), (0, 2), (1, 0), (2, 0), (2, 1)]
    if train_on == "all":
        assert trained(batch) == [(0, "refine", 1), (0, "refine", 2), (1, "draft", 0), (2, "refine", 1)]
    else:
        assert trained(batch) == [(0, "refine", 2), (1, "draft", 0), (2, "refine", 1)]
    m = batch.metrics
    assert m["skipped_rate"] == pytest.approx(1 / 3) and m["all_zero_rate"] == pytest.approx(1 / 3)
    # round 1 refined P0 ([2, 0] vs 2) and P2 ([0, 0] vs 2): 0 beats, 1 tie of 4; round 2 only P0
    assert m["round1/num_refined_prompts"] == 2 and m["round1/ties_draft_rate"] == 0.25
    assert m["round2/num_refined_prompts"] == 1 and m["round2/ties_draft_rate"] == 1.0


def test_no_draft_policy_refines_from_the_plain_prompt(fmt, rewards):
    batch, engine, seeds = rollout(fmt, rewards, algorithm("no_draft"), 3)
    plain = {p: fmt.encode_problem(r.problem) for p, r in enumerate(problems(GOLDS))}
    by_round = {seeds[r.seed]: r for r in engine.requests}
    # P1 (drafts all 0) in round 1 and P2 (round 1 all 0) in round 2 get the plain prompt, as ids.
    assert by_round[(1, 1)].prompt_ids == plain[1] and shown(batch, 1, 1) is None
    assert by_round[(2, 2)].prompt_ids == plain[2] and shown(batch, 2, 2) is None
    # the others show a completion: P1's round 2 its round-1 best (c1), P2's round 1 its best draft (c0)
    assert shown(batch, 1, 2) == (1, 1, 1) and shown(batch, 2, 1) == (2, 0, 0) and shown(batch, 0, 1) == (0, 0, 1)
    m = batch.metrics
    assert m["no_draft_rate"] == pytest.approx(1 / 3) and m["skipped_rate"] == 0.0
    assert m["draft_dropped_rate"] == 0.0  # a policy's plain prompt is not a draft that did not fit
    # round 1 compares only prompts that showed a draft: P0 [2, 0] vs 2 (1 tie), P2 [0, 0] vs 2 (none)
    assert m["beats_draft_rate"] == 0.0 and m["ties_draft_rate"] == 0.25
    # ... but every refined group counts in the mean and the uniform rate: (2+0 + 0+2 + 0+0) / 6
    assert m["refinement_reward_mean"] == pytest.approx(4 / 6) and m["uniform_group_rate"] == pytest.approx(1 / 3)
    assert trained(batch) == [(p, "refine", k) for p in range(3) for k in (1, 2)]


def test_nothing_refined_gives_nan_rates_not_zero(fmt, rewards):
    alg = algorithm("skip", rounds=1)
    seeds = seed_table(RUN_SEED, STEP, 1, 1)
    engine = ScriptedEngine(fmt.tokenizer, table_script({(0, 0): ["none"] * 3}, GOLDS, seeds))
    batch = run_step(engine, fmt, rewards, alg, problems(GOLDS[:1]))
    assert len(engine.requests) == 1 and trained(batch) == [(0, "draft", 0)]
    assert math.isnan(batch.metrics["beats_draft_rate"]) and batch.metrics["num_refined_prompts"] == 0


@pytest.mark.parametrize("variant", sorted(LOSS_VARIANTS))
def test_every_loss_runs_unchanged_under_the_wrapper(fmt, rewards, variant):
    alg = with_variant(algorithm(rounds=1), variant, max_length=64)
    assert alg.errors() == []
    batch, _, _ = rollout(fmt, rewards, alg, 2)
    train_batch, _ = build_train_batch(batch, RecipeConfig(algorithm=alg))
    seqs = train_batch.sequences  # [B = 2 groups x G = 2]
    assert len(seqs) == 4 and {s.group for s in seqs} == {0, 1}
    adv = torch.tensor([s.advantage for s in seqs])  # [B]
    t = max(len(s.completion_ids) for s in seqs)
    mask = torch.tensor([[i < len(s.completion_ids) for i in range(t)] for s in seqs])  # [B, T]
    torch.manual_seed(0)
    logp = (-torch.rand(len(seqs), t)).requires_grad_(True)  # [B, T]
    loss, metrics = policy_loss(logp, None, adv, mask, alg.loss)
    loss.backward()
    assert torch.isfinite(loss) and metrics.num_seqs.item() == 4
    # the rewarded refinement (A > 0) is pushed up, the unrewarded one down
    best, worst = int(adv.argmax()), int(adv.argmin())
    assert adv[best] > 0 > adv[worst]
    assert (logp.grad[best][mask[best]] < 0).all() and (logp.grad[worst][mask[worst]] > 0).all()
