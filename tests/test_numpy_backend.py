"""The NumPy backend against the float64 reference, over drawn shapes, dtypes and options."""

from unittest import mock

import numpy
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import cuflash
from cuflash import _numpy_backend
from cuflash.testing import assert_attention_close, assert_attention_grads_close, attention_problems

from .helpers import DTYPES, make_inputs, mask_of, naive_same_dtype

# Small tiles so several query and key tiles, partial tails and skipped tiles outside the band occur.
BLOCKS = st.tuples(st.integers(1, 40), st.integers(1, 40))
FLOAT64 = [numpy.dtype(numpy.float64)]


def _run(problem, blocks):
    """Forward and backward of a drawn problem on the NumPy backend with tiles of ``blocks``."""
    p = problem
    with mock.patch.object(_numpy_backend, "_blocks", lambda _: blocks):
        out, lse = cuflash.attention(p.q, p.k, p.v, return_lse=True, backend="numpy", **p.options)
        grads = cuflash.attention_backward(p.dout, p.q, p.k, p.v, out, lse, backend="numpy", **p.options)
    return out, lse, grads


@settings(suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(problem=attention_problems(), blocks=BLOCKS)
def test_forward_and_backward_match_reference(problem, blocks, poisoned):
    p = problem
    out, lse, grads = _run(p, blocks)
    assert_attention_close(out, p.q, p.k, p.v, lse=lse, **p.options)
    assert_attention_grads_close(*grads, p.q, p.k, p.v, p.dout, **p.options)


@given(problem=attention_problems(dtypes=FLOAT64))
def test_yardstick_in_float64_is_the_reference(problem):
    """The same-dtype yardstick writes the mask and the score modifiers out independently of the
    reference; in float64 (nothing to round) the two must agree, or the accuracy bounds above
    would be measured from a wrong computation."""
    p = problem
    ref_out, _ = cuflash.reference.attention(p.q, p.k, p.v, **p.options)
    ref_grads = cuflash.reference.attention_backward(p.dout, p.q, p.k, p.v, **p.options)
    naive = naive_same_dtype(p.q, p.k, p.v, p.dout, **p.options)
    for name, x, ref in zip(("out", "dq", "dk", "dv"), naive, (ref_out, *ref_grads)):
        numpy.testing.assert_allclose(x, ref, rtol=1e-10, atol=1e-12, err_msg=name)


@given(problem=attention_problems(dtypes=FLOAT64), blocks=BLOCKS)
def test_tiling_does_not_change_float64_results(problem, blocks):
    """The tile sizes are an implementation detail: one tile and many agree to rounding."""
    out, lse, grads = _run(problem, blocks)
    out1, lse1, grads1 = _run(problem, (max(1, problem.Sq), max(1, problem.Sk)))
    numpy.testing.assert_allclose(out, out1, rtol=1e-12, atol=1e-12)
    numpy.testing.assert_array_equal(numpy.isneginf(lse), numpy.isneginf(lse1))
    for g, g1 in zip(grads, grads1):
        numpy.testing.assert_allclose(g, g1, rtol=1e-10, atol=1e-10)


@given(problem=attention_problems(dtypes=[numpy.dtype(numpy.float32)]), blocks=BLOCKS)
def test_only_key_tiles_that_meet_the_band_are_computed(problem, blocks):
    """Cost follows the visible area: each tile the forward and the backward compute holds a visible
    (query, key) pair, each visible pair is computed once per pass, and tiles left unmasked are
    wholly visible."""
    visited = []
    logits = _numpy_backend._logits

    def recording(S_ij, problem, mask, slopes, i0, i1, j0, j1, needs_mask):
        visited.append((i0, i1, j0, j1, needs_mask))
        return logits(S_ij, problem, mask, slopes, i0, i1, j0, j1, needs_mask)

    with mock.patch.object(_numpy_backend, "_logits", recording):
        _run(problem, blocks)
    options = problem.options
    seen = mask_of(problem.Sq, problem.Sk, causal=options["causal"], causal_alignment=options["causal_alignment"],
                   window=options["window"]).matrix()
    computed = numpy.zeros(seen.shape, dtype=int)
    for i0, i1, j0, j1, needs_mask in visited:
        tile = seen[i0:i1, j0:j1]
        assert tile.any(), f"tile rows {i0}:{i1} keys {j0}:{j1} has no visible pair"
        assert needs_mask == (not tile.all()), f"tile rows {i0}:{i1} keys {j0}:{j1}: needs_mask={needs_mask}"
        computed[i0:i1, j0:j1] += 1
    passes = 2 if problem.B * problem.Sq * problem.Hq else 0  # the forward and the backward
    assert numpy.all(computed[seen] == passes) and numpy.all(computed <= passes)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_bhsd_views_give_the_same_result_as_contiguous(dtype):
    rng = numpy.random.default_rng(7)
    q, k, v, dout = (x.transpose(0, 2, 1, 3).copy() for x in make_inputs(rng, 2, 37, 45, 4, 2, 24, 24, dtype))
    views = [x.transpose(0, 2, 1, 3) for x in (q, k, v, dout)]  # BHSD storage seen as BSHD
    contiguous = [numpy.ascontiguousarray(x) for x in views]
    results = []
    for q_, k_, v_, do_ in (views, contiguous):
        out, lse = cuflash.attention(q_, k_, v_, causal=True, return_lse=True, backend="numpy")
        results.append((out, lse, *cuflash.attention_backward(do_, q_, k_, v_, out, lse, causal=True, backend="numpy")))
    for a, b in zip(*results):
        numpy.testing.assert_array_equal(a, b)


def test_vjp_matches_attention_and_backward():
    rng = numpy.random.default_rng(3)
    q, k, v, dout = make_inputs(rng, 1, 33, 29, 4, 1, 16, 16, numpy.float32)
    out, vjp = cuflash.attention_vjp(q, k, v, causal=True, backend="numpy")
    out2, lse = cuflash.attention(q, k, v, causal=True, return_lse=True, backend="numpy")
    numpy.testing.assert_array_equal(out, out2)
    for a, b in zip(vjp(dout), cuflash.attention_backward(dout, q, k, v, out2, lse, causal=True, backend="numpy")):
        numpy.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("shape", [(0, 5, 2, 8), (1, 0, 2, 8), (2, 3, 0, 8)], ids=["B=0", "Sq=0", "Hq=0"])
def test_empty_sizes_give_empty_results(shape):
    rng = numpy.random.default_rng(0)
    B, Sq, Hq, D = shape
    q = rng.standard_normal(shape).astype(numpy.float32)
    k = rng.standard_normal((B, 4, 1, D)).astype(numpy.float32)
    v = rng.standard_normal((B, 4, 1, 6)).astype(numpy.float32)
    out, lse = cuflash.attention(q, k, v, return_lse=True)
    assert out.shape == (B, Sq, Hq, 6) and lse.shape == (B, Hq, Sq)
    dq, dk, dv = cuflash.attention_backward(numpy.ones_like(out), q, k, v, out, lse)
    assert dq.shape == q.shape and dk.shape == k.shape and dv.shape == v.shape
    assert numpy.all(dk == 0) and numpy.all(dv == 0)


def test_long_sequence_memory_grows_linearly():
    """Doubling N (with H, D fixed) must roughly double peak memory, not quadruple it."""
    import tracemalloc

    def peak(n):
        rng = numpy.random.default_rng(n)
        q, k, v, _ = make_inputs(rng, 1, n, n, 2, 2, 32, 32, numpy.float32)
        tracemalloc.start()
        cuflash.attention(q, k, v, causal=True, backend="numpy")
        _, top = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        return top

    small, large = peak(2048), peak(8192)
    naive_s_bytes = 2 * 8192 * 8192 * 4
    # 4x the sequence: linear memory grows at most 4x, quadratic 16x.
    assert large < 8 * small, f"peak grew {large / small:.1f}x for 4x the sequence"
    assert large < naive_s_bytes / 8, f"peak {large} bytes is a sizeable part of an N×N matrix"
