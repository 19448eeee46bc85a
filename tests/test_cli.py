"""The installed ``igrpo`` entry point works from the venv."""

import shutil
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def igrpo(*args: str) -> subprocess.CompletedProcess:
    exe = shutil.which("igrpo", path=str(Path(sys.executable).parent))
    assert exe, "the igrpo console script is not installed next to this Python"
    return subprocess.run([exe, *args], capture_output=True, text=True, cwd=ROOT, timeout=120)


def test_help_lists_commands():
    out = igrpo("--help")
    assert out.returncode == 0
    assert "config" in out.stdout and "serve-rollout" in out.stdout


def test_config_show_prints_the_resolved_recipe():
    out = igrpo("config", "show", "recipes/tiny_cpu.yaml", "trainer.num_steps=3", "+run.tags.ci=yes")
    assert out.returncode == 0, out.stderr
    shown = yaml.safe_load(out.stdout)
    assert shown["trainer"]["num_steps"] == 3
    assert shown["run"]["tags"] == {"ci": "yes"}
    assert shown["model"]["hidden_size"] == 128
    # Inherited from recipes/base/igrpo_math.yaml, interpolated from algorithm.group_size.
    assert shown["algorithm"]["igrpo"]["grpo_equivalent_budget"] == 8


def test_config_show_help_fields_documents_every_key():
    from igrpo_megatron.config import load_recipe
    from igrpo_megatron.config.fields import field_docs

    out = igrpo("config", "show", "recipes/tiny_cpu.yaml", "trainer.num_steps=3", "--help-fields")
    assert out.returncode == 0, out.stderr
    assert "trainer.num_steps: 3\n    RL steps (one rollout batch each).\n" in out.stdout
    keys = [key for key, _, _ in field_docs(load_recipe("recipes/tiny_cpu.yaml"))]
    shown = [line.split(":")[0] for line in out.stdout.splitlines() if not line.startswith(" ")]
    assert shown == keys and len(keys) > 100
    # Every field says what it does: no empty help line.
    assert all(line.strip() for line in out.stdout.splitlines()[1::2])


def test_config_show_reports_errors_with_exit_code_2():
    out = igrpo("config", "show", "recipes/tiny_cpu.yaml", "model.hiden=3")
    assert out.returncode == 2
    assert "unknown key 'model.hiden'" in out.stderr


def test_config_get_prints_one_value():
    out = igrpo("config", "get", "recipes/tiny_cpu.yaml", "model.num_attention_heads", "model.num_attention_heads=4")
    assert out.returncode == 0 and out.stdout.strip() == "4"
    bad = igrpo("config", "get", "recipes/tiny_cpu.yaml", "model.nope")
    assert bad.returncode == 2 and "model.nope: no such key" in bad.stderr
