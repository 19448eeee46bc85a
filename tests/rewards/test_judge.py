"""The generative judge against a canned local HTTP server: request shape, parse rule, retries,
concurrency, and the counted fallback when a reply cannot be parsed or the judge is down."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence

import pytest

from igrpo_megatron.config.ports import free_port
from igrpo_megatron.config.reward import AnswerExtractionConfig, JudgeConfig, RewardConfig
from igrpo_megatron.rewards import build_rewards
from igrpo_megatron.rewards.interfaces import ItemInfo, RewardItem, RewardResult
from igrpo_megatron.rewards.judge import JudgeReward, fill_template, parse_score
from tests.rewards.canned_judge import MODEL_ID, CannedJudge

TEMPLATE = "P={problem}|R={reference}|S={solution}"
DEFAULT_REGEX = JudgeConfig().score_regex


class FixedFallback:
    """A rule-based stand-in: every item scores 0.25 and counts as correct."""

    judges_correctness = True

    def __init__(self):
        self.seen: list[RewardItem] = []

    def score(self, items: Sequence[RewardItem]) -> RewardResult:
        self.seen.extend(items)
        return RewardResult([0.25] * len(items), [ItemInfo(correct=True, answer="fb") for _ in items])

    def close(self) -> None:
        pass


def _judge(url: str, fallback=None, **overrides) -> JudgeReward:
    values = dict(url=url, prompt_template=TEMPLATE, max_retries=2, backoff_s=0.01, backoff_max_s=0.05,
                  request_timeout_s=5.0)
    values.update(overrides)
    return JudgeReward(JudgeConfig(**values), AnswerExtractionConfig(), fallback=fallback)


def _item(name: str, solution: str = "so \\boxed{1}") -> RewardItem:
    return RewardItem(problem=name, gold="1", completion=f"<think>private</think>{solution}")


def _problem(prompt: str) -> str:
    return prompt.split("|")[0][2:]


@pytest.mark.parametrize("reply, expected", [
    ("SCORE: 1", 1.0),
    ("score = 0.25", 0.25),
    ("Looks right.\n**SCORE:** 0.8", 0.8),
    ("SCORE: .5", 0.5),
    ("SCORE: 0 ... on reflection SCORE: 1", 1.0),   # the last one counts
    ("<think>SCORE: 0</think>SCORE: 1", 1.0),       # thinking is ignored
    ("<think>SCORE: 1</think>no verdict", None),
    ("SCORE: 10", None),                             # not "1" followed by junk
    ("SCORE: 1.5", None),                            # outside [0, 1]
    ("I think it is correct", None),
    ("", None),
    (None, None),
])
def test_parse_rule(reply, expected):
    assert parse_score(reply, DEFAULT_REGEX) == expected


def test_parse_rule_is_configurable():
    assert parse_score("<score>0.7</score>", r"<score>\s*([0-9.]+)\s*</score>") == 0.7


def test_template_fills_placeholders_only():
    template = "Solve $\\frac{a}{b}$: {problem} / {reference} / {solution} {other}"
    out = fill_template(template, "p{x}", "\\frac{1}{2}", "uses {problem} literally")
    assert out == "Solve $\\frac{a}{b}$: p{x} / \\frac{1}{2} / uses {problem} literally {other}"


def test_scores_parse_and_requests_carry_the_template():
    replies = {"a": "SCORE: 1", "b": "Partially right. SCORE: 0.25", "c": "SCORE: 0"}
    with CannedJudge(lambda prompt, attempt: (200, replies[_problem(prompt)])) as server:
        judge = _judge(server.url, FixedFallback(), max_tokens=64, temperature=0.0,
                       extra_body={"seed": 7}, system_prompt="be strict")
        result = judge.score([_item("a"), _item("b"), _item("c")])
    assert result.rewards == [1.0, 0.25, 0.0]
    assert result.correct == [True, False, False]  # threshold 0.5
    assert [i.components["judge"] for i in result.info] == [1.0, 0.25, 0.0]
    assert not any(i.judge_fallback for i in result.info)
    # The model came from /v1/models; thinking was dropped from the solution the judge sees.
    assert server.requests[0]["path"] == "/v1/models"
    posts = [r for r in server.requests if r["body"] is not None]
    assert {r["path"] for r in posts} == {"/v1/chat/completions"}
    body = next(r["body"] for r in posts if r["prompt"].startswith("P=a|"))
    assert body["model"] == MODEL_ID and body["max_tokens"] == 64 and body["temperature"] == 0.0
    assert body["seed"] == 7
    assert body["messages"] == [{"role": "system", "content": "be strict"},
                                {"role": "user", "content": "P=a|R=1|S=so \\boxed{1}"}]


def test_completions_api_and_named_model_and_bearer_token(monkeypatch):
    monkeypatch.setenv("JUDGE_TOKEN", "s3cret")
    with CannedJudge(lambda prompt, attempt: (200, "SCORE: 1")) as server:
        judge = _judge(server.url + "/v1/", api="completions", model="my-judge", api_key_env="JUDGE_TOKEN")
        assert judge.score([_item("a")]).rewards == [1.0]
    assert len(server.requests) == 1  # no /v1/models lookup when the model is named
    req = server.requests[0]
    assert req["path"] == "/v1/completions"
    assert req["body"]["prompt"] == "P=a|R=1|S=so \\boxed{1}" and req["body"]["model"] == "my-judge"
    assert req["headers"]["Authorization"] == "Bearer s3cret"


@pytest.mark.faults  # a judge that answers garbage (issue 17, item 9)
def test_unparseable_reply_falls_back_and_is_counted():
    replies = {"a": "SCORE: 1", "b": "I refuse to grade this."}
    fallback = FixedFallback()
    with CannedJudge(lambda prompt, attempt: (200, replies[_problem(prompt)])) as server:
        judge = _judge(server.url, fallback)
        result = judge.score([_item("a"), _item("b")])
    assert result.rewards == [1.0, 0.25]
    assert [i.judge_fallback for i in result.info] == [False, True]
    assert result.info[1].correct is True and result.info[1].answer == "fb"  # from the fallback
    assert "unparseable" in result.info[1].error
    assert [it.problem for it in fallback.seen] == ["b"]
    assert result.counts()["judge_fallback"] == 1
    assert judge.stats.unparseable == 1 and judge.stats.fallbacks == 1
    # Unparseable replies are not retried: one request per item (plus the model lookup).
    assert len(server.requests) == 3


def test_transient_errors_are_retried_with_backoff():
    def script(prompt, attempt):
        name = _problem(prompt)
        if name == "flaky" and attempt < 2:
            return 503, "overloaded"
        if name == "limited" and attempt < 1:
            return 429, "slow down"
        return 200, "SCORE: 1"

    with CannedJudge(script) as server:
        judge = _judge(server.url, FixedFallback(), max_retries=2, backoff_s=0.05)
        t0 = time.monotonic()
        result = judge.score([_item("flaky"), _item("limited"), _item("fine")])
        elapsed = time.monotonic() - t0
    assert result.rewards == [1.0, 1.0, 1.0] and not any(i.judge_fallback for i in result.info)
    tries = {name: sum(1 for p in server.prompts() if _problem(p) == name) for name in ("flaky", "limited", "fine")}
    assert tries == {"flaky": 3, "limited": 2, "fine": 1}
    assert judge.stats.retries == 3
    # Back-off waited 0.05 and 0.1 s (+-25%) before flaky's second and third tries.
    assert elapsed >= 0.75 * (0.05 + 0.1)


def test_client_errors_are_not_retried_and_exhausted_retries_fall_back():
    def script(prompt, attempt):
        return (400, "bad request") if _problem(prompt) == "bad" else (500, "broken")

    with CannedJudge(script) as server:
        judge = _judge(server.url, FixedFallback(), max_retries=2)
        result = judge.score([_item("bad"), _item("down")])
    assert result.rewards == [0.25, 0.25] and all(i.judge_fallback for i in result.info)
    assert "HTTP 400" in result.info[0].error
    assert "unreachable after 3 tries" in result.info[1].error and "HTTP 500" in result.info[1].error
    assert [_problem(p) for p in server.prompts()].count("bad") == 1
    assert [_problem(p) for p in server.prompts()].count("down") == 3


def test_judge_down_falls_back_for_every_item():
    port = free_port()  # a port with nobody listening
    judge = _judge(f"http://127.0.0.1:{port}", FixedFallback(), max_retries=1)
    result = judge.score([_item("a"), _item("b")])
    assert result.rewards == [0.25, 0.25]
    assert all(i.judge_fallback and "unreachable" in i.error for i in result.info)
    # The model lookup failed first, so no scoring request was tried.
    assert judge.stats.unreachable == 1


@pytest.mark.faults  # a judge that answers garbage (issue 17, item 9)
def test_without_a_fallback_failed_items_score_zero():
    with CannedJudge(lambda prompt, attempt: (200, "no idea")) as server:
        result = _judge(server.url, fallback=None).score([_item("a")])
    assert result.rewards == [0.0] and result.info[0].judge_fallback and not result.info[0].correct


def test_slow_replies_time_out_and_fall_back():
    with CannedJudge(lambda prompt, attempt: ("sleep", 2.0, "SCORE: 1")) as server:
        judge = _judge(server.url, FixedFallback(), request_timeout_s=0.3, max_retries=1, model="m")
        t0 = time.monotonic()
        result = judge.score([_item("a")])
    assert time.monotonic() - t0 < 1.8
    assert result.info[0].judge_fallback and "Timeout" in result.info[0].error
    assert len(server.requests) == 2


def test_requests_run_concurrently_up_to_the_limit():
    with CannedJudge(lambda prompt, attempt: ("sleep", 0.3, "SCORE: 1")) as server:
        judge = _judge(server.url, max_concurrency=3, model="m")
        t0 = time.monotonic()
        result = judge.score([_item(f"q{k}") for k in range(9)])
        elapsed = time.monotonic() - t0
    assert result.rewards == [1.0] * 9
    assert server.max_in_flight == 3
    assert elapsed < 9 * 0.3  # three waves of 0.3 s, not nine


def test_cut_off_thinking_is_not_sent_and_scores_zero():
    with CannedJudge(lambda prompt, attempt: (200, "SCORE: 1")) as server:
        judge = _judge(server.url, FixedFallback(), model="m")
        result = judge.score([RewardItem("a", "1", "<think>never finished"), _item("b")])
    assert result.rewards == [0.0, 1.0]
    assert result.info[0].no_answer and not result.info[0].judge_fallback
    assert [_problem(p) for p in server.prompts()] == ["b"]
    full = _judge("http://127.0.0.1:1", solution_view="full", max_solution_chars=10)
    assert full._solution_view("<think>never finished") == "r finished"  # the last 10 characters


def test_score_works_inside_a_running_event_loop():
    with CannedJudge(lambda prompt, attempt: (200, "SCORE: 1")) as server:
        judge = _judge(server.url, model="m")

        async def caller():
            return judge.score([_item("a")])

        assert asyncio.run(caller()).rewards == [1.0]


def test_judge_with_math_fallback_through_the_registry():
    # draft selection by the judge, training reward by math + format; the fallback is the shared pool.
    replies = {"good": "SCORE: 0.9", "garbled": "???"}
    with CannedJudge(lambda prompt, attempt: (200, replies[_problem(prompt)])) as server:
        cfg = RewardConfig(draft_weights={"judge": 1.0})
        cfg.judge.url, cfg.judge.prompt_template, cfg.judge.model = server.url, TEMPLATE, "m"
        cfg.math.num_workers = 1
        with build_rewards(cfg) as rewards:
            items = [_item("good", "\\boxed{2}"), _item("garbled", "\\boxed{1}")]
            draft = rewards.draft.score(items)
            train = rewards.train.score(items)
            assert rewards.components["judge"].fallback is rewards.components["math"]
    # gold is 1: the judge says 0.9 for "good" (it is wrong, but the judge decides); "garbled" falls
    # back to math-verify, which finds \boxed{1} correct.
    assert draft.rewards == [0.9, 1.0]
    assert draft.correct == [True, True]
    assert [i.judge_fallback for i in draft.info] == [False, True]
    assert train.rewards == [1.0, 2.0]  # format 1 each, math 0 / 1
