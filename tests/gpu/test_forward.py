"""The CUDA forward kernel against the float64 reference, the NumPy backend, and itself.

Skipped as a whole when no usable GPU is present. Accuracy follows FlashAttention's rule (see
cuflash.testing): max error at most 2x that of a naive computation in the input dtype, plus a
small floor. Outputs of the dispatcher are NaN-filled first (the ``poisoned`` fixture), so an
element the kernel forgets to write fails.
"""

import numpy
import pytest
from hypothesis import HealthCheck, given, settings

import cuflash
from cuflash._cuda import forward, runtime, variants
from cuflash._errors import BackendUnavailableError
from cuflash._problem import check_forward
from cuflash.testing import assert_attention_close, attention_problems

from ..helpers import BFLOAT16, assert_close, gpu_skip_reason, make_inputs, naive_same_dtype

_SKIP = gpu_skip_reason()
pytestmark = pytest.mark.skipif(_SKIP is not None, reason=f"no usable GPU: {_SKIP}")

if _SKIP is None:
    import cupy

GPU_DTYPES = [numpy.dtype(numpy.float16), numpy.dtype(numpy.float32)] + ([BFLOAT16] if BFLOAT16 is not None else [])
# Drawn often: lengths either side of tile edges, Sk = 0 (every row fully masked), and 200.
LENGTHS = [0, 1, 2, 16, 17, 63, 64, 65, 127, 128, 129, 200]


def check_against_reference(q, k, v, out, lse, **options):
    """``out``/``lse`` (host arrays) obey the accuracy rule on inputs q, k, v (host arrays)."""
    assert_attention_close(out, q, k, v, lse=lse, **options)


def run_gpu(q, k, v, **options):
    """cuflash.attention on the CUDA backend with host inputs; host (out, lse) back."""
    return cuflash.attention(q, k, v, return_lse=True, backend="cuda", **options)


