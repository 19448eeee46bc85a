"""Run Megatron-Core unchanged on a machine without CUDA.

Megatron-Core has no CPU code path: it allocates with ``device=torch.cuda.current_device()``,
calls ``tensor.cuda()`` and keeps a CUDA RNG tracker. All of that is harmless on CPU once
``cuda`` devices are read as ``cpu``. This module does exactly that, and nothing more:

* a :class:`torch.overrides.TorchFunctionMode` rewrites ``device="cuda"``, ``"cuda:N"``,
  ``torch.device("cuda", N)`` and bare integer devices to CPU in factory calls and
  ``Tensor.to``, makes ``Tensor.cuda()`` a no-op and reports ``torch.cuda.*Tensor`` from
  ``Tensor.type()`` (Megatron checks that string);
* the few ``torch.cuda`` functions Megatron calls (device, RNG, synchronize, streams) get CPU stand-ins;
* Megatron's CUDA RNG helpers are pointed at the CPU generator;
* Megatron's recomputation functions run their backward (which re-runs forward code) inside the
  mode too: torch does not carry torch-function modes into backward.

It is switched on explicitly (:func:`enable_cpu_mode` or the :func:`cpu_mode` context manager),
undone by :func:`disable_cpu_mode`, and does nothing at all when CUDA is available.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import Iterator
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

logger = logging.getLogger(__name__)

_CPU = torch.device("cpu")


def _as_cpu(device: Any) -> Any:
    """Map any CUDA-looking device spec to CPU; leave everything else alone."""
    if device is None or isinstance(device, bool):
        return device
    if isinstance(device, int):
        return _CPU
    if isinstance(device, torch.device):
        return _CPU if device.type == "cuda" else device
    if isinstance(device, str) and device.startswith("cuda"):
        return _CPU
    return device


class _CudaAsCpu(TorchFunctionMode):
    """Torch-function mode that reads every CUDA device as the CPU."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if "device" in kwargs:
            kwargs["device"] = _as_cpu(kwargs["device"])
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            name = func(*args)
            # Megatron asserts e.g. "torch.cuda.FloatTensor"; report the CUDA spelling.
            return name if name.startswith("torch.cuda.") else name.replace("torch.", "torch.cuda.", 1)
        if func is torch.Tensor.to:
            args = tuple(
                _as_cpu(a) if isinstance(a, (str, torch.device)) or (type(a) is int) else a for a in args
            )
        return func(*args, **kwargs)


def _cuda_stand_ins() -> dict[str, Any]:
    """CPU replacements for the ``torch.cuda`` functions Megatron-Core calls.

    Streams: megatron-core 0.19 asks for the current stream (and whether it is being captured)
    in every DDP grad sync, which raises without a GPU; the CPU stream's ``wait_event`` and
    ``wait_stream`` are no-ops, which is exact on CPU where everything runs in order.
    """
    return {
        "current_device": lambda: "cpu",
        "device_count": lambda: 0,
        "set_device": lambda device: None,
        "synchronize": lambda device=None: None,
        "manual_seed": lambda seed: torch.manual_seed(seed),
        "manual_seed_all": lambda seed: None,
        "get_rng_state": lambda device=None: torch.get_rng_state(),
        "set_rng_state": lambda state, device=None: torch.set_rng_state(state),
        "empty_cache": lambda: None,
        "memory_allocated": lambda device=None: 0,
        "max_memory_allocated": lambda device=None: 0,
        "memory_reserved": lambda device=None: 0,
        "current_stream": lambda device=None: torch.cpu.current_stream(),
        "default_stream": lambda device=None: torch.cpu.current_stream(),
        "is_current_stream_capturing": lambda: False,
    }


def _megatron_rng_stand_ins() -> dict[str, Any]:
    return {
        "_get_cuda_rng_state": lambda device="cuda", clone=False, graph_safe=False: torch.get_rng_state(),
        "_set_cuda_rng_state": lambda new_state, device=-1, graph_safe=False: torch.set_rng_state(new_state),
    }


# Megatron's activation-recomputation autograd functions: their backward re-runs forward code
# (e.g. a causal mask made with device="cuda"), and torch does not carry torch-function modes
# into backward, so they enter the mode themselves.
_RECOMPUTING_FUNCTIONS = ("CheckpointFunction", "CheckpointWithoutOutputFunction")


def _backward_in_cpu_mode(backward: Any) -> staticmethod:
    @functools.wraps(backward)
    def run(ctx: Any, *grads: Any) -> Any:
        with _CudaAsCpu():
            return backward(ctx, *grads)

    return staticmethod(run)


class _CpuModeState:
    """What was replaced, so that :func:`disable_cpu_mode` can put it back."""

    def __init__(self) -> None:
        self.mode: _CudaAsCpu | None = None
        self.saved: list[tuple[Any, str, Any]] = []

    @property
    def active(self) -> bool:
        return self.mode is not None


_STATE = _CpuModeState()


def _patch(owner: Any, name: str, value: Any) -> None:
    _STATE.saved.append((owner, name, getattr(owner, name, None)))
    setattr(owner, name, value)


def cpu_mode_active() -> bool:
    """True while the CUDA-as-CPU mode is switched on."""
    return _STATE.active


def enable_cpu_mode() -> bool:
    """Switch the CUDA-as-CPU mode on. Returns False (and does nothing) when CUDA is available."""
    if torch.cuda.is_available():
        logger.debug("CUDA is available: CPU mode stays off")
        return False
    if _STATE.active:
        return True
    for name, fn in _cuda_stand_ins().items():
        _patch(torch.cuda, name, fn)
    _patch(torch.cuda.random, "get_rng_state", torch.cuda.get_rng_state)
    _patch(torch.cuda.random, "set_rng_state", torch.cuda.set_rng_state)
    try:
        import megatron.core.tensor_parallel.random as mrandom
    except ImportError:  # Megatron is optional for the pure-PyTorch parts
        mrandom = None
    if mrandom is not None:
        for name, fn in _megatron_rng_stand_ins().items():
            _patch(mrandom, name, fn)
        for name in _RECOMPUTING_FUNCTIONS:
            if hasattr(mrandom, name):
                cls = getattr(mrandom, name)
                _STATE.saved.append((cls, "backward", cls.__dict__["backward"]))  # the staticmethod itself
                cls.backward = _backward_in_cpu_mode(cls.backward)
    _STATE.mode = _CudaAsCpu()
    _STATE.mode.__enter__()
    logger.info("CPU mode on: Megatron-Core will run on the CPU")
    return True


def disable_cpu_mode() -> None:
    """Undo :func:`enable_cpu_mode` (no-op when it is off)."""
    if not _STATE.active:
        return
    assert _STATE.mode is not None
    _STATE.mode.__exit__(None, None, None)
    _STATE.mode = None
    for owner, name, original in reversed(_STATE.saved):
        setattr(owner, name, original)
    _STATE.saved.clear()


@contextlib.contextmanager
def cpu_mode() -> Iterator[bool]:
    """Context manager form: ``with cpu_mode(): ...``. Yields whether the mode is on."""
    was_active = _STATE.active
    on = enable_cpu_mode()
    try:
        yield on
    finally:
        if on and not was_active:
            disable_cpu_mode()
