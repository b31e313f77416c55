"""cuflash: exact FlashAttention for CuPy, NumPy and any DLPack array, with no PyTorch dependency.

Public API: ``attention``, ``attention_backward``, ``attention_vjp``, ``gpu_available`` and the
float64 ground truth in ``cuflash.reference``.
"""

from . import reference
from ._api import attention, attention_backward, attention_vjp
from ._cuda.runtime import gpu_available
from ._errors import BackendUnavailableError, KernelCompileError, KernelError, KernelLaunchError

__version__ = "0.1.0"

__all__ = [
    "attention",
    "attention_backward",
    "attention_vjp",
    "gpu_available",
    "reference",
    "BackendUnavailableError",
    "KernelError",
    "KernelCompileError",
    "KernelLaunchError",
]
