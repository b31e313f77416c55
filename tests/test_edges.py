"""Edges of the contract on the CPU backends (NumPy backend and reference): NaN and infinity,
fully masked rows, extreme scales, array subclasses, argument checks, the no-GPU diagnosis, and
the NumPy backend's memory. Each test is named after the defect it guards against."""

import math
import tracemalloc
from unittest import mock

import numpy
import pytest
from hypothesis import given, settings, strategies as st

import cuflash
from cuflash import _numpy_backend, reference
from cuflash._cuda import runtime

from .helpers import mask_of

F32 = numpy.float32
CPU = ("numpy", "reference")


def _randn(rng, shape, dtype=F32):
    return rng.standard_normal(shape).astype(dtype)


def _forward(backend, q, k, v, **options):
    if backend == "reference":
        return reference.attention(q, k, v, **options)
    return cuflash.attention(q, k, v, return_lse=True, backend="numpy", **options)


def _backward(backend, dout, q, k, v, out, lse, **options):
    if backend == "reference":
        return reference.attention_backward(dout, q, k, v, **options)
    return cuflash.attention_backward(dout, q, k, v, out, lse, backend="numpy", **options)


# 1. The float64 reference hid NaN and +inf (a row summing to NaN was treated as fully masked).

@settings(max_examples=30, deadline=None)
@given(Sq=st.integers(1, 12), Sk=st.integers(1, 12), causal=st.booleans(), seed=st.integers(0, 2**32 - 1),
       data=st.data())
def test_reference_propagates_nan_exactly_to_the_outputs_that_depend_on_it(Sq, Sk, causal, seed, data):
    """A NaN in v[b, j, h, d] makes out[b, i, h', d] NaN exactly for the rows i that see key j and
    the query heads h' of group h, and nothing else; the NumPy backend gives NaN there too."""
    rng = numpy.random.default_rng(seed)
    q, k, v = _randn(rng, (2, Sq, 4, 8)), _randn(rng, (2, Sk, 2, 8)), _randn(rng, (2, Sk, 2, 5))
    b, j, h, d = (data.draw(st.integers(0, n - 1)) for n in (2, Sk, 2, 5))
    v[b, j, h, d] = numpy.nan
    sees_j = mask_of(Sq, Sk, causal=causal).matrix()[:, j]
    expected = numpy.zeros((2, Sq, 4, 5), dtype=bool)
    expected[b, sees_j, 2 * h:2 * h + 2, d] = True
    out, lse = reference.attention(q, k, v, causal=causal)
    numpy.testing.assert_array_equal(numpy.isnan(out), expected)
    assert not numpy.isnan(lse).any()
    out_numpy = cuflash.attention(q, k, v, causal=causal, backend="numpy")
    assert numpy.isnan(out_numpy)[expected].all()


@pytest.mark.parametrize("backend", CPU)
def test_reference_propagates_infinity_in_q(backend):
    """+inf in q makes its row's logits ±inf: the softmax of that row is NaN (inf − inf), as the
    arithmetic says; it is not a fully masked row (out = 0, lse = −inf)."""
    rng = numpy.random.default_rng(0)
    q, k, v = _randn(rng, (1, 4, 1, 8)), _randn(rng, (1, 4, 1, 8)), _randn(rng, (1, 4, 1, 8))
    q[0, 1, 0, 3] = numpy.inf
    with numpy.errstate(invalid="ignore", over="ignore"):
        out, lse = _forward(backend, q, k, v)
    assert numpy.isnan(out[0, 1]).all() and numpy.isnan(lse[0, 0, 1])
    others = [0, 2, 3]
    assert numpy.isfinite(out[0, others]).all() and numpy.isfinite(lse[0, 0, others]).all()


@pytest.mark.parametrize("backend", CPU)
def test_reference_gives_nan_for_a_row_whose_visible_logits_are_all_minus_infinity(backend):
    """Keys that are visible but have logit −inf (an infinite input) are not a masked row: the
    softmax is 0/0 = NaN and the log-sum-exp log 0 = −inf."""
    rng = numpy.random.default_rng(1)
    q, v = _randn(rng, (1, 3, 1, 4)), _randn(rng, (1, 5, 1, 4))
    k = numpy.abs(_randn(rng, (1, 5, 1, 4))) + 0.5
    q[0, 2] = [-numpy.inf, 1.0, 1.0, 1.0]
    with numpy.errstate(invalid="ignore", over="ignore"):
        out, lse = _forward(backend, q, k, v)
    assert numpy.isnan(out[0, 2]).all() and numpy.isneginf(lse[0, 0, 2])
    assert numpy.isfinite(out[0, :2]).all()


