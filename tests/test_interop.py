"""Arrays in and out without any framework: NumPy, generic DLPack producers, and the errors.

PyTorch and JAX have their own modules (test_interop_torch.py, test_interop_jax.py), skipped when
those packages are missing; everything here runs everywhere.
"""

import importlib
import subprocess
import sys
import textwrap

import numpy
import pytest

import cuflash
from cuflash import _interop

from .helpers import make_inputs
from .interop_helpers import pointer, recording

SHAPES = dict(B=2, Sq=5, Sk=7, Hq=4, Hkv=2, D=8, Dv=6)


def _inputs(seed, dtype=numpy.float32):
    return make_inputs(numpy.random.default_rng(seed), *SHAPES.values(), dtype)


class Producer:
    """A framework cuflash has never heard of: a DLPack producer over a NumPy array's memory."""

    def __init__(self, array):
        self.array = array

    def __dlpack__(self, **kwargs):
        return self.array.__dlpack__(**kwargs)

    def __dlpack_device__(self):
        return self.array.__dlpack_device__()


class _Namespace:
    """The array-API namespace of ``NamespacedProducer``: its ``from_dlpack`` builds producers."""

    @staticmethod
    def from_dlpack(x):
        return NamespacedProducer(numpy.from_dlpack(x))


class NamespacedProducer(Producer):
    def __array_namespace__(self, api_version=None):
        return _Namespace


class Elsewhere:
    """Claims DLPack but lives on a device cuflash cannot use."""

    def __init__(self, device_type):
        self.device_type = device_type

    def __dlpack__(self, **kwargs):
        raise AssertionError("cuflash must refuse the operand before asking for its data")

    def __dlpack_device__(self):
        return (self.device_type, 0)


def test_import_cuflash_imports_no_framework():
    # A fresh interpreter: this test process has imported frameworks already.
    code = textwrap.dedent("""
        import sys
        import numpy
        import cuflash
        rng = numpy.random.default_rng(0)
        q, k, v = (rng.standard_normal((1, 3, 2, 4)).astype(numpy.float32) for _ in range(3))
        cuflash.attention(q, k, v, backend="numpy")
        frameworks = {"torch", "jax", "jaxlib", "cupy", "cupy_backends", "tensorflow"}
        print(sorted({name.split(".")[0] for name in sys.modules} & frameworks))
    """)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]", result.stdout + result.stderr


@pytest.mark.parametrize("dtype", [numpy.float16, numpy.float32, numpy.float64])
def test_numpy_in_numpy_out(dtype):
    q, k, v, dout = _inputs(1, dtype)
    with recording("numpy") as calls:
        out, lse = cuflash.attention(q, k, v, causal=True, return_lse=True, backend="numpy")
        dq, dk, dv = cuflash.attention_backward(dout, q, k, v, out, lse, causal=True, backend="numpy")
    for x in (out, lse, dq, dk, dv):
        assert type(x) is numpy.ndarray
    assert out.dtype == dtype and dq.dtype == dtype
    # The backend read the caller's arrays and its outputs are what the caller got.
    (forward,) = calls["forward"]
    assert [pointer(a) for a in forward.arrays] == [pointer(a) for a in (q, k, v)]
    assert [pointer(a) for a in forward.results] == [pointer(out), pointer(lse)]
    ref_out, ref_lse = cuflash.reference.attention(q, k, v, causal=True)
    tol = 1e-12 if dtype == numpy.float64 else 5e-3 if dtype == numpy.float16 else 1e-5
    numpy.testing.assert_allclose(out.astype(numpy.float64), ref_out, atol=tol * 4, rtol=tol)
    numpy.testing.assert_allclose(lse, ref_lse, rtol=1e-5)


@pytest.mark.parametrize("shape", [(2, 5, 4, 6), (0, 3, 2, 8), (1, 1, 1, 1), (3, 7, 5, 11)])
@pytest.mark.parametrize("dtype", ["float16", "float32", "float64", "bfloat16"])
def test_host_outputs_are_64_byte_aligned(shape, dtype):
    if dtype == "bfloat16":
        dtype = pytest.importorskip("ml_dtypes").bfloat16
    for _ in range(5):
        x = _interop.host_empty(shape, dtype)
        assert x.shape == shape and x.dtype == numpy.dtype(dtype) and x.flags.c_contiguous and x.flags.writeable
        # An empty array has no data to adopt, and NumPy may move its pointer anywhere.
        assert x.size == 0 or x.ctypes.data % 64 == 0


def test_unknown_producer_is_read_in_place_and_gets_numpy_back():
    q, k, v, _ = _inputs(2)
    with recording("numpy") as calls:
        out = cuflash.attention(Producer(q), Producer(k), Producer(v), backend="numpy")
    (forward,) = calls["forward"]
    assert [pointer(a) for a in forward.arrays] == [pointer(a) for a in (q, k, v)]
    assert type(out) is numpy.ndarray
    numpy.testing.assert_array_equal(out, cuflash.attention(q, k, v, backend="numpy"))


