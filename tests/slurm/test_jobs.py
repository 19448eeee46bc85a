"""The Slurm path as users run it: launchers/submit.py -> slurm/*.sbatch -> igrpo train / serve-rollout.

Every job here runs on the real Slurm that ``conftest.py`` starts (two node entries, n1 and n2, on
this machine; each job gets private /tmp and /dev/shm on each node through job_container/tmpfs).

- colocated: slurm/igrpo_colocated.sbatch runs the tiny recipe to the end (1 rank; the sidecar is
  rank 0's child and gets weights through /dev/shm). It also makes the warm-start the other jobs
  start from, and is the uninterrupted reference of the preemption test.
- preempted: the same job sent USR1 after its first RL step (as Slurm's --signal=B:USR1@180 would
  before a time limit; the sidecar is frozen meanwhile, so the signal lands inside a step that is
  not the last) saves a checkpoint, requeues itself, resumes and must end where the
  reference ends, with the same weights.
- heterogeneous: slurm/igrpo.sbatch with the sidecar group on one node and a 2-rank trainer group
  (TP=2) on the other. The two components share no /dev/shm or /tmp, so weights can only cross over
  the network (rollout.weight_sync.transport auto = gloo).

Training is tiny: a 150-step warm-start (made once; fewer leave every reward 0, so RL would change
no weight), 3 RL steps of 4 prompts (2 in the heterogeneous
job), 40-token completions, one sequence decoded at a time (sampling independent of batching).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from igrpo_megatron.config.ports import free_port
from tests.helpers.distributed import run_on_ranks
from tests.helpers.processes import frozen_group
from tests.slurm.conftest import private_tmp_blocker

ROOT = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.slurm, pytest.mark.vllm, pytest.mark.timeout(3600)]

PREEMPTED_EXIT_CODE = 75  # igrpo_megatron.training.preemption.PREEMPTED_EXIT_CODE, as slurm/common.sh reads it
JOB_TIMEOUT_S = 1800  # generous: CI's 2 cores may be shared
TINY = ["trainer.num_steps=3", "trainer.prompts_per_step=4", "trainer.warmstart.steps=150", "trainer.eval_every=3",
        "evaluation.hook.num_problems=4", "evaluation.hook.samples_per_problem=1", "trainer.save_every=0",
        "rollout.sampling.max_tokens=40", "rollout.server.max_num_seqs=1", "checkpoint.keep_last=0",
        "rollout.server.start_timeout_s=1200"]  # vLLM may start slowly on shared CI cores


def _submit(slurm, out: Path, *overrides: str) -> int:
    """``launchers/submit.py --no-gpus recipes/tiny_cpu.yaml ...`` as a user runs it; the job id."""
    env = {**slurm.env, "IGRPO_LOG_DIR": str(out / "logs"), "IGRPO_ROLLOUT_PORT": str(free_port()),
           "IGRPO_MASTER_PORT": str(free_port())}
    cmd = [sys.executable, "launchers/submit.py", "--no-gpus", "recipes/tiny_cpu.yaml", f"run.output_dir={out}",
           *TINY, *overrides]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return int(re.search(r"Submitted batch job (\d+)", proc.stdout).group(1))


def _job_log(out: Path, job_id: int) -> str:
    """What the job script and its steps printed (logs/<job name>-<id>.out), and Slurm's own file."""
    texts = [p.read_text(errors="replace") for p in sorted((out / "logs").glob(f"*-{job_id}.out"))]
    return "\n".join(texts)


def _finished(slurm, out: Path, job_id: int, restarts: int = 0):
    ended_at: float | None = None  # when the job was first seen ended with fewer restarts than expected

    def settled(job) -> bool:
        nonlocal ended_at
        if not job.done:
            ended_at = None
            return False
        if job.restarts >= restarts:
            return True
        ended_at = ended_at or time.monotonic()
        return time.monotonic() - ended_at > 30  # a requeue would have shown by now: stop waiting

    job = slurm.wait(job_id, JOB_TIMEOUT_S, until=settled)
    log = _job_log(out, job_id)
    assert job.restarts >= restarts, f"{job}: ended without its requeue\n{log[-6000:]}"
    assert job.states == ["COMPLETED"] * len(job.states), f"{job}\n{log[-6000:]}"
    assert all(code == "0:0" for code in job.exit_codes), f"{job}\n{log[-6000:]}"
    return job, log