# 2. Fully masked rows leaked NaN into dq, dk, dv.

@pytest.mark.parametrize("backend", CPU)
def test_fully_masked_rows_leak_no_nan(backend):
    """Sq = 5, Sk = 2, causal: rows 0–2 see nothing. A NaN in v of key 0 reaches rows 3–4 only;
    a NaN in dout of a masked row reaches nothing: dq = 0 there and dk, dv stay finite."""
    rng = numpy.random.default_rng(2)
    q, k, v, dout = _randn(rng, (1, 5, 1, 8)), _randn(rng, (1, 2, 1, 8)), _randn(rng, (1, 2, 1, 8)), \
        _randn(rng, (1, 5, 1, 8))
    v_nan = v.copy()
    v_nan[0, 0, 0, 0] = numpy.nan
    with numpy.errstate(invalid="ignore"):
        out, lse = _forward(backend, q, k, v_nan, causal=True)
        dq, dk, dv = _backward(backend, dout, q, k, v_nan, out, lse, causal=True)
    assert (out[0, :3] == 0).all() and numpy.isneginf(lse[0, 0, :3]).all()
    assert (dq[0, :3] == 0).all() and numpy.isnan(dq[0, 3:]).any()

    dout_nan = dout.copy()
    dout_nan[0, 0, 0, 0] = numpy.nan
    out, lse = _forward(backend, q, k, v, causal=True)
    dq, dk, dv = _backward(backend, dout_nan, q, k, v, out, lse, causal=True)
    assert numpy.isfinite(dk).all() and numpy.isfinite(dv).all() and numpy.isfinite(dq).all()
    assert (dq[0, :3] == 0).all()


def test_nan_in_the_last_key_reaches_only_rows_sharing_a_tile_with_it():
    """Sq = Sk = 1100 causal, NaN in v of the last key: only row 1099 depends on it. The reference
    poisons exactly that row; the NumPy backend also poisons rows of query tiles that visit the
    key's tile (P = 0 times NaN), as the README documents, and no row of any other tile."""
    rng = numpy.random.default_rng(3)
    n = 1100
    q, k, v = _randn(rng, (1, n, 1, 4)), _randn(rng, (1, n, 1, 4)), _randn(rng, (1, n, 1, 4))
    v[0, n - 1, 0, 0] = numpy.nan
    out, _ = reference.attention(q, k, v, causal=True)
    assert numpy.flatnonzero(numpy.isnan(out[0, :, 0, 0])).tolist() == [n - 1]
    blocks = (64, 128)
    with mock.patch.object(_numpy_backend, "_blocks", lambda problem: blocks), numpy.errstate(invalid="ignore"):
        out = cuflash.attention(q, k, v, causal=True, backend="numpy")
    poisoned = numpy.isnan(out[0, :, 0, 0])
    last_key_tile = (n - 1) // blocks[1] * blocks[1]
    may = numpy.zeros(n, dtype=bool)
    for i0 in range(0, n, blocks[0]):
        if i0 + blocks[0] - 1 >= last_key_tile:  # the causal query tile reaches the key's tile
            may[i0:i0 + blocks[0]] = True
    assert poisoned[n - 1] and not poisoned[~may].any()
    assert numpy.isnan(out[0, :, 0, 1:]).sum() == 0  # other columns of v are finite


# 3 and 4. Scales that overflow.

def test_huge_scale_is_refused_where_float32_cannot_hold_it():
    x = numpy.ones((1, 4, 1, 8), F32)
    with pytest.raises(ValueError, match=r"scale=1e\+300 overflows float32"):
        cuflash.attention(x, x, x, scale=1e300)
    with pytest.raises(ValueError, match="scale"):
        reference.attention(x, x, x, scale=1e300)
    x64 = numpy.random.default_rng(4).standard_normal((1, 4, 1, 8)) * 1e-300
    out = cuflash.attention(x64, x64, x64, scale=1e300)  # float64 applies it in float64
    assert numpy.isfinite(out).all()


