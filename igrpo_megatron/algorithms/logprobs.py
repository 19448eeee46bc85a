"""Per-token log-probs and entropy from vocab-sharded logits, with exact hand-written gradients.

Under tensor parallelism each rank holds logits ``[..., V/TP]`` for its slice of the vocabulary
(rank r owns ids [r * V/TP, (r+1) * V/TP), Megatron's layout). Gathering the full ``[..., V]``
logits would cost TP times the memory, so the softmax statistics are reduced instead: one
all-reduce (MAX) of the row maxima and one (SUM) of the row sums. The backward needs no
communication: it recomputes the local softmax chunk by chunk from the saved logits and the
saved log-normaliser, so activation memory stays at the logits themselves plus one chunk.

With z = logits / tau, log Z = logsumexp(z) over the whole vocabulary and p = softmax(z):

    log p(y)  = z_y - log Z               d/dz_j = 1[j = y] - p_j
    H         = log Z - sum_j p_j z_j     d/dz_j = -p_j (z_j - sum_k p_k z_k)

and d/dlogits = d/dz / tau. The upstream gradient must be the same on every rank of the group
(it is when the loss is computed identically on each TP rank, as in Megatron).
"""

from __future__ import annotations

import logging

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)

DEFAULT_CHUNK_SIZE = 1024  # rows per chunk: 1024 x 19k vocab shard x 4 B = 78 MB of temporaries


def _group_info(group: dist.ProcessGroup | None) -> tuple[int, int]:
    """(rank in group, group size); (0, 1) when unsharded."""
    if group is None or not dist.is_initialized():
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


class _VocabParallelStats(torch.autograd.Function):
    """Forward: (log p(target) [N], entropy [N]) from a local shard [N, V_local]; backward: exact grads."""

    @staticmethod
    def forward(ctx, logits, targets, group, temperature, vocab_start, n_valid, chunk_size, want_logp,
                want_entropy):
        # logits [N, V_local] (only the first n_valid columns are real vocabulary); targets [N] or None
        ctx.set_materialize_grads(False)  # an output nobody used gets grad None, not zeros to multiply
        dtype = _compute_dtype(logits)
        n_rows = logits.shape[0]
        valid = logits[:, :n_valid]  # view, no copy
        if n_valid > 0 and n_rows > 0:
            row_max = valid.amax(dim=1).to(dtype) / temperature  # [N]
        else:
            row_max = torch.full((n_rows,), float("-inf"), dtype=dtype, device=logits.device)
        if group is not None:
            dist.all_reduce(row_max, op=dist.ReduceOp.MAX, group=group)
        row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))

        # stats rows: 0 = sum exp(z - m), 1 = sum exp(z - m) * (z - m), 2 = z_target - m (on its owner)
        stats = torch.zeros(3, n_rows, dtype=dtype, device=logits.device)
        local_t = None if targets is None else targets - vocab_start  # [N]
        for lo in range(0, n_rows if n_valid > 0 else 0, chunk_size):
            hi = min(lo + chunk_size, n_rows)
            zc = valid[lo:hi].to(dtype) / temperature - row_max[lo:hi, None]  # [C, V_local] = z - m
            ec = torch.exp(zc)
            stats[0, lo:hi] = ec.sum(dim=1)
            if want_entropy:
                stats[1, lo:hi] = torch.where(ec > 0, ec * zc, torch.zeros_like(ec)).sum(dim=1)
            if want_logp:
                idx, owned = _owned(local_t[lo:hi], n_valid)
                picked = zc.gather(1, idx[:, None]).squeeze(1)  # [C]
                stats[2, lo:hi] = torch.where(owned, picked, torch.zeros_like(picked))
        if group is not None:
            dist.all_reduce(stats, op=dist.ReduceOp.SUM, group=group)
        log_sum = torch.log(stats[0].clamp_min(torch.finfo(dtype).tiny))  # [N] = log Z - m
        mean_zm = stats[1] / stats[0].clamp_min(torch.finfo(dtype).tiny)  # [N] = E_p[z] - m
        ctx.save_for_backward(logits, local_t, row_max, log_sum, mean_zm)
        ctx.cfg = (temperature, n_valid, chunk_size, want_logp, want_entropy)
        return stats[2] - log_sum, log_sum - mean_zm

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy):
        logits, local_t, row_max, log_sum, mean_zm = ctx.saved_tensors
        temperature, n_valid, chunk_size, want_logp, want_entropy = ctx.cfg
        use_logp = want_logp and grad_logp is not None
        use_ent = want_entropy and grad_entropy is not None
        grad = torch.zeros_like(logits)  # padded vocabulary columns keep zero gradient
        for lo in range(0, logits.shape[0] if n_valid > 0 else 0, chunk_size):
            hi = min(lo + chunk_size, logits.shape[0])
            zc = logits[lo:hi, :n_valid].to(row_max.dtype) / temperature - row_max[lo:hi, None]  # z - m
            p = torch.exp(zc - log_sum[lo:hi, None])  # [C, V_local]
            g = torch.zeros_like(p)
            if use_logp:
                g_lp = grad_logp[lo:hi].to(p.dtype)  # [C]
                g -= g_lp[:, None] * p
                idx, owned = _owned(local_t[lo:hi], n_valid)
                g.scatter_add_(1, idx[:, None], torch.where(owned, g_lp, torch.zeros_like(g_lp))[:, None])
            if use_ent:
                centred = torch.where(p > 0, p * (zc - mean_zm[lo:hi, None]), torch.zeros_like(p))
                g -= grad_entropy[lo:hi].to(p.dtype)[:, None] * centred
            grad[lo:hi, :n_valid] = (g / temperature).to(logits.dtype)
        return grad, None, None, None, None, None, None, None, None


