"""Backends and the choice between them.

Each backend states what it supports; ``select`` picks one for ``backend="auto"`` or checks the
one asked for, and when none fits raises one error listing each backend and why it was refused.
Every output array of every backend is allocated by ``_empty`` here and must be fully written
by the backend (tests fill these allocations with NaN to catch unwritten elements).
"""

import numpy

from . import _numpy_backend
from ._cuda import runtime
from ._errors import BackendUnavailableError
from ._interop import host_empty


def _empty(xp, shape, dtype):
    return host_empty(shape, dtype) if xp is numpy else xp.empty(shape, dtype=dtype)


def _to_host(x):
    return x if isinstance(x, numpy.ndarray) else x.get()


class NumpyBackend:
    """The tiled NumPy algorithm on the CPU; GPU operands are copied to the host and back."""

    name = "numpy"

    def refusal(self, problem):
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
    dtypes = ("float16", "bfloat16", "float32")

    def refusal(self, problem):
        ok, reason = runtime.gpu_available()
        if not ok:
            return reason
        if problem.dtype.name not in self.dtypes:
            return f"the CUDA kernels take {', '.join(self.dtypes)}, not {problem.dtype.name}"
        return None

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
            lse = _empty(cupy, problem.lse_shape, numpy.float32)
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


BACKENDS = {"numpy": NumpyBackend(), "cuda": CudaBackend()}


def select(requested, problem, origin):
    """The backend to run: the one requested, or for "auto" CUDA when it can, else NumPy."""
    if requested != "auto":
        backend = BACKENDS[requested]
        reason = backend.refusal(problem)
        if reason is not None:
            raise BackendUnavailableError(f"backend={requested!r} cannot run this call: {reason}")
        return backend
    refusals = {}
    for backend in (BACKENDS["cuda"], BACKENDS["numpy"]):
        reason = backend.refusal(problem)
        if reason is None:
            return backend
        refusals[backend.name] = reason
    listed = "; ".join(f"{name}: {why}" for name, why in refusals.items())
    raise BackendUnavailableError(f"no backend can run this call ({listed})")