def test_producer_with_array_namespace_gets_its_own_type_back():
    q, k, v, _ = _inputs(3)
    with recording("numpy") as calls:
        out = cuflash.attention(NamespacedProducer(q), NamespacedProducer(k), NamespacedProducer(v), backend="numpy")
    assert type(out) is NamespacedProducer
    # Zero-copy on the way back: the producer wraps the backend's own output.
    assert pointer(out.array) == pointer(calls["forward"][0].results[0])
    numpy.testing.assert_array_equal(out.array, cuflash.attention(q, k, v, backend="numpy"))


def test_mixed_frameworks_are_refused_naming_each_operand():
    q, k, v, _ = _inputs(4)
    with pytest.raises(TypeError) as info:
        cuflash.attention(q, Producer(k), v, backend="numpy")
    message = str(info.value)
    assert "one framework on one device" in message
    assert "q: numpy on cpu" in message and "k: tests on cpu" in message


@pytest.mark.parametrize("device_type, name", [(8, "Metal"), (10, "ROCm"), (99, "DLPack device type 99")])
def test_unsupported_device_is_refused(device_type, name):
    q, k, v, _ = _inputs(5)
    with pytest.raises(TypeError, match=rf"v lives in {name} memory") as info:
        cuflash.attention(q, k, Elsewhere(device_type), backend="numpy")
    assert "CPU and CUDA memory only" in str(info.value)


def test_every_bad_operand_is_listed_in_one_error():
    q, _, _, _ = _inputs(6)
    with pytest.raises(TypeError) as info:
        cuflash.attention(q, [[1.0]], Elsewhere(8), backend="numpy")
    message = str(info.value)
    assert "k must be an array" in message and "builtins.list" in message
    assert "v lives in Metal memory" in message


def test_failing_dlpack_device_is_reported_for_its_operand():
    class Broken(Producer):
        def __dlpack_device__(self):
            raise BufferError("no device today")

    q, k, v, _ = _inputs(7)
    with pytest.raises(TypeError, match=r"k \(.*Broken\) cannot say where it lives: BufferError: no device today"):
        cuflash.attention(q, Broken(k), v)


def test_failing_export_is_reported_for_its_operand():
    class Unexportable(Producer):
        def __dlpack__(self, **kwargs):
            raise BufferError("not exportable")

    q, k, v, _ = _inputs(8)
    with pytest.raises(TypeError, match=r"q \(.*Unexportable\) could not be imported through DLPack"):
        cuflash.attention(Unexportable(q), Producer(k), Producer(v), backend="numpy")


def test_read_only_producer_memory_is_accepted():
    q, k, v, _ = _inputs(9)
    for x in (q, k, v):
        x.flags.writeable = False
    out = cuflash.attention(Producer(q), Producer(k), Producer(v), backend="numpy")
    numpy.testing.assert_array_equal(out, cuflash.attention(q.copy(), k.copy(), v.copy(), backend="numpy"))


@pytest.mark.parametrize("module, framework", [("cuflash.torch", "PyTorch"), ("cuflash.jax", "JAX")])
def test_adapters_say_what_is_missing(monkeypatch, module, framework):
    # A None entry in sys.modules makes the import fail as if the package were not installed.
    monkeypatch.setitem(sys.modules, module.split(".")[1], None)
    monkeypatch.delitem(sys.modules, module, raising=False)
    with pytest.raises(ImportError, match=rf"{module} needs {framework}.*rest of cuflash works without it"):
        importlib.import_module(module)


def test_repeated_calls_check_their_arguments_once(monkeypatch):
    from cuflash import _api

    q, k, v, _ = _inputs(11)
    checks = []
    original = _api.check_forward
    monkeypatch.setattr(_api, "check_forward", lambda *a, **kw: checks.append(1) or original(*a, **kw))
    first = cuflash.attention(q, k, v, causal=True, scale=0.3, backend="numpy")
    second = cuflash.attention(q.copy(), k.copy(), v.copy(), causal=True, scale=0.3, backend="numpy")
    assert len(checks) == 1 and numpy.array_equal(first, second)
    cuflash.attention(q[:, :4], k, v, causal=True, scale=0.3, backend="numpy")  # another shape: checked
    assert len(checks) == 2


def test_cached_checks_still_refuse_values_equal_to_valid_ones():
    # 1 == True and (4.0, 0) == (4, 0): a cache keyed on values alone would let these through.
    q, k, v, _ = _inputs(12)
    cuflash.attention(q, k, v, causal=True, window=(4, 0), backend="numpy")
    with pytest.raises(TypeError, match=r"causal must be a bool, got int"):
        cuflash.attention(q, k, v, causal=1, window=(4, 0), backend="numpy")
    with pytest.raises(TypeError, match=r"window left size must be a non-negative int or None, got float"):
        cuflash.attention(q, k, v, causal=True, window=(4.0, 0), backend="numpy")
