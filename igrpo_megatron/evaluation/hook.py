"""The periodic evaluation inside training: a fixed subset, scored on the trainer's live sidecar.

Built once by the trainer (benchmarks loaded, subset drawn, reward pool started; ``igrpo train``
passes this class to the trainer as its ``training.interfaces.EvaluatorFactory``) and called every
``trainer.eval_every`` steps (the loop's ``eval_due``) with the rollout engine the trainer already holds, so no second server
is started and the current policy version is the one evaluated. The subset is drawn once with the
run seed, so successive steps score the same problems; with ``evaluation.sampling.seed`` set they
also draw with the same random streams, so step-to-step differences are the policy's, not the draw's.

Usage in a training loop::

    hook = PeriodicEvaluator(recipe, tokenizer=tokenizer)
    ...
    metrics.update(hook(blocking_client, step))   # or: await hook.run_async(client, step)
    ...
    hook.close()
"""

from __future__ import annotations

import logging
import random
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from igrpo_megatron.evaluation.benchmarks import Benchmark, load_benchmarks
from igrpo_megatron.evaluation.records import BenchmarkResult, EvalRun, flat_metrics
from igrpo_megatron.evaluation.report import write_report
from igrpo_megatron.evaluation.runner import Evaluator, run_sync
from igrpo_megatron.rewards.interfaces import RewardFunction
from igrpo_megatron.rollout.interfaces import RolloutEngine

logger = logging.getLogger(__name__)


def subset_positions(size: int, count: int, seed: int) -> list[int]:
    """``count`` distinct positions out of ``size``, seeded and sorted (all of them when count is 0 or >= size)."""
    if count <= 0 or count >= size:
        return list(range(size))
    return sorted(random.Random(seed).sample(range(size), count))


def _load_tokenizer(recipe: Any) -> Any:
    from transformers import AutoTokenizer

    path = recipe.data.tokenizer_path or recipe.model.hf_path or recipe.rollout.server.model_path
    if path is None:
        raise ValueError("the evaluation hook needs a tokenizer: pass tokenizer= (the trainer's), or set "
                         "data.tokenizer_path (or model.hf_path) in the recipe.")
    return AutoTokenizer.from_pretrained(str(path))


class PeriodicEvaluator:
    """Evaluates ``recipe.evaluation.hook`` benchmarks on a live engine; returns flat metrics per call."""

    def __init__(self, recipe: Any, *, tokenizer: Any = None, reward: RewardFunction | None = None,
                 run_dir: str | Path | None = None, max_model_len: int | None = None):
        self.recipe = recipe
        cfg = recipe.evaluation
        self.hook = cfg.hook
        # The hook's sampling count and refinement switch replace the CLI's.
        self.cfg = replace(cfg, refine=replace(cfg.refine, enabled=self.hook.refine), limit=None)
        self.run_dir = Path(run_dir) if run_dir is not None else Path(recipe.run.output_dir) / recipe.run.name
        benchmarks = load_benchmarks(list(self.hook.benchmarks), self.cfg, recipe.data, seed=recipe.run.seed)
        self.benchmarks: list[Benchmark] = [
            b.subset(subset_positions(len(b), self.hook.num_problems, recipe.run.seed)) for b in benchmarks]
        self.evaluator = Evaluator.from_recipe(recipe, tokenizer if tokenizer is not None else _load_tokenizer(recipe),
                                               cfg=self.cfg, reward=reward, max_model_len=max_model_len)
        logger.info("evaluation hook: every %d steps, %s, %d samples per problem", recipe.trainer.eval_every,
                    ", ".join(f"{b.name} ({len(b)} problems)" for b in self.benchmarks),
                    self.hook.samples_per_problem)

    async def run_async(self, engine: RolloutEngine, step: int) -> dict[str, float]:
        """Evaluate every hook benchmark now; ``{'eval/<benchmark>/<metric>': value, ...}``."""
        t0 = time.monotonic()
        results: dict[str, BenchmarkResult] = {}
        for bench in self.benchmarks:
            results[bench.name] = await self.evaluator.evaluate_async(engine, bench, self.hook.samples_per_problem)
        metrics: dict[str, float] = {}
        for name, result in results.items():
            metrics.update(flat_metrics(result, prefix=f"eval/{name}/"))
            p1 = result.metrics["pass@1"]
            metrics[f"eval/{name}/pass@1_ci_low"] = p1.ci_low
            metrics[f"eval/{name}/pass@1_ci_high"] = p1.ci_high
        metrics["eval/wall_s"] = time.monotonic() - t0
        if self.hook.write_results:
            self._write(results, step, getattr(engine, "policy_version", None))
        return metrics

    def __call__(self, engine: Any, step: int) -> dict[str, float]:
        """Synchronous :meth:`run_async` (a ``BlockingRolloutClient`` runs it on its own loop)."""
        return run_sync(engine, lambda eng: self.run_async(eng, step))

    def _write(self, results: dict[str, BenchmarkResult], step: int, version: int | None) -> None:
        run = EvalRun(label=f"{self.recipe.run.name} step {step}", created=time.strftime("%Y-%m-%dT%H:%M:%S"),
                      model=f"policy version {version}" if version is not None else None,
                      settings={"step": step, "evaluation": asdict(self.cfg)}, benchmarks=results)
        write_report(run.to_dict(), self.run_dir / "eval" / f"step_{step:06d}", plot=self.cfg.plot)

    def close(self) -> None:
        self.evaluator.close()

    def __enter__(self) -> PeriodicEvaluator:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

