"""The ``igrpo`` command: ``igrpo config show RECIPE [overrides]``, ``igrpo serve-rollout RECIPE`` ...

Every command takes a recipe file and Hydra-style overrides (``a.b=1``, ``+a.new=2``, ``~a.b``),
loads them into one typed recipe object and hands that to the part that does the work.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence

logger = logging.getLogger("igrpo_megatron")

_COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {}


def command(name: str):
    """Register a sub-command handler under ``name`` (``config``, ``serve-rollout``, ...)."""

    def register(fn: Callable[[argparse.Namespace], int]):
        _COMMANDS[name] = fn
        return fn

    return register


def _add_recipe_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("recipe", help="recipe YAML file (see recipes/)")
    parser.add_argument("overrides", nargs="*", help="Hydra-style overrides: a.b=1, +a.new=2, ~a.b")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="igrpo",
        description="iGRPO (Iterative Group Relative Policy Optimization) on Megatron-Core "
                    "with a vLLM rollout sidecar.",
        epilog="Example: igrpo config show recipes/tiny_cpu.yaml trainer.num_steps=5",
    )
    parser.add_argument("--log-level", default="INFO", choices=("DEBUG", "INFO", "WARNING", "ERROR"))
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    config = sub.add_parser("config", help="inspect recipes")
    config_sub = config.add_subparsers(dest="config_command", metavar="ACTION", required=True)
    show = config_sub.add_parser("show", help="print the fully resolved recipe as YAML")
    _add_recipe_args(show)
    show.add_argument("--help-fields", action="store_true",
                      help="print every key with its resolved value and its help text instead of the YAML")
    get = config_sub.add_parser("get", help="print one resolved value (for shell scripts)")
    get.add_argument("recipe", help="recipe YAML file")
    get.add_argument("key", help="dotted key, e.g. cluster.gpus_per_node")
    get.add_argument("overrides", nargs="*", help="Hydra-style overrides")

    train = sub.add_parser("train", help="run a recipe: rollouts, rewards, Megatron training, weight sync")
    _add_recipe_args(train)

    cmp = sub.add_parser("compare", help="GRPO vs iGRPO (or selection rules) at a matched rollout budget over "
                                         "several seeds, with paired intervals")
    _add_recipe_args(cmp)
    cmp.add_argument("--seeds", type=lambda s: [int(x) for x in s.split(",") if x], default=[1, 2, 3],
                     help="comma list of seeds (default 1,2,3)")
    cmp.add_argument("--output", dest="output_dir", help="directory for the runs, compare.md and compare.png")
    cmp.add_argument("--variants", default="grpo,igrpo",
                     help="comma list of arms, the first is the baseline: grpo, igrpo, igrpo:<selection rule> "
                          "(best, worst, random, best_incorrect); default grpo,igrpo")
    cmp.add_argument("--warmstart", choices=("shared", "per-seed"), default="shared",
                     help="shared (default): one warm-start, trained with the first seed, for every run, so the "
                          "seeds vary RL, not the warm-start; per-seed: one per seed")

    ev = sub.add_parser("eval", help="pass@k evaluation on AIME24/25, MATH-500, AMC23 or custom sets")
    ev.add_argument("recipe_or_checkpoint", nargs="?",
                    help="recipe YAML, Hugging Face checkpoint directory (config.json), or Megatron checkpoint")
    ev.add_argument("overrides", nargs="*", help="Hydra-style overrides: a.b=1, +a.new=2, ~a.b")
    ev.add_argument("--benchmarks", type=lambda s: [x for x in s.split(",") if x],
                    help="comma list: aime24,aime25,math500,amc23,heldout, names in evaluation.datasets, "
                         "or .jsonl/.parquet paths")
    ev.add_argument("--compare", nargs=2, metavar=("RUN_A", "RUN_B"),
                    help="compare two results.json files or run directories")
    ev.add_argument("--recipe", help="recipe whose settings apply when evaluating a checkpoint directory")
    ev.add_argument("--output", dest="output_dir", help="directory for results.json, report.md, report.png")
    ev.add_argument("--samples", type=int, help="samples per problem (overrides the recipe)")
    ev.add_argument("--limit", type=int, help="evaluate only the first N problems of each benchmark")
    ev.add_argument("--refine", action=argparse.BooleanOptionalAction, default=None,
                    help="also evaluate draft-then-refine at test time")
    ev.add_argument("--server-url", help="use a running vLLM server instead of starting one")
    ev.add_argument("--problem-field", default="problem", help="problem column of custom files")
    ev.add_argument("--answer-field", default="answer", help="answer column of custom files")

    serve = sub.add_parser("serve-rollout", help="start the vLLM rollout sidecar for a recipe and keep it up")
    _add_recipe_args(serve)

    plan = sub.add_parser("plan", help="check a recipe without GPUs (layout, files, memory per GPU) and print "
                                       "its sizes; exit code 2 when it cannot run as planned")
    _add_recipe_args(plan)

    doctor = sub.add_parser("doctor", help="check this machine's stack (torch, CUDA, GPUs, TE, Megatron, Mamba "
                                           "kernels, the sidecar's vLLM) and which path each part of a recipe takes",
                            epilog="Exits 1 with one 'missing:' line per thing the recipe needs and this stack "
                                   "lacks. Run it first on a new cluster.")
    doctor.add_argument("recipe", nargs="?", help="recipe YAML file (optional: without it, the stack only)")
    doctor.add_argument("overrides", nargs="*", help="Hydra-style overrides: a.b=1, +a.new=2, ~a.b")
    doctor.add_argument("--no-gpu", action="store_true",
                        help="no GPU attached (container build): check GPU packages are installed, not usable")
    doctor.add_argument("--constraints", help="also compare installed versions with this pins file "
                                              "(docker/constraints.txt)")

    data = sub.add_parser("data", help="get the public evaluation sets (AIME24/25, MATH-500, AMC23)")
    data_sub = data.add_subparsers(dest="data_command", metavar="ACTION", required=True)
    fetch = data_sub.add_parser("fetch", help="download, check and write the sets as the JSONL files the "
                                              "built-in benchmarks read")
    fetch.add_argument("names", nargs="+", metavar="NAME", help="aime24, aime25, math500, amc23")
    fetch.add_argument("--to", required=True, help="directory for <name>.jsonl (point evaluation.data_dir here)")
    fetch.add_argument("--base-url", help="a mirror of raw.githubusercontent.com (same <repo>/<commit>/<path> "
                                          "layout)")
    return parser


@command("config")
def _config(args: argparse.Namespace) -> int:
    from igrpo_megatron.config import RecipeError, load_recipe, recipe_to_yaml

    recipe = load_recipe(args.recipe, args.overrides)
    if args.config_command == "get":
        value: object = recipe
        for part in args.key.split("."):
            if not hasattr(value, part):
                raise RecipeError(f"{args.key}: no such key in the recipe")
            value = getattr(value, part)
        sys.stdout.write(("" if value is None else str(value)) + "\n")
        return 0
    if args.help_fields:
        from igrpo_megatron.config.fields import field_docs

        sys.stdout.write("".join(f"{key}: {value!r}\n    {text}\n" for key, value, text in field_docs(recipe)))
        return 0
    sys.stdout.write(recipe_to_yaml(recipe))
    return 0


@command("train")
def _train(args: argparse.Namespace) -> int:
    from igrpo_megatron.config import load_recipe
    from igrpo_megatron.evaluation.hook import PeriodicEvaluator
    from igrpo_megatron.training.loop import PREEMPTED_EXIT_CODE, run_training
    from igrpo_megatron.training.preemption import StopRequest

    recipe = load_recipe(args.recipe, args.overrides)
    # SIGUSR1/SIGTERM/SIGHUP (Slurm, torchrun, kill): finish the step, save, stop the sidecar, exit 75.
    with StopRequest() as stop:
        trainer = run_training(recipe, stop, evaluator=PeriodicEvaluator)
    logger.info("run directory: %s (summary.md, training.png, metrics.jsonl, checkpoints/)",
                trainer.run_dir.resolve())
    return PREEMPTED_EXIT_CODE if trainer.preempted else 0


@command("compare")
def _compare(args: argparse.Namespace) -> int:
    from igrpo_megatron.evaluation.hook import PeriodicEvaluator
    from igrpo_megatron.training.compare import CompareStopped, run_compare
    from igrpo_megatron.training.preemption import PREEMPTED_EXIT_CODE, StopRequest

    # A signal stops the run in flight as in `igrpo train` (step, checkpoint, sidecar) and then the compare.
    try:
        with StopRequest() as stop:
            root = run_compare(args.recipe, args.overrides, args.seeds, args.output_dir,
                               evaluator=PeriodicEvaluator, variants=args.variants, warmstart=args.warmstart,
                               stop=stop)
    except CompareStopped as exc:
        logger.warning("%s", exc)
        return PREEMPTED_EXIT_CODE
    logger.info("comparison: %s", (root / "compare.md").resolve())
    return 0


@command("eval")
def _eval(args: argparse.Namespace) -> int:
    from igrpo_megatron.evaluation.cli import run_eval_command

    return run_eval_command(
        args.recipe_or_checkpoint, args.overrides, args.benchmarks,
        tuple(args.compare) if args.compare else None, recipe=args.recipe, output_dir=args.output_dir,
        samples=args.samples, limit=args.limit, refine=args.refine, server_url=args.server_url,
        problem_field=args.problem_field, answer_field=args.answer_field)


@command("plan")
def _plan(args: argparse.Namespace) -> int:
    from igrpo_megatron.config import load_recipe
    from igrpo_megatron.config.plan import format_plan, make_plan

    recipe = load_recipe(args.recipe, args.overrides)
    plan = make_plan(recipe)
    sys.stdout.write(format_plan(plan, recipe))
    return 2 if plan.errors else 0


@command("serve-rollout")
def _serve_rollout(args: argparse.Namespace) -> int:
    from igrpo_megatron.config import load_recipe
    from igrpo_megatron.rollout.server import serve_from_recipe

    recipe = load_recipe(args.recipe, args.overrides)
    if recipe.rollout.server.model_path is None and recipe.model.hf_path is None and recipe.trainer.warmstart.enabled:
        recipe.rollout.server.model_path = _await_warmstart(recipe)
    return serve_from_recipe(recipe)


def _await_warmstart(recipe) -> str:
    """The sidecar of a recipe whose trainer warm-starts (the tiny recipe on Slurm) serves the weights
    the trainer writes: wait for them. The trainer renames a finished warm-start into place, so its
    config.json means complete. No limit here: the job script stops this step if the trainer fails."""
    import time
    from pathlib import Path

    from igrpo_megatron.training.warmstart import DONE_MARK

    path = Path(recipe.run.output_dir) / recipe.run.name / "warmstart"
    if not (path / DONE_MARK).exists():
        logger.info("waiting for the trainer's warm-start at %s", path)
    while not (path / DONE_MARK).exists():
        time.sleep(2.0)
    return str(path)


@command("doctor")
def _doctor(args: argparse.Namespace) -> int:
    from igrpo_megatron.doctor import run_doctor

    lines, missing = run_doctor(args.recipe, args.overrides, no_gpu=args.no_gpu, constraints=args.constraints)
    sys.stdout.write("".join(f"{line}\n" for line in lines))
    sys.stdout.write("".join(f"missing: {line}\n" for line in missing))
    sys.stdout.write("ok: this stack can run the recipe\n" if args.recipe and not missing else "")
    return 1 if missing else 0


@command("data")
def _data(args: argparse.Namespace) -> int:
    from igrpo_megatron.evaluation.fetch import run_fetch_command

    return run_fetch_command(args.names, args.to, base_url=args.base_url)


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command. Input the user can fix (recipe, data, benchmark, layout, checkpoint, missing
    file: any :class:`~igrpo_megatron.config.errors.UserError`) is reported as ``igrpo: <message>`` on
    stderr with exit code 2 (the traceback with ``--log-level DEBUG``); anything else is a bug and keeps
    its traceback."""
    from igrpo_megatron.config.errors import UserError

    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return _COMMANDS[args.command](args)
    except UserError as exc:
        logger.debug("user error", exc_info=True)
        sys.stderr.write(f"igrpo: {exc}\n")
        return 2


if __name__ == "__main__":
    sys.exit(main())