def _compute_dtype(logits: torch.Tensor) -> torch.dtype:
    """float32 for half/bfloat16/float32 logits; float64 stays float64 (gradcheck)."""
    return torch.float64 if logits.dtype == torch.float64 else torch.float32


def _owned(local_t: torch.Tensor, n_valid: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(safe gather index [C], whether this shard owns the target [C])."""
    owned = (local_t >= 0) & (local_t < n_valid)
    return local_t.clamp(0, n_valid - 1), owned


def _run(logits, targets, group, temperature, vocab_size, chunk_size, want_logp, want_entropy):
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0 (got {temperature}); it divides the logits.")
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1 or None (got {chunk_size}).")
    if targets is not None and targets.shape != logits.shape[:-1]:
        raise ValueError(f"targets {tuple(targets.shape)} must match logits {tuple(logits.shape)} without "
                         f"the vocabulary dim.")
    rank, world = _group_info(group)
    v_local = logits.shape[-1]
    vocab_start = rank * v_local
    total = v_local * world if vocab_size is None else vocab_size
    if not 0 < total <= v_local * world:
        raise ValueError(f"vocab_size = {vocab_size} must be in [1, {v_local * world}] (the padded vocabulary).")
    n_valid = max(0, min(v_local, total - vocab_start))
    lead = logits.shape[:-1]
    flat = logits.reshape(-1, v_local)
    flat_t = None if targets is None else targets.reshape(-1).long()
    logp, ent = _VocabParallelStats.apply(flat, flat_t, group if world > 1 else None, float(temperature),
                                          vocab_start, n_valid, chunk_size or DEFAULT_CHUNK_SIZE,
                                          want_logp, want_entropy)
    return logp.reshape(lead), ent.reshape(lead)


def vocab_parallel_logprobs(
    logits: torch.Tensor,
    targets: torch.Tensor,
    *,
    group: dist.ProcessGroup | None = None,
    temperature: float = 1.0,
    vocab_size: int | None = None,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """log softmax(logits / temperature)[target] per position, float32 ``[...]``.

    Args:
        logits: ``[..., V/TP]`` this rank's vocabulary shard (any float dtype; math in fp32).
        targets: ``[...]`` global token ids (every rank passes the same ids). They must be valid
            ids; mask padding positions afterwards.
        group: the tensor-parallel group; None (or a group of one) means ``logits`` is the full vocab.
        temperature: the sampling temperature, so that log-probs match the rollout engine's.
        vocab_size: the real vocabulary size when the shards are padded; ids >= it get no mass.
            None: every column is real.
        chunk_size: rows per chunk bounding temporary memory; None: DEFAULT_CHUNK_SIZE.
    """
    return _run(logits, targets, group, temperature, vocab_size, chunk_size, True, False)[0]


def vocab_parallel_entropy(
    logits: torch.Tensor,
    *,
    group: dist.ProcessGroup | None = None,
    temperature: float = 1.0,
    vocab_size: int | None = None,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """Entropy (nats) of softmax(logits / temperature) per position, float32 ``[...]``.

    Arguments as in :func:`vocab_parallel_logprobs`.
    """
    return _run(logits, None, group, temperature, vocab_size, chunk_size, False, True)[1]


def vocab_parallel_logprobs_and_entropy(
    logits: torch.Tensor,
    targets: torch.Tensor,
    *,
    group: dist.ProcessGroup | None = None,
    temperature: float = 1.0,
    vocab_size: int | None = None,
    chunk_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Both at the cost of one pass and the same two all-reduces; arguments as above."""
    return _run(logits, targets, group, temperature, vocab_size, chunk_size, True, True)
