"""Bad trainer settings and parallel layouts are refused when the recipe loads (issue 22, items 3 and 4).

Before: ``trainer.num_steps=-5`` ran the warm-start, started the sidecar and exited 0 with a summary
of "-5 steps"; TP=2 with one attention head failed inside Megatron's TransformerConfig on every rank.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from igrpo_megatron.config import LayoutError, RecipeError, UserError, load_recipe
from igrpo_megatron.config.layout import check_world_size, layout_errors
from igrpo_megatron.config.model import ModelConfig, ParallelConfig

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "recipes" / "tiny_cpu.yaml"
pytestmark = pytest.mark.faults


def igrpo(*args: str) -> subprocess.CompletedProcess:
    exe = shutil.which("igrpo", path=str(Path(sys.executable).parent))
    assert exe, "the igrpo console script is not installed next to this Python"
    return subprocess.run([exe, *args], capture_output=True, text=True, cwd=ROOT, timeout=300)


@pytest.mark.parametrize("override, message", [
    ("trainer.num_steps=-5", "trainer.num_steps = -5: must be >= 1"),
    ("trainer.prompts_per_step=0", "trainer.prompts_per_step = 0: must be >= 1"),
    ("trainer.save_every=-1", "trainer.save_every = -1: must be >= 0"),
    ("trainer.eval_every=-2", "trainer.eval_every = -2: must be >= 0"),
    ("trainer.warmstart.steps=-3", "trainer.warmstart.steps = -3: must be >= 1"),
    ("trainer.stop_after_steps=0", "trainer.stop_after_steps = 0: must be >= 1"),
    ("trainer.optimizer_steps_per_rollout=100", "optimizer_steps_per_rollout = 100 is more than"),
    ("optimizer.warmup_fraction=1.5", "optimizer.warmup_fraction = 1.5: must be in [0, 1]"),
    ("checkpoint.keep_last=-1", "checkpoint.keep_last = -1: must be >= 0"),
    ("logging.log_every=0", "logging.log_every = 0: must be >= 1"),
    ("run.cpu_threads=0", "run.cpu_threads = 0: must be >= 1"),
    ("data.max_prompt_length=0", "data.max_prompt_length = 0: must be >= 1"),
])
def test_trainer_and_other_sections_reject_what_cannot_work(override, message):
    with pytest.raises(RecipeError, match=re.escape(message)) as info:
        load_recipe(TINY, [override])
    assert "set in command line" in str(info.value)  # and where the value came from


def test_a_disabled_warmstart_is_not_checked():
    assert load_recipe(TINY, ["trainer.warmstart.enabled=false", "trainer.warmstart.steps=0"])


def test_igrpo_train_with_negative_steps_exits_2_before_any_work(tmp_path):
    out = igrpo("train", str(TINY), f"run.output_dir={tmp_path}", "trainer.num_steps=-5", "trainer.prompts_per_step=0")
    assert out.returncode == 2, out.stderr[-3000:]
    assert "trainer.num_steps = -5: must be >= 1" in out.stderr and "trainer.prompts_per_step = 0" in out.stderr
    assert "Traceback" not in out.stderr
    assert not (tmp_path / "tiny-cpu").exists()  # no warm-start, no sidecar, no run directory


@pytest.mark.parametrize("overrides, messages", [
    (["parallel.tensor_model_parallel_size=2", "model.num_attention_heads=1"],
     ["model.num_attention_heads = 1 does not divide by parallel.tensor_model_parallel_size (2)"]),
    (["parallel.tensor_model_parallel_size=3"],
     ["model.num_attention_heads = 2 does not divide", "model.vocab_size = 512 does not divide by "
      "parallel.tensor_model_parallel_size (3)"]),
    (["parallel.tensor_model_parallel_size=2", "model.ffn_hidden_size=385"],
     ["model.ffn_hidden_size = 385 does not divide by parallel.tensor_model_parallel_size (2)"]),
    (["parallel.tensor_model_parallel_size=4", "model.num_attention_heads=4", "model.num_query_groups=3"],
     ["model.num_attention_heads = 4 does not divide by model.num_query_groups = 3",
      "model.num_query_groups = 3 is neither a multiple nor a divisor"]),
    (["parallel.pipeline_model_parallel_size=3"],
     ["model.num_layers = 2 does not divide by parallel.pipeline_model_parallel_size (3)"]),
    (["parallel.sequence_parallel=true"], ["parallel.sequence_parallel=true needs"]),
])
def test_layouts_megatron_would_reject_fail_at_load_naming_the_keys(overrides, messages):
    with pytest.raises(RecipeError) as info:
        load_recipe(TINY, overrides)
    for message in messages:
        assert message in str(info.value)


def test_layouts_megatron_accepts_pass():
    # One KV group on two TP ranks is replicated (Megatron allows groups that divide TP); the e2e test
    # trains this layout.
    assert not layout_errors(ModelConfig(num_attention_heads=2, num_query_groups=1),
                             ParallelConfig(tensor_model_parallel_size=2))
    assert not layout_errors(ModelConfig(num_layers=4), ParallelConfig(pipeline_model_parallel_size=2), world_size=4)


def test_world_size_is_checked_when_the_processes_start(tmp_path):
    with pytest.raises(LayoutError, match=r"world size 3 is not divisible by parallel.tensor_model_parallel_size"):
        check_world_size(ParallelConfig(tensor_model_parallel_size=2), 3)
    assert check_world_size(ParallelConfig(tensor_model_parallel_size=2), 4) == 2
    # `igrpo train` in one process with TP=2: one line and exit 2, not a traceback (item 7).
    out = igrpo("train", str(TINY), f"run.output_dir={tmp_path}", "parallel.tensor_model_parallel_size=2")
    assert out.returncode == 2, out.stderr[-3000:]
    assert out.stderr.count("igrpo:") == 1
    assert "world size 1 is not divisible by parallel.tensor_model_parallel_size (2)" in out.stderr
    assert "Traceback" not in out.stderr


def test_user_errors_share_one_base_class():
    from igrpo_megatron.data.rows import DataError
    from igrpo_megatron.evaluation.benchmarks import BenchmarkError
    from igrpo_megatron.models.hf_io import HFCheckpointError
    from igrpo_megatron.training.checkpoint import CheckpointError

    for cls in (RecipeError, LayoutError, DataError, BenchmarkError, CheckpointError, HFCheckpointError):
        assert issubclass(cls, UserError), cls
