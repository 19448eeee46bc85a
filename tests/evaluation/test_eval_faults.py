"""`igrpo eval` on a training checkpoint: cheap checks before the export (issue 22, item 6).

Before: the export to ``<dir>-hf`` (minutes and ~15 GB at 7B) ran before the benchmarks were
resolved; ``igrpo eval RUN/checkpoints`` ignored ``RUN/recipe.yaml`` and built the schema's default
model; the "not a checkpoint" message spoke of ``iter_*`` directories. The real export of a real
checkpoint with the run's recipe is in tests/e2e/test_faults_sidecar.py.
"""

from __future__ import annotations

import io
import json

import pytest

from igrpo_megatron.evaluation.checkpoints import CheckpointExportError, resolve_target
from igrpo_megatron.evaluation.cli import run_eval_command

pytestmark = pytest.mark.faults


def _checkpoints_root(run_dir):
    """A run directory whose checkpoints root looks complete (the export itself is never reached here)."""
    root = run_dir / "checkpoints"
    step = root / "step_000002"
    step.mkdir(parents=True)
    (step / "metadata.json").write_text("{}")
    (step / "trainer_state.pt").write_bytes(b"not read before the export")
    (root / "latest").write_text("step_000002")
    (run_dir / "recipe.yaml").write_text("model:\n  ffn_hidden_size: 384\nrun:\n  name: the-run\n")
    return root


@pytest.mark.parametrize("benchmarks, message", [
    (["aime2"], "unknown benchmark 'aime2'"),
    (["aime24"], "IGRPO_EVAL_DATA_DIR"),
    (["missing/set.jsonl"], "missing/set.jsonl: benchmark file not found"),
])
def test_benchmarks_are_resolved_before_any_export(tmp_path, monkeypatch, capsys, benchmarks, message):
    monkeypatch.delenv("IGRPO_EVAL_DATA_DIR", raising=False)
    root = _checkpoints_root(tmp_path)
    code = run_eval_command(str(root), [], benchmarks, None, stdout=io.StringIO())
    err = capsys.readouterr().err
    assert code == 2 and message in err, err
    assert not (tmp_path / "checkpoints-hf").exists(), "the checkpoint was exported before the benchmarks loaded"


def test_checkpoints_root_takes_the_run_recipe_beside_it(tmp_path):
    root = _checkpoints_root(tmp_path)
    target = resolve_target(str(root))
    assert target.recipe.model.ffn_hidden_size == 384 and target.recipe.run.name == "the-run"
    assert target.export_from == root / "step_000002" and target.hf_dir == tmp_path / "checkpoints-hf"
    assert not target.hf_dir.exists()  # resolving exports nothing
    # A recipe.yaml inside the directory given wins; --recipe wins over both.
    (root / "step_000002" / "recipe.yaml").write_text("model:\n  ffn_hidden_size: 512\n")
    assert resolve_target(str(root / "step_000002")).recipe.model.ffn_hidden_size == 512
    other = tmp_path / "other.yaml"
    other.write_text("model:\n  ffn_hidden_size: 128\n")
    assert resolve_target(str(root), recipe_path=str(other)).recipe.model.ffn_hidden_size == 128


def test_not_a_checkpoint_mentions_step_directories(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointExportError, match=r"no metadata.json, step_\* directories or 'latest' pointer"):
        resolve_target(str(tmp_path / "empty"))


def test_a_damaged_checkpoint_is_refused_naming_the_file(tmp_path):
    root = _checkpoints_root(tmp_path)
    step = root / "step_000002"
    (step / "__0_0.distcp").write_bytes(b"x" * 10)
    (step / "manifest.json").write_text(json.dumps({"files": {"__0_0.distcp": 100}}))
    with pytest.raises(CheckpointExportError, match=rf"{step / '__0_0.distcp'}: 10 bytes, but it was saved with 100"):
        resolve_target(str(step))
