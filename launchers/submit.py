#!/usr/bin/env python3
"""Submit a recipe to Slurm with the node counts, partition, account and time limit it states.

    launchers/submit.py RECIPE [overrides...]            # submit
    launchers/submit.py --dry-run RECIPE [overrides...]  # print the sbatch command only

cluster.rollout_nodes > 0 submits slurm/igrpo.sbatch as a heterogeneous job (sidecar group +
trainer group); 0 submits slurm/igrpo_colocated.sbatch (sidecar on the trainer's first node).
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from igrpo_megatron.config import load_recipe  # noqa: E402
from igrpo_megatron.config.errors import UserError  # noqa: E402
from igrpo_megatron.config.plan import check_plan  # noqa: E402


def _component(nodes: int, gpus: int, cluster) -> list[str]:
    opts = [f"--nodes={nodes}", f"--time={cluster.time_limit}"]
    if gpus:
        opts.append(f"--gpus-per-node={gpus}")
    if cluster.partition:
        opts.append(f"--partition={cluster.partition}")
    if cluster.account:
        opts.append(f"--account={cluster.account}")
    return opts


def sbatch_command(recipe_path: str, overrides: list[str], gpus: bool = True) -> list[str]:
    """The sbatch argv for a recipe (validated first, so a bad recipe never reaches the queue)."""
    recipe = load_recipe(recipe_path, overrides)
    check_plan(recipe)  # `igrpo plan`'s checks: a recipe that cannot start never waits in the queue
    cluster = recipe.cluster
    per_node = cluster.gpus_per_node if gpus else 0
    if cluster.rollout_nodes > 0:
        cmd = ["sbatch", *_component(cluster.rollout_nodes, per_node, cluster), ":",
               *_component(cluster.nodes, per_node, cluster), str(ROOT / "slurm" / "igrpo.sbatch")]
    else:
        cmd = ["sbatch", *_component(cluster.nodes, per_node, cluster),
               str(ROOT / "slurm" / "igrpo_colocated.sbatch")]
    return cmd + [recipe_path, *overrides]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true", help="print the sbatch command, do not submit")
    parser.add_argument("--no-gpus", action="store_true", help="do not ask for GPUs (CPU-only clusters, tests)")
    parser.add_argument("recipe")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)
    try:
        cmd = sbatch_command(args.recipe, args.overrides, gpus=not args.no_gpus)
    except UserError as exc:  # recipe, layout, files, memory: one message, nothing submitted
        sys.stderr.write(f"submit.py: {exc}\n")
        return 2
    if args.dry_run:
        print(shlex.join(cmd))
        return 0
    (ROOT / "logs").mkdir(exist_ok=True)
    return subprocess.run(cmd, cwd=ROOT).returncode


if __name__ == "__main__":
    sys.exit(main())