def _history(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def _steps(run_dir: Path) -> list[dict]:
    return [h for h in _history(run_dir) if "loss" in h]


def _seed_from(reference: Path, out: Path) -> None:
    """Start from the reference's tokenizer and warm-start (deterministic given the seed; saves minutes)."""
    for name in ("tokenizer", "warmstart"):
        shutil.copytree(reference / name, out / "tiny-cpu" / name)


def _check_finished_run(run_dir: Path, steps: int) -> list[dict]:
    history = _steps(run_dir)
    assert [h["step"] for h in history] == list(range(1, steps + 1))
    for h in history:
        assert h["sidecar_weight_version"] == h["step"]  # the sidecar reports the weights of every step
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == f"step_{steps:06d}"
    assert "held-out pass@1" in (run_dir / "summary.md").read_text()
    return history


@pytest.fixture(scope="module")
def colocated(slurm, tmp_path_factory):
    out = Path(slurm.dir) / "colocated"
    job_id = _submit(slurm, out)
    job, log = _finished(slurm, out, job_id)
    return job, log, out / "tiny-cpu"


@pytest.fixture(scope="module")
def preempted(slurm, colocated):
    out = Path(slurm.dir) / "preempted"
    _seed_from(colocated[2], out)
    job_id = _submit(slurm, out)
    run_dir = out / "tiny-cpu"
    deadline = time.monotonic() + JOB_TIMEOUT_S

    def wait_for(what: str, done) -> None:
        while not done():
            assert time.monotonic() < deadline, f"no {what}\n{_job_log(out, job_id)[-6000:]}"
            job = slurm.job(job_id)
            assert job is not None and not job.done, f"{job}: ended before {what}\n{_job_log(out, job_id)[-6000:]}"
            time.sleep(0.2)

    # Part-way: after the first RL step (a step without an update logs no loss, but always its time).
    wait_for("first RL step", lambda: any("time/step" in h for h in _history(run_dir)))
    signalled_after = max(h["step"] for h in _history(run_dir) if "time/step" in h)
    # A tiny step can end before the signal has made its way through scancel, the batch script and
    # rank 0's handler; were that the last step, the run would just finish. Freezing the sidecar
    # (same machine) holds the trainer in its next step until the signal has been taken.
    sidecar = int(re.findall(r"started vLLM server pid (\d+)", _job_log(out, job_id))[-1])
    with frozen_group(sidecar):
        # What Slurm does 180 s before the time limit (the scripts ask for --signal=B:USR1@180).
        subprocess.run(["scancel", "--signal=USR1", "--batch", str(job_id)], env=slurm.env, check=True, timeout=60)
        wait_for("USR1 taken by the trainer", lambda: "SIGUSR1 received: finishing" in _job_log(out, job_id))
    job, log = _finished(slurm, out, job_id, restarts=1)
    return job, log, run_dir, signalled_after


def _final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return run_on_ranks(_export, 1, args=(run_dir,))[0]


def _export(rank, world_size, run_dir):
    from igrpo_megatron.config import load_recipe
    from igrpo_megatron.training.export import export_checkpoint_to_hf
    from tests.helpers.tiny_models import load_state_dict

    export_checkpoint_to_hf(run_dir / "checkpoints", load_recipe(run_dir / "recipe.yaml"), run_dir / "final-hf")
    return load_state_dict(run_dir / "final-hf")


def test_colocated_script_runs_the_tiny_recipe_to_the_end(colocated):
    job, log, run_dir = colocated
    assert "1 rank(s) on 1 node(s)" in log and "trainer finished (exit 0)" in log
    _check_finished_run(run_dir, steps=3)


def test_usr1_saves_requeues_and_resumes_to_the_uninterrupted_result(colocated, preempted):
    job, log, run_dir, signalled_after = preempted
    assert job.restarts == 1
    assert "USR1 received" in log and f"trainer stopped (exit {PREEMPTED_EXIT_CODE}): requeueing" in log
    assert "did not stop within" not in log  # it stopped by itself, within the wait
    assert "exited with code" not in log  # the signal reached rank 0 alone: its sidecar did not die of it
    assert "(restart 1)" in log
    # The stop came at a step boundary after the signal; the requeued run resumed there, not from 0.
    resumed = [int(m) for m in re.findall(r"resumed at step (\d+)", log)]
    assert len(resumed) == 1 and signalled_after <= resumed[0] < 3, (resumed, signalled_after)
    history = _check_finished_run(run_dir, steps=3)
    reference = _steps(colocated[2])
    for key in ("generated_tokens", "refine/reward_mean", "draft/reward_mean"):
        assert history[-1][key] == pytest.approx(reference[-1][key], rel=1e-6), key
    # Same seed, same layout (1 rank), same machine: the resumed run reloads fp32 weights and Adam
    # state exactly and samples with per-step seeds, so it must reproduce the reference's weights.
    # The tolerance (relative 1e-6 per tensor) only leaves room for float summation order (threads).
    final, straight = _final_weights(run_dir), _final_weights(colocated[2])
    start = run_on_ranks(_load_warmstart, 1, args=(colocated[2],))[0]
    assert any(not torch.equal(straight[n], start[n]) for n in start), "RL changed no weight: the check is vacuous"
    for name, tensor in straight.items():
        rel = ((final[name] - tensor).norm() / tensor.norm()).item()
        assert rel < 1e-6, f"{name}: resumed and uninterrupted runs differ by {rel:.1e}"


def _load_warmstart(rank, world_size, run_dir):
    from tests.helpers.tiny_models import load_state_dict

    return load_state_dict(run_dir / "warmstart")


def test_heterogeneous_components_share_only_the_network(slurm, tmp_path_factory):
    """The premise of the heterogeneous test: its two components see different /dev/shm and /tmp."""
    why_not = private_tmp_blocker()
    if why_not is not None:
        pytest.skip(why_not)
    out = Path(slurm.dir) / "isolation"
    out.mkdir()
    script = out / "probe.sbatch"
    script.write_text("#!/bin/bash\n#SBATCH --nodes=1 --exclusive\n#SBATCH hetjob\n#SBATCH --nodes=1 --exclusive\n"
                      "srun --het-group=1 bash -c 'touch /dev/shm/igrpo-probe /tmp/igrpo-probe'\n"
                      "srun --het-group=0 bash -c 'echo shm=$(ls /dev/shm/igrpo-probe 2>/dev/null | wc -l) "
                      "tmp=$(ls /tmp/igrpo-probe 2>/dev/null | wc -l) node=$SLURMD_NODENAME'\n")
    proc = subprocess.run(["sbatch", "--parsable", f"--output={out}/probe-%j.out", str(script)], env=slurm.env,
                          capture_output=True, text=True, timeout=60, check=True)
    job_id = int(proc.stdout.strip().split(";")[0])
    job = slurm.wait(job_id, 300)
    text = (out / f"probe-{job_id}.out").read_text()
    assert job.states == ["COMPLETED", "COMPLETED"], text
    assert "shm=0 tmp=0" in text, text
    assert not Path("/dev/shm/igrpo-probe").exists()  # nor did it land on the machine's own /dev/shm


@pytest.fixture(scope="module")
def heterogeneous(slurm, colocated):
    out = Path(slurm.dir) / "hetero"
    _seed_from(colocated[2], out)
    job_id = _submit(slurm, out, "cluster.rollout_nodes=1", "cluster.gpus_per_node=2",
                     "parallel.tensor_model_parallel_size=2", "trainer.num_steps=2", "trainer.eval_every=2")
    job, log = _finished(slurm, out, job_id)
    return job, log, out / "tiny-cpu"


def test_submit_runs_a_heterogeneous_job_with_weights_over_the_network(heterogeneous):
    job, log, run_dir = heterogeneous
    assert len(job.nodes) == 2 and sorted(job.nodes) == ["n1", "n2"], job  # sidecar and trainer: one node each
    assert "trainer: 2 rank(s) on 1 node(s)" in log
    history = _check_finished_run(run_dir, steps=2)
    assert all(h["logprob_mismatch"] < 1e-3 for h in history)  # TP=2 trainer and the remote vLLM agree
    assert "gloo" in log
