"""One prompt path: the training rollout, the warm-start and evaluation send the same token ids.

The same problem goes through ``TwoStageRollout`` (training) and ``Evaluator`` (evaluation, with
test-time refinement on) against a scripted engine (tests/helpers/scripted_rollout.py) that answers
every plain prompt with the same draft; the ids each path sends, plain and draft-conditioned, must
be identical under the same prompt settings. The problem has LaTeX braces and the literal text
``{problem}``, which must survive filling the template.
"""

from __future__ import annotations

import asyncio
import random
from dataclasses import replace

import pytest

from igrpo_megatron.config.algorithm import AlgorithmConfig
from igrpo_megatron.config.evaluation import EvaluationConfig, RefinementEvalConfig
from igrpo_megatron.config.reward import AnswerExtractionConfig
from igrpo_megatron.config.schema import RecipeConfig
from igrpo_megatron.config.training import DataConfig
from igrpo_megatron.data.datasets import PromptRecord
from igrpo_megatron.data.prompts import PromptError, PromptFormatter
from igrpo_megatron.data.synthetic import build_task
from igrpo_megatron.evaluation.benchmarks import Benchmark, BenchmarkSpec, Problem
from igrpo_megatron.evaluation.runner import Evaluator
from igrpo_megatron.training.warmstart import _sequences
from tests.helpers.scripted_rollout import ScriptedEngine, run_step

PROBLEM = "Let $f(x) = \\frac{x}{2}$ and {problem} stay as written. What is $f(10)$?"
DRAFT = "<think>" + "half of ten is five " * 6 + "</think><answer>5</answer>"
TEMPLATE = "Solve: {problem}\nGive the answer inside <answer></answer>. Braces {like} this stay."


def training_ids(tokenizer, rewards, data: DataConfig, alg: AlgorithmConfig, budget: int):
    """(plain, refinement) prompt ids the training rollout sends for PROBLEM."""
    engine = ScriptedEngine(tokenizer, lambda text, n, seed: [DRAFT] * n)
    run_step(engine, PromptFormatter(tokenizer, data), rewards, alg, [PromptRecord(PROBLEM, "5")],
             max_prompt_length=budget)
    drafts, refine = engine.requests
    return drafts.prompt_ids, refine.prompt_ids


def evaluation_ids(tokenizer, rewards, cfg: EvaluationConfig, alg: AlgorithmConfig):
    """(plain, refinement) prompt ids evaluation sends for PROBLEM (plain samples, then round 1)."""
    engine = ScriptedEngine(tokenizer, lambda text, n, seed: [DRAFT] * n)
    ev = Evaluator(cfg, tokenizer, rewards.train, extraction=AnswerExtractionConfig(), refine_prompt=alg.igrpo.prompt,
                   max_tokens=16)
    bench = Benchmark(BenchmarkSpec("toy", path="toy.jsonl"), None, [Problem(0, "p0", PROBLEM, "5")])
    asyncio.run(ev.evaluate_async(engine, bench, 2, refine=True, ks=[1]))
    plain, refine = engine.requests
    return plain.prompt_ids, refine.prompt_ids


@pytest.mark.parametrize("system_prompt, use_chat", [(None, True), ("", True), ("Be brief.", True), (None, False)],
                         ids=["no-system", "empty-system", "system", "no-chat-template"])
