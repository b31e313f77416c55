"""Backends and the choice between them.

Each backend states what it supports; ``select`` picks one for ``backend="auto"`` or checks the
one asked for, and when none fits raises one error listing each backend and why it was refused.
Every output array of every backend is allocated by ``_empty`` here, in the order the backend
returns them, and must be fully written by the backend (tests fill these allocations with NaN to
catch unwritten elements). A caller that already holds memory for the outputs (a torch tensor it
allocated from PyTorch's allocator, a buffer XLA handed to a callback) passes it through
``outputs_into``: ``_empty`` then hands those arrays out instead of allocating, so the backend
writes the results where the caller wants them and nothing is copied on the way back.
"""

import threading

import numpy

from . import _numpy_backend
from ._cuda import runtime, variants
from ._errors import BackendUnavailableError
from ._interop import host_empty


_provided = threading.local()


def _empty(xp, shape, dtype):
    arrays = getattr(_provided, "arrays", None)
    if arrays:
        for i, array in enumerate(arrays):
            if isinstance(array, xp.ndarray) and array.shape == tuple(shape) and array.dtype == dtype:
                return arrays.pop(i)
    return host_empty(shape, dtype) if xp is numpy else xp.empty(shape, dtype=dtype)


class outputs_into:
    """Within it, the backend's ``_empty`` calls of this thread take ``arrays`` (NumPy or CuPy
    arrays over memory the caller owns), the first one of matching array type, shape and dtype
    each, before allocating anything.

    ``deliver(results)`` afterwards returns the caller's arrays holding the results: a result the
    backend computed elsewhere (on the other device, or where no given array matched) is copied
    into the caller's array.
    """

    __slots__ = ("arrays", "_saved")

    def __init__(self, arrays):
        self.arrays = tuple(arrays)

    def __enter__(self):
        self._saved = getattr(_provided, "arrays", None)
        _provided.arrays = list(self.arrays)
        return self

    def __exit__(self, *exc):
        _provided.arrays = self._saved

    def deliver(self, results):
        for result, target in zip(results, self.arrays):
            if result is not target:
                _copy_into(target, result)
        return self.arrays


def _copy_into(target, source):
    if isinstance(target, numpy.ndarray):
        target[...] = _to_host(source)
    elif isinstance(source, numpy.ndarray):
        target.set(source)
    else:
        target[...] = source


def _to_host(x):
    return x if isinstance(x, numpy.ndarray) else x.get()


class NumpyBackend:
    """The tiled NumPy algorithm on the CPU; GPU operands are copied to the host and back."""

    name = "numpy"

    def refusal(self, problem, backward=False):
        return None

    def forward(self, q, k, v, slopes, problem):
        q, k, v = map(_to_host, (q, k, v))
        slopes = None if slopes is None else _to_host(slopes)
        out = _empty(numpy, problem.out_shape, problem.dtype)
        lse = _empty(numpy, problem.lse_shape, problem.accum_dtype)
        _numpy_backend.forward(q, k, v, slopes, out, lse, problem)
        return out, lse

    def backward(self, dout, q, k, v, out, lse, slopes, problem, deterministic):
        dout, q, k, v, out, lse = map(_to_host, (dout, q, k, v, out, lse))
        slopes = None if slopes is None else _to_host(slopes)
        dq, dk, dv = (_empty(numpy, x.shape, problem.dtype) for x in (q, k, v))
        _numpy_backend.backward(dout, q, k, v, out, lse, slopes, dq, dk, dv, problem)
        return dq, dk, dv


