"""A scripted rollout engine and completion texts for tests of the training rollout path (no vLLM).

:class:`ScriptedEngine` implements ``igrpo_megatron.rollout.interfaces.RolloutEngine``: the test
decides every completion's text; token ids come from the real tokenizer, so lengths, prompt
budgets and provenance are those of a real run. The vLLM path itself is tested against the real
sidecar (tests/rollout/test_two_stage*.py).

Completion texts (:func:`completion`) carry a tag ``[p<prompt> r<round> c<index>]`` after the
answer, so a refinement prompt shows which completion it was conditioned on even after its
reasoning is stripped. Which prompt and round a request is for is read from its sampling seed
(:func:`seed_table`), so plain-prompt fallbacks are recognised too.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from igrpo_megatron.config.algorithm import AlgorithmConfig
from igrpo_megatron.data.datasets import PromptRecord
from igrpo_megatron.data.prompts import PromptFormatter
from igrpo_megatron.rewards.registry import RewardFunctions
from igrpo_megatron.rollout.interfaces import Completion, CompletionGroup, SamplingParams
from igrpo_megatron.rollout.two_stage import RolloutBatch, TwoStageRollout, request_seed

RUN_SEED, STEP = 3, 0

TAG = re.compile(r"\[p(\d+) r(\d+) c(\d+)\]")


def completion(prompt: int, round_index: int, index: int, kind: str, gold: int, filler: int = 1) -> str:
    """A completion the default reward (math-verify + format, weight 1 each) scores as:

    'right' 2 (correct answer, formatted), 'wrong' 1 (formatted, answer gold + 1), 'none' 0 (no
    answer block). ``filler`` repeats the reasoning words, to make a completion longer in tokens.
    """
    think = "<think>" + " ".join(["scratchwork"] * filler) + "</think>"
    tag = f"[p{prompt} r{round_index} c{index}]"
    if kind == "right":
        return f"{think}<answer>{gold}</answer> {tag}"
    if kind == "wrong":
        return f"{think}<answer>{gold + 1}</answer> {tag}"
    if kind == "none":
        return f"{think} no answer {tag}"
    raise ValueError(f"unknown completion kind {kind!r}")


def seed_table(run_seed: int, step: int, num_prompts: int, num_rounds: int) -> dict[int, tuple[int, int]]:
    """request seed -> (prompt index, round) for every request a step of TwoStageRollout sends."""
    table = {request_seed(run_seed, step, p, "draft", 0): (p, 0) for p in range(num_prompts)}
    table.update({request_seed(run_seed, step, p, "refine", k): (p, k)
                  for p in range(num_prompts) for k in range(1, num_rounds + 1)})
    if len(table) != num_prompts * (num_rounds + 1):
        raise AssertionError("two requests of the step share a seed")
    return table


@dataclass
class Request:
    prompt_ids: list[int]
    text: str  # the decoded prompt, chat template included
    n: int
    seed: int | None


@dataclass
class ScriptedEngine:
    """``script(prompt_text, n, seed) -> n completion texts``; log-probs are -1 per token."""

    tokenizer: object
    script: Callable[[str, int, int | None], list[str]]
    requests: list[Request] = field(default_factory=list)
    policy_version: int = 0

    async def generate(self, prompts: Sequence[Sequence[int]], sampling: SamplingParams | None = None,
                       seeds: Sequence[int | None] | None = None) -> list[CompletionGroup]:
        sampling = sampling or SamplingParams()
        seeds = list(seeds) if seeds is not None else [None] * len(prompts)
        groups = []
        for ids, seed in zip(prompts, seeds, strict=True):
            text = self.tokenizer.decode(list(ids))
            self.requests.append(Request(list(ids), text, sampling.n, seed))
            texts = self.script(text, sampling.n, seed)
            comps = []
            for t in texts:
                tokens = list(self.tokenizer(t, add_special_tokens=False)["input_ids"])
                comps.append(Completion(tokens, [-1.0] * len(tokens), t, "stop", None, self.policy_version))
            groups.append(CompletionGroup(list(ids), comps, self.policy_version))
        return groups


def table_script(kinds: dict[tuple[int, int], list[str]], golds: Sequence[int], seeds: dict[int, tuple[int, int]],
                 fillers: dict[tuple[int, int, int], int] | None = None) -> Callable[[str, int, int | None], list[str]]:
    """A script from ``kinds[(prompt, round)]`` (one kind per completion, see :func:`completion`)."""
    fillers = fillers or {}

    def script(text: str, n: int, seed: int | None) -> list[str]:
        p, k = seeds[seed]
        row = kinds[(p, k)]
        if len(row) != n:
            raise AssertionError(f"prompt {p} round {k}: {n} completions requested, the script has {len(row)}")
        return [completion(p, k, j, kind, golds[p], fillers.get((p, k, j), 1)) for j, kind in enumerate(row)]

    return script


def problems(golds: Sequence[int]) -> list[PromptRecord]:
    """One prompt per gold answer (what the scripts above answer; the reward checks against ``gold``)."""
    return [PromptRecord(f"Problem {p}: add one to {g - 1}.", str(g)) for p, g in enumerate(golds)]


def run_step(engine: ScriptedEngine, fmt: PromptFormatter, rewards: RewardFunctions, alg: AlgorithmConfig,
             records: Sequence[PromptRecord], *, max_prompt_length: int = 4096, run_seed: int = RUN_SEED,
             step: int = STEP) -> RolloutBatch:
    """One step of the training rollout (``TwoStageRollout.run``) with the training and draft rewards."""
    runner = TwoStageRollout(engine, fmt, rewards.train, alg, SamplingParams(max_tokens=64),
                             max_prompt_length=max_prompt_length, run_seed=run_seed, draft_reward=rewards.draft)
    try:
        return asyncio.run(runner.run(records, step))
    finally:
        runner.close()


def tag_of(text: str) -> tuple[int, int, int]:
    """(prompt, round, index) of the completion a text shows or is; the last tag wins."""
    found = TAG.findall(text)
    if not found:
        raise AssertionError(f"no completion tag in {text!r}")
    return tuple(int(x) for x in found[-1])
