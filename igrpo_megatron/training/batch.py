"""What the trainer consumes: token sequences with per-sequence advantages, and how they are cut.

A :class:`TrainBatch` holds whole sequences (prompt + completion). It is split over data-parallel
ranks (balanced by tokens) and each rank's share into micro-batches by a *token budget*. The loss
is normalised by counts over the whole batch, so neither split changes the result.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class Sequence:
    """One training sequence. ``rollout_logprobs`` align with the completion tokens."""

    prompt_ids: list[int]
    completion_ids: list[int]
    advantage: float
    rollout_logprobs: list[float] | None = None
    group: int = 0

    @property
    def length(self) -> int:
        return len(self.prompt_ids) + len(self.completion_ids)


@dataclass
class TrainBatch:
    """Sequences of one optimizer step, in a fixed order every rank agrees on."""

    sequences: list[Sequence]
    # Per-sequence values the trainer fills in (old-policy / reference log-probs per completion token).
    old_logprobs: list[torch.Tensor] | None = None
    ref_logprobs: list[torch.Tensor] | None = None

    def __len__(self) -> int:
        return len(self.sequences)

    @property
    def num_completion_tokens(self) -> int:
        return sum(len(s.completion_ids) for s in self.sequences)


@dataclass
class MicroBatch:
    """Padded tensors for one forward pass. Position t predicts token t + 1."""

    indices: list[int]              # positions of these sequences in the TrainBatch
    tokens: torch.Tensor            # [b, S] input ids (right-padded with 0)
    targets: torch.Tensor           # [b, S] next-token ids
    loss_mask: torch.Tensor         # [b, S] True where the target is a completion token
    advantages: torch.Tensor        # [b]
    rollout_logprobs: torch.Tensor | None = None   # [b, S], 0 off the mask
    old_logprobs: torch.Tensor | None = None       # [b, S]
    ref_logprobs: torch.Tensor | None = None       # [b, S]
    extras: dict = field(default_factory=dict)


def shard_for_rank(batch: TrainBatch, dp_rank: int, dp_size: int) -> list[int]:
    """Indices of the sequences this DP rank trains on: longest first, dealt to the lightest rank."""
    order = sorted(range(len(batch)), key=lambda i: (-batch.sequences[i].length, i))
    loads = [0] * dp_size
    mine: list[int] = []
    for i in order:
        rank = min(range(dp_size), key=lambda r: (loads[r], r))
        loads[rank] += batch.sequences[i].length
        if rank == dp_rank:
            mine.append(i)
    return sorted(mine)


def plan_micro_batches(lengths: list[int], token_budget: int, pad_to: int = 1) -> list[list[int]]:
    """Group sequence positions so that (count x padded max length) stays within ``token_budget``.

    A sequence longer than the budget gets a micro-batch of its own. Order is kept, so every rank
    of a pipeline builds the same plan from the same data.
    """
    plans: list[list[int]] = []
    current: list[int] = []
    longest = 0
    for pos, length in enumerate(lengths):
        padded = -(-length // pad_to) * pad_to
        if current and max(longest, padded) * (len(current) + 1) > token_budget:
            plans.append(current)
            current, longest = [], 0
        current.append(pos)
        longest = max(longest, padded)
    if current:
        plans.append(current)
    return plans


def _pad(rows: list[list[float]] | list[list[int]], width: int, dtype: torch.dtype) -> torch.Tensor:
    out = torch.zeros(len(rows), width, dtype=dtype)
    for i, row in enumerate(rows):
        out[i, : len(row)] = torch.tensor(row, dtype=dtype)
    return out


def _completion_aligned(values: list[float] | torch.Tensor, prompt_len: int, width: int) -> list[float]:
    """Place per-completion-token values at the positions that predict those tokens."""
    row = [0.0] * width
    start = prompt_len - 1  # position prompt_len - 1 predicts the first completion token
    for j, v in enumerate(list(values)):
        row[start + j] = float(v)
    return row


def build_micro_batch(batch: TrainBatch, indices: list[int], pad_to: int = 1) -> MicroBatch:
    """Right-padded tensors for the sequences at ``indices``."""
    seqs = [batch.sequences[i] for i in indices]
    full = [s.prompt_ids + s.completion_ids for s in seqs]
    width = max(len(f) - 1 for f in full)
    width = -(-width // pad_to) * pad_to
    tokens = _pad([f[:-1] for f in full], width, torch.long)
    targets = _pad([f[1:] for f in full], width, torch.long)
    mask = torch.zeros(len(seqs), width, dtype=torch.bool)
    for i, s in enumerate(seqs):
        mask[i, len(s.prompt_ids) - 1: len(s.prompt_ids) - 1 + len(s.completion_ids)] = True
    mb = MicroBatch(indices=list(indices), tokens=tokens, targets=targets, loss_mask=mask,
                    advantages=torch.tensor([s.advantage for s in seqs], dtype=torch.float32))
    if all(s.rollout_logprobs is not None for s in seqs):
        mb.rollout_logprobs = _pad([_completion_aligned(s.rollout_logprobs, len(s.prompt_ids), width)
                                    for s in seqs], width, torch.float32)
    for name in ("old_logprobs", "ref_logprobs"):
        stored = getattr(batch, name)
        if stored is not None:
            setattr(mb, name, _pad([_completion_aligned(stored[i], len(batch.sequences[i].prompt_ids), width)
                                    for i in indices], width, torch.float32))
    return mb


def completion_values(mb: MicroBatch, values: torch.Tensor) -> list[torch.Tensor]:
    """Inverse of the alignment: per-sequence 1-D tensors of ``values [b, S]`` on completion tokens."""
    return [values[i][mb.loss_mask[i]].detach().clone() for i in range(values.shape[0])]
