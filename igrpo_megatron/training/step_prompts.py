"""The prompts of one training step: the loader's next batch, and more batches when dynamic sampling
(``algorithm.dynamic_sampling``) asks for them.

Rank 0 runs the rollouts, so only its loader is asked for extra batches while the step rolls out;
:meth:`StepPrompts.agree` then has every other rank draw as many, so every rank's loader (saved in
checkpoints) stands at the same place. Extra batches are drawn once and remembered: a rollout retried
after a sidecar failure samples the same prompts as the first try, and a resumed run those of the
uninterrupted one.
"""

from __future__ import annotations

import torch.distributed as dist

from igrpo_megatron.data.datasets import PromptLoader, PromptRecord


class StepPrompts:
    """``first``: the step's prompts; ``more(k)``: those of extra round k (1, 2, ...), drawn on first use."""

    def __init__(self, loader: PromptLoader):
        self.loader = loader
        self.first: list[PromptRecord] = loader.next_batch()
        self.extra: list[list[PromptRecord]] = []

    def more(self, k: int) -> list[PromptRecord]:
        """The prompts of extra round ``k`` (the loader's next batches, in order, each drawn once)."""
        if k < 1:
            raise ValueError(f"extra rounds count from 1, got {k}")
        while len(self.extra) < k:
            self.extra.append(self.loader.next_batch())
        return self.extra[k - 1]

    def agree(self) -> int:
        """Collective: every rank's loader draws the extra batches rank 0's drew; returns their number."""
        drawn = [len(self.extra)]
        if dist.is_initialized():
            dist.broadcast_object_list(drawn, src=0)
        if drawn[0]:
            self.more(drawn[0])
        return drawn[0]
