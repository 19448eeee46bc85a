"""launchers/submit.py turns a recipe's cluster section into the sbatch command (no Slurm needed).

The jobs these commands start are run for real in test_jobs.py; here: what is asked of Slurm.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def submit():
    spec = importlib.util.spec_from_file_location("igrpo_submit", ROOT / "launchers" / "submit.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _options(cmd: list[str], start: int, stop: int) -> dict[str, str]:
    return dict(arg[2:].split("=", 1) for arg in cmd[start:stop] if arg.startswith("--"))


def test_heterogeneous_job_asks_for_each_group(submit, monkeypatch):
    monkeypatch.delenv("IGRPO_CONTAINER", raising=False)
    cmd, env = submit.sbatch_command(
        str(ROOT / "recipes" / "tiny_cpu.yaml"),
        ["cluster.rollout_nodes=1", "cluster.nodes=2", "cluster.gpus_per_node=4", "cluster.partition=gpu",
         "cluster.time_limit=01:00:00", "cluster.container_image=nvcr.io/me/igrpo:1", "parallel.tensor_model_parallel_size=2"])
    split = cmd.index(":")
    sidecar, trainer = _options(cmd, 1, split), _options(cmd, split + 1, len(cmd))
    assert sidecar["nodes"] == "1" and sidecar["ntasks-per-node"] == "1" and sidecar["gpus-per-node"] == "4"
    assert trainer["nodes"] == "2" and trainer["ntasks-per-node"] == "4"  # one task per rank
    assert sidecar["partition"] == trainer["partition"] == "gpu" and trainer["time"] == "01:00:00"
    assert sidecar["job-name"] == "tiny-cpu"
    script = next(a for a in cmd if a.endswith(".sbatch"))
    assert script == str(ROOT / "slurm" / "igrpo.sbatch")
    # The recipe as the job sees it: relative to the project (its working directory, and the image's).
    assert cmd[cmd.index(script) + 1] == "recipes/tiny_cpu.yaml"
    assert env == {"IGRPO_WORKDIR": str(ROOT), "IGRPO_CONTAINER": "nvcr.io/me/igrpo:1"}


def test_colocated_job_without_gpus(submit):
    cmd, _ = submit.sbatch_command("recipes/tiny_cpu.yaml", ["cluster.gpus_per_node=2"], gpus=False)
    assert ":" not in cmd  # one component
    assert cmd[-3:] == [str(ROOT / "slurm" / "igrpo_colocated.sbatch"), "recipes/tiny_cpu.yaml", "cluster.gpus_per_node=2"]
    opts = _options(cmd, 1, len(cmd) - 3)
    # --gpus-per-node=0 overrides the scripts' #SBATCH --gpus-per-node=8 (a CPU cluster rejects any GPU request).
    assert opts["gpus-per-node"] == "0" and opts["ntasks-per-node"] == "2" and opts["nodes"] == "1"


def test_a_recipe_that_cannot_run_is_not_submitted():
    proc = subprocess.run([sys.executable, "launchers/submit.py", "--dry-run", "recipes/tiny_cpu.yaml",
                           "parallel.tensor_model_parallel_size=2"], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 2 and "sbatch" not in proc.stdout
    assert "parallel.tensor_model_parallel_size" in proc.stderr  # 1 rank per node cannot hold TP=2
