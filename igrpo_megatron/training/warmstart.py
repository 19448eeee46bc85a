"""Supervised warm-start on the synthetic task's worked solutions, before RL.

A random tiny model never answers correctly, so every group would have zero advantage. A few
hundred supervised steps teach it the answer format and some arithmetic; RL then has signal.
Supervised training reuses the RL step: with advantage 1 and the on-policy ratio (= 1) the policy
loss's gradient is exactly that of the mean token negative log-likelihood.
The result is written as a Hugging Face directory, which both the RL trainer and the vLLM
sidecar start from; a finished warm-start is found and reused on resume. A stop signal during it
(:mod:`igrpo_megatron.training.preemption`) ends it at the next step: nothing is exported, and the
requeued run starts the warm-start again (it is minutes long, and a half-trained one is not kept).
"""

from __future__ import annotations

import copy
import logging
import random
import time
from pathlib import Path

import torch
import torch.distributed as dist

from igrpo_megatron.config.schema import RecipeConfig
from igrpo_megatron.data.prompts import PromptFormatter
from igrpo_megatron.data.synthetic import build_task
from igrpo_megatron.rewards.pool import available_cores
from igrpo_megatron.training.batch import Sequence, TrainBatch
from igrpo_megatron.training.preemption import StopRequest, stop_agreed

logger = logging.getLogger(__name__)

DONE_MARK = "config.json"


class WarmstartStopped(Exception):
    """A stop signal arrived during the warm-start; every rank left it at the same step."""

    def __init__(self, step: int, total: int) -> None:
        super().__init__(f"warm-start stopped on a signal after step {step} of {total}")
        self.step, self.total = step, total


def _sequences(recipe: RecipeConfig, fmt: PromptFormatter) -> list[Sequence]:
    """Worked solutions for plain prompts and (``refinement_fraction`` of them) draft-conditioned prompts.

    A draft-conditioned example shows another problem's solution as the "earlier attempt" (so it is
    usually wrong) and trains on the correct one: the model learns to read a draft without copying
    it. Pretrained reasoning models bring this ability; a random tiny model has to be shown it.
    The prompts are built as the rollouts build them (same builder, same ``data.max_prompt_length``
    budget; a draft with no room left gives the plain prompt). Which drafts are shown and what is
    written from them is the task's ``refinement_example`` (``arithmetic_chain``: near misses of the
    same problem, whose checked lines the target copies).
    """
    ws, d = recipe.trainer.warmstart, recipe.data
    task = build_task(d.synthetic_task, d.synthetic_options)
    items = task.generate(ws.num_examples, "train", seed=recipe.run.seed + 1)
    eos = [fmt.eos_token_id] if fmt.eos_token_id is not None else []
    rng = random.Random(recipe.run.seed + 2)
    out = []
    for p in items:
        prompt, target = fmt.encode_problem(p.problem), p.solution
        # Also with iGRPO off: GRPO and iGRPO runs of one seed then start from the same warm-start.
        if rng.random() < ws.refinement_fraction:
            draft, written = task.refinement_example(p, items, rng)  # which drafts, and what is written from them
            built = fmt.refinement(p.problem, draft, recipe.algorithm.igrpo.prompt, d.max_prompt_length)
            if built is not None:
                prompt, target = built.ids, written
        out.append(Sequence(prompt, fmt.encode_text(target) + eos, advantage=1.0))
    return out


def _supervised_recipe(recipe: RecipeConfig) -> RecipeConfig:
    sft = copy.deepcopy(recipe)
    ws = recipe.trainer.warmstart
    sft.optimizer.lr, sft.optimizer.warmup_fraction, sft.optimizer.min_lr_ratio = ws.lr, 0.05, 0.1
    sft.algorithm.loss.kl.coef = 0.0
    sft.algorithm.loss.truncated_is.enabled = False
    sft.algorithm.loss.aggregation = "token_mean"  # plain mean NLL over all answer tokens
    return sft


def run_warmstart(recipe: RecipeConfig, run_dir: Path, tokenizer_dir: Path, fmt: PromptFormatter,
                  stop: StopRequest | None = None) -> Path:
    """Train, export to ``<run_dir>/warmstart`` and return it (collective; reused when already there).

    Raises :class:`WarmstartStopped` when ``stop`` was signalled on any rank.
    """
    out = run_dir / "warmstart"
    if (out / DONE_MARK).exists():
        logger.info("warm-start found at %s; skipping it", out)
        return out
    sequences = _sequences(recipe, fmt)
    threads = torch.get_num_threads()
    if not torch.cuda.is_available():
        # The sidecar starts after the warm-start: until then the trainer ranks have the cores to themselves.
        world = dist.get_world_size() if dist.is_initialized() else 1
        torch.set_num_threads(max(threads, available_cores() // world))
    try:
        return _train_and_save(recipe, out, tokenizer_dir, sequences, stop)
    finally:
        torch.set_num_threads(threads)


def _train_and_save(recipe: RecipeConfig, out: Path, tokenizer_dir: Path, sequences: list[Sequence],
                    stop: StopRequest | None) -> Path:
    from igrpo_megatron.models.hf_io import save_hf_checkpoint
    from igrpo_megatron.training.policy import MegatronPolicy

    ws = recipe.trainer.warmstart
    policy = MegatronPolicy(_supervised_recipe(recipe), total_optimizer_steps=ws.steps, temperature=1.0)
    policy.setup()
    rng = random.Random(recipe.run.seed)
    start = time.perf_counter()
    for step in range(1, ws.steps + 1):
        if stop_agreed(stop):  # collective, every step: ranks leave together
            raise WarmstartStopped(step - 1, ws.steps)
        metrics = policy.train_step(TrainBatch(rng.sample(sequences, ws.batch_size)))
        if step % 25 == 0 or step == ws.steps:
            rate = step / (time.perf_counter() - start)
            logger.info("warm-start %d/%d  nll %.3f  lr %.2e  %.1f steps/s  eta %.0fs", step, ws.steps,
                        -metrics.get("token_logprob", float("nan")), metrics["lr"], rate, (ws.steps - step) / rate)
    save_hf_checkpoint(policy.chunks, recipe.model, out, tokenizer_dir=tokenizer_dir)
    del policy
    if dist.is_initialized():
        dist.barrier()
    return out
