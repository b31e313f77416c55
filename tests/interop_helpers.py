"""Shared machinery of the interop tests: what a backend was handed and what it gave back."""

import contextlib
import sys
from dataclasses import dataclass
from unittest import mock

import numpy
import pytest

import cuflash
from cuflash import _dispatch


def pointer(array):
    """Address of the first element of a NumPy or CuPy array."""
    return array.ctypes.data if isinstance(array, numpy.ndarray) else array.data.ptr


@dataclass
class Call:
    """One backend call: its array arguments, its results, and CuPy's current stream during it."""

    arrays: tuple
    results: tuple
    stream: object


@contextlib.contextmanager
def recording(backend):
    """Record every forward and backward call of one backend ("numpy" or "cuda") as a ``Call``.

    Yields ``{"forward": [...], "backward": [...]}``, filled as the calls happen.
    """
    calls = {"forward": [], "backward": []}
    cls = type(_dispatch.BACKENDS[backend])

    def recorded(method):
        original = getattr(cls, method)

        def run(self, *args):
            cupy = sys.modules.get("cupy")
            stream = cupy.cuda.get_current_stream().ptr if backend == "cuda" else None
            results = original(self, *args)
            array_types = (numpy.ndarray,) if cupy is None else (numpy.ndarray, cupy.ndarray)
            arrays = tuple(a for a in args if isinstance(a, array_types))
            calls[method].append(Call(arrays, tuple(results), stream))
            return results

        return run

    with mock.patch.object(cls, "forward", recorded("forward")), \
            mock.patch.object(cls, "backward", recorded("backward")):
        yield calls


def torch_host(tensor):
    """A tensor's values as a NumPy array of the same dtype (bfloat16 through ml_dtypes), exactly."""
    from .helpers import BFLOAT16

    tensor = tensor.detach().cpu()
    if str(tensor.dtype) == "torch.bfloat16":
        return tensor.float().numpy().astype(BFLOAT16)
    return tensor.numpy()


def math_attention(q, k, v, *, causal, causal_alignment, scale=None):
    """PyTorch's float64 math attention on BSHD tensors, differentiable: the yardstick of the adapters.

    PyTorch's ``is_causal`` is cuflash's top-left alignment; bottom-right gets an explicit mask.
    """
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel

    Sq, Sk = q.shape[1], k.shape[1]
    group = q.shape[2] // k.shape[2]
    Q, K, V = (x.double().transpose(1, 2) for x in (q, k, v))
    K, V = K.repeat_interleave(group, dim=1), V.repeat_interleave(group, dim=1)
    mask, is_causal = None, False
    if causal and causal_alignment == "top_left":
        is_causal = True
    elif causal:
        mask = torch.arange(Sk, device=q.device)[None, :] <= torch.arange(Sq, device=q.device)[:, None] + (Sk - Sq)
    with sdpa_kernel(SDPBackend.MATH):
        out = torch.nn.functional.scaled_dot_product_attention(Q, K, V, attn_mask=mask, is_causal=is_causal,
                                                               scale=scale)
    return out.transpose(1, 2)


def _new_options_run():
    """Whether the NumPy backend takes window/softcap/alibi_slopes yet (its update lands separately)."""
    rng = numpy.random.default_rng(0)
    q, k, v = (rng.standard_normal((1, 6, 2, 4)).astype(numpy.float32) for _ in range(3))
    try:
        cuflash.attention(q, k, v, window=(4, 0), softcap=5.0, alibi_slopes=numpy.ones(2, numpy.float32),
                          backend="numpy")
    except Exception:  # noqa: BLE001  (any failure means: not there yet)
        return False
    return True


needs_new_options = pytest.mark.skipif(not _new_options_run(),
                                       reason="the NumPy backend does not run window/softcap/alibi_slopes yet")
