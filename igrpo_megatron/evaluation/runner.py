"""The sampling + scoring loop: k completions per problem from a rollout engine, scored by the reward.

Works against the ``RolloutEngine`` protocol (``igrpo_megatron.rollout.interfaces``): prompts go out
as token ids, ``CompletionGroup``s come back. Any engine works: a ``RolloutClient`` on a sidecar the
CLI started, the trainer's live client (the periodic hook), or a fake in tests. The loop is async;
:func:`run_sync` runs it from synchronous code, on a ``BlockingRolloutClient``'s own event loop when
given one (its aiohttp session and locks belong to that loop).

Problems go to the engine in batches of ``evaluation.problems_per_batch``; while batch i is scored
(math-verify in worker processes, on a thread so the event loop keeps going), batch i + 1 is
already generating. Each batch ends with a progress line (rate and ETA).

Prompts, plain and draft-conditioned, come from ``data.prompts.PromptFormatter``, the builder training
uses. Test-time refinement rounds (:meth:`Evaluator.refine_async`) pick drafts with ``refine.pick_drafts``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any, TypeVar

from igrpo_megatron.config.algorithm import RefinementPromptConfig
from igrpo_megatron.config.evaluation import EvaluationConfig
from igrpo_megatron.config.reward import AnswerExtractionConfig
from igrpo_megatron.config.validate import raise_errors
from igrpo_megatron.data.prompts import PromptFormatter
from igrpo_megatron.evaluation.benchmarks import Benchmark, Problem
from igrpo_megatron.evaluation.metrics import IntervalSettings, per_problem_metrics, summarize
from igrpo_megatron.evaluation.records import BenchmarkResult, ProblemRecord, RefineRoundRecord, SampleRecord
from igrpo_megatron.evaluation.refine import EXTRA_DRAFTS_ROUND, pick_drafts
from igrpo_megatron.rewards.extraction import extract_answer
from igrpo_megatron.rewards.interfaces import RewardFunction, RewardItem
from igrpo_megatron.rollout.interfaces import CompletionGroup, RolloutEngine, SamplingParams

logger = logging.getLogger(__name__)

T = TypeVar("T")
# Seeds: problem row r in round t starts at seed + (t * ROUND_STRIDE + r) * SAMPLE_STRIDE and vLLM gives
# sample j seed + j, so a run with k = 4 draws the first 4 samples of a run with k = 8 (same seed).
ROUND_STRIDE = 1_000_000  # rows per round (benchmarks have far fewer rows)
SAMPLE_STRIDE = 1024  # samples per problem before seeds of neighbouring problems overlap


class EvaluationError(RuntimeError):
    """An evaluation cannot run as configured (prompt too long, engine answered wrongly, ...)."""


@dataclass(frozen=True)
class Query:
    """One prompt sent for one problem: the user message and its token ids."""

    problem: Problem
    user_text: str
    prompt_ids: list[int]


def run_sync(engine: Any, make: Callable[[RolloutEngine], Awaitable[T]]) -> T:
    """Run ``make(engine)`` to completion from synchronous code.

    A ``BlockingRolloutClient`` (has ``.run`` and ``.client``) runs it on its own loop thread; any
    other engine gets a fresh event loop (so it must not already be bound to another loop).
    """
    runner, inner = getattr(engine, "run", None), getattr(engine, "client", None)
    if callable(runner) and inner is not None:
        return runner(make(inner))
    return asyncio.run(make(engine))


class _Progress:
    """A log line per batch: done/total, rate, ETA."""

    def __init__(self, label: str, total: int):
        self.label, self.total, self.done = label, total, 0
        self.t0 = time.monotonic()

    def update(self, n: int) -> None:
        self.done += n
        elapsed = max(time.monotonic() - self.t0, 1e-9)
        rate = self.done / elapsed
        eta = (self.total - self.done) / rate if rate > 0 else float("inf")
        logger.info("%s: %d/%d problems (%.2f problems/s, ETA %s)", self.label, self.done, self.total, rate,
                    time.strftime("%H:%M:%S", time.gmtime(eta)) if eta != float("inf") else "?")


class Evaluator:
    """Samples and scores benchmarks with one tokenizer, one reward and the evaluation settings.

    Build it with :meth:`from_recipe`; call :meth:`evaluate` (sync) or :meth:`evaluate_async`;
    :meth:`close` stops the reward's workers when the evaluator built the reward.
    """

    def __init__(self, cfg: EvaluationConfig, tokenizer: Any, reward: RewardFunction, *,
                 extraction: AnswerExtractionConfig, refine_prompt: RefinementPromptConfig, max_tokens: int,
                 max_model_len: int | None = None, owns_reward: bool = False):
        self.cfg = cfg
        self.prompts = PromptFormatter(tokenizer, cfg, section="evaluation")  # the training prompt path
        self.reward = reward
        self.extraction = extraction
        self.refine_prompt = refine_prompt
        self.max_tokens = max_tokens
        self.max_model_len = max_model_len
        self.owns_reward = owns_reward
        self.intervals = IntervalSettings(cfg.confidence, cfg.ci_method, cfg.bootstrap_resamples,
                                          cfg.sampling.seed or 0)

    @classmethod
    def from_recipe(cls, recipe: Any, tokenizer: Any, *, cfg: EvaluationConfig | None = None,
                    reward: RewardFunction | None = None, max_model_len: int | None = None) -> Evaluator:
        """Settings from ``recipe`` (evaluation, reward.extraction, algorithm.igrpo.prompt, rollout lengths).

        ``reward``: a correctness reward to share (e.g. the trainer's); None builds
        ``evaluation.correctness_reward`` alone (owned and closed by this evaluator).
        """
        from igrpo_megatron.rewards import build_reward

        cfg = cfg or recipe.evaluation
        raise_errors(cfg, "evaluation")
        owns = reward is None
        if reward is None:
            reward = build_reward(recipe.reward, weights={cfg.correctness_reward: 1.0})
        return cls(cfg, tokenizer, reward, extraction=recipe.reward.extraction,
                   refine_prompt=recipe.algorithm.igrpo.prompt,
                   max_tokens=cfg.sampling.max_tokens or recipe.rollout.sampling.max_tokens,
                   max_model_len=max_model_len or recipe.rollout.server.max_model_len, owns_reward=owns)

    def close(self) -> None:
        if self.owns_reward:
            self.reward.close()

    def __enter__(self) -> Evaluator:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- prompts and sampling ---------------------------------------------------------------------

    def sampling(self, n: int) -> SamplingParams:
        s = self.cfg.sampling
        return SamplingParams(temperature=s.temperature, top_p=s.top_p, top_k=s.top_k, max_tokens=self.max_tokens,
                              stop=tuple(s.stop), n=n, logprobs=False, seed=None)

    def queries(self, benchmark: Benchmark) -> list[Query]:
        """Plain prompts of every problem; refuses prompts that cannot fit beside max_tokens."""
        out = []
        for p in benchmark.problems:
            text = self.prompts.message(p.problem)
            out.append(Query(p, text, self.prompts.encode_message(text)))
        if self.max_model_len is not None:
            too_long = [q for q in out if len(q.prompt_ids) + self.max_tokens > self.max_model_len]
            if too_long:
                worst = max(too_long, key=lambda q: len(q.prompt_ids))
                raise EvaluationError(
                    f"{benchmark.name}: {len(too_long)} prompt(s) do not fit: prompt + max_tokens ({self.max_tokens}) "
                    f"exceeds the server's max_model_len {self.max_model_len} (longest: problem {worst.problem.id!r} "
                    f"with {len(worst.prompt_ids)} prompt tokens). Raise rollout.server.max_model_len or lower "
                    "evaluation.sampling.max_tokens.")
        return out

    def _seed(self, row: int, round_no: int) -> int | None:
        base = self.cfg.sampling.seed
        return None if base is None else base + (round_no * ROUND_STRIDE + row) * SAMPLE_STRIDE

    async def sample_and_score(self, engine: RolloutEngine, queries: Sequence[Query], n: int, *, round_no: int,
                               label: str) -> list[list[SampleRecord]]:
        """n scored samples per query, in order. ``round_no`` separates the seeds of plain and refined prompts."""
        params = self.sampling(n)
        size = self.cfg.problems_per_batch
        chunks = [list(queries[i:i + size]) for i in range(0, len(queries), size)]
        progress = _Progress(label, len(queries))

        def launch(chunk: list[Query]) -> asyncio.Future:
            seeds = [self._seed(q.problem.index, round_no) for q in chunk]
            return asyncio.ensure_future(engine.generate([q.prompt_ids for q in chunk], params, seeds))

        out: list[list[SampleRecord]] = []
        pending = launch(chunks[0]) if chunks else None
        try:
            for i, chunk in enumerate(chunks):
                groups = await pending
                pending = launch(chunks[i + 1]) if i + 1 < len(chunks) else None
                self._check_groups(groups, chunk, n)
                out.extend(await asyncio.to_thread(self.score, chunk, groups))
                progress.update(len(chunk))
        finally:
            if pending is not None and not pending.done():
                pending.cancel()
        return out

    @staticmethod
    def _check_groups(groups: list[CompletionGroup], chunk: list[Query], n: int) -> None:
        if len(groups) != len(chunk) or any(len(g.completions) != n for g in groups):
            got = [len(g.completions) for g in groups]
            raise EvaluationError(f"the rollout engine returned {len(groups)} groups with {got} completions for "
                                  f"{len(chunk)} prompts x {n} samples; it must return n per prompt, in order.")

    def score(self, queries: Sequence[Query], groups: Sequence[CompletionGroup]) -> list[list[SampleRecord]]:
        """Score every completion with the correctness reward; one list of records per query."""
        items = [RewardItem(q.problem.problem, q.problem.gold, c.text)
                 for q, g in zip(queries, groups, strict=True) for c in g.completions]
        result = self.reward.score(items) if items else None
        records: list[list[SampleRecord]] = []
        pos = 0
        for g in groups:
            row = []
            for c in g.completions:
                info, reward = result.info[pos], result.rewards[pos]
                answer = info.answer if info.answer is not None else extract_answer(c.text, self.extraction)
                row.append(SampleRecord(text=c.text, answer=answer, correct=bool(info.correct), reward=float(reward),
                                        finish_reason=c.finish_reason, num_tokens=len(c.token_ids),
                                        error=info.error))
                pos += 1
            records.append(row)
        return records

    # -- one benchmark ----------------------------------------------------------------------------

    async def evaluate_async(self, engine: RolloutEngine, benchmark: Benchmark, num_samples: int, *,
                             refine: bool | None = None, ks: Sequence[int] | None = None) -> BenchmarkResult:
        """Sample, score and summarise one benchmark (plus test-time refinement when enabled)."""
        if num_samples < 1:
            raise EvaluationError(f"{benchmark.name}: samples per problem = {num_samples}; must be >= 1.")
        refine = self.cfg.refine.enabled if refine is None else refine
        ks = list(self.cfg.pass_at_k if ks is None else ks)
        t0 = time.monotonic()
        queries = self.queries(benchmark)
        plain = await self.sample_and_score(engine, queries, num_samples, round_no=0, label=benchmark.name)
        records = [ProblemRecord(q.problem.index, q.problem.id, q.problem.problem, q.problem.gold,
                                 len(q.prompt_ids), samples) for q, samples in zip(queries, plain, strict=True)]
        if refine:
            await self.refine_async(engine, queries, records, num_samples, label=benchmark.name)
        per_problem = per_problem_metrics(records, ks)
        metrics = summarize(per_problem, self.intervals)
        wall = time.monotonic() - t0
        p1 = metrics["pass@1"]
        logger.info("%s: pass@1 = %.1f%% [%.1f, %.1f] over %d problems x %d samples (%.0f s)", benchmark.name,
                    100 * p1.value, 100 * p1.ci_low, 100 * p1.ci_high, len(records), num_samples, wall)
        return BenchmarkResult(name=benchmark.name, path=str(benchmark.path), num_problems=len(records),
                               samples_per_problem=num_samples, metrics=metrics, per_problem=per_problem,
                               problems=records, wall_s=wall)

    def evaluate(self, engine: Any, benchmark: Benchmark, num_samples: int, **kwargs: Any) -> BenchmarkResult:
        """Synchronous :meth:`evaluate_async` (see :func:`run_sync` for which loop runs it)."""
        return run_sync(engine, lambda eng: self.evaluate_async(eng, benchmark, num_samples, **kwargs))

    # -- test-time refinement (evaluation.refine; see the refine module) --------------------------

    def _refinement_query(self, query: Query, draft: SampleRecord, use_draft: bool) -> tuple[Query, bool, bool]:
        """(query, used_draft, truncated): q' built as training builds it, or the plain query when the
        draft is not to be shown or no part of it fits the budget."""
        if not use_draft:
            return query, False, False
        budget = self.cfg.refine.max_prompt_tokens
        if budget is None and self.max_model_len is not None:
            budget = self.max_model_len - self.max_tokens
        built = self.prompts.refinement(query.problem.problem, draft.text, self.refine_prompt, budget)
        if built is None:
            return query, False, False
        return replace(query, user_text=built.user_text, prompt_ids=built.ids), True, built.truncated

    async def refine_async(self, engine: RolloutEngine, queries: Sequence[Query], records: Sequence[ProblemRecord],
                           n: int, *, label: str) -> None:
        """Run ``evaluation.refine.num_rounds`` rounds; fills ``records[i].refine`` (and ``extra_drafts``)."""
        cfg = self.cfg.refine
        pools = [list(r.samples[:cfg.num_drafts]) for r in records]
        if cfg.num_drafts > n:
            extra = await self.sample_and_score(engine, queries, cfg.num_drafts - n, round_no=EXTRA_DRAFTS_ROUND,
                                                label=f"{label} extra drafts")
            for record, pool, more in zip(records, pools, extra, strict=True):
                record.extra_drafts = more
                pool.extend(more)
        for rnd in range(1, cfg.num_rounds + 1):
            picks = pick_drafts(pools, cfg)
            built = [self._refinement_query(q, pool[p.index], p.use_draft)
                     for q, pool, p in zip(queries, pools, picks, strict=True)]
            samples = await self.sample_and_score(engine, [b[0] for b in built], n, round_no=rnd,
                                                  label=f"{label} refine round {rnd}")
            for record, pool, pick, (q, used, truncated), got in zip(records, pools, picks, built, samples,
                                                                      strict=True):
                draft = pool[pick.index]
                record.refine.append(RefineRoundRecord(
                    round=rnd, picked=pick.index, picked_answer=draft.answer, picked_correct=draft.correct,
                    vote_share=pick.vote_share, used_draft=used, draft_truncated=truncated,
                    prompt_tokens=len(q.prompt_ids), samples=got))
            pools = samples
