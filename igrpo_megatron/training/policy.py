"""The policy on Megatron-Core: log-probs of given tokens, and RL optimizer steps on a TrainBatch.

The loss is the recipe's ``policy_loss`` with *global* normalisers (all sequences and completion
tokens of the step, whatever the DP split and micro-batching), so a step gives the same update
at any TP/PP/DP layout. Megatron's schedule divides each micro-batch loss by the number of
micro-batches and DDP averages gradients over data-parallel ranks; both are undone here, because
each micro-batch loss is already its exact share of the step's loss.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from functools import partial

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.distributed import finalize_model_grads
from megatron.core.pipeline_parallel import get_forward_backward_func

from igrpo_megatron.algorithms.logprobs import vocab_parallel_logprobs_and_entropy
from igrpo_megatron.algorithms.losses import needs_reference, policy_loss
from igrpo_megatron.config.layout import micro_batch_pad_multiple
from igrpo_megatron.config.schema import RecipeConfig
from igrpo_megatron.models import unwrap
from igrpo_megatron.training.batch import (
    MicroBatch,
    TrainBatch,
    build_micro_batch,
    completion_values,
    plan_micro_batches,
    shard_for_rank,
)
from igrpo_megatron.training.megatron_setup import build_model_chunks, build_optimizer, build_scheduler

logger = logging.getLogger(__name__)


class MetricSums:
    """Sums and counts of per-micro-batch metrics, reduced over pipeline and data-parallel ranks."""

    def __init__(self) -> None:
        self.sums: dict[str, float] = {}

    def add(self, name: str, value: float | torch.Tensor, weight: float = 1.0) -> None:
        self.sums[name] = self.sums.get(name, 0.0) + float(value) * weight
        self.sums[name + "/_w"] = self.sums.get(name + "/_w", 0.0) + weight

    def reduce(self, names: list[str], totals: tuple[str, ...] = ()) -> dict[str, float]:
        """Weighted means over every rank (only the last pipeline stage contributes); plain sums
        for the names in ``totals``. Names nobody reported are left out."""
        keys = [k for n in names for k in (n, n + "/_w")]
        vec = torch.tensor([self.sums.get(k, 0.0) for k in keys], dtype=torch.float64)
        if dist.is_initialized():
            dist.all_reduce(vec, group=parallel_state.get_data_parallel_group())
            dist.all_reduce(vec, group=parallel_state.get_pipeline_model_parallel_group())
        out = {}
        for i, name in enumerate(names):
            total, weight = vec[2 * i].item(), vec[2 * i + 1].item()
            if weight > 0:
                out[name] = total if name in totals else total / weight
        return out


class MegatronPolicy:
    """The trainer side of RL: built from the recipe, it owns the model, optimizer and schedule."""

    def __init__(self, recipe: RecipeConfig, total_optimizer_steps: int, temperature: float | None = None):
        self.recipe = recipe
        self.total_optimizer_steps = max(total_optimizer_steps, 1)
        # Score tokens under the distribution whose log-probs vLLM reports (see rollout.server.logprobs_mode);
        # supervised training passes temperature=1.
        processed = recipe.rollout.server.logprobs_mode.startswith("processed")
        default = recipe.rollout.sampling.temperature if processed else 1.0
        self.temperature = default if temperature is None else temperature
        self.chunks: list[torch.nn.Module] = []
        self.reference: list[torch.nn.Module] | None = None

    # ----------------------------------------------------------------- setup
    def setup(self) -> None:
        r = self.recipe
        if r.parallel.context_parallel_size > 1:
            raise ValueError("parallel.context_parallel_size > 1 is not supported by the RL step yet "
                             "(log-probs would need the CP-split sequence); use TP/PP/DP")
        self.chunks = build_model_chunks(r.model, r.parallel)
        if r.model.hf_path:
            from igrpo_megatron.models.hf_io import load_hf_into_megatron

            load_hf_into_megatron(self.chunks, r.model, r.model.hf_path)
        self.optimizer = build_optimizer(r.optimizer, r.model, r.parallel, self.chunks)
        self.scheduler = build_scheduler(r.optimizer, self.optimizer, self.total_optimizer_steps)
        for chunk in self.chunks:
            cfg = chunk.config
            cfg.finalize_model_grads_func = finalize_model_grads
            cfg.grad_scale_func = self.optimizer.scale_loss
            cfg.no_sync_func = [c.no_sync for c in self.chunks] if len(self.chunks) > 1 else self.chunks[0].no_sync
            cfg.variable_seq_lengths = True  # micro-batches have different lengths
        if needs_reference(r.algorithm.loss):
            self.reference = self._frozen_copy()
        self.tp_group = parallel_state.get_tensor_model_parallel_group()

    def _frozen_copy(self) -> list[torch.nn.Module]:
        """The reference policy for the KL term: the initial weights, never updated."""
        ref = build_model_chunks(self.recipe.model, self.recipe.parallel, wrap_ddp=False)
        for mine, theirs in zip(ref, self.chunks, strict=True):
            mine.load_state_dict(unwrap(theirs).state_dict())
            mine.requires_grad_(False)
            mine.eval()
        return ref

    # ------------------------------------------------------------ schedules
    def _micro_batches(self, batch: TrainBatch) -> list[MicroBatch]:
        dp_rank = parallel_state.get_data_parallel_rank()
        dp_size = parallel_state.get_data_parallel_world_size()
        mine = shard_for_rank(batch, dp_rank, dp_size)
        # Sequence parallelism splits each micro-batch's sequence over TP (FP8 needs 16s): pad up to it;
        # padded positions have loss_mask False, so they change neither log-probs nor the loss.
        pad_to = micro_batch_pad_multiple(self.recipe.model, self.recipe.parallel)
        plans = plan_micro_batches([batch.sequences[i].length for i in mine],
                                   self.recipe.trainer.micro_batch_tokens, pad_to=pad_to)
        return [build_micro_batch(batch, [mine[p] for p in plan], pad_to=pad_to) for plan in plans]

    def _forward(self, model: torch.nn.Module, mb: MicroBatch) -> torch.Tensor:
        positions = torch.arange(mb.tokens.shape[1]).unsqueeze(0).expand_as(mb.tokens)
        return model(mb.tokens, positions, attention_mask=None)  # last stage: [b, S, V/TP] logits

    def _run(self, models: list[torch.nn.Module], mbs: list[MicroBatch], loss_fn, forward_only: bool):
        def step(data_iterator: Iterator[MicroBatch], model):
            mb = next(data_iterator)
            return self._forward(model, mb), partial(loss_fn, mb)

        iterators = [iter(mbs) for _ in models] if len(models) > 1 else iter(mbs)
        get_forward_backward_func()(
            forward_step_func=step, data_iterator=iterators, model=models, num_microbatches=len(mbs),
            seq_length=max(mb.tokens.shape[1] for mb in mbs), micro_batch_size=1, forward_only=forward_only,
        )

    def _token_stats(self, mb: MicroBatch, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return vocab_parallel_logprobs_and_entropy(
            logits, mb.targets, group=self.tp_group, temperature=self.temperature)  # [b, S] each

    # ------------------------------------------------------------- log-probs
    @torch.no_grad()
    def compute_logprobs(self, batch: TrainBatch, reference: bool = False) -> dict[str, float]:
        """Fill ``batch.old_logprobs`` (or ``ref_logprobs``) on the last pipeline stage; return entropy."""
        models = self.reference if reference else self.chunks
        if models is None:
            raise RuntimeError("reference log-probs asked for, but algorithm.loss.kl.coef is 0")
        for m in models:
            m.eval()
        mbs = self._micro_batches(batch)
        found: dict[int, torch.Tensor] = {}
        sums = MetricSums()

        def loss_fn(mb: MicroBatch, logits: torch.Tensor):
            logp, entropy = self._token_stats(mb, logits)
            for idx, values in zip(mb.indices, completion_values(mb, logp), strict=True):
                found[idx] = values
            n = mb.loss_mask.sum()
            if n > 0:
                sums.add("entropy", entropy[mb.loss_mask].mean(), weight=float(n))
            return torch.zeros((), requires_grad=False), {}

        self._run(models, mbs, loss_fn, forward_only=True)
        if found:
            # Every DP rank has only its own sequences; the loss only needs them on that rank.
            values = [found.get(i) for i in range(len(batch))]
            setattr(batch, "ref_logprobs" if reference else "old_logprobs", values)
        return sums.reduce(["entropy"])

    # ------------------------------------------------------------------ train
    def train_step(self, batch: TrainBatch) -> dict[str, float]:
        """One optimizer step on ``batch`` (every rank passes the same batch)."""
        for m in self.chunks:
            m.train()
            m.zero_grad_buffer()
        self.optimizer.zero_grad()
        mbs = self._micro_batches(batch)
        num_tokens = float(batch.num_completion_tokens)
        num_seqs = float(sum(1 for s in batch.sequences if s.completion_ids))
        scale = len(mbs) * parallel_state.get_data_parallel_world_size()
        loss_cfg = self.recipe.algorithm.loss
        sums = MetricSums()

        def loss_fn(mb: MicroBatch, logits: torch.Tensor):
            logp, entropy = self._token_stats(mb, logits)
            loss, metrics = policy_loss(
                logp, mb.old_logprobs, mb.advantages, mb.loss_mask, loss_cfg,
                ref_logprobs=mb.ref_logprobs, rollout_logprobs=mb.rollout_logprobs,
                num_global_tokens=num_tokens, num_global_seqs=num_seqs)
            tokens = float(mb.loss_mask.sum())
            # Each micro-batch's loss is its share: the step's loss is their sum.
            for name in ("loss", "pg_loss", "kl_loss"):
                sums.add(name, getattr(metrics, name))
            if tokens:
                sums.add("entropy", entropy.detach()[mb.loss_mask].mean(), weight=tokens)
                sums.add("token_logprob", logp.detach()[mb.loss_mask].mean(), weight=tokens)
                for name, value in metrics.as_dict().items():
                    if name not in ("loss", "pg_loss", "kl_loss", "num_tokens", "num_seqs"):
                        sums.add(name, value, weight=tokens)
            return loss * scale, {}

        self._run(self.chunks, mbs, loss_fn, forward_only=False)
        names = ["loss", "entropy", "token_logprob", "pg_loss", "kl_loss", "ratio_mean", "clip_frac_low", "clip_frac_high",
                 "kl_mean", "logprob_mismatch", "rollout_kl", "tis_weight_mean", "tis_clip_frac"]
        out = sums.reduce(names, totals=("loss", "pg_loss", "kl_loss"))  # collective: before any skip decision
        grad_sq = self._global_grad_sq()
        ok = math.isfinite(out.get("loss", 0.0)) and math.isfinite(grad_sq)
        if ok:  # Megatron's own check (found_inf) covers fp16 loss scaling only; bf16/fp32 NaNs get here
            ok, grad_norm, _ = self.optimizer.step()
        if not ok:
            # Skip the update: no optimizer step, no schedule step, gradients dropped; weights and Adam
            # moments stay those of the last good step. The loop counts these (trainer.max_consecutive_bad_steps).
            self.optimizer.zero_grad()
            for m in self.chunks:
                m.zero_grad_buffer()
            logger.warning("optimizer update skipped: non-finite loss %s or squared gradient norm %s",
                           out.get("loss"), grad_sq)
            return {**out, "grad_norm": math.sqrt(grad_sq) if grad_sq >= 0 else grad_sq,
                    "lr": float(self.optimizer.param_groups[0]["lr"]), "update_skipped": 1.0}
        self.scheduler.step(increment=1)
        out["grad_norm"] = float(grad_norm)
        out["lr"] = float(self.optimizer.param_groups[0]["lr"])
        out["update_skipped"] = 0.0
        return out

    def _global_grad_sq(self) -> float:
        """Sum of squared gradients over every rank (float64): NaN or Inf when any gradient is.

        Replicated parameters are counted once per replica, so this is a finiteness test, not the norm.
        """
        squares = []  # one float64 scalar per parameter, on the gradients' device (no per-tensor sync)
        for chunk in self.chunks:
            for p in chunk.parameters():
                g = getattr(p, "main_grad", None)
                g = p.grad if g is None else g
                if g is not None:
                    squares.append(torch.linalg.vector_norm(g.detach(), dtype=torch.float64) ** 2)
        device = squares[0].device if squares else torch.device("cuda" if torch.cuda.is_available() else "cpu")
        local = torch.stack(squares).sum() if squares else torch.zeros((), dtype=torch.float64, device=device)
        if dist.is_initialized():
            dist.all_reduce(local)
        return float(local)

    # ----------------------------------------------------------- checkpoints
    def save(self, root: str, step: int, loop_state: dict, recipe_yaml: str) -> str:
        """Save model, optimizer, schedule and ``loop_state`` at ``step`` (collective)."""
        from igrpo_megatron.training.checkpoint import save_training_checkpoint

        state = {"scheduler": self.scheduler.state_dict(), "loop": loop_state}
        path = save_training_checkpoint(root, step, self.chunks, self.optimizer, state, recipe_yaml,
                                        keep_last=self.recipe.checkpoint.keep_last)
        return str(path)

    def load(self, path: str) -> tuple[int, dict]:
        """Restore from a checkpoint saved at any layout; returns (step, loop_state)."""
        from igrpo_megatron.training.checkpoint import load_training_checkpoint

        state = load_training_checkpoint(path, self.chunks, self.optimizer)
        self.scheduler.load_state_dict(state["scheduler"])
        return int(state["step"]), state.get("loop", {})

    # ---------------------------------------------------------------- export
    def export_hf_weights(self) -> Iterator[tuple[str, torch.Tensor]]:
        """Full HF-named tensors on global rank 0 (every rank must iterate)."""
        from igrpo_megatron.models.weight_export import export_hf_weights

        return export_hf_weights(self.chunks, self.recipe.model)
