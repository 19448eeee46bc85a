"""Pure-PyTorch reference versions of the Mamba2 kernels Megatron's hybrid model calls.

The real kernels (``mamba_ssm`` Triton, ``causal_conv1d`` CUDA) exist only on GPU machines. These
implement the same call signatures from the maths, differentiable through plain autograd, so the
Nemotron-H-style hybrid trains on CPU (and on a GPU without those packages, slowly):

* :func:`mamba_chunk_scan_combined`, :func:`mamba_split_conv1d_scan_combined` - chunked SSD scan;
* :func:`selective_state_update` - one decoding step of the recurrence;
* :func:`causal_conv1d_fn`, :func:`causal_conv1d_update`, :func:`causal_conv1d_varlen_states`;
* :class:`RMSNormGated` / :func:`rmsnorm_fn` - grouped RMSNorm with a SiLU gate.

Importing this package changes nothing; :func:`install_cpu_mamba_kernels` registers them under
the module names Megatron imports (see :mod:`.install`). Packed sequences (``seq_idx``,
``cu_seqlens``) are not supported.
"""

from igrpo_megatron.models.cpu_kernels.conv1d import (
    causal_conv1d_fn,
    causal_conv1d_update,
    causal_conv1d_varlen_states,
)
from igrpo_megatron.models.cpu_kernels.gated_norm import RMSNormGated, rmsnorm_fn
from igrpo_megatron.models.cpu_kernels.install import (
    cpu_mamba_kernels_installed,
    install_cpu_mamba_kernels,
    real_mamba_kernels_usable,
    uninstall_cpu_mamba_kernels,
)
from igrpo_megatron.models.cpu_kernels.ssd import (
    mamba_chunk_scan_combined,
    mamba_split_conv1d_scan_combined,
    selective_state_update,
    ssd_scan,
)

__all__ = [
    "RMSNormGated",
    "causal_conv1d_fn",
    "causal_conv1d_update",
    "causal_conv1d_varlen_states",
    "cpu_mamba_kernels_installed",
    "install_cpu_mamba_kernels",
    "mamba_chunk_scan_combined",
    "mamba_split_conv1d_scan_combined",
    "real_mamba_kernels_usable",
    "rmsnorm_fn",
    "selective_state_update",
    "ssd_scan",
    "uninstall_cpu_mamba_kernels",
]
