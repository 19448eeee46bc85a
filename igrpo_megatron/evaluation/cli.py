"""``igrpo eval``: serve a model with the vLLM sidecar, evaluate benchmarks, write and print the report.

``run_eval_command`` is what the ``igrpo`` CLI calls (argparse lives in ``igrpo_megatron/cli.py``):

    igrpo eval RECIPE_OR_CHECKPOINT [overrides] [--benchmarks aime24,math500] [--samples 8] [--limit 10]
               [--refine] [--recipe R.yaml] [--server-url URL] [--output DIR]
    igrpo eval --compare RUN_A RUN_B [--output DIR]

The report table goes to stdout (this is the CLI layer); progress goes to the log.
"""

from __future__ import annotations

import logging
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any, TextIO

from igrpo_megatron.config import RecipeError, UserError
from igrpo_megatron.config.validate import raise_errors
from igrpo_megatron.data.prompts import PromptError
from igrpo_megatron.evaluation.benchmarks import BenchmarkError, load_benchmarks, samples_per_problem
from igrpo_megatron.evaluation.checkpoints import (
    CheckpointExportError,
    EvalTarget,
    export_if_needed,
    resolve_target,
)
from igrpo_megatron.evaluation.records import EvalRun
from igrpo_megatron.evaluation.report import (
    compare_markdown,
    compare_runs,
    load_results,
    markdown_table,
    plot_comparison,
    write_report,
    write_text,
)
from igrpo_megatron.evaluation.runner import EvaluationError, Evaluator
from igrpo_megatron.rollout.interfaces import SidecarError

logger = logging.getLogger(__name__)

USER_ERRORS = (UserError, RecipeError, BenchmarkError, CheckpointExportError, EvaluationError, PromptError, SidecarError,
               FileNotFoundError, ValueError)


def run_eval_command(recipe_or_checkpoint: str | None, overrides: list[str], benchmarks: list[str] | None,
                     compare: tuple[str, str] | None, *, recipe: str | None = None, output_dir: str | None = None,
                     samples: int | None = None, limit: int | None = None, refine: bool | None = None,
                     server_url: str | None = None, problem_field: str = "problem", answer_field: str = "answer",
                     stdout: TextIO | None = None) -> int:
    """Run ``igrpo eval``; returns the exit code (0 ok, 2 a problem the user can fix, named on stderr).

    Args:
        recipe_or_checkpoint: recipe YAML, HF checkpoint directory, or Megatron checkpoint (not yet exportable).
        overrides: Hydra-style recipe overrides (``evaluation.sampling.temperature=0.7``).
        benchmarks: names or .jsonl/.parquet paths, replacing ``evaluation.benchmarks``; None: the recipe's.
        compare: two results.json files (or run directories): print A vs B instead of evaluating.
        recipe: settings for a checkpoint directory (default: its recipe.yaml, else schema defaults).
        output_dir: where reports go (default ``evaluation.output_dir``, else a time-stamped run directory).
        samples: samples per problem for every benchmark (replaces the per-benchmark k).
        limit: first N problems per benchmark. refine: force test-time refinement on/off.
        server_url: evaluate on a running vLLM server instead of starting one.
        problem_field / answer_field: field names for benchmarks given as bare file paths.
    """
    out = stdout or sys.stdout
    try:
        if compare is not None:
            return _compare(compare, output_dir, out)
        if recipe_or_checkpoint is None:
            raise ValueError("igrpo eval needs a recipe or checkpoint directory (or --compare RUN_A RUN_B).")
        target = resolve_target(recipe_or_checkpoint, overrides, recipe_path=recipe, server_url=server_url)
        cfg = _settings(target, benchmarks, samples, limit, refine, output_dir)
        # Every benchmark loads (names, files, rows) before a training checkpoint's export, which takes minutes.
        benches = load_benchmarks(cfg.benchmarks, cfg, target.recipe.data, problem_field=problem_field,
                                  answer_field=answer_field, seed=target.recipe.run.seed)
        run = _evaluate(export_if_needed(target), cfg, benches)
        folder = Path(cfg.output_dir)
        write_report(run, folder, plot=cfg.plot)
        out.write(markdown_table(run))
        out.write(f"\nresults: {folder / 'results.json'}\n")
        return 0
    except USER_ERRORS as exc:
        logger.debug("igrpo eval failed", exc_info=True)  # the traceback, with --log-level DEBUG
        sys.stderr.write(f"igrpo eval: {exc}\n")
        return 2


