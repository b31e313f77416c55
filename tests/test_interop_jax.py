"""JAX CPU arrays through cuflash (NumPy backend), and gradients through ``cuflash.jax``. Skipped without JAX."""

import os

import numpy
import pytest

import cuflash

from .helpers import BFLOAT16, assert_close, magnitudes, naive_same_dtype
from .interop_helpers import pointer, recording

# A JAX with CUDA would otherwise reserve most of the GPU's memory at its start, starving CuPy.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
jax = pytest.importorskip("jax")
import cuflash.jax  # noqa: E402  (needs jax, which the skip above guarantees)
import jax.numpy as jnp  # noqa: E402

DTYPES = [numpy.dtype(numpy.float16), numpy.dtype(numpy.float32)] + ([BFLOAT16] if BFLOAT16 is not None else [])
OPTIONS = dict(causal=True, causal_alignment="bottom_right")


def _arrays(seed, dtype, B=2, Sq=5, Sk=7, Hq=4, Hkv=2, D=8, Dv=6):
    """Host inputs (q, k, v, dout) in ``dtype`` and the same values as JAX CPU arrays."""
    rng = numpy.random.default_rng(seed)
    shapes = [(B, Sq, Hq, D), (B, Sk, Hkv, D), (B, Sk, Hkv, Dv), (B, Sq, Hq, Dv)]
    host = [rng.standard_normal(s).astype(dtype) for s in shapes]
    cpu = jax.devices("cpu")[0]
    return host, [jax.device_put(x, cpu) for x in host]


def _check_values(host, out, grads=None):
    dtype = host[0].dtype
    naive = naive_same_dtype(*host, **OPTIONS)
    sizes = magnitudes(*host)
    ref_out, _ = cuflash.reference.attention(*host[:3], **OPTIONS)
    assert_close("out", numpy.asarray(out), ref_out, naive[0], dtype, magnitude=sizes["out"])
    if grads is not None:
        ref = cuflash.reference.attention_backward(host[3], *host[:3], **OPTIONS)
        for name, x, r, nv in zip(("dq", "dk", "dv"), grads, ref, naive[1:]):
            assert_close(name, numpy.asarray(x), r, nv, dtype, factor=3.0, magnitude=sizes[name])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cpu_arrays_in_arrays_out_without_copies(dtype):
    host, (q, k, v, dout) = _arrays(30, dtype)
    with recording("numpy") as calls:
        out, lse = cuflash.attention(q, k, v, return_lse=True, backend="numpy", **OPTIONS)
        grads = cuflash.attention_backward(dout, q, k, v, out, lse, backend="numpy", **OPTIONS)
    for x, like in zip((out, *grads), (dout, q, k, v)):
        assert isinstance(x, jax.Array) and x.dtype == dtype and x.shape == like.shape
        assert x.devices() == like.devices()
    assert lse.dtype == numpy.float32
    forward = calls["forward"][0]
    assert [pointer(a) for a in forward.arrays] == [x.unsafe_buffer_pointer() for x in (q, k, v)]
    assert [pointer(a) for a in forward.results] == [out.unsafe_buffer_pointer(), lse.unsafe_buffer_pointer()]
    assert [pointer(a) for a in calls["backward"][0].results] == [x.unsafe_buffer_pointer() for x in grads]
    _check_values(host, out, grads)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_grad_through_custom_vjp(dtype):
    host, (q, k, v, dout) = _arrays(31, dtype)

    def loss(q, k, v):
        out = cuflash.jax.attention(q, k, v, **OPTIONS)
        return (out.astype(jnp.float32) * dout.astype(jnp.float32)).sum(), out

    (_, out), grads = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(q, k, v)
    assert out.dtype == dtype and all(g.dtype == dtype for g in grads)
    _check_values(host, out, grads)


def test_vjp_matches_the_plain_backward():
    _, (q, k, v, dout) = _arrays(32, numpy.float32)
    out, vjp = jax.vjp(lambda q, k, v: cuflash.jax.attention(q, k, v, deterministic=True, **OPTIONS), q, k, v)
    grads = vjp(dout)
    plain_out, lse = cuflash.attention(q, k, v, return_lse=True, backend="numpy", **OPTIONS)
    expected = cuflash.attention_backward(dout, q, k, v, plain_out, lse, backend="numpy", **OPTIONS)
    assert numpy.array_equal(out, plain_out)
    for g, e in zip(grads, expected):
        assert numpy.array_equal(g, e)


@pytest.mark.parametrize("transform", ["jit", "vmap", "grad_of_grad"])
def test_tracing_transformations_are_refused_with_the_reason(transform):
    _, (q, k, v, _) = _arrays(33, numpy.float32)
    if transform == "jit":
        call = lambda: jax.jit(cuflash.jax.attention)(q, k, v)  # noqa: E731
    elif transform == "vmap":
        call = lambda: jax.vmap(cuflash.jax.attention)(q[None], k[None], v[None])  # noqa: E731
    else:
        def dq_sum(q):
            return jax.grad(lambda q: cuflash.jax.attention(q, k, v).sum())(q).sum()

        call = lambda: jax.grad(dq_sum)(q)  # noqa: E731
    with pytest.raises(TypeError, match=r"cuflash.jax.attention got a traced value .* cannot run inside jax.jit"):
        call()


def test_adapter_refuses_non_jax_operands():
    host, (q, k, v, _) = _arrays(34, numpy.float32)
    with pytest.raises(TypeError, match=r"v must be a jax.Array, got numpy.ndarray"):
        cuflash.jax.attention(q, k, host[2])


def test_mixed_jax_and_numpy_are_refused():
    host, (q, k, v, _) = _arrays(35, numpy.float32)
    with pytest.raises(TypeError, match=r"got q: jax on cpu, k: jax on cpu, v: numpy on cpu"):
        cuflash.attention(q, k, host[2])
