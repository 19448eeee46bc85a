"""Two-stage iGRPO rollouts against the vLLM sidecar, pipelined per prompt.

For each prompt: sample N drafts, score them, select one, build the draft-conditioned prompt,
sample G refinements, score them (and repeat for K rounds). Every prompt runs as its own task,
so a prompt's refinements are requested as soon as *its* drafts are scored, while other prompts
are still drafting: the two stages overlap instead of running one after the other.
``barrier=True`` runs Stage 1 for every prompt before any Stage 2 (for comparison only).
Plain GRPO is the same path with Stage 1 switched off (``algorithm.igrpo.enabled: false``).

DAPO's two additions act here. ``algorithm.overlong_penalty`` adds the soft length penalty to every
sample's reward as it is scored (drafts included, so selection sees the training reward).
``algorithm.dynamic_sampling`` drops trained groups whose rewards are all equal after the step's
prompts are rolled out, and rolls out more prompts (``more_prompts``) until the batch is full or the
bound on extra rounds is spent; dropped groups stay in the batch, untrained, so the logged rewards
and the completion budget count everything that was sampled.

This module knows nothing about Megatron: it returns a :class:`RolloutBatch` of token ids,
rollout log-probs, rewards, groups, stage, draft provenance and policy version.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, fields
from typing import TypeVar

import torch

from igrpo_megatron.algorithms.draft_selection import DraftSelection
from igrpo_megatron.algorithms.dynamic_sampling import (
    informative_groups,
    kept_prompts,
    needs_refill,
    select_groups,
)
from igrpo_megatron.algorithms.igrpo import igrpo_step_metrics, round_metrics, select_with_config
from igrpo_megatron.algorithms.overlong import overlong_penalty
from igrpo_megatron.config.algorithm import AlgorithmConfig
from igrpo_megatron.data.datasets import PromptRecord
from igrpo_megatron.data.prompts import PromptFormatter
from igrpo_megatron.rewards.interfaces import RewardFunction, RewardItem, RewardResult
from igrpo_megatron.rollout.interfaces import Completion, RolloutEngine, SamplingParams

logger = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass
class Sample:
    """One sampled completion with everything the trainer and the logs need."""

    prompt_index: int            # position of the problem in the step's batch
    stage: str                   # "draft" | "refine" | "grpo"
    round: int                   # 0 for drafts / GRPO, k for refinement round k
    prompt_ids: list[int]
    completion_ids: list[int]
    rollout_logprobs: list[float]
    text: str
    reward: float
    correct: bool
    policy_version: int
    finish_reason: str | None = None
    draft_source: int | None = None  # refinements: index of the conditioning sample in ``samples``
    length_penalty: float = 0.0  # algorithm.overlong_penalty's share of ``reward`` (<= 0)


@dataclass
class Group:
    """Completions of one prompt text: a candidate GRPO group (indices into ``RolloutBatch.samples``)."""

    prompt_index: int
    stage: str
    round: int
    members: list[int]
    trained: bool = False


@dataclass
class RolloutBatch:
    """What one rollout step produced."""

    samples: list[Sample]
    groups: list[Group]
    metrics: dict[str, float] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)

    def training_groups(self) -> list[Group]:
        return [g for g in self.groups if g.trained]

    @property
    def generated_tokens(self) -> int:
        return sum(len(s.completion_ids) for s in self.samples)


def request_seed(run_seed: int, step: int, prompt_index: int, stage: str, round_index: int) -> int:
    """A sampling seed that depends only on *what* is sampled, so resumed runs sample the same."""
    digest = hashlib.sha256(f"{run_seed}:{step}:{prompt_index}:{stage}:{round_index}".encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


def _concat_selections(rows: Sequence[DraftSelection]) -> DraftSelection:
    values = {f.name: (torch.cat([getattr(r, f.name) for r in rows]) if f.name != "rule" else rows[0].rule)
              for f in fields(DraftSelection)}
    return DraftSelection(**values)


class _BatchingScorer:
    """Scores the requests of many prompts in as few reward calls as possible, one call at a time.

    Requests that arrive while a call is running wait and are then scored together in the next call
    (one per reward function). Per-prompt requests would otherwise queue one call each: a call
    wakes the scoring thread and the math-verify worker and waits for their results, and on a busy
    machine (the engine decoding on the same cores) each wake-up costs far more than scoring a
    few items does, which staggered the Stage-2 starts of pipelined prompts by a call each.
    """

    def __init__(self) -> None:
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="reward")
        self._pending: list[tuple[RewardFunction, list[RewardItem], asyncio.Future]] = []
        self._drainer: asyncio.Task | None = None

    async def score(self, fn: RewardFunction, items: list[RewardItem]) -> RewardResult:
        future = asyncio.get_running_loop().create_future()
        self._pending.append((fn, items, future))
        if self._drainer is None or self._drainer.done():
            self._drainer = asyncio.ensure_future(self._drain())
        return await future

    async def _drain(self) -> None:
        loop = asyncio.get_running_loop()
        while self._pending:
            taken, self._pending = self._pending, []
            for fn in dict.fromkeys(f for f, _, _ in taken):  # each function once, in arrival order
                mine = [(items, fut) for f, items, fut in taken if f is fn and not fut.cancelled()]
                if not mine:
                    continue
                try:
                    scored = await loop.run_in_executor(self._executor, fn.score, [i for items, _ in mine for i in items])
                except Exception as exc:  # every waiting prompt sees the failure
                    for _, fut in mine:
                        if not fut.done():
                            fut.set_exception(exc)
                    continue
                start = 0
                for items, fut in mine:
                    end = start + len(items)
                    if not fut.done():
                        fut.set_result(RewardResult(scored.rewards[start:end], scored.info[start:end]))
                    start = end

    async def aclose(self) -> None:
        """Stop draining (a failed step leaves no task behind)."""
        if self._drainer is not None and not self._drainer.done():
            self._drainer.cancel()
            await asyncio.gather(self._drainer, return_exceptions=True)

    def close(self) -> None:
        self._executor.shutdown(wait=False)


class TwoStageRollout:
    """Runs one step's rollouts. ``reward`` scores Stage-2 (and GRPO) samples; ``draft_reward``
    (default: the same) scores drafts for selection."""

    def __init__(self, engine: RolloutEngine, formatter: PromptFormatter, reward: RewardFunction,
                 algorithm: AlgorithmConfig, sampling: SamplingParams, *, max_prompt_length: int,
                 run_seed: int, draft_reward: RewardFunction | None = None, barrier: bool = False):
        self.engine = engine
        self.fmt = formatter
        self.reward = reward
        self.draft_reward = draft_reward or reward
        self.alg = algorithm
        self.sampling = sampling
        self.max_prompt_length = max_prompt_length
        self.run_seed = run_seed
        self.barrier = barrier
        self._scorer = _BatchingScorer()

    def close(self) -> None:
        self._scorer.close()

    # ------------------------------------------------------------------ pieces
    async def _sample(self, prompt_ids: list[int], n: int, seed: int) -> list[Completion]:
        params = dataclasses.replace(self.sampling, n=n)
        (group,) = await self.engine.generate([prompt_ids], params, seeds=[seed])
        return list(group.completions)

    async def _score(self, fn: RewardFunction, record: PromptRecord, completions: list[Completion]) -> RewardResult:
        items = [RewardItem(problem=record.problem, gold=record.answer, completion=c.text) for c in completions]
        return await self._scorer.score(fn, items)

    def _add(self, out: list[Sample], completions: list[Completion], scored: RewardResult, *, index: int,
             stage: str, round_index: int, prompt_ids: list[int], source: int | None = None) -> list[int]:
        """Append the scored completions (reward shaped by the overlong penalty, when on); their indices."""
        first = len(out)
        penalties = self._length_penalties(completions)
        for c, r, info, pen in zip(completions, scored.rewards, scored.info, penalties, strict=True):
            out.append(Sample(index, stage, round_index, list(prompt_ids), list(c.token_ids), list(c.logprobs or []),
                              c.text, float(r) + pen, bool(info.correct), c.policy_version, c.finish_reason, source,
                              pen))
        return list(range(first, len(out)))

    def _length_penalties(self, completions: list[Completion]) -> list[float]:
        """``algorithm.overlong_penalty`` of each completion (0 when off); L_max is the sampling's max_tokens."""
        cfg = self.alg.overlong_penalty
        if not cfg.enabled:
            return [0.0] * len(completions)
        max_tokens = self.sampling.max_tokens
        return overlong_penalty([len(c.token_ids) for c in completions], max_tokens, cfg.buffer_tokens(max_tokens),
                                cfg.penalty_factor).tolist()

    def _refinement_ids(self, record: PromptRecord, draft_text: str) -> list[int] | None:
        """Token ids of q' within ``max_prompt_length`` (chat template included), or None when none of
        the draft fits: the server would reject the longer prompt and fail the whole step."""
        built = self.fmt.refinement(record.problem, draft_text, self.alg.igrpo.prompt, self.max_prompt_length)
        return None if built is None else built.ids

    # ---------------------------------------------------------------- prompts
    async def _grpo(self, index: int, record: PromptRecord, step: int, out: list[Sample], groups: list[Group]):
        ids = self.fmt.encode_problem(record.problem)
        comps = await self._sample(ids, self.alg.group_size, request_seed(self.run_seed, step, index, "grpo", 0))
        scored = await self._score(self.reward, record, comps)
        groups.append(Group(index, "grpo", 0, self._add(out, comps, scored, index=index, stage="grpo",
                                                        round_index=0, prompt_ids=ids), trained=True))

    async def _drafts(self, index: int, record: PromptRecord, step: int, out: list[Sample], groups: list[Group]):
        cfg = self.alg.igrpo
        ids = self.fmt.encode_problem(record.problem)
        comps = await self._sample(ids, cfg.num_drafts, request_seed(self.run_seed, step, index, "draft", 0))
        scored = await self._score(self.draft_reward, record, comps)
        members = self._add(out, comps, scored, index=index, stage="draft", round_index=0, prompt_ids=ids)
        group = Group(index, "draft", 0, members)
        groups.append(group)
        return group

    async def _refine(self, index: int, record: PromptRecord, step: int, drafts: Group, out: list[Sample],
                      groups: list[Group], selections: list[list[DraftSelection]]):
        cfg = self.alg.igrpo
        source = drafts
        for k in range(1, cfg.num_rounds + 1):
            rewards = torch.tensor([[out[i].reward for i in source.members]])  # [1, M]
            correct = torch.tensor([[out[i].correct for i in source.members]])
            lengths = torch.tensor([[len(out[i].completion_ids) for i in source.members]])
            sel = select_with_config(rewards, cfg.selection, correct_mask=correct, draft_lengths=lengths,
                                     seed=request_seed(self.run_seed, step, index, "select", k))
            selections[k - 1][index] = sel
            if not bool(sel.refine[0]):
                source.trained = True  # 'skip' policy: the drafts are this prompt's GRPO group
                return
            chosen = source.members[int(sel.indices[0])]
            ids = self._refinement_ids(record, out[chosen].text) if bool(sel.use_draft[0]) else None
            if ids is None:  # no draft to show, or no room for it: the plain prompt
                ids, chosen = self.fmt.encode_problem(record.problem), None
            comps = await self._sample(ids, cfg.num_refinements, request_seed(self.run_seed, step, index, "refine", k))
            scored = await self._score(self.reward, record, comps)
            members = self._add(out, comps, scored, index=index, stage="refine", round_index=k, prompt_ids=ids,
                                source=chosen)
            trained = cfg.train_on_rounds == "all" or k == cfg.num_rounds
            source = Group(index, "refine", k, members, trained=trained)
            groups.append(source)

    # ------------------------------------------------------------------- step
    async def run(self, records: Sequence[PromptRecord], step: int,
                  more_prompts: Callable[[int], Sequence[PromptRecord]] | None = None) -> RolloutBatch:
        """Rollouts for one step's prompts (GRPO or iGRPO, per the recipe).

        ``more_prompts(k)`` gives the prompts of dynamic sampling's extra round k (1, 2, ...); it must
        give the same prompts when asked again (a retried step samples what the first try did).
        None: dynamic sampling only drops groups. If any prompt fails, the others are cancelled and the
        first error is raised.
        """
        before = _request_counters(self.engine)
        try:
            batch = await self._run(records, step, more_prompts)
        except BaseException:
            await self._scorer.aclose()
            raise
        after = _request_counters(self.engine)
        # Resent requests cost time (and maybe a second generation): against a healthy server, 0.
        batch.metrics.update({f"rollout/{k}": float(after[k] - before[k]) for k in after})
        return batch

    async def _run(self, records: Sequence[PromptRecord], step: int,
                   more_prompts: Callable[[int], Sequence[PromptRecord]] | None) -> RolloutBatch:
        out: list[Sample] = []
        groups: list[Group] = []
        selections: list[list[DraftSelection | None]] = [[] for _ in range(self.alg.igrpo.num_rounds)]
        start = time.perf_counter()
        stage1 = await self._sample_prompts(records, 0, step, out, groups, selections)
        sampling: dict[str, float] = {}
        if self.alg.dynamic_sampling.enabled:
            sampling = await self._refill(len(records), step, out, groups, selections, more_prompts)
        batch = _ordered_batch(out, groups)
        batch.timings["rollout"] = time.perf_counter() - start
        batch.metrics.update(sampling)
        batch.metrics.update(_reward_metrics(batch))
        if self.alg.overlong_penalty.enabled:
            batch.metrics.update(_overlong_metrics(batch))
        if not self.alg.igrpo.enabled:
            return batch
        batch.timings["rollout_stage1"] = stage1
        batch.metrics.update(self._igrpo_metrics(batch, selections))
        if batch.metrics["draft_dropped_rate"] > 0:
            logger.warning("step %d: %.0f%% of refinement prompts had no room for their draft within "
                           "data.max_prompt_length = %d and were sampled from the plain prompt; raise it or lower "
                           "algorithm.igrpo.prompt.max_draft_tokens", step,
                           100 * batch.metrics["draft_dropped_rate"], self.max_prompt_length)
        return batch

    async def _sample_prompts(self, records: Sequence[PromptRecord], first: int, step: int, out: list[Sample],
                              groups: list[Group], selections: list[list[DraftSelection | None]]) -> float:
        """Roll out ``records`` as prompts ``first``, ``first + 1``, ... of the step (their sampling seeds);
        returns the Stage-1 time with ``barrier``, else NaN (the stages overlap: no Stage-1 boundary)."""
        indexed = list(enumerate(records, start=first))
        if not self.alg.igrpo.enabled:
            await _all_or_cancel(self._grpo(i, r, step, out, groups) for i, r in indexed)
            return float("nan")
        for per_prompt in selections:  # one slot per prompt of the step, filled by _refine
            per_prompt.extend([None] * len(indexed))

        async def one(i: int, r: PromptRecord, drafts: Group | None = None):
            drafts = drafts or await self._drafts(i, r, step, out, groups)
            await self._refine(i, r, step, drafts, out, groups, selections)

        if not self.barrier:
            await _all_or_cancel(one(i, r) for i, r in indexed)
            return float("nan")
        start = time.perf_counter()
        drafted = await _all_or_cancel(self._drafts(i, r, step, out, groups) for i, r in indexed)
        stage1 = time.perf_counter() - start
        await _all_or_cancel(one(i, r, d) for (i, r), d in zip(indexed, drafted, strict=True))
        return stage1

    async def _refill(self, target: int, step: int, out: list[Sample], groups: list[Group],
                      selections: list[list[DraftSelection | None]],
                      more_prompts: Callable[[int], Sequence[PromptRecord]] | None) -> dict[str, float]:
        """Dynamic sampling: more rounds of prompts until ``target`` prompts have a trained group whose
        rewards differ (or ``max_extra_rounds`` are spent); then untrain every other group."""
        cfg = self.alg.dynamic_sampling
        extra, first = 0, target

        def trained() -> tuple[list[Group], list[list[float]]]:
            picked = [g for g in groups if g.trained]
            return picked, [[out[i].reward for i in g.members] for g in picked]

        while more_prompts is not None:
            candidates, rewards = trained()
            kept = kept_prompts([g.prompt_index for g in candidates], informative_groups(rewards))
            if not needs_refill(len(kept), target, extra, cfg.max_extra_rounds):
                break
            extra += 1
            records = list(more_prompts(extra))
            await self._sample_prompts(records, first, step, out, groups, selections)
            first += len(records)
        candidates, rewards = trained()
        keep, metrics = select_groups(rewards, [g.prompt_index for g in candidates], target, extra)
        for group, trains in zip(candidates, keep, strict=True):
            group.trained = trains
        if metrics.short:
            logger.warning("step %d: dynamic sampling kept %d of %d prompts after %d extra round(s) "
                           "(algorithm.dynamic_sampling.max_extra_rounds = %d); training on what was gathered",
                           step, metrics.kept_prompts, target, extra, cfg.max_extra_rounds)
        return metrics.as_dict()

    def _igrpo_metrics(self, batch: RolloutBatch, selections) -> dict[str, float]:
        drafts = [g for g in batch.groups if g.stage == "draft"]
        draft_r = torch.tensor([[batch.samples[i].reward for i in g.members] for g in drafts])  # [P, N]
        stats = []
        wanted = dropped = 0  # refinement groups meant to show a draft, and those left without it
        for k, per_prompt in enumerate(selections, start=1):
            rows = [(p, s) for p, s in enumerate(per_prompt) if s is not None]
            if not rows:
                break
            sel = _concat_selections([s for _, s in rows])
            refined = {g.prompt_index: g for g in batch.groups if g.stage == "refine" and g.round == k}
            g_size = self.alg.igrpo.num_refinements
            r = torch.zeros(len(rows), g_size)
            for j, (p, _) in enumerate(rows):
                if p in refined:
                    r[j] = torch.tensor([batch.samples[i].reward for i in refined[p].members])
                    if bool(sel.use_draft[j]):
                        wanted += 1
                        dropped += batch.samples[refined[p].members[0]].draft_source is None
            stats.append(round_metrics(sel, r, k))
        first = _concat_selections([s for s in selections[0] if s is not None])
        metrics = igrpo_step_metrics(draft_r, first, stats).as_dict()
        metrics["draft_dropped_rate"] = dropped / wanted if wanted else 0.0  # no room in max_prompt_length
        return metrics


