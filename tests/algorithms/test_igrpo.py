"""iGRPO wrapper: budget check, K refinement rounds, per-step metrics, and every loss under it."""

import logging
import math
import re

import pytest
import torch

from igrpo_megatron.algorithms import (
    LOSS_VARIANTS,
    check_budget,
    group_advantages,
    policy_loss,
    run_igrpo_rollout,
    with_variant,
)
from igrpo_megatron.config.algorithm import AlgorithmConfig, DraftSelectionConfig, IGRPOConfig

# A scripted "model": completion j of problem p in round k (0 = drafts) is the text
# "<think>scratch</think>p{p}-r{k}-{j}". generate() reads p from the prompt and k from the draft
# shown in it, so the test sees exactly which draft each round conditioned on.
REWARDS = {
    # drafts (N = 3)                        round 1 (G = 2)       round 2 (G = 2)
    0: {0: [0.0, 1.0, 0.5], 1: [1.0, 0.0], 2: [1.0, 1.0]},
    1: {0: [0.0, 0.0, 0.0], 1: [0.0, 1.0], 2: [0.0, 0.0]},
}
PROBLEMS = ["problem 0", "problem 1"]
SEEN_PROMPTS: list[str] = []


def generate(prompts, n):
    out = []
    for q in prompts:
        SEEN_PROMPTS.append(q)
        p = int(re.search(r"problem (\d)", q).group(1))
        shown = re.search(r"p\d-r(\d)-\d", q)
        k = 0 if shown is None else int(shown.group(1)) + 1
        out.append([f"<think>scratch</think>p{p}-r{k}-{j}" for j in range(n)])
    return out


def score(ids, completions):
    rows = []
    for p, comps in zip(ids, completions, strict=True):
        k = int(re.search(r"-r(\d)-", comps[0]).group(1))
        rows.append([REWARDS[p][k][int(c.rsplit("-", 1)[1])] for c in comps])
    return torch.tensor(rows)


def _cfg(policy="keep", rounds=2):
    return IGRPOConfig(num_drafts=3, num_refinements=2, num_rounds=rounds, grpo_equivalent_budget=3 + 2 * rounds,
                       selection=DraftSelectionConfig(all_zero_policy=policy))


def test_two_rounds_condition_on_the_best_of_the_previous_round():
    SEEN_PROMPTS.clear()
    out = run_igrpo_rollout(PROBLEMS, generate, score, _cfg())
    # round 1: p0's best draft is j=1 (reward 1); p1's drafts are all 0 -> tie -> j=0
    r1 = {g.problem_id: g.prompt for g in out.rounds[0]}
    assert "p0-r0-1" in r1[0] and "p1-r0-0" in r1[1]
    assert "<think>" not in r1[0] and "Earlier attempt" in r1[0]  # stripped, default template
    # round 2: p0's round-1 best is j=0 ([1, 0]); p1's is j=1 ([0, 1])
    r2 = {g.problem_id: g.prompt for g in out.rounds[1]}
    assert "p0-r1-0" in r2[0] and "p1-r1-1" in r2[1]
    assert len(SEEN_PROMPTS) == 2 + 2 + 2  # drafts, round 1, round 2


def test_step_metrics_by_hand():
    m = run_igrpo_rollout(PROBLEMS, generate, score, _cfg()).metrics
    assert m.draft_reward_mean == pytest.approx(0.25)  # (0 + 1 + 0.5 + 0 + 0 + 0) / 6
    assert m.best_draft_reward_mean == pytest.approx(0.5)  # (1 + 0) / 2
    assert m.selected_draft_reward_mean == pytest.approx(0.5)
    assert m.all_zero_rate == 0.5 and m.selection_tie_rate == 0.5  # p1: all drafts tied at 0
    r1, r2 = m.rounds
    # round 1: p0 [1, 0] vs draft 1 -> 0 beat, 1 tie; p1 [0, 1] vs draft 0 -> 1 beat, 1 tie
    assert r1.refinement_reward_mean == 0.5 and r1.conditioning_reward_mean == 0.5
    assert r1.beats_draft_rate == 0.25 and r1.ties_draft_rate == 0.5 and r1.uniform_group_rate == 0.0
    # round 2: p0 [1, 1] vs 1 -> 2 ties; p1 [0, 0] vs 1 -> 2 losses; both groups uniform
    assert r2.beats_draft_rate == 0.0 and r2.ties_draft_rate == 0.5 and r2.uniform_group_rate == 1.0
    d = m.as_dict()
    assert d["beats_draft_rate"] == 0.25 and d["round2/uniform_group_rate"] == 1.0
    assert d["round1/refinement_reward_mean"] == 0.5


