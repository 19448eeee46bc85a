"""The rollout recipe section: defaults are valid, every broken rule is reported with its key."""

from __future__ import annotations

from igrpo_megatron.config.rollout import RolloutConfig
from igrpo_megatron.rollout.interfaces import SamplingParams


def test_defaults_are_valid_and_match_the_paper():
    cfg = RolloutConfig()
    assert cfg.errors() == []
    # Reference run: training temperature 0.7, completions up to 4,096 tokens.
    assert cfg.sampling.temperature == 0.7 and cfg.sampling.max_tokens == 4096


def test_all_errors_are_reported_at_once_with_their_keys():
    cfg = RolloutConfig()
    cfg.server.dtype = "fp8"
    cfg.server.port = 70000
    cfg.server.url = "node12:8000"
    cfg.server.max_model_len = 1024  # not more than max_tokens = 4096
    cfg.sampling.top_p = 0.0
    cfg.max_concurrency = 0
    errors = "\n".join(cfg.errors())
    for key in ["rollout.server.dtype", "rollout.server.port", "rollout.server.url",
                "rollout.server.max_model_len", "rollout.sampling.top_p", "rollout.max_concurrency"]:
        assert key in errors, f"{key} missing from:\n{errors}"
    assert len(cfg.errors()) == 6


def test_sampling_params_from_config():
    cfg = RolloutConfig()
    cfg.sampling.stop = ["</answer>"]
    params = SamplingParams.from_config(cfg.sampling, n=4)
    assert params.n == 4 and params.stop == ("</answer>",) and params.temperature == 0.7
