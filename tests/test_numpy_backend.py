"""The NumPy backend against the float64 reference, over drawn shapes, dtypes and options."""

from unittest import mock

import numpy
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import cuflash
from cuflash import _numpy_backend

F32 = numpy.float32

from .helpers import (DTYPES, alibi_bias, assert_close, assert_lse_close, magnitudes, make_inputs, mask_of,
                      naive_same_dtype, windows)

SIZES = st.one_of(st.sampled_from([0, 1, 2, 3, 16, 17, 31, 33, 64]), st.integers(0, 80))
# One side of a window: unbounded, tiny (a band a few keys wide), or anything up to past the sequence.
WINDOW_SIDES = st.one_of(st.none(), st.sampled_from([0, 1, 3]), st.integers(0, 90))


@st.composite
def cases(draw, dtypes=DTYPES):
    heads_kv = draw(st.integers(1, 3))
    group = draw(st.sampled_from([1, 2, 3, 4]))
    head_dim = draw(st.one_of(st.sampled_from([1, 8, 59, 64, 128, 256]), st.integers(1, 256)))
    head_dim_v = draw(st.one_of(st.just(head_dim), st.integers(1, 256)))
    causal = draw(st.booleans())
    return dict(
        B=draw(st.integers(1, 2)), Sq=draw(SIZES), Sk=draw(SIZES), Hq=heads_kv * group, Hkv=heads_kv,
        D=head_dim, Dv=head_dim_v, dtype=draw(st.sampled_from(dtypes)),
        causal=causal, causal_alignment=draw(st.sampled_from(["bottom_right", "top_left"])),
        window=draw(windows(causal, WINDOW_SIDES)), softcap=draw(st.one_of(st.none(), st.floats(0.5, 50.0))),
        alibi=draw(st.sampled_from([None, "head", "batch_head"])),
        scale=draw(st.one_of(st.none(), st.floats(0.01, 2.0))),
        # Small tiles so several query and key tiles, partial tails and skipped tiles outside the band occur.
        blocks=(draw(st.integers(1, 40)), draw(st.integers(1, 40))),
        seed=draw(st.integers(0, 2**32 - 1)),
    )


def _inputs(case):
    """(q, k, v, dout) and the options of a drawn case, from its seed."""
    rng = numpy.random.default_rng(case["seed"])
    q, k, v, dout = make_inputs(rng, *(case[n] for n in ("B", "Sq", "Sk", "Hq", "Hkv", "D", "Dv")), case["dtype"])
    slopes_shape = {None: None, "head": (case["Hq"],), "batch_head": (case["B"], case["Hq"])}[case["alibi"]]
    options = dict(causal=case["causal"], causal_alignment=case["causal_alignment"], window=case["window"],
                   softcap=case["softcap"], scale=case["scale"],
                   alibi_slopes=None if slopes_shape is None else rng.uniform(0.01, 1.0, slopes_shape).astype(F32))
    return (q, k, v, dout), options


def _run_case(case):
    (q, k, v, dout), options = _inputs(case)
    with mock.patch.object(_numpy_backend, "_blocks", lambda problem: case["blocks"]):
        out, lse = cuflash.attention(q, k, v, return_lse=True, backend="numpy", **options)
        grads = cuflash.attention_backward(dout, q, k, v, out, lse, backend="numpy", **options)
    return (q, k, v, dout), options, out, lse, grads


def _largest_visible_bias(q, k, options):
    """max |ALiBi bias| over the visible (query, key) pairs; 0 without ALiBi or without such pairs."""
    if options["alibi_slopes"] is None:
        return 0.0
    (B, Sq, Hq, _), Sk = q.shape, k.shape[1]
    mask = mask_of(Sq, Sk, causal=options["causal"], causal_alignment=options["causal_alignment"],
                   window=options["window"])
    bias = numpy.abs(alibi_bias(options["alibi_slopes"], B, Hq, Sq, Sk, mask.offset))
    return float(numpy.max(bias[..., mask.matrix()], initial=0.0))