def _settings(target: EvalTarget, benchmarks: list[str] | None, samples: int | None, limit: int | None,
              refine: bool | None, output_dir: str | None) -> Any:
    """``recipe.evaluation`` with the command-line flags applied, validated."""
    cfg = target.recipe.evaluation
    names = list(benchmarks) if benchmarks else list(cfg.benchmarks)
    per_bench = dict(cfg.samples_per_problem)
    if samples is not None:
        per_bench = {name: samples for name in names}
        per_bench.update({Path(n).stem: samples for n in names})
    run = target.recipe.run
    folder = output_dir or cfg.output_dir or str(Path(run.output_dir) / run.name / "eval" /
                                                 time.strftime("%Y%m%d-%H%M%S"))
    cfg = replace(cfg, benchmarks=names, samples_per_problem=per_bench,
                  limit=limit if limit is not None else cfg.limit, output_dir=folder,
                  refine=replace(cfg.refine, enabled=cfg.refine.enabled if refine is None else refine))
    raise_errors(cfg, "evaluation")
    return cfg


def _evaluate(target: EvalTarget, cfg: Any, benches: list[Any]) -> dict[str, Any]:
    """Serve the model, evaluate the loaded benchmarks, return the run dict."""
    from transformers import AutoTokenizer

    from igrpo_megatron.rollout.client import BlockingRolloutClient, RolloutClient
    from igrpo_megatron.rollout.server import RolloutServer

    recipe = target.recipe
    if target.tokenizer_dir is None:
        raise EvaluationError("no tokenizer to build prompts with: set data.tokenizer_path (or model.hf_path).")
    tokenizer = AutoTokenizer.from_pretrained(str(target.tokenizer_dir))
    server = None
    if target.server_url is None:
        server = RolloutServer(recipe.rollout.server, model_path=target.hf_dir, log_dir=cfg.output_dir)
        server.start()
    url = target.server_url or server.url
    client = BlockingRolloutClient(RolloutClient.from_config(recipe.rollout, url))
    evaluator = None
    try:
        evaluator = Evaluator.from_recipe(recipe, tokenizer, cfg=cfg, max_model_len=_served_max_len(client))
        results = {b.name: evaluator.evaluate(client, b, samples_per_problem(b.spec, cfg)) for b in benches}
    finally:
        if evaluator is not None:
            evaluator.close()
        client.close()
        if server is not None:
            server.close()
    run = EvalRun(label=target.label, created=time.strftime("%Y-%m-%dT%H:%M:%S"),
                  model=str(target.hf_dir) if target.hf_dir else url,
                  settings={"evaluation": asdict(cfg), "max_tokens": evaluator.max_tokens,
                            "max_model_len": evaluator.max_model_len,
                            "reward_extraction": asdict(recipe.reward.extraction)},
                  benchmarks=results)
    return run.to_dict()


def _served_max_len(client: Any) -> int | None:
    """The server's max_model_len from /v1/models (vLLM reports it), None when it does not say."""
    try:
        models = client.run(client.client.get("/v1/models"))
        return int(models["data"][0]["max_model_len"])
    except (KeyError, IndexError, TypeError, ValueError, SidecarError) as exc:
        logger.warning("could not read max_model_len from the server (%s); prompt lengths are not checked "
                       "beforehand", exc)
        return None


def _compare(paths: tuple[str, str], output_dir: str | None, out: TextIO) -> int:
    run_a, run_b = load_results(paths[0]), load_results(paths[1])
    label_a, label_b = run_a.get("label") or paths[0], run_b.get("label") or paths[1]
    rows = compare_runs(run_a, run_b)
    text = compare_markdown(rows, f"{label_a} ({paths[0]})", f"{label_b} ({paths[1]})")
    out.write(text)
    if output_dir is not None:
        write_text(Path(output_dir) / "compare.md", text)
        if rows:
            plot_comparison(rows, str(label_a), str(label_b), Path(output_dir) / "compare.png")
    return 0
