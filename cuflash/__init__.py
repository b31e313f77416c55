"""cuflash: exact FlashAttention for CuPy, NumPy and any DLPack array, with no PyTorch dependency.

Public API: ``attention``, ``attention_backward``, ``attention_vjp`` (dense and padded batches),
``attention_varlen``, ``attention_varlen_backward``, ``attention_varlen_vjp`` (packed sequences),
``attention_with_kvcache`` (decoding against a dense or paged cache), ``gpu_available``, the
exceptions ``BackendUnavailableError``, ``KernelCompileError`` and ``KernelLaunchError`` (both
``KernelError``s), and the float64 ground truth in ``cuflash.reference``.

Modules imported on their own (``import cuflash`` loads none of them, nor PyTorch, JAX or Hypothesis):

- ``cuflash.torch``: ``attention`` with PyTorch autograd, as torch operators (``torch.compile``,
  CUDA graphs).
- ``cuflash.jax``: ``attention`` under ``jax.jit``, ``jax.grad`` and ``jax.vmap``; ``ring_attention``
  inside ``jax.shard_map``.
- ``cuflash.distributed``: ring attention over a sequence sharded across ranks (context
  parallelism), forward and backward.
- ``cuflash.testing``: Hypothesis strategies that draw attention problems and assertions that hold
  a result to the float64 reference by the same-dtype accuracy rule, for your own test suite.
"""

from . import reference
from ._api import attention, attention_backward, attention_vjp
from ._ragged_api import attention_varlen, attention_varlen_backward, attention_varlen_vjp, attention_with_kvcache
from ._cuda.runtime import gpu_available
from ._errors import BackendUnavailableError, KernelCompileError, KernelError, KernelLaunchError

__version__ = "0.1.0"

__all__ = [
    "attention",
    "attention_backward",
    "attention_vjp",
    "attention_varlen",
    "attention_varlen_backward",
    "attention_varlen_vjp",
    "attention_with_kvcache",
    "gpu_available",
    "reference",
    "BackendUnavailableError",
    "KernelError",
    "KernelCompileError",
    "KernelLaunchError",
]
