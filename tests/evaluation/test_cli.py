"""``run_eval_command`` without a model server: --compare, what gets served, and errors users can act on."""

from __future__ import annotations

import io
import json

import pytest

from igrpo_megatron.config.evaluation import EvaluationConfig
from igrpo_megatron.config.validate import raise_errors
from igrpo_megatron.evaluation.checkpoints import (
    CheckpointExportError,
    export_megatron_checkpoint,
    is_megatron_checkpoint,
    resolve_target,
)
from igrpo_megatron.evaluation.cli import run_eval_command
from tests.evaluation.conftest import REPO
from tests.evaluation.test_report import _run

TINY_RECIPE = str(REPO / "recipes" / "tiny_cpu.yaml")


def _eval(*args, **kwargs) -> tuple[int, str]:
    out = io.StringIO()
    code = run_eval_command(*args, stdout=out, **kwargs)
    return code, out.getvalue()


def test_compare_prints_the_table_and_writes_files(tmp_path):
    ids = ["q1", "q2", "q3", "q4", "q5"]
    for name, values in (("a", [0, 0, 0, 0, 1]), ("b", [1, 1, 1, 1, 1])):
        (tmp_path / name).mkdir()
        (tmp_path / name / "results.json").write_text(json.dumps(_run({"pass@1": values}, ids, f"run-{name}")))
    code, text = _eval(None, [], None, (str(tmp_path / "a"), str(tmp_path / "b" / "results.json")),
                       output_dir=str(tmp_path / "cmp"))
    assert code == 0
    assert "A = run-a" in text and "| b | pass@1 | 20.0 | 100.0 | +80.0 |" in text and "| yes |" in text
    assert (tmp_path / "cmp" / "compare.md").read_text() == text
    assert (tmp_path / "cmp" / "compare.png").stat().st_size > 0


def test_compare_with_a_missing_run_exits_2(tmp_path, capsys):
    code, _ = _eval(None, [], None, (str(tmp_path / "nope"), str(tmp_path / "nope2")))
    assert code == 2 and "no evaluation results" in capsys.readouterr().err


def test_incomplete_megatron_checkpoint_is_refused_clearly(tmp_path, capsys):
    ckpt = tmp_path / "step_000010"
    ckpt.mkdir()
    (ckpt / "metadata.json").write_text("{}")  # no trainer_state.pt: the save never finished
    assert is_megatron_checkpoint(ckpt) and is_megatron_checkpoint(tmp_path)
    with pytest.raises(CheckpointExportError, match="no complete checkpoint"):
        export_megatron_checkpoint(ckpt, None, tmp_path / "hf")
    code, _ = _eval(str(ckpt), [], ["aime24"], None)
    err = capsys.readouterr().err
    assert code == 2 and "no complete checkpoint" in err


def test_recipe_without_a_model_exits_2(capsys):
    code, _ = _eval(TINY_RECIPE, [], ["aime24"], None)
    err = capsys.readouterr().err
    assert code == 2 and "names no model to evaluate" in err and "rollout.server.model_path" in err


def test_bad_override_exits_2(tmp_path, capsys):
    (tmp_path / "config.json").write_text("{}")
    code, _ = _eval(str(tmp_path), ["rollout.sampling.max_tokns=3"], ["aime24"], None)
    assert code == 2 and "unknown key 'rollout.sampling.max_tokns'" in capsys.readouterr().err


def test_resolve_hf_directory_recipe_and_server_url(tmp_path):
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text("{}")
    target = resolve_target(str(hf), ["rollout.sampling.max_tokens=16"])
    assert target.hf_dir == hf and target.server_url is None and target.tokenizer_dir == hf
    assert target.recipe.rollout.sampling.max_tokens == 16 and target.label == "hf"
    # A recipe.yaml saved next to the weights is used for their settings.
    (hf / "recipe.yaml").write_text("run:\n  name: saved-run\n")
    assert resolve_target(str(hf)).recipe.run.name == "saved-run"
    # An external server: nothing to serve locally.
    ext = resolve_target(str(hf), server_url="http://node3:8000")
    assert ext.hf_dir is None and ext.server_url == "http://node3:8000" and ext.tokenizer_dir == hf
    # A recipe naming its model.
    via_recipe = resolve_target(TINY_RECIPE, [f"model.hf_path={hf}"])
    assert via_recipe.hf_dir == hf and via_recipe.label == "tiny-cpu"
    with pytest.raises(CheckpointExportError, match="neither an HF checkpoint"):
        resolve_target(str(tmp_path / "hf" / ".."))  # a directory with neither layout


def test_evaluation_section_validation():
    cfg = EvaluationConfig(benchmarks=[], pass_at_k=[0], confidence=1.5, prompt_template="no placeholder")
    cfg.sampling.top_p = 0.0
    cfg.refine.pick = "vote"
    errs = "\n".join(cfg.errors())
    for expected in ("evaluation.benchmarks is empty", "evaluation.pass_at_k", "evaluation.confidence = 1.5",
                     "prompt_template must contain {problem}", "evaluation.sampling.top_p = 0.0",
                     "evaluation.refine.pick = 'vote'"):
        assert expected in errs
    assert EvaluationConfig().errors() == []
    with pytest.raises(ValueError, match="invalid evaluation settings"):
        raise_errors(cfg, "evaluation")
