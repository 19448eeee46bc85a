"""Async client for the vLLM sidecar's ``/v1/completions`` endpoint, in token ids.

Prompts go out as token-id lists and completions come back as the sampled token ids with the
log-prob of each (``logprobs=0`` + ``return_token_ids``), so the trainer scores exactly what was
sampled. Every result carries the policy version that served it: a weight update (see
``weight_update()``) holds back new requests and waits for running ones, so no request spans two
versions. Transient failures are retried with back-off; when the server stays unreachable the
batch raises ``SidecarUnavailableError`` listing what completed and what did not. ``counters``
counts the retries and the generations that may have run twice because of them.

Idle connections are dropped after ``CLIENT_KEEPALIVE_S``, before the server closes them: vLLM's
HTTP server closes a connection idle for ``VLLM_HTTP_TIMEOUT_KEEP_ALIVE`` seconds (5 by default;
servers started by ``RolloutServer`` get a longer one), and a request written to a connection the
server has just closed fails (``ServerDisconnectedError``, "Can not write request body"): with
aiohttp's default of 15 s, whenever the client's event loop was busy (prompt building, parsing)
as the server closed a pooled connection. ``bench/rollout_overlap.py`` saw 9-19 such retries per
run against a healthy local server; tests/rollout/test_keepalive.py reproduces them.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import AsyncIterator, Awaitable, Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any, TypeVar

import aiohttp

from igrpo_megatron.config.rollout import RetryConfig, RolloutConfig
from igrpo_megatron.rollout.interfaces import (
    Completion,
    CompletionGroup,
    RolloutRequestError,
    SamplingParams,
    SidecarUnavailableError,
    StaleWeightsError,
)

logger = logging.getLogger(__name__)

T = TypeVar("T")

# Seconds an idle connection stays in the client's pool: below the 5 s after which vLLM's HTTP
# server (uvicorn) closes idle connections by default, so the client never reuses one the server
# may be closing. A new loopback or LAN connection costs far less than one generation.
CLIENT_KEEPALIVE_S = 2.0
GENERATE_PATH = "/v1/completions"


class _TransientError(Exception):
    """A failure worth retrying (connection lost, timeout, HTTP 5xx).

    ``maybe_served``: the request may have reached the server (it was written to a connection),
    so a retried generation may be computed twice. False only when no connection was made.
    """

    def __init__(self, message: str, *, kind: str = "error", maybe_served: bool = True):
        super().__init__(message)
        self.kind = kind
        self.maybe_served = maybe_served


@dataclass
class RequestCounters:
    """What a ``RolloutClient`` had to resend, cumulative over its life (``client.counters``)."""

    retries: int = 0  # requests sent again after a transient failure (any endpoint)
    # Generation requests sent again after an attempt that may have reached the engine. An upper
    # bound on duplicated work: a connection the server closed before reading the request counts
    # too, since the client cannot tell it from one dropped mid-generation.
    duplicate_generations: int = 0
    errors: dict[str, int] = field(default_factory=dict)  # retried failures by error type

    def as_dict(self) -> dict:
        return asdict(self)


class VersionUpdate:
    """Handle given by ``RolloutClient.weight_update()``: call ``commit(v)`` once the weights are in."""

    def __init__(self, current: int):
        self.version: int | None = None
        self.previous = current

    def commit(self, version: int) -> None:
        self.version = version


class RolloutClient:
    """Concurrent, retrying, version-stamping client of one vLLM OpenAI server (implements RolloutEngine)."""

    def __init__(self, base_url: str, *, sampling: SamplingParams | None = None, max_concurrency: int = 64,
                 retry: RetryConfig | None = None, model: str | None = None, initial_version: int = 0,
                 verify_weights: bool = True, keepalive_s: float = CLIENT_KEEPALIVE_S):
        self.base_url = base_url.rstrip("/")
        self.sampling = sampling or SamplingParams()
        self.max_concurrency = max_concurrency
        self.retry = retry or RetryConfig()
        self.model = model
        self.verify_weights = verify_weights  # check /weight_info after each batch once weights were pushed
        self.keepalive_s = keepalive_s  # keep below the server's keep-alive timeout (see CLIENT_KEEPALIVE_S)
        self.counters = RequestCounters()
        self._version = initial_version
        self._in_flight = 0
        self._updating = False
        # asyncio primitives bind to the loop that first uses them, so they are made lazily.
        self._cond: asyncio.Condition | None = None
        self._sem: asyncio.Semaphore | None = None
        self._session: aiohttp.ClientSession | None = None
        self._tasks: set[asyncio.Task] = set()  # tasks with a request of ours under way (close() cancels them)

    @classmethod
    def from_config(cls, cfg: RolloutConfig, base_url: str) -> RolloutClient:
        return cls(base_url, sampling=SamplingParams.from_config(cfg.sampling), max_concurrency=cfg.max_concurrency,
                   retry=cfg.retry, model=cfg.server.served_model_name)

    @property
    def policy_version(self) -> int:
        return self._version

    @property
    def in_flight(self) -> int:
        """Generation requests admitted and not yet answered."""
        return self._in_flight

    # -- generation -------------------------------------------------------------------------------

    async def generate(self, prompts: Sequence[Sequence[int]], sampling: SamplingParams | None = None,
                       seeds: Sequence[int | None] | None = None) -> list[CompletionGroup]:
        """One ``CompletionGroup`` per prompt, in order, requests running concurrently.

        ``seeds[i]`` overrides ``sampling.seed`` for prompt i. If any prompt fails for good, raises
        (after the others finished) with ``.results`` holding each prompt's group or exception.
        Once weights were pushed, also checks that the server did not restart from its initial
        checkpoint meanwhile (``StaleWeightsError``).
        """
        if seeds is not None and len(seeds) != len(prompts):
            raise ValueError(f"got {len(seeds)} seeds for {len(prompts)} prompts; pass one per prompt or None.")
        tasks = [self.generate_one(p, sampling, None if seeds is None else seeds[i]) for i, p in enumerate(prompts)]
        results = await asyncio.gather(*tasks, return_exceptions=True)
        errors = [r for r in results if isinstance(r, BaseException)]
        if not errors:
            await self._check_not_restarted(results)
            return results
        for err in errors:
            if not isinstance(err, Exception):
                raise err  # cancellation and interpreter exits are not request failures
        if any(isinstance(e, RolloutRequestError) for e in errors):
            raise next(e for e in errors if isinstance(e, RolloutRequestError))
        raise SidecarUnavailableError(
            f"{len(errors)} of {len(prompts)} requests to the vLLM server at {self.base_url} failed "
            f"(first error: {errors[0]}). The error's .results holds every completed group and each "
            "failure; retry the failed prompts once the server is healthy again.",
            url=self.base_url, results=list(results)) from errors[0]

    async def generate_one(self, prompt: Sequence[int], sampling: SamplingParams | None = None,
                           seed: int | None = None) -> CompletionGroup:
        """All ``sampling.n`` samples for one prompt (token ids)."""
        params = sampling or self.sampling
        payload = self._payload(prompt, params, seed)
        with self._tracked():
            async with self._semaphore(), self._admitted() as version:
                body = await self._request("POST", GENERATE_PATH, payload, self.retry.request_timeout_s)
        return self._parse(list(prompt), body, version, params.logprobs)

    async def _check_not_restarted(self, results: list[CompletionGroup]) -> None:
        """A restarted server reports version 'default' again: its weights are the initial ones."""
        if not self.verify_weights or not any(g.policy_version > 0 for g in results):
            return
        label = (await self.get("/weight_info"))["weight_version"]
        if label == "default":
            raise StaleWeightsError(
                f"the vLLM server at {self.base_url} restarted from its initial checkpoint after policy "
                f"version {self._version} was pushed; push the current weights again and regenerate "
                "(the suspect groups are in .results).", url=self.base_url, results=list(results))

    def _payload(self, prompt: Sequence[int], params: SamplingParams, seed: int | None) -> dict[str, Any]:
        if not prompt:
            raise ValueError("empty prompt: every prompt needs at least one token id.")
        payload: dict[str, Any] = {
            "prompt": [int(t) for t in prompt], "max_tokens": params.max_tokens, "n": params.n,
            "temperature": params.temperature, "top_p": params.top_p, "top_k": params.top_k,
            "stop": list(params.stop), "return_token_ids": True, "skip_special_tokens": True,
        }
        if params.logprobs:
            payload["logprobs"] = 0  # the sampled token's log-prob only
        chosen_seed = seed if seed is not None else params.seed
        if chosen_seed is not None:
            payload["seed"] = chosen_seed
        if self.model is not None:
            payload["model"] = self.model
        return payload

    def _parse(self, prompt: list[int], body: dict, version: int, want_logprobs: bool) -> CompletionGroup:
        completions = []
        for choice in sorted(body["choices"], key=lambda c: c["index"]):
            token_ids = choice.get("token_ids")
            if token_ids is None:
                raise RolloutRequestError(f"the server at {self.base_url} returned no token_ids; it must be "
                                          "a vLLM version that supports return_token_ids (>= 0.10).")
            logprobs: list[float] = []
            if want_logprobs:
                logprobs = [float(x) for x in choice["logprobs"]["token_logprobs"]]
                if len(logprobs) != len(token_ids):
                    raise RolloutRequestError(f"the server at {self.base_url} returned {len(logprobs)} "
                                              f"log-probs for {len(token_ids)} tokens.")
            completions.append(Completion(token_ids=list(token_ids), logprobs=logprobs, text=choice["text"],
                                          finish_reason=choice.get("finish_reason") or "abort",
                                          stop_reason=choice.get("stop_reason"), policy_version=version))
        return CompletionGroup(prompt_token_ids=prompt, completions=completions, policy_version=version)

    # -- versions and pausing ---------------------------------------------------------------------

    def _condition(self) -> asyncio.Condition:
        if self._cond is None:
            self._cond = asyncio.Condition()
        return self._cond

    def _semaphore(self) -> asyncio.Semaphore:
        if self._sem is None:
            self._sem = asyncio.Semaphore(self.max_concurrency)
        return self._sem

    @asynccontextmanager
    async def _admitted(self) -> AsyncIterator[int]:
        """Run one request under the current version; waits while a weight update is in progress."""
        cond = self._condition()
        async with cond:
            await cond.wait_for(lambda: not self._updating)
            self._in_flight += 1
            version = self._version
        try:
            yield version
        finally:
            async with cond:
                self._in_flight -= 1
                cond.notify_all()

    @asynccontextmanager
    async def weight_update(self) -> AsyncIterator[VersionUpdate]:
        """Hold back new requests, wait for running ones, and let the caller swap weights.

        The policy version advances only if the caller calls ``commit(version)`` on the handle.
        """
        cond = self._condition()
        async with cond:
            await cond.wait_for(lambda: not self._updating)
            self._updating = True
            await cond.wait_for(lambda: self._in_flight == 0)
        update = VersionUpdate(self._version)
        try:
            yield update
        finally:
            async with cond:
                if update.version is not None:
                    self._version = update.version
                self._updating = False
                cond.notify_all()

    # -- HTTP -------------------------------------------------------------------------------------

    async def health(self, timeout_s: float = 5.0) -> bool:
        """Whether ``GET /health`` answers 200 now (no retries)."""
        try:
            session = await self._get_session()
            async with session.get(f"{self.base_url}/health",
                                   timeout=aiohttp.ClientTimeout(total=timeout_s)) as resp:
                return resp.status == 200
        except (TimeoutError, aiohttp.ClientError, OSError):
            return False

    async def post(self, path: str, payload: dict | None = None, timeout_s: float | None = None,
                   retry: bool = True) -> Any:
        """POST JSON to ``path`` with the client's retries (used for the server's control endpoints).

        ``retry=False`` for calls that must not run twice (a weight-transfer step the server may
        already be executing): any failure raises ``SidecarUnavailableError`` at once.
        """
        timeout_s = timeout_s or self.retry.request_timeout_s
        if retry:
            return await self._request("POST", path, payload, timeout_s)
        try:
            return await self._request_once("POST", path, payload, timeout_s)
        except _TransientError as exc:
            raise SidecarUnavailableError(f"POST {self.base_url}{path} failed: {exc}", url=self.base_url) from exc

    async def get(self, path: str, timeout_s: float = 30.0) -> Any:
        return await self._request("GET", path, None, timeout_s)

    async def _request(self, method: str, path: str, payload: dict | None, timeout_s: float) -> Any:
        with self._tracked():  # back-off waits included: close() must not find a retry about to start
            return await self._request_with_retries(method, path, payload, timeout_s)

    async def _request_with_retries(self, method: str, path: str, payload: dict | None, timeout_s: float) -> Any:
        delay = self.retry.initial_backoff_s
        last: Exception | None = None
        for attempt in range(1, self.retry.max_attempts + 1):
            try:
                return await self._request_once(method, path, payload, timeout_s)
            except _TransientError as exc:
                last = exc
                if attempt == self.retry.max_attempts:
                    break
                self._count_retry(path, exc)
                logger.warning("%s %s%s failed (attempt %d of %d): %s; retrying in %.1f s", method,
                               self.base_url, path, attempt, self.retry.max_attempts, exc, delay)
                await asyncio.sleep(delay)
                delay = min(2 * delay, self.retry.max_backoff_s)
        raise SidecarUnavailableError(
            f"vLLM server at {self.base_url} is unavailable: {method} {path} failed "
            f"{self.retry.max_attempts} times (rollout.retry.max_attempts); last error: {last}. "
            "Check that the sidecar is running and read its log.", url=self.base_url) from last

    async def _request_once(self, method: str, path: str, payload: dict | None, timeout_s: float) -> Any:
        session = await self._get_session()
        try:
            async with session.request(method, f"{self.base_url}{path}", json=payload,
                                       timeout=aiohttp.ClientTimeout(total=timeout_s)) as resp:
                text = await resp.text()
                if resp.status >= 500:
                    raise _TransientError(f"HTTP {resp.status}: {text[:500]}", kind=f"HTTP {resp.status}")
                if resp.status >= 400:
                    raise RolloutRequestError(f"{method} {self.base_url}{path} was rejected with HTTP "
                                              f"{resp.status}: {text[:2000]}")
                if not text:
                    return None
                return await resp.json(content_type=None)
        except (TimeoutError, aiohttp.ClientError, ConnectionError) as exc:
            # Failing to connect is the one failure where the server surely never saw the request.
            raise _TransientError(f"{type(exc).__name__}: {exc}", kind=type(exc).__name__,
                                  maybe_served=not isinstance(exc, aiohttp.ClientConnectorError)) from exc

    def _count_retry(self, path: str, exc: _TransientError) -> None:
        c = self.counters
        c.retries += 1
        c.errors[exc.kind] = c.errors.get(exc.kind, 0) + 1
        if path == GENERATE_PATH and exc.maybe_served:
            c.duplicate_generations += 1

    @contextmanager
    def _tracked(self) -> Iterator[None]:
        """Register the running task as having a request under way (for ``close()`` to cancel)."""
        task = asyncio.current_task()
        if task is None or task in self._tasks:
            yield
            return
        self._tasks.add(task)
        try:
            yield
        finally:
            self._tasks.discard(task)

    async def _get_session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            connector = aiohttp.TCPConnector(limit=self.max_concurrency + 8, keepalive_timeout=self.keepalive_s)
            self._session = aiohttp.ClientSession(connector=connector)
        return self._session

    async def close(self) -> None:
        """Cancel requests still under way (quietly: no retries, no warnings), then close the session.

        A caller awaiting one of them gets ``asyncio.CancelledError``; the server sees the
        disconnect and aborts the generation. The client can be used again afterwards.
        """
        others = [t for t in self._tasks if t is not asyncio.current_task() and not t.done()]
        for task in others:
            task.cancel()
        if others:
            await asyncio.gather(*others, return_exceptions=True)
        if self._session is not None:
            session, self._session = self._session, None
            await session.close()
            await asyncio.sleep(0)  # let the transports finish closing while the loop still runs

    async def __aenter__(self) -> RolloutClient:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()


class BlockingRolloutClient:
    """Synchronous front of a ``RolloutClient``: runs its event loop in a background thread.

    For synchronous callers (the training loop, scripts). ``run(coro)`` executes any coroutine
    on that loop, e.g. ``blocking.run(synchronizer.sync(named_tensors))``.
    """

    def __init__(self, client: RolloutClient):
        self.client = client
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="rollout-client", daemon=True)
        self._thread.start()

    def run(self, coro: Awaitable[T]) -> T:
        if self._loop.is_closed():
            raise RuntimeError("BlockingRolloutClient is closed; make a new one.")
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    @property
    def policy_version(self) -> int:
        return self.client.policy_version

    def generate(self, prompts: Sequence[Sequence[int]], sampling: SamplingParams | None = None,
                 seeds: Sequence[int | None] | None = None) -> list[CompletionGroup]:
        return self.run(self.client.generate(prompts, sampling, seeds))

    def health(self) -> bool:
        return self.run(self.client.health())

    def close(self) -> None:
        """Stop the loop thread; work still running on it (a rollout interrupted by SIGTERM) is
        cancelled first, so nothing is retried, warned about, or left pending on a closed loop."""
        if self._loop.is_closed():
            return
        self.run(self._shutdown())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()

    async def _shutdown(self) -> None:
        me = asyncio.current_task()
        while others := [t for t in asyncio.all_tasks() if t is not me]:  # cancelling may start cleanup tasks
            for task in others:
                task.cancel()
            await asyncio.gather(*others, return_exceptions=True)
        await self.client.close()
        await self._loop.shutdown_asyncgens()

    def __enter__(self) -> BlockingRolloutClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
