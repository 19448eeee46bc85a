"""The sampling + scoring loop, test-time refinement and the training hook, on a scripted engine.

The scripted engine (conftest.ScriptedEngine) answers plain prompts from a table and, for
refinement prompts, repeats the answer of the draft shown, so every metric below is hand-computable.
Three problems, n = 4 samples each:

    P0 gold 5: answers 5, 5, 3, -     c = 2: pass@1 .5, pass@2 1 - C(2,2)/C(4,2) = 5/6, maj -> 5 right
    P1 gold 7: answers 1, 2, 2, 7     c = 1: pass@1 .25, pass@2 1 - C(3,2)/C(4,2) = .5, maj -> 2 wrong
    P2 gold 9: no answers             c = 0: all 0, maj none
"""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from igrpo_megatron.config.algorithm import RefinementPromptConfig
from igrpo_megatron.config.evaluation import (
    EvalHookConfig,
    EvalSamplingConfig,
    EvaluationConfig,
    RefinementEvalConfig,
)
from igrpo_megatron.config.reward import AnswerExtractionConfig
from igrpo_megatron.config.schema import RecipeConfig
from igrpo_megatron.evaluation.benchmarks import Benchmark, BenchmarkSpec, Problem
from igrpo_megatron.evaluation.hook import PeriodicEvaluator, subset_positions
from igrpo_megatron.evaluation.records import SampleRecord
from igrpo_megatron.evaluation.refine import pick_drafts
from igrpo_megatron.evaluation.runner import ROUND_STRIDE, SAMPLE_STRIDE, EvaluationError, Evaluator
from igrpo_megatron.rollout.client import BlockingRolloutClient
from tests.evaluation.conftest import ExactReward, ScriptedEngine

PROBLEMS = [Problem(0, "p0", "Problem zero: find x.", "5"), Problem(1, "p1", "Problem one: find y.", "7"),
            Problem(2, "p2", "Problem two: find z.", "9")]
SCRIPT = {"Problem zero": ["5", "5", "3", None], "Problem one": ["1", "2", "2", "7"], "Problem two": [None] * 4}
BENCH = Benchmark(BenchmarkSpec("toy", path="toy.jsonl"), None, PROBLEMS)


def make_evaluator(tokenizer, cfg: EvaluationConfig | None = None, **kwargs) -> Evaluator:
    cfg = cfg or EvaluationConfig(pass_at_k=[1, 2, 4], problems_per_batch=2, sampling=EvalSamplingConfig(seed=1234))
    return Evaluator(cfg, tokenizer, ExactReward(), extraction=AnswerExtractionConfig(),
                     refine_prompt=RefinementPromptConfig(), max_tokens=kwargs.pop("max_tokens", 32), **kwargs)


def test_plain_metrics_match_hand_values(tiny_tokenizer):
    engine = ScriptedEngine(tiny_tokenizer, SCRIPT)
    result = make_evaluator(tiny_tokenizer).evaluate(engine, BENCH, 4)
    m = {k: v.value for k, v in result.metrics.items()}
    assert m["pass@1"] == pytest.approx((0.5 + 0.25 + 0) / 3)           # 0.25
    assert m["pass@2"] == pytest.approx((5 / 6 + 0.5 + 0) / 3)          # 0.4444
    assert m["pass@4"] == pytest.approx(2 / 3)                          # P0 and P1 have a correct sample
    assert m["maj@4"] == pytest.approx(1 / 3)                           # only P0's majority (5) is right
    assert m["no_answer_rate"] == pytest.approx((0.25 + 0 + 1) / 3)
    assert m["truncated_rate"] == 0.0 and m["mean_tokens"] == 5.0
    assert result.per_problem["pass@1"] == [0.5, 0.25, 0.0]
    assert "refine.pass@1" not in m and "pass@8" not in m               # k > n is left out
    p1 = result.metrics["pass@1"]
    assert p1.ci_low <= p1.value <= p1.ci_high and p1.num_problems == 3
    # Every sample is kept with its answer and score.
    assert [s.answer for s in result.problems[1].samples] == ["1", "2", "2", "7"]
    assert [s.correct for s in result.problems[1].samples] == [False, False, False, True]


def test_prompts_seeds_and_batches(tiny_tokenizer):
    engine = ScriptedEngine(tiny_tokenizer, SCRIPT)
    make_evaluator(tiny_tokenizer).evaluate(engine, BENCH, 4)
    # problems_per_batch = 2: batches of 2 and 1 prompts, n = 4, sampling from the evaluation section.
    assert [c[0] for c in engine.calls] == [2, 1]
    params = engine.calls[0][1]
    assert (params.n, params.temperature, params.top_p, params.max_tokens) == (4, 0.6, 0.95, 32)
    # Seeds: 1234 + (round * ROUND_STRIDE + row) * SAMPLE_STRIDE; round 0 for plain prompts.
    assert engine.calls[0][2] == [1234, 1234 + SAMPLE_STRIDE] and engine.calls[1][2] == [1234 + 2 * SAMPLE_STRIDE]
    # The chat template wraps the instruction template around the problem.
    assert engine.prompts[0] == ("<|im_start|>user\nProblem zero: find x.\n\nReason step by step, and put your "
                                 "final answer within \\boxed{}.<|im_end|>\n<|im_start|>assistant\n")


