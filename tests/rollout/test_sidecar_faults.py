"""A hung sidecar request (issue 17, item 5): timed out, retried within bounds, reported.

Injected with the in-process fake of vLLM's HTTP API (tests/rollout/fake_server.py), whose first
requests never answer. The real client (``RolloutClient``, what the loop uses) must give up on each
after ``rollout.retry.request_timeout_s``, retry, count the retry, and after
``rollout.retry.max_attempts`` raise an error naming the server. The other sidecar faults: a killed
server (tests/rollout/test_lifecycle.py::test_crash_mid_batch_fails_loudly_then_recovers), a refused
weight update and stale rollouts through the loop (tests/training/test_step_faults.py).
"""

from __future__ import annotations

import asyncio

import pytest

from igrpo_megatron.config.rollout import RetryConfig
from igrpo_megatron.rollout.client import RolloutClient
from igrpo_megatron.rollout.interfaces import SidecarUnavailableError
from tests.rollout.fake_server import FakeVLLM, serve

pytestmark = pytest.mark.faults

RETRY = RetryConfig(max_attempts=3, initial_backoff_s=0.05, max_backoff_s=0.1, request_timeout_s=1.0)


async def _generate(fake: FakeVLLM):
    runner, url = await serve(fake)
    try:
        async with RolloutClient(url, retry=RETRY) as client:
            try:
                return await client.generate([[10]]), client.counters, url
            except SidecarUnavailableError as exc:
                return exc, client.counters, url
    finally:
        await runner.cleanup()


def test_a_hung_request_times_out_and_the_retry_answers():
    fake = FakeVLLM(hang_first=1)
    groups, counters, _ = asyncio.run(_generate(fake))
    assert len(fake.requests) == 2  # the hung one, then the retry
    assert [c.token_ids for c in groups[0].completions] == [[11, 0]]
    assert counters.retries == 1 and sum(counters.errors.values()) == 1


def test_a_server_that_always_hangs_fails_after_max_attempts_naming_it():
    fake = FakeVLLM(hang_first=100)
    err, counters, url = asyncio.run(_generate(fake))
    assert isinstance(err, SidecarUnavailableError) and url in str(err)
    assert len(fake.requests) == RETRY.max_attempts and counters.retries == RETRY.max_attempts - 1