@pytest.mark.parametrize("cut", [False, True], ids=["whole-draft", "draft-cut-to-budget"])
def test_training_and_evaluation_send_the_same_ids(tiny_tokenizer, rewards, system_prompt, use_chat, cut):
    data = DataConfig(prompt_template=TEMPLATE, system_prompt=system_prompt, use_chat_template=use_chat)
    alg = AlgorithmConfig()
    alg.igrpo.num_drafts, alg.igrpo.num_refinements, alg.igrpo.grpo_equivalent_budget = 2, 2, 4
    alg.igrpo.prompt.strip_think = False
    fmt = PromptFormatter(tiny_tokenizer, data)
    whole = fmt.refinement(PROBLEM, DRAFT, alg.igrpo.prompt, None)
    budget = len(whole.ids) - 10 if cut else 4096
    train_plain, train_refine = training_ids(tiny_tokenizer, rewards, data, alg, budget)
    cfg = EvaluationConfig(prompt_template=TEMPLATE, system_prompt=system_prompt, use_chat_template=use_chat,
                           refine=RefinementEvalConfig(enabled=True, num_drafts=2, max_prompt_tokens=budget))
    eval_plain, eval_refine = evaluation_ids(tiny_tokenizer, rewards, cfg, alg)
    assert train_plain == eval_plain == fmt.encode_problem(PROBLEM)
    assert train_refine == eval_refine and len(train_refine) <= budget
    text = tiny_tokenizer.decode(train_refine)
    assert PROBLEM in text and "Braces {like} this stay." in text and "{draft}" not in text
    assert ("[...]" in text) == cut and ("<answer>5</answer>" in text)
    assert ("<|im_start|>system" in text) == (use_chat and system_prompt is not None)
    assert ("<|im_start|>assistant" in text) == use_chat


def test_warmstart_builds_draft_conditioned_prompts_the_same_way(tiny_tokenizer):
    recipe = RecipeConfig()
    recipe.data.synthetic_task = "arithmetic"
    recipe.trainer.warmstart.num_examples = 6
    recipe.trainer.warmstart.refinement_fraction = 1.0
    fmt = PromptFormatter(tiny_tokenizer, recipe.data)
    items = build_task("arithmetic").generate(6, "train", seed=recipe.run.seed + 1)
    seqs = _sequences(recipe, fmt)
    assert len(seqs) == len(items)
    cfg, budget = recipe.algorithm.igrpo.prompt, recipe.data.max_prompt_length
    for item, seq in zip(items, seqs, strict=True):
        # the draft is one of the task's solutions; the prompt is what the rollout would send for it
        candidates = [fmt.refinement(item.problem, other.solution, cfg, budget) for other in items]
        assert seq.prompt_ids in [c.ids for c in candidates if c is not None]
        assert seq.prompt_ids != fmt.encode_problem(item.problem)


def test_settings_errors_name_the_section(tiny_tokenizer):
    with pytest.raises(PromptError, match=r"evaluation\.prompt_template must contain \{problem\} exactly once"):
        PromptFormatter(tiny_tokenizer, EvaluationConfig(prompt_template="no placeholder"), section="evaluation")
    with pytest.raises(PromptError, match=r"data\.prompt_template .* \(found 2\)"):
        PromptFormatter(tiny_tokenizer, DataConfig(prompt_template="{problem} {problem}"))
    bare = type(tiny_tokenizer).from_pretrained(tiny_tokenizer.name_or_path)
    bare.chat_template = None
    with pytest.raises(PromptError, match=r"data\.use_chat_template"):
        PromptFormatter(bare, DataConfig())
    assert PromptFormatter(bare, replace(DataConfig(), use_chat_template=False)).encode_problem("1 + 1") != []


def test_no_room_for_the_draft_gives_none(tiny_tokenizer):
    fmt = PromptFormatter(tiny_tokenizer, DataConfig())
    cfg = AlgorithmConfig().igrpo.prompt
    plain = len(fmt.encode_problem(PROBLEM))
    assert fmt.refinement(PROBLEM, DRAFT, cfg, plain + 5) is None  # the template alone is longer
    rng = random.Random(0)
    words = " ".join(rng.choice(["one", "two", "three"]) for _ in range(300))
    built = fmt.refinement(PROBLEM, words + " <answer>5</answer>", cfg, 600)
    assert built is not None and built.truncated and len(built.ids) <= 600
    assert built.user_text.rstrip().endswith("<answer>5</answer>")  # keep_tail: the answer survives
