"""The sm_90a forward (kernels/fwd_sm90.cu, behind CUFLASH_SM90_FORWARD=1) against the float64
reference, itself, and the routing to the mma.sync kernel where a tensor map cannot serve.

Skipped unless the GPU has compute capability 9.0. Every test turns the development switch on and
records what ``forward_sm90.flash_forward_sm90`` answered, so a test of the new kernel fails if the
call silently took the old one. Accuracy: ``cuflash.testing.assert_attention_close`` (error at
most 2x that of a naive computation in the input dtype, plus a floor); outputs start as NaN (the
``poisoned`` fixture), so an element the kernel forgets to write fails.
"""

import numpy
import pytest

import cuflash
from cuflash._cuda import forward, forward_sm90, runtime
from cuflash.testing import assert_attention_close

from ..helpers import BFLOAT16, gpu_skip_reason, make_inputs


def _skip_reason():
    reason = gpu_skip_reason()
    if reason is not None:
        return f"no usable GPU: {reason}"
    major, minor = runtime.compute_capability()
    return None if (major, minor) == (9, 0) else f"compute capability {major}.{minor}: the kernel is built for sm_90a"


_SKIP = _skip_reason()
pytestmark = pytest.mark.skipif(_SKIP is not None, reason=_SKIP or "")

if _SKIP is None:
    import cupy

DTYPES = [numpy.dtype(numpy.float16)] + ([BFLOAT16] if BFLOAT16 is not None else [])


@pytest.fixture
def sm90(monkeypatch):
    """Turns the switch on; the list collects, per forward call, whether the sm_90a kernel ran."""
    monkeypatch.setenv(forward_sm90.ENV_FLAG, "1")
    ran = []

    def recording(*args):
        ran.append(forward_sm90.flash_forward_sm90(*args))
        return ran[-1]

    monkeypatch.setattr(forward, "flash_forward_sm90", recording)
    return ran


def run(q, k, v, **options):
    return cuflash.attention(q, k, v, return_lse=True, backend="cuda", **options)


def check(q, k, v, sm90, expect_sm90=True, **options):
    out, lse = run(q, k, v, **options)
    assert sm90 and all(sm90) == expect_sm90 and any(sm90) == expect_sm90, sm90
    host = [x.get() if hasattr(x, "get") else x for x in (q, k, v, out, lse)]
    slopes = options.pop("alibi_slopes", None)
    if slopes is not None:
        options["alibi_slopes"] = slopes.get() if hasattr(slopes, "get") else slopes
    assert_attention_close(host[3], host[0], host[1], host[2], lse=host[4], **options)
    return out, lse


# Lengths either side of the 128-row tiles, 1, and long enough for several trips round the ring.
SIZES = [(1, 1), (1, 300), (300, 1), (127, 129), (128, 128), (129, 257), (200, 1000), (1000, 200), (777, 777)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("D", [64, 128, 40, 96], ids=lambda d: f"d{d}")
@pytest.mark.parametrize("Sq, Sk", SIZES)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_matches_reference(Sq, Sk, D, dtype, causal, sm90, poisoned):
    rng = numpy.random.default_rng(Sq * 7 + Sk * 3 + D)
    q, k, v, _ = make_inputs(rng, 2, Sq, Sk, 3, 3, D, D, dtype)
    check(q, k, v, sm90, causal=causal)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(
    "options",
    [dict(causal=True, causal_alignment="top_left"), dict(window=(100, 0)), dict(window=(64, 200)),
     dict(window=(0, 0)), dict(causal=True, window=(300, 0)), dict(softcap=5.0), dict(softcap=30.0, causal=True),
     dict(alibi="head"), dict(alibi="batch_head", causal=True), dict(alibi="head", softcap=10.0, window=(150, 20)),
     dict(scale=-0.3), dict(scale=0.0)],
    ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()))
def test_features(options, dtype, sm90, poisoned):
    rng = numpy.random.default_rng(17)
    B, Sq, Sk, Hq, Hkv = 2, 333, 517, 4, 4
    q, k, v, _ = make_inputs(rng, B, Sq, Sk, Hq, Hkv, 128, 128, dtype)
    options = dict(options)
    alibi = options.pop("alibi", None)
    if alibi is not None:
        shape = (Hq,) if alibi == "head" else (B, Hq)
        options["alibi_slopes"] = rng.uniform(0.01, 0.5, shape).astype(numpy.float32)
    check(q, k, v, sm90, **options)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("Hq, Hkv", [(8, 2), (6, 1), (4, 4)])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_gqa(Hq, Hkv, causal, dtype, sm90, poisoned):
    rng = numpy.random.default_rng(Hq * 10 + Hkv)
    q, k, v, _ = make_inputs(rng, 2, 300, 450, Hq, Hkv, 64, 64, dtype)
    check(q, k, v, sm90, causal=causal)


