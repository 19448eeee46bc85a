"""RMSNorm for Megatron's local (non-Transformer-Engine) layer specs, sequence parallelism included.

Megatron's own local norm (``WrappedTorchNorm``) refuses ``sequence_parallel``. With sequence
parallelism the tensors around the TP-split blocks hold 1/TP of the sequence on each rank, so each
TP rank sees different tokens and the norm weight's gradient on one rank covers only its share.
Megatron sums such gradients over the TP group in ``finalize_model_grads``
(``_allreduce_non_tensor_model_parallel_grads``, megatron-core 0.16 and 0.19 alike), for every
parameter that carries the attribute ``sequence_parallel = True``; Transformer Engine's norms set
it, and :class:`LocalRMSNorm` sets it the same way. The arithmetic is ``torch.nn.RMSNorm``'s, and
the parameter is ``weight`` as before, so checkpoints and the HF mapping are unchanged.

The weight is made in ``config.params_dtype``, as every other parameter (Megatron's local norm keeps
float32 weights in a bf16 model, and its optimizer then pairs parameters with the wrong main
parameters when a checkpoint is saved), so the local spec of a bf16 model uses this norm too.
"""

from __future__ import annotations

from typing import Any

import torch


class LocalRMSNorm(torch.nn.RMSNorm):
    """``torch.nn.RMSNorm`` built as Megatron builds norms; marks its weight for sequence parallelism.

    Accepts every way megatron-core calls a norm (positional or keyword, with or without ``eps``,
    extra arguments ignored). ``eps`` defaults to ``config.layernorm_epsilon``.
    """

    def __init__(self, config: Any, hidden_size: int, eps: float | None = None, **_: Any):
        super().__init__(hidden_size, eps=config.layernorm_epsilon if eps is None else eps, dtype=config.params_dtype)
        # Read by megatron.core.distributed.finalize_model_grads: all-reduce this grad over TP.
        self.weight.sequence_parallel = bool(config.sequence_parallel)
