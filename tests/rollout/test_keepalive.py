"""Connection reuse, retry counters and a quiet close of the rollout client.

The race (issue 20): aiohttp kept idle connections 15 s while vLLM's HTTP server closes them after
5 s, so a burst that followed a pause could write requests to connections the server had already
closed (``ServerDisconnectedError``, then a retry after a back-off). It shows when the client's event
loop is busy at the moment of the close, so that it has not yet seen the server's FIN when the burst
starts; the test reproduces that by blocking the loop across the server's keep-alive deadline
(measured against a 5 s server: the old 15 s client retried 12 of 12 requests, a 2 s client none).

Tests marked ``vllm`` use the session's tiny-Qwen2 vLLM server (conftest.py), started by
``RolloutServer`` and so with ``SERVER_KEEPALIVE_S``; the others use the in-process fake API.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from igrpo_megatron.config.ports import free_port
from igrpo_megatron.config.rollout import RetryConfig
from igrpo_megatron.rollout.client import CLIENT_KEEPALIVE_S, BlockingRolloutClient, RolloutClient
from igrpo_megatron.rollout.interfaces import SamplingParams, SidecarUnavailableError
from igrpo_megatron.rollout.server import SERVER_KEEPALIVE_S
from tests.rollout.fake_server import FakeVLLM, serve

FAST_RETRY = RetryConfig(max_attempts=3, initial_backoff_s=0.05, max_backoff_s=0.1, request_timeout_s=120)
BURST = 12  # concurrent requests: as many pooled connections
REPO = Path(__file__).resolve().parents[2]


def engine_finished_requests(url: str) -> float:
    """Requests the engine has finished (every reason), from its Prometheus /metrics: one per sample."""
    with urllib.request.urlopen(f"{url}/metrics", timeout=30) as resp:
        lines = resp.read().decode().splitlines()
    return sum(float(line.rsplit(" ", 1)[1]) for line in lines if line.startswith("vllm:request_success_total"))


def test_client_drops_idle_connections_before_the_server_would():
    # vLLM's default keep-alive is 5 s (an external server may keep it); ours is SERVER_KEEPALIVE_S.
    assert CLIENT_KEEPALIVE_S < 5 <= SERVER_KEEPALIVE_S


@pytest.mark.vllm
def test_burst_after_idling_past_server_keepalive_needs_no_retry(sidecar):
    """Idle connections older than the server's keep-alive, then a burst: the client's settings need
    no retry. A client that keeps connections longer than the server (the old aiohttp default against
    vLLM's) does retry in the same situation, and the engine shows those were no duplicate generations."""
    params = SamplingParams(temperature=1.0, max_tokens=4)
    prompts = [[5, 6, 7 + i] for i in range(BURST)]

    async def scenario():
        fixed = RolloutClient(sidecar.url, retry=FAST_RETRY)
        stale = RolloutClient(sidecar.url, retry=FAST_RETRY, keepalive_s=2 * SERVER_KEEPALIVE_S)
        async with fixed, stale:
            await asyncio.gather(fixed.generate(prompts, params), stale.generate(prompts, params))  # fill the pools
            before = await asyncio.to_thread(engine_finished_requests, sidecar.url)
            await asyncio.sleep(SERVER_KEEPALIVE_S - 1.5)
            burst = [asyncio.ensure_future(c.generate_one(p, params)) for c in (fixed, stale) for p in prompts]
            # The loop is busy (as when it builds prompts) while the server closes the idle connections,
            # so the burst's requests pick their connections before the loop has read the server's FINs.
            time.sleep(4.0)
            groups = await asyncio.gather(*burst)
            after = await asyncio.to_thread(engine_finished_requests, sidecar.url)
        return fixed.counters, stale.counters, groups, after - before

    fixed, stale, groups, engine_requests = asyncio.run(scenario())
    assert len(groups) == 2 * BURST and all(len(g.completions) == 1 for g in groups)
    assert fixed.retries == 0 and fixed.duplicate_generations == 0 and fixed.errors == {}, fixed
    # The control reproduces the race: requests written to connections the server had closed.
    assert stale.retries >= 1, f"the stale-connection race did not reproduce: {stale}"
    assert set(stale.errors) <= {"ServerDisconnectedError", "ClientOSError"}, stale.errors
    assert stale.duplicate_generations == stale.retries  # counted: the client cannot tell them apart
    # ...yet the engine ran each sample once: the server closed those connections unread.
    assert engine_requests == 2 * BURST, (engine_requests, stale)


# --- counters (fake server) -----------------------------------------------------------------------


def test_retries_and_possible_duplicates_are_counted():
    async def body():
        fake = FakeVLLM(fail_first=2, fail_status=503)
        runner, url = await serve(fake)
        try:
            async with RolloutClient(url, retry=FAST_RETRY) as client:
                await client.generate_one([10], SamplingParams(n=2))
        finally:
            await runner.cleanup()
        return client.counters

    counters = asyncio.run(body())
    # Two 503s: the server saw both requests, so either may have generated before failing.
    assert counters.retries == 2 and counters.duplicate_generations == 2
    assert counters.errors == {"HTTP 503": 2}


def test_failed_connects_are_retries_but_no_duplicates():
    port = free_port()  # a port nobody listens on

    async def body():
        async with RolloutClient(f"http://127.0.0.1:{port}", retry=FAST_RETRY) as client:
            with pytest.raises(SidecarUnavailableError):
                await client.generate_one([1])
        return client.counters

    counters = asyncio.run(body())
    assert counters.retries == FAST_RETRY.max_attempts - 1  # the last failure is not followed by a retry
    assert counters.duplicate_generations == 0  # nothing reached a server
    assert counters.errors == {"ClientConnectorError": FAST_RETRY.max_attempts - 1}


def test_step_metrics_carry_the_steps_retries(tiny_model_dir):
    """TwoStageRollout (what the training loop calls) reports the client's retries of its step."""
    from transformers import AutoTokenizer

    from igrpo_megatron.config.algorithm import AlgorithmConfig
    from igrpo_megatron.config.reward import RewardConfig
    from igrpo_megatron.config.training import DataConfig
    from igrpo_megatron.data.datasets import PromptRecord
    from igrpo_megatron.data.prompts import PromptFormatter
    from igrpo_megatron.rewards.registry import build_reward
    from igrpo_megatron.rollout.two_stage import TwoStageRollout

    fmt = PromptFormatter(AutoTokenizer.from_pretrained(str(tiny_model_dir)), DataConfig())
    reward_cfg = RewardConfig()
    reward_cfg.math.num_workers = 1
    reward = build_reward(reward_cfg)
    records = [PromptRecord(f"What is {i} + 1?", str(i + 1)) for i in range(3)]

    async def body():
        fake = FakeVLLM(fail_first=1, fail_status=503)
        runner, url = await serve(fake)
        try:
            async with RolloutClient(url, retry=FAST_RETRY) as client:
                rollout = TwoStageRollout(client, fmt, reward, AlgorithmConfig(group_size=2), SamplingParams(),
                                          max_prompt_length=256, run_seed=0)
                try:
                    first = await rollout.run(records, step=0)
                    second = await rollout.run(records, step=1)
                finally:
                    rollout.close()
        finally:
            await runner.cleanup()
        return first, second

    try:
        first, second = asyncio.run(body())
    finally:
        reward.close()
    assert first.metrics["rollout/retries"] == 1 and first.metrics["rollout/duplicate_generations"] == 1
    assert second.metrics["rollout/retries"] == 0 and second.metrics["rollout/duplicate_generations"] == 0


# --- closing with requests in flight --------------------------------------------------------------


def test_close_cancels_requests_in_flight_quietly(caplog):
    async def body():
        fake = FakeVLLM(delay_s=30.0)
        runner, url = await serve(fake)
        try:
            client = RolloutClient(url, retry=FAST_RETRY)
            pending = asyncio.ensure_future(client.generate([[1], [2], [3]]))
            while len(fake.requests) < 3:  # all three are on the server
                await asyncio.sleep(0.01)
            await client.close()
            with pytest.raises(asyncio.CancelledError):
                await pending
            return client.counters, client._session
        finally:
            await runner.cleanup()

    with caplog.at_level(logging.WARNING):
        counters, session = asyncio.run(body())
    assert counters.retries == 0 and session is None
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], caplog.text