@pytest.mark.parametrize("D, Dv", [(64, 128), (128, 64), (40, 72), (128, 8)])
def test_dv_differs_from_d(D, Dv, sm90, poisoned):
    rng = numpy.random.default_rng(D + Dv)
    q, k, v, _ = make_inputs(rng, 1, 200, 300, 2, 1, D, Dv, numpy.float16)
    check(q, k, v, sm90, causal=True)


def test_fully_masked_rows_are_zero_with_minus_inf_lse(sm90, poisoned):
    rng = numpy.random.default_rng(2)
    q, k, v, _ = make_inputs(rng, 2, 300, 70, 2, 1, 64, 64, numpy.float16)
    out, lse = check(q, k, v, sm90, causal=True)  # bottom-right: rows 0..229 see no key
    assert numpy.all(out[:, :230] == 0) and numpy.all(numpy.isneginf(lse[:, :, :230]))
    assert not numpy.isnan(out.astype(numpy.float32)).any() and not numpy.isnan(lse).any()


def test_strided_views_run_on_tensor_maps(sm90, poisoned):
    """q, k, v as views of one packed (B, S, 3, H, D) tensor: rows S-strided by 3 H D elements, all
    16-byte aligned, so the tensor maps carry the strides and nothing is copied."""
    rng = numpy.random.default_rng(4)
    qkv = cupy.asarray(rng.standard_normal((2, 260, 3, 4, 64)).astype(numpy.float16))
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    ok, reason = forward_sm90.route(_problem(q, k, v), q, k, v)
    assert ok, reason
    check(q, k, v, sm90, causal=True)


@pytest.mark.parametrize("layout", ["misaligned_base", "odd_row_stride", "head_dim_stride_2"])
def test_fallback_for_layouts_tma_cannot_describe(layout, sm90, poisoned):
    """A base or stride off the 16-byte grid, or a non-unit head-dim stride: the call goes to the
    mma.sync kernel (route says why) and is still right."""
    rng = numpy.random.default_rng(6)
    shape = (2, 150, 2, 64)
    if layout == "misaligned_base":
        q = cupy.asarray(rng.standard_normal((2, 150, 2, 72)).astype(numpy.float16))[..., 1:65]
    elif layout == "odd_row_stride":
        rows = cupy.asarray(rng.standard_normal((2, 150, 2 * 64 + 3)).astype(numpy.float16))
        q = cupy.lib.stride_tricks.as_strided(rows, shape, (rows.strides[0], rows.strides[1], 128, 2))
    else:
        q = cupy.asarray(rng.standard_normal((2, 150, 2, 128)).astype(numpy.float16))[..., ::2]
    k = cupy.asarray(rng.standard_normal(shape).astype(numpy.float16))
    v = cupy.asarray(rng.standard_normal(shape).astype(numpy.float16))
    ok, reason = forward_sm90.route(_problem(q, k, v), q, k, v)
    assert not ok and reason.startswith("q:"), reason
    check(q, k, v, sm90, expect_sm90=False, causal=True)


def test_switch_off_runs_the_mma_sync_kernel(sm90, monkeypatch):
    monkeypatch.delenv(forward_sm90.ENV_FLAG)
    rng = numpy.random.default_rng(8)
    q, k, v, _ = make_inputs(rng, 1, 100, 100, 2, 2, 64, 64, numpy.float16)
    check(q, k, v, sm90, expect_sm90=False)


@pytest.mark.parametrize("D", [64, 128])
def test_results_are_bitwise_identical_over_30_runs(D, sm90):
    rng = numpy.random.default_rng(9)
    q, k, v, _ = (cupy.asarray(x) for x in make_inputs(rng, 2, 1000, 1100, 4, 2, D, D, numpy.float16))
    first_out, first_lse = run(q, k, v, causal=True)
    for _ in range(29):
        out, lse = run(q, k, v, causal=True)
        assert cupy.array_equal(out.view(numpy.uint16), first_out.view(numpy.uint16))
        assert cupy.array_equal(lse.view(numpy.uint32), first_lse.view(numpy.uint32))
    assert all(sm90)


def test_sm90_agrees_with_mma_sync_kernel(sm90, monkeypatch):
    """Same problem through both kernels: both obey the rule, so they differ by at most twice its bound."""
    rng = numpy.random.default_rng(10)
    q, k, v, _ = (cupy.asarray(x) for x in make_inputs(rng, 2, 2048, 2048, 4, 4, 128, 128, numpy.float16))
    new_out, new_lse = run(q, k, v, causal=True)
    monkeypatch.delenv(forward_sm90.ENV_FLAG)
    old_out, old_lse = run(q, k, v, causal=True)
    assert sm90 == [True, False]
    numpy.testing.assert_allclose(new_lse.get(), old_lse.get(), rtol=1e-4, atol=1e-4)
    numpy.testing.assert_allclose(new_out.get().astype(numpy.float32), old_out.get().astype(numpy.float32),
                                  rtol=0, atol=4e-3)


def _problem(q, k, v, **options):
    from cuflash._problem import check_forward

    options = dict(dict(causal=False, causal_alignment="bottom_right", scale=None, backend="cuda"), **options)
    return check_forward(q, k, v, **options)