@settings(suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(problem=attention_problems(dtypes=GPU_DTYPES, max_seqlen=300, lengths=LENGTHS, group_sizes=(1, 2, 4),
                                  features={"causal", "top_left", "scale"}, layouts=("contiguous",),
                                  scale_range=(0.01, 1.0)))
def test_forward_matches_reference(problem, poisoned):
    p = problem
    out, lse = run_gpu(p.q, p.k, p.v, **p.options)
    check_against_reference(p.q, p.k, p.v, out, lse, **p.options)


@pytest.mark.parametrize("dtype", GPU_DTYPES, ids=str)
@pytest.mark.parametrize(
    "Sq, Sk, D",
    [(1, 1, 40), (17, 17, 59), (113, 113, 111), (1023, 1023, 200), (1025, 1025, 256),
     (113, 1025, 64), (1025, 113, 128), (1, 1023, 59), (1023, 1, 40)],
)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_awkward_sizes(Sq, Sk, D, dtype, causal, poisoned):
    rng = numpy.random.default_rng(Sq * 7 + Sk * 3 + D)
    q, k, v, _ = make_inputs(rng, 1, Sq, Sk, 2, 1, D, D, dtype)
    out, lse = run_gpu(q, k, v, causal=causal)
    check_against_reference(q, k, v, out, lse, causal=causal)


@pytest.mark.parametrize("scale", [-0.3, 0.0, 2.5])
@pytest.mark.parametrize("dtype", GPU_DTYPES, ids=str)
def test_negative_zero_and_large_scales(scale, dtype, poisoned):
    """Unmasked tiles fold the scale into exp2 and take the row max as scale * max S, which for a
    negative scale is scale * min S; masked tiles scale first. Both must agree with the reference."""
    rng = numpy.random.default_rng(12)
    q, k, v, _ = make_inputs(rng, 1, 300, 333, 2, 1, 64, 64, dtype)
    for causal in (False, True):
        out, lse = run_gpu(q, k, v, causal=causal, scale=scale)
        check_against_reference(q, k, v, out, lse, causal=causal, scale=scale)


@pytest.mark.parametrize("dtype", GPU_DTYPES, ids=str)
def test_gpu_agrees_with_numpy_backend(dtype):
    rng = numpy.random.default_rng(11)
    q, k, v, _ = make_inputs(rng, 2, 130, 257, 6, 2, 72, 40, dtype)
    ref_out, _ = cuflash.reference.attention(q, k, v, causal=True)
    naive = naive_same_dtype(q, k, v, numpy.zeros(ref_out.shape, dtype), causal=True)[0]
    gpu_out, gpu_lse = run_gpu(q, k, v, causal=True)
    cpu_out, cpu_lse = cuflash.attention(q, k, v, causal=True, return_lse=True, backend="numpy")
    # Both backends obey the rule, so they differ by at most twice its bound.
    assert_close("gpu vs numpy", gpu_out, cpu_out.astype(numpy.float64), naive, dtype, factor=4.0)
    numpy.testing.assert_allclose(gpu_lse, cpu_lse, rtol=2e-5, atol=2e-5)


def test_more_than_65535_heads():
    """B * Hq beyond the 65535 limit of gridDim.y/z: every head is computed and written."""
    rng = numpy.random.default_rng(5)
    q, k, v, _ = make_inputs(rng, 2, 5, 7, 33000, 33000, 8, 8, numpy.float16)
    out, lse = run_gpu(q, k, v, causal=True)
    check_against_reference(q, k, v, out, lse, causal=True)


def test_fully_masked_rows_are_zero_with_minus_inf_lse(poisoned):
    rng = numpy.random.default_rng(2)
    q, k, v, _ = make_inputs(rng, 2, 200, 70, 2, 1, 64, 64, numpy.float16)
    out, lse = run_gpu(q, k, v, causal=True)  # bottom-right: rows 0..129 see no key
    assert numpy.all(out[:, :130] == 0) and numpy.all(numpy.isneginf(lse[:, :, :130]))
    assert not numpy.isnan(out.astype(numpy.float32)).any() and not numpy.isnan(lse).any()
    check_against_reference(q, k, v, out, lse, causal=True)
    out, lse = run_gpu(q, k[:, :0], v[:, :0])  # Sk = 0: every row fully masked
    assert numpy.all(out == 0) and numpy.all(numpy.isneginf(lse))


def test_results_are_bitwise_identical_over_20_runs():
    rng = numpy.random.default_rng(9)
    q, k, v, _ = (cupy.asarray(x) for x in make_inputs(rng, 2, 1000, 1100, 4, 2, 128, 128, numpy.float16))
    first_out, first_lse = cuflash.attention(q, k, v, causal=True, return_lse=True, backend="cuda")
    for _ in range(19):
        out, lse = cuflash.attention(q, k, v, causal=True, return_lse=True, backend="cuda")
        assert cupy.array_equal(out.view(numpy.uint16), first_out.view(numpy.uint16))
        assert cupy.array_equal(lse.view(numpy.uint32), first_lse.view(numpy.uint32))


@pytest.mark.parametrize("dtype", GPU_DTYPES, ids=str)
def test_strided_layouts(dtype):
    """An odd D (rows not a whole number of 16-byte chunks) takes the element-wise loading path in
    every layout: contiguous, BHSD storage, a stride-2 head dim, rows padded to 16 bytes; the same
    kernel, so the same bits (the load path follows the shape, never the layout)."""
    rng = numpy.random.default_rng(4)
    host = make_inputs(rng, 2, 77, 90, 4, 2, 59, 59, dtype)[:3]
    q, k, v = (cupy.asarray(x) for x in host)
    ref_out, ref_lse = cuflash.attention(q, k, v, causal=True, return_lse=True, backend="cuda")

    def stride2(x):
        wide = cupy.zeros(x.shape[:-1] + (2 * x.shape[-1],), x.dtype)
        wide[..., ::2] = x
        return wide[..., ::2]

    def bhsd(x):
        return cupy.ascontiguousarray(x.transpose(0, 2, 1, 3)).transpose(0, 2, 1, 3)

    def padded(x):
        wide = cupy.zeros(x.shape[:-1] + (64,), x.dtype)
        wide[..., :59] = x
        return wide[..., :59]

    for layout in (stride2, bhsd, padded):
        out, lse = cuflash.attention(*(layout(x) for x in (q, k, v)), causal=True, return_lse=True, backend="cuda")
        assert cupy.array_equal(out.astype(numpy.float32), ref_out.astype(numpy.float32)), layout.__name__
        assert cupy.array_equal(lse, ref_lse), layout.__name__
    check_against_reference(*host, ref_out.get(), ref_lse.get(), causal=True)


def test_strided_output_is_fully_written():
    rng = numpy.random.default_rng(8)
    q, k, v, _ = (cupy.asarray(x) for x in make_inputs(rng, 1, 65, 65, 2, 2, 40, 40, numpy.float16))
    problem = check_forward(q, k, v, causal=False, causal_alignment="bottom_right", scale=None, backend="cuda")
    expected, expected_lse = cuflash.attention(q, k, v, return_lse=True, backend="cuda")
    out = cupy.full((1, 2, 65, 40), numpy.nan, numpy.float16).transpose(0, 2, 1, 3)  # BHSD storage
    lse = cupy.full((1, 2, 65), numpy.nan, numpy.float32)
    forward.flash_forward(q, k, v, None, out, lse, problem)
    assert cupy.array_equal(out, expected) and cupy.array_equal(lse, expected_lse)


def test_runs_on_the_current_non_default_stream():
    rng = numpy.random.default_rng(6)
    q, k, v, _ = (cupy.asarray(x) for x in make_inputs(rng, 2, 600, 600, 4, 4, 64, 64, numpy.float16))
    expected = cuflash.attention(q, k, v, causal=True, backend="cuda")
    cupy.cuda.Device().synchronize()
    stream = cupy.cuda.Stream(non_blocking=True)
    with stream:
        out = cuflash.attention(q, k, v, causal=True, backend="cuda")
        stream.synchronize()
    assert cupy.array_equal(out, expected)


@pytest.mark.skipif(_SKIP is None and cupy.cuda.runtime.getDeviceCount() < 2, reason="needs a second GPU")
def test_arrays_on_a_non_zero_device():
    rng = numpy.random.default_rng(10)
    q, k, v, _ = make_inputs(rng, 1, 100, 90, 2, 1, 64, 64, numpy.float16)
    with cupy.cuda.Device(1):
        qd, kd, vd = (cupy.asarray(x) for x in (q, k, v))
    out, lse = cuflash.attention(qd, kd, vd, causal=True, return_lse=True, backend="cuda")
    assert out.device.id == 1
    check_against_reference(q, k, v, out.get(), lse.get(), causal=True)


def test_float64_is_refused_by_the_kernel_launcher():
    q = cupy.zeros((1, 4, 1, 8), numpy.float64)
    problem = check_forward(q, q, q, causal=False, causal_alignment="bottom_right", scale=None, backend="cuda")
    with pytest.raises(BackendUnavailableError, match="float64"):
        forward.flash_forward(q, q, q, None, cupy.empty_like(q), cupy.empty((1, 1, 4), numpy.float32), problem)


def test_compile_errors_name_the_kernel():
    with pytest.raises(cuflash.KernelCompileError, match="flash_fwd"):
        runtime.get_kernel(variants.FWD_SOURCE, variants.FWD_KERNEL, {"HEAD_DIM": 48})


@pytest.mark.parametrize("family", ["sm80", "sm90"])
@pytest.mark.parametrize("bucket", variants.HEAD_DIM_BUCKETS)
@pytest.mark.parametrize("dtype", GPU_DTYPES, ids=str)
def test_every_table_entry_matches_reference(family, bucket, dtype, poisoned, monkeypatch):
    """Each tile of both architecture families' forward tables (the sm80 family's run here on
    whatever GPU this is): full and tail tiles, causal, GQA, D at the bucket's top."""
    if family == "sm90" and runtime.compute_capability()[0] != 9:
        pytest.skip("sm90 entries use sm_90a instructions")
    monkeypatch.setattr(variants, "family", lambda major, minor: family)
    rng = numpy.random.default_rng(bucket)
    q, k, v, _ = make_inputs(rng, 1, 300, 257, 4, 2, bucket, bucket, dtype)
    for causal in (False, True):
        out, lse = run_gpu(q, k, v, causal=causal)
        check_against_reference(q, k, v, out, lse, causal=causal)
