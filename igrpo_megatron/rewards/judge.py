"""The ``judge`` reward: an LLM behind an OpenAI-compatible server (vLLM) scores each solution in [0, 1].

All requests of a batch go out concurrently (bounded by ``max_concurrency``); connection errors,
timeouts, HTTP 429 and 5xx are retried with exponential back-off. When a reply has no parseable score,
or the judge stays unreachable, the item is scored by a rule-based fallback component (``math`` by
default) and counted as ``judge_fallback``, so a flaky judge degrades the reward instead of stopping
the run.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import re
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import aiohttp

from igrpo_megatron.config.reward import AnswerExtractionConfig, JudgeConfig
from igrpo_megatron.rewards.extraction import answer_region
from igrpo_megatron.rewards.interfaces import ItemInfo, RewardFunction, RewardItem, RewardResult

logger = logging.getLogger(__name__)

PLACEHOLDERS = ("{problem}", "{reference}", "{solution}")
_NOT_A_DIGIT_AFTER = r"(?!\d)"


def fill_template(template: str, problem: str, reference: str, solution: str) -> str:
    """Replace the literal placeholders only, so LaTeX braces anywhere stay as they are."""
    values = dict(zip(PLACEHOLDERS, (problem, reference, solution), strict=True))
    pattern = "|".join(re.escape(p) for p in PLACEHOLDERS)
    return re.sub(pattern, lambda m: values[m.group(0)], template)


def parse_score(reply: str | None, pattern: str) -> float | None:
    """The judge's score: group 1 of the last match of ``pattern`` after any thinking; None if absent or
    outside [0, 1]."""
    if not reply:
        return None
    text = reply.rsplit("</think>", 1)[-1]
    last = None
    for last in re.finditer(pattern + _NOT_A_DIGIT_AFTER, text, re.IGNORECASE):  # noqa: B007 (want the last)
        pass
    if last is None:
        return None
    try:
        value = float(last.group(1))
    except (TypeError, ValueError):
        return None
    return value if 0.0 <= value <= 1.0 else None


@dataclass
class JudgeStats:
    """Cumulative counters since the judge was built."""

    requests: int = 0
    retries: int = 0
    fallbacks: int = 0
    unparseable: int = 0
    unreachable: int = 0


class JudgeReward:
    """Generative judge component; ``fallback`` scores items the judge could not (None: they score 0)."""

    judges_correctness = True

    def __init__(self, cfg: JudgeConfig, extraction: AnswerExtractionConfig,
                 fallback: RewardFunction | None = None, seed: int = 0):
        self.cfg = cfg
        self.extraction = extraction
        self.fallback = fallback
        self.stats = JudgeStats()
        self._rng = random.Random(seed)
        base = cfg.url.rstrip("/")
        self.base_url = base[:-3] if base.endswith("/v1") else base
        self._model = cfg.model

    # -- scoring ----------------------------------------------------------------------------------

    def score(self, items: Sequence[RewardItem]) -> RewardResult:
        info = [ItemInfo() for _ in items]
        rewards = [0.0] * len(items)
        prompts: dict[int, str] = {}
        for i, item in enumerate(items):
            solution = self._solution_view(item.completion)
            if solution is None:
                info[i].no_answer = True  # thinking cut off: nothing to judge, scores 0 like a wrong answer
                info[i].components["judge"] = 0.0
                continue
            prompts[i] = fill_template(self.cfg.prompt_template, item.problem, item.gold, solution)
        replies = _run_coroutine(self._request_all(prompts)) if prompts else {}
        needs_fallback: dict[int, str] = {}
        for i, (reply, problem) in replies.items():
            value = parse_score(reply, self.cfg.score_regex) if problem is None else None
            if value is None:
                needs_fallback[i] = problem or f"unparseable judge reply: {str(reply)[:120]!r}"
                if problem is None:
                    self.stats.unparseable += 1
                continue
            rewards[i] = value
            info[i].correct = value >= self.cfg.correct_threshold
            info[i].components["judge"] = value
        if needs_fallback:
            self._apply_fallback(items, needs_fallback, rewards, info)
        return RewardResult(rewards, info)

    def _solution_view(self, completion: str) -> str | None:
        text = completion if self.cfg.solution_view == "full" else answer_region(completion, self.extraction)
        if text is None:
            return None
        return text[-self.cfg.max_solution_chars:]

    def _apply_fallback(self, items: Sequence[RewardItem], reasons: dict[int, str], rewards: list[float],
                        info: list[ItemInfo]) -> None:
        indices = sorted(reasons)
        self.stats.fallbacks += len(indices)
        logger.warning("judge fell back to %s for %d of %d items (first reason: %s)",
                       self.cfg.fallback if self.fallback is not None else "score 0", len(indices), len(items),
                       reasons[indices[0]])
        sub = self.fallback.score([items[i] for i in indices]) if self.fallback is not None else None
        for k, i in enumerate(indices):
            if sub is not None:
                rewards[i] = sub.rewards[k]
                fb = sub.info[k]
                info[i].correct, info[i].no_answer, info[i].timed_out = fb.correct, fb.no_answer, fb.timed_out
                info[i].answer = fb.answer
            info[i].judge_fallback = True
            info[i].error = reasons[i]
            info[i].components["judge"] = rewards[i]

    # -- HTTP -------------------------------------------------------------------------------------

    async def _request_all(self, prompts: dict[int, str]) -> dict[int, tuple[str | None, str | None]]:
        """{item: (reply text, problem)}; ``problem`` is None when a reply came back."""
        timeout = aiohttp.ClientTimeout(total=self.cfg.request_timeout_s)
        connector = aiohttp.TCPConnector(limit=self.cfg.max_concurrency)
        async with aiohttp.ClientSession(timeout=timeout, connector=connector, headers=self._headers()) as s:
            if self._model is None:
                model, problem = await self._discover_model(s)
                if model is None:
                    return {i: (None, problem) for i in prompts}
                self._model = model
            gate = asyncio.Semaphore(self.cfg.max_concurrency)
            keys = list(prompts)
            replies = await asyncio.gather(*(self._judge_one(s, gate, prompts[i]) for i in keys))
        return dict(zip(keys, replies, strict=True))

    def _headers(self) -> dict[str, str]:
        env = self.cfg.api_key_env
        if env is None:
            return {}
        token = os.environ.get(env)
        if not token:
            raise ValueError(f"reward.judge.api_key_env = {env!r} but that environment variable is unset or "
                             "empty; export it or set api_key_env: null.")
        return {"Authorization": f"Bearer {token}"}

    async def _discover_model(self, s: aiohttp.ClientSession) -> tuple[str | None, str | None]:
        body, problem = await self._with_retries(lambda: s.get(f"{self.base_url}/v1/models"))
        try:
            return body["data"][0]["id"], None
        except (TypeError, KeyError, IndexError):
            return None, problem or f"judge at {self.base_url} lists no model at /v1/models"

    async def _judge_one(self, s: aiohttp.ClientSession, gate: asyncio.Semaphore,
                         prompt: str) -> tuple[str | None, str | None]:
        c = self.cfg
        body: dict[str, Any] = {"model": self._model, "max_tokens": c.max_tokens, "temperature": c.temperature}
        if c.api == "chat":
            messages = [{"role": "system", "content": c.system_prompt}] if c.system_prompt else []
            body["messages"] = messages + [{"role": "user", "content": prompt}]
            url = f"{self.base_url}/v1/chat/completions"
        else:
            body["prompt"] = prompt
            url = f"{self.base_url}/v1/completions"
        body.update(c.extra_body)
        async with gate:
            data, problem = await self._with_retries(lambda: s.post(url, json=body))
        if data is None:
            return None, problem
        try:
            choice = data["choices"][0]
            text = choice["message"]["content"] if c.api == "chat" else choice["text"]
        except (TypeError, KeyError, IndexError):
            return None, f"judge reply without choices: {str(data)[:120]!r}"
        return text, None

    async def _with_retries(self, send: Callable[[], Any]) -> tuple[Any, str | None]:
        """(JSON body, None) on HTTP 200, else (None, why); retries transient failures with back-off."""
        c = self.cfg
        problem = "no attempt"
        for attempt in range(c.max_retries + 1):
            if attempt:
                self.stats.retries += 1
                await asyncio.sleep(self._backoff(attempt - 1))
            self.stats.requests += 1
            try:
                async with send() as resp:
                    if resp.status == 200:
                        try:
                            return await resp.json(content_type=None), None
                        except ValueError:
                            return None, "judge replied HTTP 200 with a body that is not JSON"
                    text = (await resp.text())[:200]
                    problem = f"HTTP {resp.status}: {text}"
                    if resp.status != 429 and resp.status < 500:
                        return None, problem  # a bad request stays bad: do not retry
            except (TimeoutError, aiohttp.ClientError) as e:
                problem = f"{type(e).__name__}: {e}"[:200]
        self.stats.unreachable += 1
        return None, f"judge unreachable after {c.max_retries + 1} tries ({problem})"

    def _backoff(self, retry: int) -> float:
        base = min(self.cfg.backoff_max_s, self.cfg.backoff_s * (2 ** retry))
        return base * self._rng.uniform(0.75, 1.25)

    def close(self) -> None:
        pass  # sessions live for one score() call; the fallback is closed by its owner


def _run_coroutine(coro: Any) -> Any:
    """Run ``coro`` to completion from sync code, also when the caller is inside a running event loop."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="igrpo-judge") as ex:
        return ex.submit(asyncio.run, coro).result()
