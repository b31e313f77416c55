"""JAX CPU arrays through cuflash (NumPy backend), and ``cuflash.jax`` eagerly and under jit, grad, vmap, scan
and checkpoint. Skipped without JAX."""

import os

import numpy
import pytest

import cuflash

from .helpers import BFLOAT16, assert_close, magnitudes, naive_same_dtype
from .interop_helpers import needs_new_options, pointer, recording

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


def _loss(dout, **options):
    def loss(q, k, v):
        out = cuflash.jax.attention(q, k, v, **{**OPTIONS, **options})
        return (out.astype(jnp.float32) * dout.astype(jnp.float32)).sum(), out

    return loss


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_jit_forward_and_gradients_match_eager_bitwise(dtype):
    host, (q, k, v, dout) = _arrays(36, dtype)
    grad = jax.value_and_grad(_loss(dout), argnums=(0, 1, 2), has_aux=True)
    (_, out), grads = grad(q, k, v)
    (_, jit_out), jit_grads = jax.jit(grad)(q, k, v)
    assert jit_out.dtype == dtype and numpy.array_equal(jit_out, out)
    assert all(a.dtype == dtype and numpy.array_equal(a, b) for a, b in zip(jit_grads, grads))
    _check_values(host, jit_out, jit_grads)


def test_jit_reads_inputs_and_writes_outputs_in_place():
    # Under jit the backend gets XLA's own buffers: the arguments' memory, and the memory of the
    # arrays the jitted function returns.
    _, (q, k, v, _) = _arrays(37, numpy.float32)
    forward = jax.jit(lambda q, k, v: cuflash.jax.attention(q, k, v, **OPTIONS))
    with recording("numpy") as calls:
        out = forward(q, k, v)
    (call,) = calls["forward"]
    assert [pointer(a) for a in call.arrays] == [x.unsafe_buffer_pointer() for x in (q, k, v)]
    assert pointer(call.results[0]) == out.unsafe_buffer_pointer()


def test_vmap_folds_the_mapped_axis_into_the_batch():
    _, (q, k, v, _) = _arrays(38, numpy.float32)
    qs, ks, vs = (jnp.stack([x, -x, 2 * x]) for x in (q, k, v))
    attend = lambda q, k, v: cuflash.jax.attention(q, k, v, **OPTIONS)  # noqa: E731
    with recording("numpy") as calls:
        mapped = jax.jit(jax.vmap(attend))(qs, ks, vs)
    # One backend call on a batch of 3 · 2.
    (call,) = calls["forward"]
    assert call.arrays[0].shape == (6, 5, 4, 8)
    for i in range(3):
        assert numpy.array_equal(mapped[i], attend(qs[i], ks[i], vs[i]))


def test_vmap_of_queries_against_shared_keys_and_values_and_its_gradients():
    _, (q, k, v, dout) = _arrays(39, numpy.float32)
    qs = jnp.stack([q, 0.5 * q])
    grad = jax.grad(lambda q, k, v: _loss(dout)(q, k, v)[0], argnums=(0, 1, 2))
    mapped = jax.jit(jax.vmap(grad, in_axes=(0, None, None)))(qs, k, v)
    for i in range(2):
        for a, b in zip(mapped, grad(qs[i], k, v)):
            assert numpy.array_equal(a[i], b)


def test_nested_vmap():
    _, (q, k, v, _) = _arrays(40, numpy.float32)
    qs = jnp.stack([jnp.stack([q, 2 * q]), jnp.stack([-q, 3 * q])])  # (2, 2, B, Sq, Hq, D)
    attend = lambda q: cuflash.jax.attention(q, k, v, **OPTIONS)  # noqa: E731
    mapped = jax.vmap(jax.vmap(attend))(qs)
    for i in range(2):
        for j in range(2):
            assert numpy.array_equal(mapped[i, j], attend(qs[i, j]))


