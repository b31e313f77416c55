"""The CUDA backward against the float64 reference and the NumPy backend.

The forward's out and lse come from the NumPy backend, so these tests judge the backward kernels
alone. Skipped cleanly where no GPU is usable.
"""

import numpy
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import cuflash
from cuflash._cuda import runtime, variants
from cuflash.testing import assert_attention_grads_close, attention_problems

from ..helpers import BFLOAT16, gpu_skip_reason, magnitudes, make_inputs, naive_same_dtype

_SKIP = gpu_skip_reason()
pytestmark = pytest.mark.skipif(_SKIP is not None, reason=_SKIP or "")

GPU_DTYPES = [numpy.dtype(numpy.float16), numpy.dtype(numpy.float32)]
if BFLOAT16 is not None:
    GPU_DTYPES.insert(1, BFLOAT16)


def _with_forward(q, k, v, dout, **options):
    """The backward's arguments (dout, q, k, v, out, lse), out and lse from the NumPy backend."""
    out, lse = cuflash.attention(q, k, v, return_lse=True, backend="numpy", **options)
    return (dout, q, k, v, out, lse), options


def _inputs(B, Sq, Sk, Hq, Hkv, D, Dv, dtype, causal=False, causal_alignment="bottom_right", scale=None, seed=0):
    rng = numpy.random.default_rng(seed)
    q, k, v, dout = make_inputs(rng, B, Sq, Sk, Hq, Hkv, D, Dv, dtype)
    return _with_forward(q, k, v, dout, causal=causal, causal_alignment=causal_alignment, scale=scale)


def _check_against_reference(args, options, deterministic=False, factor=3.0):
    dout, q, k, v, out, lse = args
    grads = cuflash.attention_backward(*args, backend="cuda", deterministic=deterministic, **options)
    assert_attention_grads_close(*grads, q, k, v, dout, factor=factor, **options)
    return grads


