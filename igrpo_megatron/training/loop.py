"""The RL loop: rollout (two-stage or GRPO) -> rewards -> advantages -> train -> weight sync, per step.

Every rank runs the trainer; rank 0 also owns the vLLM sidecar, the rollouts, the rewards, the
evaluation hook and the metrics. Rank 0 turns the rollout into a :class:`TrainBatch` and
broadcasts it; all ranks train on it; all ranks export the new weights, which rank 0 streams into
the sidecar. Sampling seeds depend only on (run seed, step, prompt, stage), so a resumed run
samples what the uninterrupted run would have.

Stopping on a signal (``igrpo train``; see :mod:`igrpo_megatron.training.preemption`): SIGUSR1,
SIGTERM or SIGHUP lets the step in flight finish (all ranks agree to stop at the same step
boundary), saves a checkpoint, stops the sidecar, writes the summary and exits with
``PREEMPTED_EXIT_CODE`` = 75, for a job script to requeue; a second signal stops at once (exit
128 + signal) and still stops the sidecar.

A resume is checked before anything starts: ``checkpoint.resume: auto`` skips a damaged newest
checkpoint (saying so) for the one before; an explicit damaged one is an error naming the file.
The run's ``recipe.yaml`` and ``summary.md`` are written only by a run that got going, so a run
that fails to resume leaves the run directory's record as it was.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from igrpo_megatron.algorithms.advantages import group_advantages
from igrpo_megatron.algorithms.losses import needs_reference
from igrpo_megatron.config.errors import UserError
from igrpo_megatron.config.loader import recipe_to_yaml, save_resolved_recipe
from igrpo_megatron.config.schema import RecipeConfig
from igrpo_megatron.config.training import TrainerConfig
from igrpo_megatron.rollout.two_stage import RolloutBatch
from igrpo_megatron.training.batch import Sequence, TrainBatch
from igrpo_megatron.training.interfaces import EvaluatorFactory
from igrpo_megatron.training.preemption import PREEMPTED_EXIT_CODE, StopRequest, stop_agreed
from igrpo_megatron.training.step_prompts import StepPrompts
from igrpo_megatron.training.warmstart import WarmstartStopped, run_warmstart

logger = logging.getLogger(__name__)


class TrainingDivergedError(UserError, RuntimeError):
    """Too many steps in a row had a NaN/Inf loss or gradient (``trainer.max_consecutive_bad_steps``).

    A user error (``igrpo train`` prints the message and exits 2): the fix is in the recipe or the
    data, and the last good state is saved to resume from."""


def build_train_batch(rollout: RolloutBatch, recipe: RecipeConfig) -> tuple[TrainBatch, dict[str, float]]:
    """Group-normalised advantages for every trained group, as one TrainBatch (groups kept together)."""
    adv_cfg = recipe.algorithm.advantage
    sequences: list[Sequence] = []
    uniform = 0
    groups = rollout.training_groups()
    for gid, group in enumerate(groups):
        rewards = torch.tensor([[rollout.samples[i].reward for i in group.members]])  # [1, G]
        adv, m = group_advantages(rewards, normalize_by_std=adv_cfg.normalize_by_std,
                                  leave_one_out=adv_cfg.leave_one_out, eps=adv_cfg.eps)
        uniform += int(m.num_uniform_groups)
        for i, a in zip(group.members, adv[0].tolist(), strict=True):
            s = rollout.samples[i]
            if s.completion_ids:
                sequences.append(Sequence(s.prompt_ids, s.completion_ids, a, s.rollout_logprobs, gid))
    return TrainBatch(sequences), {"uniform_group_rate": uniform / max(len(groups), 1),
                                   "trained_sequences": float(len(sequences))}


def eval_due(step: int, trainer: TrainerConfig) -> bool:
    """Whether the held-out evaluation runs after ``step`` (0: before training): every
    ``trainer.eval_every`` steps and after the last one; never when ``eval_every`` is 0."""
    every = trainer.eval_every
    return every > 0 and (step % every == 0 or step == trainer.num_steps)


def _split(batch: TrainBatch, parts: int) -> list[TrainBatch]:
    """Mini-batches of whole groups (several optimizer steps per rollout batch)."""
    if parts <= 1:
        return [batch]
    groups = sorted({s.group for s in batch.sequences})
    chunks = [groups[i::parts] for i in range(parts)]
    out = []
    for chunk in chunks:
        keep = [i for i, s in enumerate(batch.sequences) if s.group in set(chunk)]
        out.append(TrainBatch([batch.sequences[i] for i in keep],
                              old_logprobs=None if batch.old_logprobs is None else [batch.old_logprobs[i] for i in keep],
                              ref_logprobs=None if batch.ref_logprobs is None else [batch.ref_logprobs[i] for i in keep]))
    return [b for b in out if len(b)]


class RLTrainer:
    """``setup()``, ``train()``, ``save_checkpoint()``, ``cleanup()`` — the recipe's skeleton."""

    def __init__(self, recipe: RecipeConfig, stop: StopRequest | None = None,
                 evaluator: EvaluatorFactory | None = None):
        self.recipe = recipe
        if recipe.trainer.eval_every and evaluator is None:
            raise ValueError(f"trainer.eval_every = {recipe.trainer.eval_every} but this trainer was given no "
                             "evaluator (igrpo train passes evaluation.hook.PeriodicEvaluator); pass evaluator= "
                             "or set trainer.eval_every=0")
        self.make_evaluator = evaluator  # builds the trainer.eval_every hook on rank 0
        self.run_dir = Path(recipe.run.output_dir) / recipe.run.name
        self.step = 0
        self.rank0 = True
        self.stop = stop  # signals caught by the caller (igrpo train); None: no signal handling
        self.preempted = False  # stopped on a signal, after saving: the run should be requeued
        self.resume_from: Path | None = None
        self._started = False
        self.data_skipped = 0  # training rows skipped as unusable (data/skipped_rows)
        self.bad_in_a_row = 0  # steps in a row whose update was skipped for a NaN/Inf
        self.faults = dict.fromkeys(("uniform_steps_skipped", "bad_steps", "failed_saves", "failed_weight_pushes",
                                     "rollout_retries"), 0)  # cumulative counts, logged as faults/<name>

    # ------------------------------------------------------------------- setup
    def setup(self) -> None:
        self._setup_plan_checks()
        self._setup_distributed()
        self._choose_checkpoint()  # before anything is built or started: a damaged one fails in seconds
        self._setup_run_dir()
        self._setup_tokenizer_and_data()
        try:
            self._setup_policy()
        except WarmstartStopped as stopped:
            self.preempted = True  # nothing to save yet: the requeued run starts the warm-start again
            logger.warning("%s; nothing saved, exit code %d (the next run starts the warm-start again)", stopped,
                           PREEMPTED_EXIT_CODE)
            return
        if self.rank0:
            self._setup_sidecar()
            self._setup_rollout()
        self._resume()
        if self.rank0:  # only now: a run that failed to set up (or resume) must not rewrite the record
            save_resolved_recipe(self.recipe, self.run_dir)

    def _setup_plan_checks(self) -> None:
        """`igrpo plan`'s checks (layout, files, benchmarks, memory per GPU), before anything is built."""
        import os

        from igrpo_megatron.config.plan import check_plan

        check_plan(self.recipe, world_size=int(os.environ.get("WORLD_SIZE", "1")))

    def _setup_distributed(self) -> None:
        from igrpo_megatron.runtime.cpu_mode import enable_cpu_mode
        from igrpo_megatron.runtime.parallel import init_distributed

        if enable_cpu_mode() and self.recipe.run.cpu_threads:  # enable_cpu_mode does nothing with CUDA
            torch.set_num_threads(self.recipe.run.cpu_threads)
        self.layout = init_distributed(self.recipe.parallel, seed=self.recipe.run.seed)
        self.rank0 = self.layout.is_main

    def _setup_run_dir(self) -> None:
        """The run and checkpoint directories must take files before anything is built (every rank agrees)."""
        from igrpo_megatron.training.checkpoint import CheckpointError, storage_problem

        problem: list[str | None] = [None]
        if self.rank0:
            problem[0] = storage_problem(self.run_dir) or storage_problem(self._checkpoint_root())
            logger.info("run directory: %s", self.run_dir.resolve())
        dist.broadcast_object_list(problem, src=0)
        if problem[0] is not None:
            raise CheckpointError(f"{problem[0]}: nothing was started; free some space or set run.output_dir / "
                                  "checkpoint.save_dir to a writable directory")

    def _setup_tokenizer_and_data(self) -> None:
        from transformers import AutoTokenizer

        from igrpo_megatron.data.datasets import PromptLoader
        from igrpo_megatron.data.prompts import PromptFormatter
        from igrpo_megatron.data.sources import ensure_tokenizer, training_records

        if self.rank0:
            ensure_tokenizer(self.recipe, self.run_dir)
        dist.barrier()
        self.tokenizer_dir = ensure_tokenizer(self.recipe, self.run_dir)
        self.tokenizer = AutoTokenizer.from_pretrained(str(self.tokenizer_dir))
        self.fmt = PromptFormatter(self.tokenizer, self.recipe.data)
        t = self.recipe.trainer
        records, self.data_skipped = training_records(self.recipe, lambda p: len(self.fmt.encode_problem(p)))
        self.loader = PromptLoader(records, t.prompts_per_step, self.recipe.run.seed, shuffle=self.recipe.data.shuffle)

    def _setup_policy(self) -> None:
        from igrpo_megatron.training.policy import MegatronPolicy

        start_from = self.recipe.model.hf_path
        if self.recipe.trainer.warmstart.enabled:
            start_from = str(run_warmstart(self.recipe, self.run_dir, self.tokenizer_dir, self.fmt, self.stop))
            self.recipe.model.hf_path = start_from
        self.initial_weights = start_from
        t = self.recipe.trainer
        self.policy = MegatronPolicy(self.recipe, total_optimizer_steps=t.num_steps * t.optimizer_steps_per_rollout)
        self.policy.setup()

    def _setup_sidecar(self) -> None:
        from igrpo_megatron.rollout.client import BlockingRolloutClient, RolloutClient
        from igrpo_megatron.rollout.server import RolloutServer
        from igrpo_megatron.rollout.weight_sync import WeightSynchronizer, build_transport, engine_backend

        cfg = self.recipe.rollout
        model_path = cfg.server.model_path or self.initial_weights
        if cfg.server.url is None and model_path is None:
            raise ValueError("the recipe gives no starting weights: set model.hf_path (or rollout.server.model_path), "
                             "or enable trainer.warmstart for a synthetic task")
        local = cfg.server.url is None  # rollout.weight_sync.transport 'auto' follows where the server runs
        self.server = RolloutServer(cfg.server, model_path=model_path, log_dir=self.run_dir / "sidecar",
                                    weight_transfer_backend=engine_backend(cfg, local))
        self.server.start()
        self.server.start_watchdog()
        self.client = BlockingRolloutClient(RolloutClient.from_config(cfg, self.server.url))
        self.sync = WeightSynchronizer(self.client.client, build_transport(cfg, self.client.client, local))

    def _setup_rollout(self) -> None:
        from igrpo_megatron.rewards.registry import build_rewards
        from igrpo_megatron.rollout.interfaces import SamplingParams
        from igrpo_megatron.rollout.two_stage import TwoStageRollout
        from igrpo_megatron.training.metrics import MetricsLogger

        r = self.recipe
        self.rewards = build_rewards(r.reward)
        self.rollout = TwoStageRollout(
            self.client.client, self.fmt, self.rewards.train, r.algorithm, SamplingParams.from_config(r.rollout.sampling),
            max_prompt_length=r.data.max_prompt_length, run_seed=r.run.seed, draft_reward=self.rewards.draft)
        self.evaluator = None  # no hook: no benchmark files needed
        if r.trainer.eval_every:
            self.evaluator = self.make_evaluator(r, tokenizer=self.tokenizer, reward=self.rewards.train,
                                                 run_dir=self.run_dir, max_model_len=r.rollout.server.max_model_len)
        self.metrics = MetricsLogger(self.run_dir, r.logging, r.run.name, tags=r.run.tags)

    def _checkpoint_root(self) -> Path:
        return Path(self.recipe.checkpoint.save_dir or self.run_dir / "checkpoints")

    def _choose_checkpoint(self) -> None:
        """Which checkpoint to resume from (rank 0 checks it, every rank gets its answer)."""
        from igrpo_megatron.training.checkpoint import CheckpointError, find_latest, verify_checkpoint

        choice: list[Any] = [None, None]  # [path, error message]
        if self.rank0:
            mode = self.recipe.checkpoint.resume
            try:
                if mode == "auto":
                    choice[0] = find_latest(self._checkpoint_root())
                elif mode != "none":
                    verify_checkpoint(mode)
                    choice[0] = Path(mode)
            except CheckpointError as exc:
                choice[1] = f"checkpoint.resume={mode}: {exc}"
        dist.broadcast_object_list(choice, src=0)
        if choice[1] is not None:
            raise CheckpointError(choice[1])
        self.resume_from = choice[0]

    def _resume(self) -> None:
        path = self.resume_from
        if path is None:
            return
        self.step, loop_state = self.policy.load(str(path))
        self.loader.load_state_dict(loop_state["loader"])
        if self.rank0:
            self.metrics.truncate_after(self.step)
            logger.info("resumed at step %d from %s", self.step, path)
        self._push_weights(self.step)  # the sidecar starts from the initial weights: bring it up to date

    # ------------------------------------------------------------------- train
    def _rollout(self, records, more_prompts=None) -> tuple[TrainBatch | None, dict[str, float]]:
        """The step's rollouts on rank 0 (``more_prompts``: dynamic sampling's refills), broadcast to every rank.

        If the sidecar dies (or restarted and lost the weights), rank 0 restarts it, every rank
        re-sends the current weights (the export is collective) and the step's rollouts run again:
        seeds depend on the step only, so the retry samples what the first try would have.
        """
        from igrpo_megatron.rollout.interfaces import SidecarError

        for attempt in range(self.recipe.rollout.server.max_restarts + 1):
            batch = metrics = failure = None
            if self.rank0:
                try:
                    batch, metrics = self._rollout_rank0(records, more_prompts)
                except SidecarError as exc:
                    failure = f"{type(exc).__name__}: {exc}"
                    self.server.ensure_running()
                    self.server.start()  # waits until healthy (also for an external server)
            shared = [batch, metrics, failure]
            dist.broadcast_object_list(shared, src=0)
            if shared[2] is None:
                return shared[0], shared[1]
            self.faults["rollout_retries"] += 1
            logger.warning("step %d: rollout failed (%s); re-sending weights and retrying (%d)",
                           self.step, shared[2], attempt + 1)
            self._push_weights(self.step, resend=True)
        raise RuntimeError(f"step {self.step}: the sidecar kept failing; see {self.run_dir / 'sidecar'}")

    def _rollout_rank0(self, records, more_prompts=None) -> tuple[TrainBatch, dict[str, float]]:
        from igrpo_megatron.rollout.interfaces import StaleWeightsError
        from igrpo_megatron.rollout.mechanism import rollout_mechanism_metrics

        rollout = self.client.run(self.rollout.run(records, self.step, more_prompts))
        batch, extra = build_train_batch(rollout, self.recipe)
        metrics = {**rollout.metrics, **extra, **{f"time/{k}": v for k, v in rollout.timings.items()}}
        metrics.update(rollout_mechanism_metrics(rollout, self.recipe.reward.extraction))  # refine vs draft, copies
        metrics["rollout_tokens_per_s"] = rollout.generated_tokens / max(rollout.timings["rollout"], 1e-9)
        versions = {s.policy_version for s in rollout.samples}
        if versions != {self.step}:  # never trained on: _rollout re-sends the weights and samples again
            raise StaleWeightsError(f"step {self.step}: rollouts came from policy versions {sorted(versions)}",
                                    url=self.client.client.base_url)
        return batch, metrics

    def _push_weights(self, version: int, resend: bool = False) -> float:
        """Every rank exports; rank 0 streams into the sidecar. A push the sidecar refuses is reported and
        counted, not fatal: the next rollout comes back tagged with the old version, and ``_rollout``
        pushes again (bounded by rollout.server.max_restarts) before anything is trained on."""
        from igrpo_megatron.rollout.interfaces import WeightSyncError

        start = time.perf_counter()
        pairs = self.policy.export_hf_weights()
        if self.rank0:
            try:
                self.client.run(self.sync.sync(pairs, version=version, resend=resend))
            except WeightSyncError as exc:
                self.faults["failed_weight_pushes"] += 1
                logger.error("step %d: the sidecar did not take the weights of version %d (%s); the next rollout "
                             "will push them again", self.step, version, exc)
                for _ in pairs:  # the export is collective: the other ranks are still walking it
                    pass
        else:
            for _ in pairs:  # the export is collective: every rank walks it
                pass
        dist.barrier()
        return time.perf_counter() - start

    def _train_on(self, batch: TrainBatch) -> dict[str, float]:
        timings = {}
        t0 = time.perf_counter()
        steps = self.recipe.trainer.optimizer_steps_per_rollout
        if steps > 1:
            self.policy.compute_logprobs(batch)
        if needs_reference(self.recipe.algorithm.loss):
            self.policy.compute_logprobs(batch, reference=True)
        timings["time/logprob"] = time.perf_counter() - t0
        t1 = time.perf_counter()
        out: dict[str, float] = {}
        skipped = 0.0
        for part in _split(batch, steps):
            out = self.policy.train_step(part)
            skipped += out.pop("update_skipped", 0.0)
        timings["time/train"] = time.perf_counter() - t1
        return {**out, **timings, "updates_skipped": skipped}

    def _train_guarded(self, batch: TrainBatch) -> dict[str, float]:
        """Train on ``batch`` unless nothing can be learnt from it; count what was skipped and why.

        A batch whose advantages are all zero (every group uniform: all right or all wrong) would move
        nothing but the KL term, so it takes no optimizer update. An update with a NaN/Inf loss or
        gradient is skipped by the policy (weights and Adam state untouched); ``trainer.max_consecutive_bad_steps``
        of those in a row stop the run (see :meth:`_stop_if_diverged`).
        """
        if not any(s.advantage for s in batch.sequences):
            self.faults["uniform_steps_skipped"] += 1
            logger.warning("step %d: every group's rewards are uniform (zero advantage everywhere); no optimizer "
                           "update this step", self.step)
            out: dict[str, float] = {"updates_skipped": 1.0}
        else:
            out = self._train_on(batch)
            bad = out["updates_skipped"] > 0
            self.bad_in_a_row = self.bad_in_a_row + 1 if bad else 0
            self.faults["bad_steps"] += int(bad)
        return {**out, "data/skipped_rows": float(self.data_skipped),
                **{f"faults/{k}": float(v) for k, v in self.faults.items()}}

    def _stop_if_diverged(self) -> None:
        """After ``trainer.max_consecutive_bad_steps`` non-finite steps in a row: save, then stop with an error."""
        limit = self.recipe.trainer.max_consecutive_bad_steps
        if not limit or self.bad_in_a_row < limit:
            return
        self.save_checkpoint()  # no bad update was applied: the weights are those of the last good step
        raise TrainingDivergedError(
            f"step {self.step}: {self.bad_in_a_row} steps in a row had a NaN/Inf loss or gradient norm "
            f"(trainer.max_consecutive_bad_steps = {limit}); their updates were skipped and the last good state "
            f"is saved in {self._checkpoint_root()}. Lower optimizer.lr, check the data and rewards, then resume "
            "(checkpoint.resume=auto), or raise the limit")

    def _save_or_defer(self, final: bool) -> bool:
        """Save a checkpoint if the directory can take it (every rank agrees); else report, count, and
        keep the state in memory for the next save to retry. A final save that cannot be done is an error."""
        from igrpo_megatron.training.checkpoint import (
            SAVE_ERRORS,
            CheckpointError,
            checkpoint_bytes,
            storage_problem,
        )

        root = self._checkpoint_root()
        problem: list[str | None] = [storage_problem(root, checkpoint_bytes(root)) if self.rank0 else None]
        dist.broadcast_object_list(problem, src=0)
        if problem[0] is None:
            try:
                self.save_checkpoint()
                return True
            except SAVE_ERRORS as exc:  # written part-way: the previous checkpoint stays `latest`
                if dist.get_world_size() > 1:
                    raise  # the other ranks may be inside the save's collectives: no agreed way on
                problem[0] = f"{type(exc).__name__}: {exc}"
        self.faults["failed_saves"] += 1
        if final:
            raise CheckpointError(f"step {self.step}: the final checkpoint could not be saved ({problem[0]})")
        logger.error("step %d: checkpoint not saved (%s); training goes on with its state in memory and the next "
                     "save tries again", self.step, problem[0])
        return False

    def _evaluate(self) -> dict[str, float]:
        metrics = {}
        if self.rank0:
            metrics = self.evaluator(self.client, self.step)
        return metrics

    def train(self) -> None:
        t = self.recipe.trainer
        if self.preempted:  # stopped during set-up (the warm-start)
            return
        self._started = True
        if self.step == 0 and eval_due(0, t) and self.rank0:
            self._log(self._evaluate())
        start = time.perf_counter()
        first = saved = self.step
        last = t.num_steps if t.stop_after_steps is None else min(t.num_steps, first + t.stop_after_steps)
        while self.step < last:
            if stop_agreed(self.stop):  # every rank, at the same step boundary
                self._stop_early(saved)
                break
            step_start = time.perf_counter()
            prompts = StepPrompts(self.loader)
            if self.recipe.algorithm.dynamic_sampling.enabled:  # rank 0 may draw more; agree() evens the loaders
                batch, metrics = self._rollout(prompts.first, prompts.more)
                prompts.agree()
            else:  # no refills: no extra batches, and no collective to even them out
                batch, metrics = self._rollout(prompts.first)
            metrics.update(self._train_guarded(batch))
            self.step += 1
            self._stop_if_diverged()
            metrics["time/sync"] = self._push_weights(self.step)
            if self.rank0:  # what the sidecar itself reports, not what we believe we sent
                metrics["sidecar_weight_version"] = float(self.client.run(self.sync.server_version()))
            metrics["time/step"] = time.perf_counter() - step_start
            if eval_due(self.step, t):
                t_eval = time.perf_counter()
                metrics.update(self._evaluate())
                metrics["time/eval"] = time.perf_counter() - t_eval  # outside time/step, like the save
            if t.save_every and self.step % t.save_every == 0 or self.step == last:
                t_save = time.perf_counter()
                if self._save_or_defer(final=self.step == last):
                    saved = self.step
                metrics["time/checkpoint"] = time.perf_counter() - t_save
            if self.rank0:
                self._log(metrics)
            if self.rank0 and (self.step % self.recipe.logging.log_every == 0 or self.step == last):
                rate = (self.step - first) / (time.perf_counter() - start)
                logger.info("step %d/%d  reward %.3f  loss %.4f  entropy %.3f  %.1fs/step  eta %.0fs", self.step,
                            t.num_steps, metrics.get("refine/reward_mean", metrics.get("grpo/reward_mean", 0.0)),
                            metrics.get("loss", 0.0), metrics.get("entropy", 0.0), 1 / rate,
                            (t.num_steps - self.step) / rate)

    def _stop_early(self, saved: int) -> None:
        self.preempted = True
        if self.step > saved:
            self.save_checkpoint()
        if self.rank0:
            logger.warning("stopped at step %d of %d on %s; checkpoint %s; exit code %d (resume with "
                           "checkpoint.resume=auto)", self.step, self.recipe.trainer.num_steps,
                           self.stop.signal_name if self.stop and self.stop.requested else "another rank's signal",
                           self._checkpoint_root(), PREEMPTED_EXIT_CODE)

    def _log(self, metrics: dict[str, float]) -> None:
        self.metrics.log(self.step, {**metrics, "policy_version": self.step})

    def save_checkpoint(self) -> None:
        self.policy.save(str(self._checkpoint_root()), self.step, {"loader": self.loader.state_dict()},
                         recipe_to_yaml(self.recipe))

    def cleanup(self) -> None:
        from igrpo_megatron.runtime.parallel import destroy_distributed

        if self.stop is not None:
            self.stop.cleaning_up = True  # a further signal must not cut the sidecar's shutdown short
        # Whatever setup got as far as building, in reverse order (setup may have failed half-way).
        for name in ("metrics", "evaluator", "rollout", "rewards", "sync", "client", "server"):
            part = getattr(self, name, None)
            if part is not None:
                try:
                    part.close()
                except Exception:  # closing one part must not keep the others (and the sidecar) alive
                    logger.exception("closing %s failed", name)
        if self.rank0 and self._started and hasattr(self, "metrics"):  # after the sidecar is stopped
            from igrpo_megatron.training.summary import write_summary

            write_summary(self.run_dir, self.metrics.history(), self.recipe)
        destroy_distributed()


def run_training(recipe: RecipeConfig, stop: StopRequest | None = None,
                 evaluator: EvaluatorFactory | None = None) -> RLTrainer:
    """Set up, train, clean up; returns the trainer (``run_dir``; ``preempted`` when a signal stopped it).

    ``evaluator`` builds the ``trainer.eval_every`` hook (``evaluation.hook.PeriodicEvaluator``).
    """
    trainer = RLTrainer(recipe, stop, evaluator)
    try:
        trainer.setup()
        trainer.train()
    finally:
        trainer.cleanup()
    return trainer