def test_scan_and_checkpoint():
    # Three attention layers in a scan, each rematerialized in the backward, against a Python loop.
    _, (q, k, v, _) = _arrays(41, numpy.float32, Dv=8)

    def layer(x):
        return cuflash.jax.attention(x, k, v, **OPTIONS) + x

    def scanned(q):
        return jax.lax.scan(jax.checkpoint(lambda x, _: (layer(x), None)), q, None, length=3)[0].sum()

    def unrolled(q):
        return layer(layer(layer(q))).sum()

    value, grad = jax.jit(jax.value_and_grad(scanned))(q)
    expected_value, expected_grad = jax.value_and_grad(unrolled)(q)
    numpy.testing.assert_allclose(value, expected_value, rtol=1e-6)
    numpy.testing.assert_allclose(grad, expected_grad, rtol=1e-6, atol=1e-6)


@needs_new_options
@pytest.mark.parametrize("per_batch", [False, True], ids=["slopes_per_head", "slopes_per_batch_and_head"])
def test_vmap_with_alibi_slopes_and_the_other_new_options(per_batch):
    _, (q, k, v, dout) = _arrays(44, numpy.float32)
    rng = numpy.random.default_rng(44)
    slopes = jnp.asarray(rng.uniform(0.1, 1.0, (3, 2, 4) if per_batch else (3, 4)).astype(numpy.float32))
    qs = jnp.stack([q, -q, 0.5 * q])
    options = dict(window=(3, 0), softcap=4.0)

    def attend(q, slopes):
        return cuflash.jax.attention(q, k, v, alibi_slopes=slopes, **OPTIONS, **options)

    with recording("numpy") as calls:
        mapped = jax.jit(jax.vmap(attend))(qs, slopes)
    # Folded into one call: q (3·2, ...) and one row of slopes per folded batch entry.
    (call,) = calls["forward"]
    folded = numpy.asarray(slopes).reshape(6, 4) if per_batch else numpy.repeat(numpy.asarray(slopes), 2, axis=0)
    assert call.arrays[0].shape == (6, 5, 4, 8) and numpy.array_equal(call.arrays[3], folded)
    for i in range(3):
        expected = cuflash.attention(qs[i], k, v, alibi_slopes=slopes[i], backend="numpy", **OPTIONS, **options)
        assert numpy.array_equal(mapped[i], expected)
    grads = jax.vmap(jax.grad(lambda q, s: (attend(q, s) * dout).sum()))(qs, slopes)
    for i in range(3):
        out, lse = cuflash.attention(qs[i], k, v, alibi_slopes=slopes[i], return_lse=True, backend="numpy",
                                     **OPTIONS, **options)
        dq, _, _ = cuflash.attention_backward(dout, qs[i], k, v, out, lse, alibi_slopes=slopes[i], backend="numpy",
                                              **OPTIONS, **options)
        assert numpy.array_equal(grads[i], dq)


def test_shapes_are_checked_at_trace_time():
    _, (q, k, v, _) = _arrays(42, numpy.float32)
    with recording("numpy") as calls:
        with pytest.raises(ValueError, match=r"(?s)cuflash.jax.attention.*q and k must have the same head_dim"):
            jax.jit(lambda q, k, v: cuflash.jax.attention(q, k, v)).lower(q, k[..., :4], v)
    assert calls["forward"] == []


def test_second_derivatives_are_refused():
    _, (q, k, v, _) = _arrays(43, numpy.float32)

    def dq_sum(q):
        return jax.grad(lambda q: cuflash.jax.attention(q, k, v).sum())(q).sum()

    with pytest.raises(Exception, match=r"(?i)callback.*(JVP|transpose)|custom_vjp"):
        jax.grad(dq_sum)(q)


def test_adapter_refuses_non_jax_operands():
    host, (q, k, v, _) = _arrays(34, numpy.float32)
    with pytest.raises(TypeError, match=r"v must be a jax.Array, got numpy.ndarray"):
        cuflash.jax.attention(q, k, host[2])


def test_mixed_jax_and_numpy_are_refused():
    host, (q, k, v, _) = _arrays(35, numpy.float32)
    with pytest.raises(TypeError, match=r"got q: jax on cpu, k: jax on cpu, v: numpy on cpu"):
        cuflash.attention(q, k, host[2])