def test_training_groups():
    out = run_igrpo_rollout(PROBLEMS, generate, score, _cfg())
    assert [(g.problem_id, g.round) for g in out.training_groups("all")] == [(0, 1), (1, 1), (0, 2), (1, 2)]
    assert [(g.problem_id, g.round) for g in out.training_groups("last")] == [(0, 2), (1, 2)]


def test_skip_policy_trains_plain_grpo_on_the_drafts():
    out = run_igrpo_rollout(PROBLEMS, generate, score, _cfg("skip"))
    assert [g.problem_id for g in out.rounds[0]] == [0]  # p1's drafts were all zero
    assert [(g.problem_id, g.round) for g in out.training_groups("all")] == [(1, 0), (0, 1), (0, 2)]
    assert [(g.problem_id, g.round) for g in out.training_groups("last")] == [(0, 2), (1, 0)]
    m = out.metrics
    assert m.skipped_rate == 0.5
    # round 1 only p0: [1, 0] vs 1 -> 0 beats, 1 tie of 2
    assert m.rounds[0].num_refined_prompts == 1 and m.rounds[0].ties_draft_rate == 0.5


def test_no_draft_policy_refines_from_the_plain_prompt():
    out = run_igrpo_rollout(PROBLEMS, generate, score, _cfg("no_draft", rounds=1))
    p1 = [g for g in out.rounds[0] if g.problem_id == 1][0]
    assert p1.prompt == "problem 1"
    m = out.metrics
    assert m.no_draft_rate == 0.5
    # only p0 is compared with a draft: [1, 0] vs 1 -> beats 0, ties 1/2
    assert m.rounds[0].beats_draft_rate == 0.0 and m.rounds[0].ties_draft_rate == 0.5
    # p1's plain-prompt completions read as drafts to the script (r0, rewards [0, 0]):
    # mean over both groups (1 + 0 + 0 + 0) / 4; p1's group is uniform
    assert m.rounds[0].refinement_reward_mean == 0.25 and m.rounds[0].uniform_group_rate == 0.5


def test_no_refined_prompt_gives_nan_rates_not_zero():
    all_zero = {"p": [[0.0, 0.0, 0.0]]}
    out = run_igrpo_rollout(["problem 0"], lambda q, n: [[f"x{j}" for j in range(n)] for _ in q],
                            lambda ids, c: torch.tensor(all_zero["p"]), _cfg("skip", rounds=1))
    assert out.rounds == [[]] and math.isnan(out.metrics.rounds[0].beats_draft_rate)


def test_check_budget(caplog):
    assert check_budget(IGRPOConfig()) == 8
    with pytest.raises(ValueError, match=r"algorithm\.igrpo\.grpo_equivalent_budget"):
        check_budget(IGRPOConfig(num_drafts=2))
    with caplog.at_level(logging.WARNING):
        assert check_budget(IGRPOConfig(num_drafts=2, allow_budget_mismatch=True)) == 6
    assert "matched GRPO budget is 8" in caplog.text


def test_generate_contract_is_checked():
    with pytest.raises(ValueError, match="completions for each"):
        run_igrpo_rollout(PROBLEMS, lambda q, n: [["only one"]] * len(q), score, _cfg())


@pytest.mark.parametrize("variant", sorted(LOSS_VARIANTS))
def test_every_loss_runs_unchanged_under_the_wrapper(variant):
    cfg = with_variant(AlgorithmConfig(), variant, max_length=6)
    cfg.igrpo = _cfg(rounds=1)
    cfg.validate()
    groups = run_igrpo_rollout(PROBLEMS, generate, score, cfg.igrpo).training_groups(cfg.igrpo.train_on_rounds)
    rewards = torch.stack([g.rewards for g in groups])  # [2 groups, G = 2]
    adv, _ = group_advantages(rewards, normalize_by_std=cfg.advantage.normalize_by_std)
    adv = adv.reshape(-1)  # [B = 4]
    torch.manual_seed(0)
    logp = (-torch.rand(4, 6)).requires_grad_(True)  # [B, T]
    mask = torch.ones(4, 6, dtype=torch.bool)
    mask[1, 4:] = False
    loss, metrics = policy_loss(logp, None, adv, mask, cfg.loss)
    loss.backward()
    assert torch.isfinite(loss) and metrics.num_seqs.item() == 4
    # the rewarded refinement (A > 0) is pushed up, the unrewarded one down
    best, worst = int(adv.argmax()), int(adv.argmin())
    assert (logp.grad[best][mask[best]] < 0).all() and (logp.grad[worst][mask[worst]] > 0).all()