class CudaBackend:
    """The CUDA kernels of ``cuda_src/`` through CuPy; host operands are copied to the GPU and back."""

    name = "cuda"
    dtypes = ("float16", "bfloat16", "float32", "float64")

    def refusal(self, problem, backward=False):
        """Why the kernels cannot run ``problem``'s forward (or ``backward``) here, or None: no usable
        GPU, a dtype they never take, or one the current GPU's family has no kernel for
        (``variants.unserved``: bfloat16, float32 and float64 on Turing, its backward past d = 224)."""
        ok, reason = runtime.gpu_available()
        if not ok:
            return reason
        if problem.dtype.name not in self.dtypes:
            return f"the CUDA kernels take {', '.join(self.dtypes)}, not {problem.dtype.name}"
        return variants.unserved(variants.family(*runtime.compute_capability()), problem.dtype.name,
                                 problem.head_dim, problem.head_dim_v, backward)

    @staticmethod
    def _device_arrays(*arrays):
        import cupy

        return [cupy.asarray(x) for x in arrays]

    def forward(self, q, k, v, slopes, problem):
        import cupy

        from ._cuda.forward import flash_forward

        q, k, v = self._device_arrays(q, k, v)
        slopes = None if slopes is None else cupy.asarray(slopes)
        with cupy.cuda.Device(q.device.id):
            out = _empty(cupy, problem.out_shape, problem.dtype)
            lse = _empty(cupy, problem.lse_shape, problem.accum_dtype)
            if out.size or lse.size:
                flash_forward(q, k, v, slopes, out, lse, problem)
        return out, lse

    def backward(self, dout, q, k, v, out, lse, slopes, problem, deterministic):
        import cupy

        from ._cuda.backward import flash_backward

        dout, q, k, v, out, lse = self._device_arrays(dout, q, k, v, out, lse)
        slopes = None if slopes is None else cupy.asarray(slopes)
        with cupy.cuda.Device(q.device.id):
            dq, dk, dv = (_empty(cupy, x.shape, problem.dtype) for x in (q, k, v))
            if dq.size or dk.size or dv.size:
                flash_backward(dout, q, k, v, out, lse, slopes, dq, dk, dv, problem, deterministic)
        return dq, dk, dv


class Float64Auto:
    """``backend="auto"`` for float64 where the CUDA kernels can run: operands already on a GPU (CuPy
    arrays, and so torch CUDA tensors and JAX GPU arrays) run there; NumPy arrays (and CPU tensors)
    stay on the NumPy backend, as float64 host data always has, rather than travel to the GPU and
    back. Decided per call from the operands, since a call's plan (``_api._plan``) is shared by host
    and device operands of one shape and dtype."""

    name = "auto-float64"

    @staticmethod
    def _backend(q):
        return BACKENDS["numpy"] if isinstance(q, numpy.ndarray) else BACKENDS["cuda"]

    def forward(self, q, k, v, slopes, problem):
        return self._backend(q).forward(q, k, v, slopes, problem)

    def backward(self, dout, q, k, v, out, lse, slopes, problem, deterministic):
        return self._backend(q).backward(dout, q, k, v, out, lse, slopes, problem, deterministic)


BACKENDS = {"numpy": NumpyBackend(), "cuda": CudaBackend()}
_FLOAT64_AUTO = Float64Auto()


def select(requested, problem, backward=False):
    """The backend to run ``problem``'s forward (or ``backward``): the one requested, or for "auto"
    CUDA when it can, else NumPy (float64: CUDA for GPU operands, NumPy for host ones;
    ``Float64Auto``)."""
    if requested != "auto":
        backend = BACKENDS[requested]
        reason = backend.refusal(problem, backward)
        if reason is not None:
            raise BackendUnavailableError(f"backend={requested!r} cannot run this call: {reason}")
        return backend
    refusals = {}
    for backend in (BACKENDS["cuda"], BACKENDS["numpy"]):
        reason = backend.refusal(problem, backward)
        if reason is None:
            if backend is BACKENDS["cuda"] and problem.dtype == numpy.float64:
                return _FLOAT64_AUTO
            return backend
        refusals[backend.name] = reason
    listed = "; ".join(f"{name}: {why}" for name, why in refusals.items())
    raise BackendUnavailableError(f"no backend can run this call ({listed})")
