#!/usr/bin/env python3
"""Submit a recipe to Slurm, asking for what its ``cluster`` section plans.

    launchers/submit.py RECIPE [overrides...]              # submit
    launchers/submit.py --dry-run RECIPE [overrides...]    # print the sbatch command only
    launchers/submit.py --no-gpus RECIPE [overrides...]    # a cluster without GPUs (CPU ranks)

cluster.rollout_nodes > 0 submits slurm/igrpo.sbatch as a heterogeneous job (a sidecar group of
rollout_nodes nodes + a trainer group of cluster.nodes nodes); 0 submits slurm/igrpo_colocated.sbatch
(the sidecar on the trainer's first node). Trainer nodes run cluster.gpus_per_node ranks each, one
Slurm task per rank. cluster.partition, account and time_limit become sbatch options, and
cluster.container_image becomes IGRPO_CONTAINER (every step then runs in that image). The recipe is
loaded and checked first, so a recipe that cannot load never reaches the queue.
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from igrpo_megatron.config import RecipeError, load_recipe  # noqa: E402
from igrpo_megatron.config.plan import PlanError, check_plan  # noqa: E402


def _component(nodes: int, tasks_per_node: int, gpus_per_node: int, cluster) -> list[str]:
    """sbatch options of one job component (every option repeated per component of a heterogeneous job)."""
    # --gpus-per-node=0 (CPU clusters) also overrides the scripts' default request of 8.
    opts = [f"--nodes={nodes}", f"--ntasks-per-node={tasks_per_node}", f"--gpus-per-node={gpus_per_node}",
            f"--time={cluster.time_limit}"]
    if cluster.partition:
        opts.append(f"--partition={cluster.partition}")
    if cluster.account:
        opts.append(f"--account={cluster.account}")
    return opts


def log_dir() -> Path:
    """Where the job logs go: $IGRPO_LOG_DIR, else logs/ in the project (as in slurm/common.sh)."""
    return Path(os.environ.get("IGRPO_LOG_DIR") or ROOT / "logs")


def _recipe_arg(recipe_path: str) -> str:
    """The recipe path as the job sees it: relative to the project (the job's working directory, and the
    project's place inside the container), or absolute when the recipe lives elsewhere."""
    path = Path(recipe_path).resolve()
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def sbatch_command(recipe_path: str, overrides: list[str], gpus: bool = True) -> tuple[list[str], dict[str, str]]:
    """The sbatch argv for a recipe and the environment variables it adds for the job."""
    recipe = load_recipe(recipe_path, overrides)
    check_plan(recipe)  # `igrpo plan`'s checks: a recipe that cannot start never waits in the queue
    cluster = recipe.cluster
    per_node = cluster.gpus_per_node if gpus else 0
    # Slurm's own messages go next to the job's log (slurm/common.sh), not into the project directory.
    cmd = ["sbatch", f"--job-name={recipe.run.name}", f"--output={log_dir() / 'slurm-%j.out'}"]
    if cluster.rollout_nodes > 0:
        cmd += [*_component(cluster.rollout_nodes, 1, per_node, cluster), ":",
                *_component(cluster.nodes, cluster.gpus_per_node, per_node, cluster),
                str(ROOT / "slurm" / "igrpo.sbatch")]
    else:
        cmd += [*_component(cluster.nodes, cluster.gpus_per_node, per_node, cluster),
                str(ROOT / "slurm" / "igrpo_colocated.sbatch")]
    env = {"IGRPO_WORKDIR": str(ROOT)}
    if cluster.container_image and "IGRPO_CONTAINER" not in os.environ:
        env["IGRPO_CONTAINER"] = cluster.container_image
    return cmd + [_recipe_arg(recipe_path), *overrides], env


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true", help="print the sbatch command, do not submit")
    parser.add_argument("--no-gpus", action="store_true", help="ask for no GPUs (CPU-only clusters, tests)")
    parser.add_argument("recipe")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)
    try:
        cmd, env = sbatch_command(args.recipe, args.overrides, gpus=not args.no_gpus)
    except (RecipeError, PlanError) as exc:
        print(f"submit.py: {exc}", file=sys.stderr)
        return 2
    if args.dry_run:
        print(shlex.join([*(f"{k}={v}" for k, v in env.items()), *cmd]))
        return 0
    log_dir().mkdir(parents=True, exist_ok=True)  # Slurm opens --output before the script runs
    return subprocess.run(cmd, cwd=ROOT, env={**os.environ, **env}).returncode


if __name__ == "__main__":
    sys.exit(main())
