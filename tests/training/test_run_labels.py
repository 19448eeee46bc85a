"""run.tags reach summary.md and TensorBoard; logging.level is gone (the CLI's --log-level sets the level)."""

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from igrpo_megatron.config import RecipeError, load_recipe
from igrpo_megatron.training.metrics import MetricsLogger
from igrpo_megatron.training.summary import write_summary

TAGS = ["+run.tags.owner=alice", "+run.tags.purpose=ablation"]


def test_tags_are_written_to_summary_and_tensorboard(tmp_path):
    recipe = load_recipe("recipes/tiny_cpu.yaml", TAGS)
    metrics = MetricsLogger(tmp_path, recipe.logging, recipe.run.name, tags=recipe.run.tags)
    metrics.log(1, {"loss": 0.5})
    metrics.close()
    events = EventAccumulator(str(tmp_path / "tensorboard"), size_guidance={"tensors": 0})
    events.Reload()
    text = events.Tensors("run/tags/text_summary")[0].tensor_proto.string_val[0].decode()
    assert text == "owner=alice, purpose=ablation"
    summary = write_summary(tmp_path, metrics.history(), recipe).read_text()
    assert "- tags: owner=alice, purpose=ablation" in summary
    untagged = write_summary(tmp_path, metrics.history(), load_recipe("recipes/tiny_cpu.yaml")).read_text()
    assert "tags:" not in untagged


def test_logging_level_is_not_a_recipe_key():
    with pytest.raises(RecipeError, match="logging.level"):
        load_recipe("recipes/tiny_cpu.yaml", ["+logging.level=DEBUG"])
