"""The async rollout client: sampling settings honoured, log-probs equal to the model's, retries,
bounded concurrency, and version stamping around weight updates.

Tests marked ``vllm`` use the session's tiny-Qwen2 vLLM server (see conftest.py); the others use an
in-process fake of the HTTP API.
"""

from __future__ import annotations

import asyncio

import pytest

from igrpo_megatron.config.ports import free_port
from igrpo_megatron.config.rollout import RetryConfig, RolloutConfig
from igrpo_megatron.rollout.client import BlockingRolloutClient, RolloutClient
from igrpo_megatron.rollout.interfaces import (
    CompletionGroup,
    RolloutEngine,
    RolloutRequestError,
    SamplingParams,
    SidecarUnavailableError,
    StaleWeightsError,
)
from tests.helpers.tiny_models import hf_token_logprobs
from tests.rollout.fake_server import FakeVLLM, serve

FAST_RETRY = RetryConfig(max_attempts=3, initial_backoff_s=0.05, max_backoff_s=0.1, request_timeout_s=60)
PROMPTS = [[5, 17, 42, 99, 7], [300, 12, 9], [2, 80, 81, 82, 83, 84, 85]]


def _run(coro):
    return asyncio.run(coro)


async def _with_client(url, fn, **kwargs):
    async with RolloutClient(url, **kwargs) as client:
        return await fn(client)


# --- against the real server ----------------------------------------------------------------------


@pytest.mark.vllm
def test_n_and_max_tokens_are_honoured(sidecar):
    params = SamplingParams(temperature=1.0, max_tokens=12, n=3, seed=7)
    groups = _run(_with_client(sidecar.url, lambda c: c.generate(PROMPTS, params), retry=FAST_RETRY))
    assert [g.prompt_token_ids for g in groups] == PROMPTS
    for group in groups:
        assert len(group.completions) == 3 and group.policy_version == 0
        for c in group.completions:
            assert 1 <= len(c.token_ids) <= 12
            assert len(c.logprobs) == len(c.token_ids)
            # Stopping early is only allowed on EOS (id 1 in the tiny tokenizer), which is then the last token.
            assert c.finish_reason == ("length" if len(c.token_ids) == 12 else "stop")
            if c.finish_reason == "stop":
                assert c.token_ids[-1] == 1
        # Sample i of a seeded request uses seed + i, so the three samples differ.
        assert len({tuple(c.token_ids) for c in group.completions}) == 3


@pytest.mark.vllm
def test_stop_string_ends_generation(sidecar):
    prompt = PROMPTS[0]
    greedy = SamplingParams(temperature=0.0, max_tokens=40)
    full = _run(_with_client(sidecar.url, lambda c: c.generate_one(prompt, greedy))).completions[0]
    # Pick a short ASCII stop string from the middle of the unconstrained output.
    stop = next((full.text[i:i + 2] for i in range(4, len(full.text) - 2)
                 if full.text[i:i + 2].isascii() and full.text[i:i + 2].isprintable()), None)
    assert stop is not None, f"greedy output has no usable stop string: {full.text!r}"
    cut = _run(_with_client(sidecar.url, lambda c: c.generate_one(prompt, SamplingParams(
        temperature=0.0, max_tokens=40, stop=(stop,))))).completions[0]
    assert cut.finish_reason == "stop" and cut.stop_reason == stop
    assert cut.text == full.text[: full.text.index(stop)]
    # The sampled ids are a prefix of the unconstrained ones; they keep the token that completed the stop string.
    assert cut.token_ids == full.token_ids[: len(cut.token_ids)]
    assert len(cut.token_ids) < len(full.token_ids)


@pytest.mark.vllm
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_logprobs_match_transformers(sidecar, tiny_model_dir, temperature):
    """Returned log-probs are those of the distribution sampled (processed_logprobs, the default mode):
    teacher-forced transformers at the same temperature agrees to 1e-3."""
    params = SamplingParams(temperature=temperature, max_tokens=16, n=2, seed=11)
    groups = _run(_with_client(sidecar.url, lambda c: c.generate(PROMPTS[:2], params)))
    worst = 0.0
    for group in groups:
        for c in group.completions:
            ref = hf_token_logprobs(tiny_model_dir, group.prompt_token_ids, c.token_ids, temperature=temperature)
            worst = max(worst, max(abs(a - b) for a, b in zip(c.logprobs, ref, strict=True)))
    assert worst < 1e-3, f"largest |vLLM - transformers| log-prob difference: {worst}"


@pytest.mark.vllm
def test_blocking_client_and_protocol(sidecar):
    client = RolloutClient(sidecar.url, sampling=SamplingParams(temperature=0.0, max_tokens=4))
    assert isinstance(client, RolloutEngine)
    with BlockingRolloutClient(client) as blocking:
        assert blocking.health()
        groups = blocking.generate([PROMPTS[1]])
    assert isinstance(groups[0], CompletionGroup) and len(groups[0].completions[0].token_ids) >= 1


# --- against the fake server ----------------------------------------------------------------------


