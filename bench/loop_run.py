"""A short real run of a recipe through the training loop (``RLTrainer``), recording what the padding
and step-breakdown entries need. Started in its own process by bench/breakdown.py:

    python -m bench.loop_run RECIPE OUT.json RUN_ROOT [KEY=VALUE ...]

The loop runs unchanged; two of its calls are observed from outside: the policy's micro-batch plan
(``MegatronPolicy._micro_batches``: every sequence length and every padded micro-batch shape the
planner built) and the rollout's scoring calls (their summed wall time; they overlap generation).
The per-phase times are the loop's own ``time/*`` metrics in RUN_ROOT/<name>/metrics.jsonl.
"""

from __future__ import annotations

import functools
import inspect
import json
import logging
import sys
import time


def _observe(trainer, record: dict) -> None:
    policy = trainer.policy
    plan = policy._micro_batches

    @functools.wraps(plan)
    def micro_batches(batch):
        mbs = plan(batch)
        if policy.chunks[0].training:  # the train step's plan (log-prob passes plan the same batches)
            record["steps"].append({
                "prompt_lengths": [len(s.prompt_ids) for s in batch.sequences],
                "completion_lengths": [len(s.completion_ids) for s in batch.sequences],
                "micro_batches": [{"shape": list(mb.tokens.shape), "real_tokens": int(sum(
                    batch.sequences[i].length - 1 for i in mb.indices))} for mb in mbs]})
        return mbs

    policy._micro_batches = micro_batches
    if getattr(trainer, "rollout", None) is None:
        return
    score = trainer.rollout._score

    @functools.wraps(score)
    async def timed_score(*args, **kwargs):
        t0 = time.perf_counter()
        try:
            return await score(*args, **kwargs)
        finally:
            record["score_call_s"] += time.perf_counter() - t0

    trainer.rollout._score = timed_score


def main(recipe_path: str, out_path: str, run_root: str, *overrides: str) -> int:
    from igrpo_megatron.config import load_recipe
    from igrpo_megatron.evaluation.report import write_text
    from igrpo_megatron.training.loop import RLTrainer

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    recipe = load_recipe(recipe_path, [f"run.output_dir={run_root}", *overrides])
    record: dict = {"steps": [], "score_call_s": 0.0}
    from igrpo_megatron.evaluation.hook import PeriodicEvaluator

    # The loop takes its evaluation hook from above (as `igrpo train` passes it), where it asks for one.
    wants_hook = "evaluator" in inspect.signature(RLTrainer).parameters
    trainer = RLTrainer(recipe, evaluator=PeriodicEvaluator) if wants_hook else RLTrainer(recipe)
    try:
        trainer.setup()
        _observe(trainer, record)
        t0 = time.perf_counter()
        trainer.train()
        record["train_s"] = time.perf_counter() - t0
    finally:
        trainer.cleanup()
    record["run_dir"] = str(trainer.run_dir)
    record["micro_batch_tokens"] = recipe.trainer.micro_batch_tokens
    write_text(out_path, json.dumps(record))
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
