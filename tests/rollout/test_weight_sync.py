"""Weight sync: staged safetensors shards, and a real push into the sidecar after which its outputs
are those of the NEW weights (compared with transformers), not the old.

The new weights come from a second random model, so every tensor changes, the output layer
included: a reload that left ``lm_head`` stale (the tied-embedding bug of DESIGN.md section 4)
would fail the log-prob comparison.
"""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from igrpo_megatron.config.rollout import WeightSyncConfig
from igrpo_megatron.rollout.client import RolloutClient
from igrpo_megatron.rollout.interfaces import SamplingParams, WeightSyncError, WeightTransport
from igrpo_megatron.rollout.weight_sync import (
    INDEX_FILE,
    SharedMemoryReloadTransport,
    WeightSynchronizer,
    stage_weights,
)
from tests.helpers.tiny_models import build_tiny_qwen2, hf_token_logprobs, load_state_dict

PROMPTS = [[5, 17, 42, 99, 7], [300, 12, 9, 44]]
GREEDY = SamplingParams(temperature=0.0, max_tokens=12)


def test_stage_weights_writes_bounded_shards_atomically(tmp_path):
    state = {f"layer.{i}.weight": torch.randn(64, 64) for i in range(5)}  # 16 KiB each
    state["view.weight"] = torch.randn(8, 64)[:4]  # a view: must be copied out of its larger storage
    out = stage_weights(state.items(), tmp_path, bucket_bytes=40 * 1024, version=3)
    assert out.parent == tmp_path and out.name.startswith("igrpo-weights-v3-")
    assert sorted(p.name for p in tmp_path.iterdir()) == [out.name]  # no temporary directory left
    shards = sorted(out.glob("*.safetensors"))
    assert len(shards) == 3  # 16+16 | 16+16 | 16+1 KiB with a 40 KiB bound
    index = json.loads((out / INDEX_FILE).read_text())
    assert set(index["weight_map"]) == set(state)
    loaded = {}
    for shard in shards:
        loaded.update(load_file(str(shard)))
    for name, tensor in state.items():
        assert torch.equal(loaded[name], tensor)


def test_stage_weights_rejects_bad_input(tmp_path):
    with pytest.raises(WeightSyncError, match="given twice"):
        stage_weights([("a", torch.zeros(2)), ("a", torch.ones(2))], tmp_path, 1 << 20, version=1)
    with pytest.raises(WeightSyncError, match="no weights"):
        stage_weights([], tmp_path, 1 << 20, version=1)
    assert list(tmp_path.iterdir()) == []  # failed writes leave nothing behind
    with pytest.raises(WeightSyncError, match="shm_root"):
        stage_weights([("a", torch.zeros(2))], tmp_path / "missing", 1 << 20, version=1)


def test_transport_satisfies_protocol():
    transport = SharedMemoryReloadTransport.from_config(WeightSyncConfig(bucket_size_mb=2),
                                                        RolloutClient("http://x:1"))
    assert isinstance(transport, WeightTransport) and transport.bucket_bytes == 2 << 20


def _greedy(url: str):
    async def gen():
        async with RolloutClient(url) as client:
            return await client.generate(PROMPTS, GREEDY)

    return asyncio.run(gen())


def _worst_gap(groups, model_dir: Path, state: dict[str, torch.Tensor]) -> float:
    """Largest |server - transformers(state)| log-prob over the greedy tokens of ``groups``."""
    worst = 0.0
    for group in groups:
        c = group.completions[0]
        ref = hf_token_logprobs(model_dir, group.prompt_token_ids, c.token_ids, state=state)
        worst = max(worst, max(abs(a - b) for a, b in zip(c.logprobs, ref, strict=True)))
    return worst


@pytest.mark.vllm
def test_push_switches_the_server_to_the_new_weights(sidecar, tiny_model_dir, tmp_path):
    old = load_state_dict(tiny_model_dir)
    new = load_state_dict(build_tiny_qwen2(tmp_path / "other", tokenizer=tiny_model_dir, seed=1, init_std=0.05))
    assert set(new) == set(old) and "lm_head.weight" in new

    assert _worst_gap(_greedy(sidecar.url), tiny_model_dir, old) < 1e-3

    async def push(state, **kwargs):
        async with RolloutClient(sidecar.url) as client:
            transport = SharedMemoryReloadTransport(client, bucket_bytes=256 * 1024)  # several shards
            sync = WeightSynchronizer(client, transport)
            version = await sync.sync(state.items(), **kwargs)
            stamped = await client.generate_one(PROMPTS[0], GREEDY)
            return version, stamped.policy_version, await sync.server_version(), await sync.server_in_sync()

    try:
        version, stamped, server_version, in_sync = asyncio.run(push(new))
        assert (version, stamped, server_version, in_sync) == (1, 1, "1", True)
        after = _greedy(sidecar.url)
        gap_new = _worst_gap(after, tiny_model_dir, new)
        assert gap_new < 1e-3, f"outputs do not follow the new weights (gap {gap_new})"
        assert _worst_gap(after, tiny_model_dir, old) > 1e-2  # ... and not those of the old weights
        leftovers = [p for p in Path("/dev/shm").glob(f"igrpo-weights-*-{os.getpid()}-*")]
        assert leftovers == []
    finally:
        # Put the original weights back (version 2) so other modules see the model on disk.
        version, *_ = asyncio.run(push(old, version=2))
    assert version == 2
    assert _worst_gap(_greedy(sidecar.url), tiny_model_dir, old) < 1e-3


def test_version_must_increase():
    async def body():
        async with RolloutClient("http://127.0.0.1:9", initial_version=5) as client:
            sync = WeightSynchronizer(client, SharedMemoryReloadTransport(client))
            with pytest.raises(WeightSyncError, match="must increase"):
                await sync.sync([("x", torch.zeros(1))], version=5)
            return client.policy_version

    assert asyncio.run(body()) == 5