def test_refinement_conditions_on_the_majority_draft(tiny_tokenizer):
    cfg = EvaluationConfig(pass_at_k=[1], refine=RefinementEvalConfig(enabled=True, num_drafts=4),
                           sampling=EvalSamplingConfig(seed=1234))
    engine = ScriptedEngine(tiny_tokenizer, SCRIPT)
    result = make_evaluator(tiny_tokenizer, cfg).evaluate(engine, BENCH, 4)
    r0, r1, r2 = (p.refine[0] for p in result.problems)
    # P0: answers 5,5,3,- -> majority 5 (first at index 0, share 2/4); P1: 1,2,2,7 -> 2 (index 1, share 2/4);
    # P2: no answers -> 'keep' shows draft 0 anyway (share 0).
    assert (r0.picked, r0.picked_answer, r0.vote_share, r0.picked_correct) == (0, "5", 0.5, True)
    assert (r1.picked, r1.picked_answer, r1.vote_share, r1.picked_correct) == (1, "2", 0.5, False)
    assert (r2.picked, r2.vote_share, r2.used_draft) == (0, 0.0, True)
    # The scripted model repeats the shown draft's answer: P0 all right, P1 all wrong, P2 no answer.
    m = {k: v.value for k, v in result.metrics.items()}
    assert m["refine.pass@1"] == pytest.approx(1 / 3) and m["refine.pick_correct"] == pytest.approx(1 / 3)
    assert m["pass@1"] == pytest.approx(0.25)  # the plain numbers are unchanged
    assert m["refine.no_answer_rate"] == pytest.approx(1 / 3)
    refine_prompts = [p for p in engine.prompts if "Earlier attempt:" in p]
    assert len(refine_prompts) == 3 and "\\boxed{2}" in refine_prompts[1]
    assert r0.prompt_tokens > result.problems[0].prompt_tokens  # the draft made the prompt longer
    # Refinement requests (one batch of the 3 problems) use round 1 seeds.
    assert engine.calls[-1][2] == [1234 + (1 * ROUND_STRIDE + row) * SAMPLE_STRIDE for row in range(3)]


def test_refinement_extra_drafts_rounds_and_no_draft_policy(tiny_tokenizer):
    cfg = EvaluationConfig(pass_at_k=[1], refine=RefinementEvalConfig(enabled=True, num_drafts=3, num_rounds=2,
                                                                    no_answer_policy="no_draft"))
    engine = ScriptedEngine(tiny_tokenizer, SCRIPT)
    result = make_evaluator(tiny_tokenizer, cfg).evaluate(engine, BENCH, 2)
    p0, p1, p2 = result.problems
    # n = 2 < 3 drafts: one extra draft per problem (the script's sample 0 again: 5, 1, none).
    assert [s.answer for s in p0.extra_drafts] == ["5"] and [s.answer for s in p1.extra_drafts] == ["1"]
    # P1 drafts 1, 2, 1 -> majority 1 (index 0); P2 has no answers -> refined from the plain prompt.
    assert p1.refine[0].picked_answer == "1" and not p2.refine[0].used_draft
    assert [r.round for r in p0.refine] == [1, 2]
    assert "refine.r1.pass@1" in result.metrics and "refine.r2.pass@1" in result.metrics
    assert result.metrics["refine.pass@1"] == result.metrics["refine.r2.pass@1"]


def test_refinement_prompt_is_cut_to_the_token_budget(tiny_tokenizer):
    base = EvaluationConfig(pass_at_k=[1], refine=RefinementEvalConfig(enabled=True))
    full = make_evaluator(tiny_tokenizer, base).evaluate(ScriptedEngine(tiny_tokenizer, SCRIPT), BENCH, 4).problems[0]
    budget = full.refine[0].prompt_tokens - 3
    tight = replace(base, refine=replace(base.refine, max_prompt_tokens=budget))
    engine = ScriptedEngine(tiny_tokenizer, SCRIPT)
    cut = make_evaluator(tiny_tokenizer, tight).evaluate(engine, BENCH, 4).problems[0].refine[0]
    assert cut.used_draft and cut.draft_truncated and cut.prompt_tokens <= budget
    shown = engine.prompts[-3].split("Earlier attempt:")[1]
    assert shown.lstrip().startswith("[...]") and "\\boxed{5}" in shown  # keep_tail: the answer survives
    assert [s.answer for s in cut.samples] == ["5"] * 4
    # Room for the plain prompt only: refined from the plain prompt, and the record says so.
    none = replace(base, refine=replace(base.refine, max_prompt_tokens=full.prompt_tokens + 2))
    r = make_evaluator(tiny_tokenizer, none).evaluate(ScriptedEngine(tiny_tokenizer, SCRIPT), BENCH, 4).problems[0]
    assert not r.refine[0].used_draft and r.refine[0].prompt_tokens == r.prompt_tokens