def test_scale_int_too_large_for_a_float_is_refused_naming_scale():
    x = numpy.ones((1, 4, 1, 8), F32)
    with pytest.raises(ValueError, match="scale must be a finite number"):
        cuflash.attention(x, x, x, scale=10**400)
    with pytest.raises(ValueError, match="scale must be a finite number"):
        cuflash.attention(x, x, x, scale=-10**400)


# 5. ndarray subclasses.

def test_masked_array_is_refused_up_front():
    x = numpy.ma.masked_array(numpy.ones((1, 4, 1, 8), F32))
    with pytest.raises(TypeError, match=r"(?s)q is a numpy.ma.MaskedArray.*k is a numpy.ma.MaskedArray"):
        with mock.patch.object(_numpy_backend, "forward", side_effect=AssertionError("ran")):
            cuflash.attention(x, x, x)


def test_matrix_is_refused_up_front():
    with pytest.warns(PendingDeprecationWarning):
        m = numpy.asmatrix(numpy.ones((4, 8), F32))
    with pytest.raises(TypeError, match="q is a numpy.matrix"):
        cuflash.attention(m, m, m)


def test_other_ndarray_subclasses_are_read_as_plain_arrays(tmp_path):
    rng = numpy.random.default_rng(5)
    data = _randn(rng, (1, 6, 2, 8))
    mapped = numpy.memmap(tmp_path / "x", dtype=F32, mode="w+", shape=data.shape)
    mapped[...] = data
    out = cuflash.attention(mapped, mapped, mapped, causal=True)
    assert type(out) is numpy.ndarray
    numpy.testing.assert_array_equal(out, cuflash.attention(data, data, data, causal=True))


# 6. attention_backward reported only the forward-level problems.

def test_backward_reports_forward_and_operand_problems_together():
    x = numpy.ones((1, 4, 1, 8), F32)
    with pytest.raises(TypeError) as error:
        cuflash.attention_backward(x[:, :3], x.astype(numpy.int32), x, x, x.astype(numpy.float64), x[0],
                                   causal="x")
    message = str(error.value)
    for expected in ("causal must be a bool", "q has dtype int32", "dout must have shape",
                     "out has dtype float64", "lse must have shape"):
        assert expected in message, message


# 7. Booleans that were not checked, or checked late.

def test_vjp_checks_deterministic_before_running_anything():
    x = numpy.ones((1, 4, 1, 8), F32)
    with mock.patch.object(_numpy_backend, "forward", side_effect=AssertionError("ran")):
        with pytest.raises(TypeError, match="deterministic must be a bool"):
            cuflash.attention_vjp(x, x, x, deterministic="no")


@pytest.mark.parametrize("value", ["no", 1, None])
def test_return_lse_must_be_a_bool(value):
    x = numpy.ones((1, 4, 1, 8), F32)
    with pytest.raises(TypeError, match="return_lse must be a bool"):
        cuflash.attention(x, x, x, return_lse=value)


# 8. A machine with no driver was told its driver was too old.

def test_missing_driver_is_named_as_such(monkeypatch):
    cupy = pytest.importorskip("cupy")

    def no_driver():
        raise cupy.cuda.runtime.CUDARuntimeError(35)  # cudaErrorInsufficientDriver

    monkeypatch.setattr(cupy.cuda.runtime, "getDeviceCount", no_driver)
    monkeypatch.setattr(runtime, "_driver_loadable", lambda: False)
    available, reason = runtime.gpu_available.__wrapped__()
    assert not available and "no NVIDIA driver found" in reason and "insufficient" not in reason


# 9. The NumPy backend's memory.

def _peak(fn):
    tracemalloc.start()
    try:
        result = fn()
        return result, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_numpy_backend_reads_16bit_inputs_in_place():
    """A broadcast float16 input is not copied whole to float32: beyond the output, the forward
    allocates a few tiles."""
    rng = numpy.random.default_rng(6)
    Sq, Sk = 1 << 14, 256
    q = numpy.broadcast_to(_randn(rng, (1, 1, 4, 64), numpy.float16), (1, Sq, 4, 64))
    kv = _randn(rng, (1, Sk, 4, 64), numpy.float16)
    with mock.patch.object(_numpy_backend, "_TILE_ELEMENTS", 1 << 16):
        out, peak = _peak(lambda: cuflash.attention(q, kv, kv, backend="numpy"))
    assert peak < out.nbytes + (4 << 20), f"peak {peak / 2**20:.1f} MiB for a {out.nbytes / 2**20:.1f} MiB output"