@settings(suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=cases())
def test_forward_and_backward_match_reference(case, poisoned):
    (q, k, v, dout), options, out, lse, (dq, dk, dv) = _run_case(case)
    dtype = case["dtype"]
    ref_out, ref_lse = cuflash.reference.attention(q, k, v, **options)
    ref_grads = cuflash.reference.attention_backward(dout, q, k, v, **options)
    naive = naive_same_dtype(q, k, v, dout, **options)
    assert out.dtype == dtype and lse.dtype == (numpy.float64 if dtype == numpy.float64 else numpy.float32)
    sizes = magnitudes(q, k, v, dout, case["scale"], bias=_largest_visible_bias(q, k, options))
    assert_close("out", out, ref_out, naive[0], dtype, magnitude=sizes["out"])
    assert_lse_close(lse, ref_lse, dtype)
    for name, x, ref, nv in zip(("dq", "dk", "dv"), (dq, dk, dv), ref_grads, naive[1:]):
        assert x.dtype == dtype
        assert_close(name, x, ref, nv, dtype, factor=3.0, magnitude=sizes[name])


@given(case=cases(dtypes=[numpy.dtype(numpy.float64)]))
def test_yardstick_in_float64_is_the_reference(case):
    """The same-dtype yardstick writes the mask and the score modifiers out independently of the
    reference; in float64 (nothing to round) the two must agree, or the accuracy bounds above
    would be measured from a wrong computation."""
    (q, k, v, dout), options = _inputs(case)
    ref_out, _ = cuflash.reference.attention(q, k, v, **options)
    ref_grads = cuflash.reference.attention_backward(dout, q, k, v, **options)
    naive = naive_same_dtype(q, k, v, dout, **options)
    for name, x, ref in zip(("out", "dq", "dk", "dv"), naive, (ref_out, *ref_grads)):
        numpy.testing.assert_allclose(x, ref, rtol=1e-10, atol=1e-12, err_msg=name)


@given(case=cases(dtypes=[numpy.dtype(numpy.float64)]))
def test_tiling_does_not_change_float64_results(case):
    """The tile sizes are an implementation detail: one tile and many agree to rounding."""
    _, _, out, lse, grads = _run_case(case)
    _, _, out1, lse1, grads1 = _run_case(dict(case, blocks=(max(1, case["Sq"]), max(1, case["Sk"]))))
    numpy.testing.assert_allclose(out, out1, rtol=1e-12, atol=1e-12)
    numpy.testing.assert_array_equal(numpy.isneginf(lse), numpy.isneginf(lse1))
    for g, g1 in zip(grads, grads1):
        numpy.testing.assert_allclose(g, g1, rtol=1e-10, atol=1e-10)


@given(case=cases(dtypes=[numpy.dtype(numpy.float32)]))
def test_only_key_tiles_that_meet_the_band_are_computed(case):
    """Cost follows the visible area: each tile the forward and the backward compute holds a visible
    (query, key) pair, each visible pair is computed once per pass, and tiles left unmasked are
    wholly visible."""
    visited = []
    logits = _numpy_backend._logits

    def recording(S_ij, problem, mask, slopes, i0, i1, j0, j1, needs_mask):
        visited.append((i0, i1, j0, j1, needs_mask))
        return logits(S_ij, problem, mask, slopes, i0, i1, j0, j1, needs_mask)

    with mock.patch.object(_numpy_backend, "_logits", recording):
        _run_case(case)
    seen = mask_of(case["Sq"], case["Sk"], causal=case["causal"], causal_alignment=case["causal_alignment"],
                   window=case["window"]).matrix()
    computed = numpy.zeros(seen.shape, dtype=int)
    for i0, i1, j0, j1, needs_mask in visited:
        tile = seen[i0:i1, j0:j1]
        assert tile.any(), f"tile rows {i0}:{i1} keys {j0}:{j1} has no visible pair"
        assert needs_mask == (not tile.all()), f"tile rows {i0}:{i1} keys {j0}:{j1}: needs_mask={needs_mask}"
        computed[i0:i1, j0:j1] += 1
    passes = 2 if case["B"] * case["Sq"] * case["Hq"] else 0  # the forward and the backward
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
