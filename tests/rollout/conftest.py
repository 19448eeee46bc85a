"""Shared fixtures for the rollout tests: one tiny Qwen2 and one vLLM server for the whole session.

A vLLM start costs 20-50 s on 2 cores, so every module shares the session's server. Modules that
kill or stop it set ``RUN_LAST = True`` and run after all others. Tests that need the server carry
``@pytest.mark.vllm`` (tests/conftest.py skips them, with the reason, where vLLM is missing).
"""

from __future__ import annotations

import pytest

from igrpo_megatron.config.rollout import RolloutServerConfig
from igrpo_megatron.rollout.server import RolloutServer, live_group_members
from tests.helpers.tiny_models import build_tiny_qwen2


def pytest_collection_modifyitems(config, items):
    # Stable sort: only tests of RUN_LAST modules move, to the end, keeping their own order.
    items.sort(key=lambda item: bool(getattr(item.module, "RUN_LAST", False)))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A random-init 2-layer Qwen2 (hidden 128, untied embeddings) with a byte-level BPE tokenizer."""
    return build_tiny_qwen2(tmp_path_factory.mktemp("tiny_qwen2"), seed=0)


def sidecar_config(**overrides) -> RolloutServerConfig:
    values = dict(port=0, dtype="float32", kv_cache_space_gib=1, max_model_len=512, max_restarts=2,
                  shutdown_grace_s=10.0, health_poll_interval_s=0.5, start_timeout_s=240.0,
                  enforce_eager=True)  # no torch.compile: starts faster on 2 cores
    values.update(overrides)
    return RolloutServerConfig(**values)


@pytest.fixture(scope="session")
def _session_sidecar(tiny_model_dir, tmp_path_factory):
    server = RolloutServer(sidecar_config(), model_path=tiny_model_dir,
                           log_dir=tmp_path_factory.mktemp("vllm_logs"))
    yield server
    pgid = server.pid
    server.close()
    if pgid is not None:
        assert not live_group_members(pgid), f"vLLM processes left behind: {live_group_members(pgid)}"


@pytest.fixture
def sidecar(_session_sidecar) -> RolloutServer:
    """The session's vLLM server, started (again) if it is not running."""
    if not _session_sidecar.is_alive():
        _session_sidecar.start()
    return _session_sidecar