@settings(max_examples=30, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(problem=attention_problems(dtypes=GPU_DTYPES, min_seqlen=1, max_seqlen=300,
                                  lengths=[1, 2, 16, 17, 63, 64, 65, 129], max_heads_kv=2, group_sizes=(1, 2, 3, 8),
                                  features={"causal", "top_left", "scale"}, layouts=("contiguous",),
                                  scale_range=(0.05, 1.0)),
       deterministic=st.booleans())
def test_drawn_shapes_match_reference(problem, deterministic, poisoned):
    p = problem
    _check_against_reference(*_with_forward(p.q, p.k, p.v, p.dout, **p.options), deterministic)


AWKWARD = [
    # (Sq, Sk, D, Dv)
    (1, 1025, 40, 40),
    (17, 113, 59, 59),
    (113, 17, 111, 111),
    (1023, 1025, 200, 200),
    (1025, 1023, 256, 256),
    (1025, 1, 64, 64),
    (113, 1023, 59, 111),
]


@pytest.mark.parametrize("dtype", GPU_DTYPES, ids=lambda d: d.name)
@pytest.mark.parametrize("sizes", AWKWARD, ids=lambda s: "Sq{}-Sk{}-D{}-Dv{}".format(*s))
@pytest.mark.parametrize("causal_alignment", [None, "bottom_right", "top_left"])
def test_awkward_sizes_match_reference(sizes, dtype, causal_alignment, poisoned):
    Sq, Sk, D, Dv = sizes
    args, options = _inputs(1, Sq, Sk, 2, 1, D, Dv, dtype, causal=causal_alignment is not None,
                            causal_alignment=causal_alignment or "bottom_right")
    _check_against_reference(args, options)


@pytest.mark.parametrize("family", ["sm80", "sm90"])
@pytest.mark.parametrize("bucket", variants.HEAD_DIM_BUCKETS)
@pytest.mark.parametrize("dtype", GPU_DTYPES, ids=lambda d: d.name)
def test_every_table_entry_matches_reference(family, bucket, dtype, poisoned, monkeypatch):
    """Each configuration of both architecture families' tables (the sm80 family's run here on
    whatever GPU this is): full and tail tiles, causal, GQA, D at the bucket's top."""
    if family == "sm90" and runtime.compute_capability()[0] != 9:
        pytest.skip("sm90 entries use sm_90a instructions")
    monkeypatch.setattr(variants, "family", lambda major, minor: family)
    args, options = _inputs(1, 300, 257, 4, 2, bucket, bucket, dtype, causal=True, seed=bucket)
    for deterministic in (False, True):
        _check_against_reference(args, options, deterministic)


@pytest.mark.parametrize("heads", [(4, 4), (4, 2), (16, 2), (6, 1)], ids=["mha", "gqa2", "gqa8", "mqa"])
@pytest.mark.parametrize("deterministic", [False, True])
def test_gqa_and_mqa_sum_over_the_group(heads, deterministic, poisoned):
    Hq, Hkv = heads
    args, options = _inputs(2, 200, 333, Hq, Hkv, 64, 64, numpy.dtype(numpy.float16), causal=True)
    _check_against_reference(args, options, deterministic)


@pytest.mark.parametrize("dtype", GPU_DTYPES, ids=lambda d: d.name)
def test_gpu_agrees_with_numpy_backend(dtype):
    args, options = _inputs(2, 257, 190, 4, 2, 96, 80, dtype, causal=True)
    gpu = cuflash.attention_backward(*args, backend="cuda", **options)
    cpu = cuflash.attention_backward(*args, backend="numpy", **options)
    dout, q, k, v, _, _ = args
    naive = naive_same_dtype(q, k, v, dout, **options)
    ref = cuflash.reference.attention_backward(dout, q, k, v, **options)
    sizes = magnitudes(q, k, v, dout, options["scale"])
    for name, g, c, nv, r in zip(("dq", "dk", "dv"), gpu, cpu, naive[1:], ref):
        # The two backends differ by at most what the dtype's own rounding allows (the CPU result
        # stands in for the reference, the same-dtype naive error is the yardstick).
        yardstick = numpy.max(numpy.abs(nv.astype(numpy.float64) - r))
        diff = numpy.max(numpy.abs(g.astype(numpy.float64) - c.astype(numpy.float64)))
        floor = 2e-6 * max(1.0, sizes[name])
        assert diff <= 3 * yardstick + floor, f"{name}: {diff:.3g} vs yardstick {yardstick:.3g}, floor {floor:.3g}"


def test_deterministic_mode_is_bitwise_reproducible():
    import cupy

    args, options = _inputs(2, 700, 650, 8, 1, 64, 64, numpy.dtype(numpy.float16), causal=True)
    args = [cupy.asarray(x) for x in args]
    first = [g.get() for g in cuflash.attention_backward(*args, deterministic=True, **options)]
    for _ in range(49):
        again = cuflash.attention_backward(*args, deterministic=True, **options)
        for a, b in zip(first, again):
            assert numpy.array_equal(a.view(numpy.uint16), b.get().view(numpy.uint16))


def test_fully_masked_rows_and_unseen_keys_get_zero_gradient(poisoned):
    # Bottom-right with Sq > Sk: queries 0..Sq-Sk-1 see no key. Top-left with Sq < Sk: keys >= Sq
    # are seen by no query.
    for Sq, Sk, alignment in ((300, 70, "bottom_right"), (70, 300, "top_left"), (5, 2, "bottom_right")):
        for deterministic in (False, True):
            args, options = _inputs(1, Sq, Sk, 2, 1, 64, 64, numpy.dtype(numpy.float32), causal=True,
                                    causal_alignment=alignment)
            dq, dk, dv = _check_against_reference(args, options, deterministic)
            assert numpy.isfinite(dq).all() and numpy.isfinite(dk).all() and numpy.isfinite(dv).all()
            if alignment == "bottom_right":
                assert not dq[:, : Sq - Sk].any()
            else:
                assert not dk[:, Sq:].any() and not dv[:, Sq:].any()


def test_no_keys_gives_zero_dq(poisoned):
    args, options = _inputs(1, 5, 0, 2, 1, 32, 32, numpy.dtype(numpy.float16))
    dq, dk, dv = cuflash.attention_backward(*args, backend="cuda", **options)
    assert dq.shape == (1, 5, 2, 32) and not dq.any() and dk.size == 0 and dv.size == 0


@pytest.mark.parametrize("deterministic", [False, True])
def test_strided_views_match_contiguous(deterministic):
    """BHSD data passed as transposed views, dout sliced from a wider array, and a head dim with
    stride 2 (the element-by-element load path) give the contiguous results."""
    import cupy

    args, options = _inputs(2, 150, 170, 4, 2, 64, 64, numpy.dtype(numpy.float16), causal=True)
    dout, q, k, v, out, lse = (cupy.asarray(x) for x in args)
    expect = [g.get() for g in cuflash.attention_backward(dout, q, k, v, out, lse, deterministic=True, **options)]

    def bhsd_view(x):
        return cupy.ascontiguousarray(x.transpose(0, 2, 1, 3)).transpose(0, 2, 1, 3)

    def wide(x):
        w = cupy.zeros(x.shape[:-1] + (2 * x.shape[-1],), dtype=x.dtype)
        w[..., ::2] = x
        return w[..., ::2]

    for make in (bhsd_view, wide):
        views = [make(x) for x in (dout, q, k, v, out)]
        got = cuflash.attention_backward(*views, lse, deterministic=deterministic, **options)
        for name, g, e in zip(("dq", "dk", "dv"), got, expect):
            if deterministic:
                assert numpy.array_equal(g.get(), e), f"{make.__name__}: {name}"
            else:
                numpy.testing.assert_allclose(g.get().astype(numpy.float32), e.astype(numpy.float32),
                                              rtol=2e-3, atol=2e-3, err_msg=f"{make.__name__}: {name}")


def test_many_heads_exceed_the_old_grid_limit(poisoned):
    # B * Hq = 70000 > 65535: the grid is one-dimensional, with no 65535 limit.
    args, options = _inputs(700, 3, 4, 100, 50, 8, 8, numpy.dtype(numpy.float16), causal=True)
    _check_against_reference(args, options)
