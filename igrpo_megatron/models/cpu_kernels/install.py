"""Make Megatron's Mamba mixer use the reference kernels when the real CUDA ones are not there.

``megatron/core/ssm/mamba_mixer.py`` does, at import time::

    from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined, ...   # else HAVE_MAMBA_SSM=False
    from mamba_ssm.ops.triton.layernorm_gated import RMSNorm as RMSNormGated      # subclassed at import
    from causal_conv1d import causal_conv1d_fn, causal_conv1d_update
    from causal_conv1d.causal_conv1d_varlen import causal_conv1d_varlen_states
    from mamba_ssm.ops.triton.selective_state_update import selective_state_update  # 0.16 only

so the stand-ins must sit in ``sys.modules`` under those names *before* that module is first
imported; patching afterwards cannot reach the names it already bound (nor the class it already
derived from a MagicMock). :func:`install_cpu_mamba_kernels` does exactly that, on request only.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import logging
import sys
import types

import torch

from igrpo_megatron.models.cpu_kernels import conv1d, gated_norm, ssd

logger = logging.getLogger(__name__)

_MARK = "__igrpo_cpu_reference__"
# Version reported by the stand-ins. Megatron compares it with the minimum versions it needs for
# sequence packing (mamba_ssm>=2.0, causal_conv1d>=1.4), which the stand-ins do not implement,
# so packed training is refused by Megatron's own check rather than failing deeper down.
_VERSION = "0.0.0+igrpo.cpu.reference"
# Modules that bind the kernels at import time; the mixer is the one the hybrid model needs.
_MIXER_MODULE = "megatron.core.ssm.mamba_mixer"

_EXPORTS: dict[str, dict[str, object]] = {
    "mamba_ssm": {},
    "mamba_ssm.ops": {},
    "mamba_ssm.ops.triton": {},
    "mamba_ssm.ops.triton.ssd_combined": {
        "mamba_chunk_scan_combined": ssd.mamba_chunk_scan_combined,
        "mamba_split_conv1d_scan_combined": ssd.mamba_split_conv1d_scan_combined,
    },
    "mamba_ssm.ops.triton.selective_state_update": {"selective_state_update": ssd.selective_state_update},
    "mamba_ssm.ops.triton.layernorm_gated": {"RMSNorm": gated_norm.RMSNormGated, "rmsnorm_fn": gated_norm.rmsnorm_fn},
    "causal_conv1d": {
        "causal_conv1d_fn": conv1d.causal_conv1d_fn,
        "causal_conv1d_update": conv1d.causal_conv1d_update,
    },
    "causal_conv1d.causal_conv1d_varlen": {"causal_conv1d_varlen_states": conv1d.causal_conv1d_varlen_states},
}


def cpu_mamba_kernels_installed() -> bool:
    """True when ``mamba_ssm`` in ``sys.modules`` is this package's stand-in."""
    return getattr(sys.modules.get("mamba_ssm"), _MARK, False)


def real_mamba_kernels_usable() -> bool:
    """The real ``mamba_ssm`` package is importable and there is a GPU for its kernels."""
    if cpu_mamba_kernels_installed() or not torch.cuda.is_available():
        return False
    return importlib.util.find_spec("mamba_ssm") is not None


def _make_module(name: str, attrs: dict[str, object]) -> types.ModuleType:
    module = types.ModuleType(name, "CPU reference stand-in registered by igrpo_megatron.models.cpu_kernels")
    module.__spec__ = importlib.machinery.ModuleSpec(name, loader=None, is_package=True)
    module.__path__ = []  # a package, so that the dotted children resolve
    module.__version__ = _VERSION
    setattr(module, _MARK, True)
    for key, value in attrs.items():
        setattr(module, key, value)
    return module


def _check_mixer_not_bound() -> bool:
    """Return True if the mixer already uses the stand-ins; raise if it bound nothing (or real kernels)."""
    mixer = sys.modules.get(_MIXER_MODULE)
    if mixer is None:
        return False
    if getattr(mixer, "mamba_chunk_scan_combined", None) is ssd.mamba_chunk_scan_combined:
        return True
    raise RuntimeError(
        f"{_MIXER_MODULE} was imported before install_cpu_mamba_kernels() (HAVE_MAMBA_SSM="
        f"{getattr(mixer, 'HAVE_MAMBA_SSM', None)}), so it cannot see the CPU kernels. Call "
        "igrpo_megatron.models.cpu_kernels.install_cpu_mamba_kernels() (or build the model with "
        "igrpo_megatron.models.build_model) before anything imports megatron.core.ssm.mamba_mixer, "
        "megatron.core.models.mamba or megatron.core.models.hybrid."
    )


def install_cpu_mamba_kernels() -> bool:
    """Register the pure-PyTorch kernels as ``mamba_ssm`` / ``causal_conv1d`` in ``sys.modules``.

    Returns True when the stand-ins are (now or already) in place, False when it did nothing
    because the real ``mamba_ssm`` is importable and CUDA is available. Raises RuntimeError when
    Megatron's mixer was imported earlier without them. Idempotent; never runs on import.
    """
    if cpu_mamba_kernels_installed():
        _check_mixer_not_bound()
        return True
    if real_mamba_kernels_usable():
        logger.debug("real mamba_ssm kernels and CUDA available: CPU reference kernels not installed")
        return False
    _check_mixer_not_bound()
    if torch.cuda.is_available():
        logger.warning("CUDA is available but mamba_ssm is not importable: the hybrid model will run the "
                       "slow pure-PyTorch reference kernels. Install the 'gpu' extra for the real ones.")
    shadowed = [name for name in _EXPORTS if name in sys.modules]
    if shadowed:
        logger.warning("replacing already-imported modules %s with the CPU reference kernels", shadowed)
    modules = {name: _make_module(name, attrs) for name, attrs in _EXPORTS.items()}
    for name, module in modules.items():
        parent, _, child = name.rpartition(".")
        if parent:
            setattr(modules[parent], child, module)
    sys.modules.update(modules)
    logger.info("registered pure-PyTorch Mamba2 kernels as mamba_ssm / causal_conv1d")
    return True


def uninstall_cpu_mamba_kernels() -> None:
    """Remove the stand-ins from ``sys.modules`` (modules that already bound them keep them)."""
    for name in _EXPORTS:
        if getattr(sys.modules.get(name), _MARK, False):
            del sys.modules[name]