def test_pick_drafts_tie_break_shortest():
    pool = [SampleRecord("a", "3", False, 0.0, "stop", 9), SampleRecord("b", "4", True, 1.0, "stop", 2),
            SampleRecord("c", None, False, 0.0, "stop", 1)]
    # 3 and 4 each hold 1/3 of the votes: 'first' takes index 0, 'shortest' the 2-token sample.
    assert pick_drafts([pool], RefinementEvalConfig(tie_break="first"))[0].index == 0
    assert pick_drafts([pool], RefinementEvalConfig(tie_break="shortest"))[0].index == 1
    assert pick_drafts([pool], RefinementEvalConfig(pick="first"))[0].index == 0


def test_without_a_seed_requests_carry_none(tiny_tokenizer):
    engine = ScriptedEngine(tiny_tokenizer, SCRIPT)
    make_evaluator(tiny_tokenizer, EvaluationConfig()).evaluate(engine, BENCH, 2)
    assert engine.calls[0][2] == [None, None, None]  # the engine's own random stream


def test_too_long_prompts_are_refused_before_sampling(tiny_tokenizer):
    engine = ScriptedEngine(tiny_tokenizer, SCRIPT)
    ev = make_evaluator(tiny_tokenizer, max_model_len=40, max_tokens=32)
    with pytest.raises(EvaluationError, match=r"toy: 3 prompt\(s\) do not fit.*max_model_len 40"):
        ev.evaluate(engine, BENCH, 2)
    assert engine.calls == []


def test_engine_returning_too_few_samples_is_an_error(tiny_tokenizer):
    class Short(ScriptedEngine):
        async def generate(self, prompts, sampling=None, seeds=None):
            groups = await super().generate(prompts, sampling, seeds)
            return groups[:-1]

    with pytest.raises(EvaluationError, match="must return n per prompt"):
        make_evaluator(tiny_tokenizer).evaluate(Short(tiny_tokenizer, SCRIPT), BENCH, 2)


def test_hook_evaluates_a_fixed_subset_on_a_blocking_client(tiny_tokenizer, tmp_path):
    rows = [{"problem": f"Problem {w}: compute.", "answer": str(i)} for i, w in enumerate(
        ["zero", "one", "two", "three", "four", "five"])]
    path = tmp_path / "held.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    recipe = RecipeConfig()
    recipe.data.eval_path = str(path)
    recipe.trainer.eval_every = 5
    recipe.run.output_dir = str(tmp_path / "runs")
    recipe.evaluation = EvaluationConfig(hook=EvalHookConfig(num_problems=4, samples_per_problem=2), plot=False)
    # Every problem answered right by sample 0 and wrong by sample 1: pass@1 = .5 on any subset.
    script = {f"Problem {r['problem'].split()[1]}": [r["answer"], "-1"] for r in rows}
    reward = ExactReward()
    hook = PeriodicEvaluator(recipe, tokenizer=tiny_tokenizer, reward=reward)
    assert [p.index for p in hook.benchmarks[0].problems] == subset_positions(6, 4, recipe.run.seed)
    assert len(hook.benchmarks[0]) == 4
    engine = ScriptedEngine(tiny_tokenizer, script, policy_version=3)
    with BlockingRolloutClient(engine) as blocking:
        metrics = hook(blocking, step=10)
    assert metrics["eval/heldout/pass@1"] == pytest.approx(0.5)
    assert metrics["eval/heldout/pass@2"] == pytest.approx(1.0)
    assert metrics["eval/heldout/pass@1_ci_low"] == pytest.approx(0.5)  # no spread over problems
    written = json.loads((tmp_path / "runs" / "igrpo" / "eval" / "step_000010" / "results.json").read_text())
    assert written["model"] == "policy version 3" and written["benchmarks"]["heldout"]["num_problems"] == 4
    hook.close()
    assert not reward.closed  # a shared reward belongs to the trainer


def test_subset_positions():
    assert subset_positions(5, 0, 1) == [0, 1, 2, 3, 4] and subset_positions(5, 9, 1) == [0, 1, 2, 3, 4]
    picked = subset_positions(100, 10, 7)
    assert picked == sorted(set(picked)) and len(picked) == 10 and picked == subset_positions(100, 10, 7)