@pytest.mark.parametrize("dtype", [numpy.float16, F32])
def test_numpy_backward_accumulates_without_whole_copies(dtype):
    """dk and dv are accumulated a key tile at a time and written once; float32 dq in place."""
    rng = numpy.random.default_rng(7)
    q, k, v = _randn(rng, (1, 64, 2, 32), dtype), _randn(rng, (1, 1 << 14, 2, 32), dtype), \
        _randn(rng, (1, 1 << 14, 2, 32), dtype)
    out, lse = cuflash.attention(q, k, v, return_lse=True, backend="numpy")
    dout = _randn(rng, out.shape, dtype)
    with mock.patch.object(_numpy_backend, "_TILE_ELEMENTS", 1 << 16):
        grads, peak = _peak(lambda: cuflash.attention_backward(dout, q, k, v, out, lse, backend="numpy"))
    results = sum(g.nbytes for g in grads)
    assert peak < results + (4 << 20), f"peak {peak / 2**20:.1f} MiB for {results / 2**20:.1f} MiB of gradients"


def test_numpy_backend_bounds_tiles_when_batch_times_heads_is_large():
    """With B·Hq beyond what one tile holds, heads are split into chunks: the S tile stays bounded
    and the results equal the unchunked computation."""
    rng = numpy.random.default_rng(8)
    q, k, v = (_randn(rng, (8, 40, 64, 2)) for _ in range(3))
    dout = _randn(rng, q.shape)
    out, lse = cuflash.attention(q, k, v, return_lse=True, backend="numpy", causal=True)
    grads = cuflash.attention_backward(dout, q, k, v, out, lse, backend="numpy", causal=True)
    tiles = []
    logits = _numpy_backend._logits

    def recording(S_ij, *args):
        tiles.append(S_ij.size)
        return logits(S_ij, *args)

    with mock.patch.object(_numpy_backend, "_TILE_ELEMENTS", 1 << 12), \
            mock.patch.object(_numpy_backend, "_logits", recording):
        out_c, lse_c = cuflash.attention(q, k, v, return_lse=True, backend="numpy", causal=True)
        grads_c = cuflash.attention_backward(dout, q, k, v, out, lse, backend="numpy", causal=True)
    assert max(tiles) <= 1 << 12
    numpy.testing.assert_allclose(out_c, out, rtol=1e-6, atol=1e-6)
    numpy.testing.assert_allclose(lse_c, lse, rtol=1e-6, atol=1e-6)
    for g_c, g in zip(grads_c, grads):
        numpy.testing.assert_allclose(g_c, g, rtol=1e-5, atol=1e-5)


# 11. float32 over long key sequences.

def test_numpy_backend_float32_long_reductions_stay_within_twice_naive():
    """Sq = 64 queries over Sk = 65,536 keys (inducing points): the error against float64 is within
    2x a naive float32 computation's."""
    rng = numpy.random.default_rng(9)
    Sk = 1 << 16
    q, k, v = _randn(rng, (1, 64, 1, 64)), _randn(rng, (1, Sk, 1, 64)), _randn(rng, (1, Sk, 1, 64))
    out = cuflash.attention(q, k, v, backend="numpy")
    Q, K, V = (x[0, :, 0] for x in (q, k, v))
    scale = 1 / math.sqrt(64)

    def softmax_v(Q, K, V):
        S = (Q * Q.dtype.type(scale)) @ K.T
        P = numpy.exp(S - S.max(axis=1, keepdims=True))
        return (P / P.sum(axis=1, keepdims=True)) @ V

    exact = softmax_v(*(x.astype(numpy.float64) for x in (Q, K, V)))
    naive = numpy.abs(softmax_v(Q, K, V) - exact).max()
    error = numpy.abs(out[0, :, 0] - exact).max()
    assert error <= 2 * naive, f"error {error:.3g} against naive float32 {naive:.3g}"