def test_blocking_close_with_work_in_flight_leaves_nothing_pending(caplog):
    """The training loop's client, closed while another thread waits on a rollout: that thread's call
    ends cancelled, the loop closes with no task left, and nothing is logged."""
    fake = FakeVLLM(delay_s=30.0)
    url, stop_server = _serve_in_thread(fake)
    blocking = BlockingRolloutClient(RolloutClient(url, retry=FAST_RETRY))
    outcome: list[BaseException] = []

    def trainer():
        try:
            blocking.generate([[1], [2]])
        except BaseException as exc:  # noqa: BLE001 (recorded for the assertion)
            outcome.append(exc)

    thread = threading.Thread(target=trainer)
    thread.start()
    try:
        while len(fake.requests) < 2:
            time.sleep(0.01)
        with caplog.at_level(logging.WARNING):
            blocking.close()
        thread.join(timeout=60)
    finally:
        stop_server()
    assert len(outcome) == 1 and isinstance(outcome[0], concurrent.futures.CancelledError), outcome
    assert blocking._loop.is_closed()
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], caplog.text


def _serve_in_thread(fake: FakeVLLM):
    """Run ``fake`` on its own loop thread (the client's loop is closed by the test)."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    runner, url = asyncio.run_coroutine_threadsafe(serve(fake), loop).result()

    def stop():
        asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result()
        loop.call_soon_threadsafe(loop.stop)
        thread.join()
        loop.close()

    return url, stop


@pytest.mark.vllm
def test_sigterm_mid_rollout_closes_quietly(sidecar, tiny_model_dir):
    """A trainer-like process (same SIGTERM handling as ``igrpo train``) is stopped while its rollout
    has requests on the server: it exits 143 with nothing on stderr but its own log lines, and the
    server aborts the abandoned generations."""
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, "-m", "tests.rollout.close_in_flight", sidecar.url, str(tiny_model_dir)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    out, err = proc.stdout, proc.stderr
    assert proc.returncode == 128 + signal.SIGTERM, f"rc {proc.returncode}\nstdout:\n{out}\nstderr:\n{err}"
    assert "requests in flight:" in out and "closed" in out, out
    for noise in ("Task was destroyed", "Event loop is closed", "retrying", "Exception ignored", "Traceback",
                  "Unclosed", "WARNING", "ERROR"):
        assert noise not in err, f"{noise!r} on stderr:\n{err}"
    deadline = time.monotonic() + 120  # the engine aborts them once it sees the disconnects
    while _running_requests(sidecar.url) > 0 and time.monotonic() < deadline:
        time.sleep(0.5)
    assert _running_requests(sidecar.url) == 0
    assert sidecar.is_healthy()


def _running_requests(url: str) -> float:
    with urllib.request.urlopen(f"{url}/metrics", timeout=30) as resp:
        lines = resp.read().decode().splitlines()
    return sum(float(line.rsplit(" ", 1)[1]) for line in lines
               if line.startswith(("vllm:num_requests_running", "vllm:num_requests_waiting{")))