async def _all_or_cancel(coros: Iterable[Awaitable[T]]) -> list[T]:
    """``asyncio.gather``, except that the first failure cancels the other prompts' tasks.

    Plain ``gather`` would leave them running after the step has failed: they would keep sending
    requests (racing the caller's retry or a weight sync) and appending to the step's samples.
    The original exception is re-raised, so callers still see e.g. ``SidecarUnavailableError``.
    """
    tasks = [asyncio.ensure_future(c) for c in coros]
    try:
        return await asyncio.gather(*tasks)
    except BaseException:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise


def _ordered_batch(samples: list[Sample], groups: list[Group]) -> RolloutBatch:
    """The batch in a fixed order: groups by (prompt, round), samples group by group.

    Samples are appended in the order requests *finish*, which varies from run to run; the trainer
    cuts micro-batches from this order, so without it a resumed step would not be reproducible.
    Group members and ``draft_source`` are renumbered to the new positions.
    """
    groups = sorted(groups, key=lambda g: (g.prompt_index, g.round))
    new_index = {old: new for new, old in enumerate(i for g in groups for i in g.members)}
    if len(new_index) != len(samples):
        raise RuntimeError(f"{len(samples)} samples but {len(new_index)} belong to a group: a bug in the rollout.")
    ordered = [samples[old] for old in sorted(new_index, key=new_index.__getitem__)]
    for s in ordered:
        if s.draft_source is not None:
            s.draft_source = new_index[s.draft_source]
    for g in groups:
        g.members = [new_index[i] for i in g.members]
    return RolloutBatch(ordered, groups)


