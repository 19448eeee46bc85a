"""Which GPU-only parts are usable here, decided at run time (never by crashing on import)."""

from __future__ import annotations

import functools
import importlib.util

import torch


@functools.cache
def has_cuda() -> bool:
    return torch.cuda.is_available()


@functools.cache
def has_transformer_engine() -> bool:
    """Transformer Engine is importable and there is a GPU to run it on."""
    if not has_cuda() or importlib.util.find_spec("transformer_engine") is None:
        return False
    try:
        import transformer_engine.pytorch  # noqa: F401
    except Exception:  # a broken TE install must not take the CPU path down with it
        return False
    return True


def use_transformer_engine(transformer_impl: str) -> bool:
    """Resolve the recipe's ``model.transformer_impl`` ('auto' | 'transformer_engine' | 'local')."""
    if transformer_impl == "local":
        return False
    if transformer_impl == "transformer_engine":
        if not has_transformer_engine():
            raise RuntimeError(
                "model.transformer_impl=transformer_engine, but Transformer Engine is not importable "
                "or there is no GPU. Install the 'gpu' extra on a GPU machine, or set "
                "model.transformer_impl=auto (falls back to the local spec)."
            )
        return True
    return has_transformer_engine()