def test_payload_follows_recipe_sampling():
    cfg = RolloutConfig()
    cfg.sampling.temperature, cfg.sampling.top_p, cfg.sampling.stop = 0.6, 0.95, ["</answer>"]
    cfg.sampling.max_tokens, cfg.sampling.n, cfg.sampling.seed = 64, 4, 123
    client = RolloutClient.from_config(cfg, "http://x:1")
    payload = client._payload([3, 4], client.sampling, seed=None)
    assert payload["prompt"] == [3, 4] and payload["max_tokens"] == 64 and payload["n"] == 4
    assert payload["temperature"] == 0.6 and payload["top_p"] == 0.95 and payload["stop"] == ["</answer>"]
    assert payload["seed"] == 123 and payload["logprobs"] == 0 and payload["return_token_ids"] is True
    assert client._payload([3], client.sampling, seed=9)["seed"] == 9  # a per-prompt seed wins


def test_transient_5xx_is_retried():
    async def body():
        fake = FakeVLLM(fail_first=2, fail_status=503)
        runner, url = await serve(fake)
        try:
            async with RolloutClient(url, retry=FAST_RETRY) as client:
                group = await client.generate_one([10], SamplingParams(n=2))
        finally:
            await runner.cleanup()
        return fake, group

    fake, group = _run(body())
    assert len(fake.requests) == 3  # two 503s, then success
    assert [c.token_ids for c in group.completions] == [[11, 0], [11, 1]]
    assert group.completions[1].logprobs == [-0.5, -1.5]


def test_4xx_is_not_retried():
    async def body():
        fake = FakeVLLM(fail_first=5, fail_status=400)
        runner, url = await serve(fake)
        try:
            async with RolloutClient(url, retry=FAST_RETRY) as client:
                with pytest.raises(RolloutRequestError, match="HTTP 400"):
                    await client.generate([[1], [2]])
        finally:
            await runner.cleanup()
        return fake

    assert len(_run(body()).requests) == 2  # one try per prompt


def test_unreachable_server_raises_naming_the_url():
    port = free_port()  # a port nobody listens on
    url = f"http://127.0.0.1:{port}"
    with pytest.raises(SidecarUnavailableError) as info:
        _run(_with_client(url, lambda c: c.generate([[1], [2], [3]]), retry=FAST_RETRY))
    err = info.value
    assert err.url == url and url in str(err) and "3 of 3" in str(err)
    assert len(err.results) == 3 and all(isinstance(r, SidecarUnavailableError) for r in err.results)


def test_concurrency_is_bounded_and_order_kept():
    async def body():
        fake = FakeVLLM(delay_s=0.05)
        runner, url = await serve(fake)
        try:
            async with RolloutClient(url, max_concurrency=3) as client:
                groups = await client.generate([[i] for i in range(1, 13)])
        finally:
            await runner.cleanup()
        return fake, groups

    fake, groups = _run(body())
    assert fake.max_in_flight == 3
    assert [g.prompt_token_ids for g in groups] == [[i] for i in range(1, 13)]
    assert [g.completions[0].token_ids[0] for g in groups] == list(range(2, 14))


def test_weight_update_waits_for_running_requests_and_holds_new_ones():
    async def body():
        fake = FakeVLLM(delay_s=0.3)
        runner, url = await serve(fake)
        try:
            async with RolloutClient(url) as client:
                before = asyncio.create_task(client.generate_one([1], seed=1))
                await asyncio.sleep(0.1)  # request 1 is running on the server now

                async def update():
                    async with client.weight_update() as handle:
                        fake.events.append(("update", asyncio.get_running_loop().time(), None))
                        await asyncio.sleep(0.2)
                        handle.commit(7)

                swap = asyncio.create_task(update())
                await asyncio.sleep(0.05)
                after = asyncio.create_task(client.generate_one([2], seed=2))  # sent during the update
                first, second = await before, await after
                await swap
        finally:
            await runner.cleanup()
        return fake, first, second, client

    fake, first, second, client = _run(body())
    kinds = [(kind, seed) for kind, _, seed in fake.events]
    # The update starts only after request 1 finished; request 2 reaches the server only after the update.
    assert kinds == [("start", 1), ("end", 1), ("update", None), ("start", 2), ("end", 2)]
    assert first.policy_version == 0 and second.policy_version == 7
    assert all(c.policy_version == 7 for c in second.completions)
    assert client.policy_version == 7


def test_failed_update_keeps_the_version():
    async def body():
        async with RolloutClient("http://127.0.0.1:9") as client:
            with pytest.raises(RuntimeError):
                async with client.weight_update():
                    raise RuntimeError("transport failed")
            return client.policy_version

    assert _run(body()) == 0


def test_restarted_server_with_initial_weights_is_detected():
    async def body(label):
        fake = FakeVLLM(weight_version=label)
        runner, url = await serve(fake)
        try:
            async with RolloutClient(url, initial_version=3) as client:
                return await client.generate([[1], [2]])
        finally:
            await runner.cleanup()

    assert [g.policy_version for g in _run(body("3"))] == [3, 3]  # server still holds version 3
    with pytest.raises(StaleWeightsError, match="push the current weights again") as info:
        _run(body("default"))  # server came back from its initial checkpoint
    assert len(info.value.results) == 2