def _request_counters(engine: RolloutEngine) -> dict[str, int]:
    """The engine's cumulative retry counters (``RolloutClient.counters``); {} for engines without them."""
    counters = getattr(engine, "counters", None)
    if counters is None:
        return {}
    return {"retries": counters.retries, "duplicate_generations": counters.duplicate_generations}


def _overlong_metrics(batch: RolloutBatch) -> dict[str, float]:
    """The overlong penalty over every sample of the step: its mean and the fraction it touched."""
    penalties = [s.length_penalty for s in batch.samples]
    n = max(len(penalties), 1)
    return {"overlong/penalty_mean": sum(penalties) / n,
            "overlong/penalised_fraction": sum(p < 0 for p in penalties) / n}


def _reward_metrics(batch: RolloutBatch) -> dict[str, float]:
    """Mean reward, accuracy and response length per stage."""
    out: dict[str, float] = {}
    for stage in ("draft", "refine", "grpo"):
        picked = [s for s in batch.samples if s.stage == stage]
        if picked:
            out[f"{stage}/reward_mean"] = sum(s.reward for s in picked) / len(picked)
            out[f"{stage}/accuracy"] = sum(s.correct for s in picked) / len(picked)
            out[f"{stage}/response_length"] = sum(len(s.completion_ids) for s in picked) / len(picked)
    out["generated_tokens"] = float(batch.generated_tokens)
    out["generated_completions"] = float(len(batch.samples))  # the rollout budget (igrpo compare matches it)
    return out
