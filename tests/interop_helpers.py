"""Shared machinery of the interop tests: what a backend was handed and what it gave back."""

import contextlib
import sys
from dataclasses import dataclass
from unittest import mock

import numpy

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

    with mock.patch.object(cls, "forward", recorded("forward")), mock.patch.object(cls, "backward", recorded("backward")):
        yield calls
