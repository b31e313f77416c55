"""float64 on the GPU, what can be checked without one: the variant table covers float64 in every
bucket of both families with tiles that fit, every float64 lookup is an instantiation the compile
gate builds, the parameter records keep float64 precision, and ``backend="auto"`` routes float64
GPU operands to the CUDA kernels and float64 NumPy operands to the NumPy backend.
"""

import numpy
import pytest

import cuflash
from cuflash import _api, _dispatch
from cuflash._cuda import params, runtime, variants
from cuflash._problem import check_forward

# The families with float64 kernels (Turing has none: test_turing.py).
FAMILIES = tuple(f for f in variants.FAMILY_ARCHS if "float64" in variants.family_dtypes(f))


@pytest.mark.parametrize("family", FAMILIES)
def test_every_bucket_has_float64_tiles_that_fit(family):
    limit = variants.SMEM_LIMITS[family]
    fwd = variants.FWD_TILES[(family, "float64")]
    bwd = variants.BWD_TILES[(family, "float64")]
    assert tuple(sorted(fwd)) == tuple(sorted(bwd)) == variants.HEAD_DIM_BUCKETS
    for bucket in variants.HEAD_DIM_BUCKETS:
        tile = fwd[bucket]
        assert isinstance(tile, variants.F64FwdTile)
        assert tile.smem_bytes(bucket) == (tile.block_m + 4 * tile.block_n) * (8 * bucket + 16) <= limit
        assert tile.warps * 32 >= bucket // 2, "a CTA needs a thread per 16-byte chunk of a row"
        entry = bwd[bucket]
        assert isinstance(entry.dkdv, variants.F64RowsTile) and isinstance(entry.dq, variants.F64RowsTile)
        assert entry.dkdv.smem_bytes(bucket, 8, True, False) <= limit
        assert entry.dq.smem_bytes(bucket, 8, False, False) <= limit
        # The atomic dK/dV variant fits everywhere but the sm80 family at d = 256 (the launcher then
        # runs the dQ kernel).
        if family == "sm90" or bucket < 256:
            assert entry.dkdv.smem_bytes(bucket, 8, True, True) <= limit, (family, bucket)


@pytest.mark.parametrize("family", FAMILIES)
def test_every_float64_lookup_is_an_instantiation_the_gate_compiles(family):
    listed = {(source, kernel, tuple(sorted(defines.items())))
              for source, kernel, defines in variants.instantiations(family)}
    for bucket in variants.HEAD_DIM_BUCKETS:
        for mods in variants.SCORE_MOD_SETS:
            for vec in (True, False):
                tile, b = variants.fwd_tile(family, "float64", bucket, bucket, mods, vec)
                assert variants.fwd_source(tile) == variants.FWD_F64_SOURCE
                defines = variants.fwd_defines(tile, b, "float64", vec, mods)
                assert defines["DTYPE"] == 4
                assert (variants.FWD_F64_SOURCE, variants.FWD_KERNEL, tuple(sorted(defines.items()))) in listed
            entry, b = variants.bwd_entry(family, "float64", bucket, bucket, mods)
            for atomic in (True, False):
                tile = variants.dkdv_tile(family, "float64", b, mods, atomic)
                assert variants.dkdv_source(tile) == "kernels/bwd_dkdv_f64.cu"
                defines = variants.dkdv_defines(tile, b, "float64", atomic, mods)
                assert (variants.dkdv_source(tile), variants.DKDV_KERNEL, tuple(sorted(defines.items()))) in listed
            assert variants.dq_source(entry.dq) == variants.DQ_F64_SOURCE
            defines = variants.dq_defines(entry.dq, b, "float64", mods)
            assert (variants.DQ_F64_SOURCE, variants.DQ_KERNEL, tuple(sorted(defines.items()))) in listed
    aux = variants.aux_defines("float64")
    for kernel in (variants.PREPROCESS_KERNEL, variants.CONVERT_KERNEL):
        assert (variants.AUX_SOURCE, kernel, tuple(sorted(aux.items()))) in listed


def test_float64_is_its_own_kind():
    assert variants.kind("float64") == "float64" and variants.dtypes_of("float64") == ("float64",)
    assert variants.DTYPE_CODES["float64"] == 4 and variants.elem_bytes("float64") == 8
    assert variants.kind("float32") == "float32" and variants.kind("bfloat16") == "16bit"


def _problem(dtype, **options):
    q = numpy.zeros((2, 33, 4, 40), dtype)
    k = numpy.zeros((2, 50, 2, 40), dtype)
    return check_forward(q, k, k, causal=False, causal_alignment="bottom_right", scale=options.pop("scale", None),
                         backend="auto", **options)


class _Device:
    """Stands in for a CuPy array: what the parameter builders read (pointer, strides, itemsize)."""

    def __init__(self, array, ptr):
        self.data = type("Data", (), {"ptr": ptr})()
        self.strides, self.itemsize = array.strides, array.itemsize


def test_float64_records_keep_double_precision_and_mirror_the_double_structs():
    problem = _problem(numpy.float64, scale=0.1, softcap=3.0)
    x = _Device(numpy.empty((2, 33, 4, 40)), 16)
    lse = _Device(numpy.empty((2, 4, 33)), 32)
    record = params.forward(problem, x, x, x, x, lse, None, 1, True)
    assert record.dtype == params.FWD64
    assert record["scale"] == 0.1 and record["scale_log2"] == 0.1 * 1.4426950408889634
    assert record["softcap_in"] == 0.1 / 3.0
    for field in ("scale", "scale_log2", "softcap_in", "softcap_out"):
        assert params.FWD64.fields[field][0] == numpy.float64 and params.FWD.fields[field][0] == numpy.float32
    backward = params.backward(record, x, None, None, None, x, x, x, params.strides(x), params.strides(x), 0, 0,
                               128, 1, 1, 3, True, False)
    assert backward.dtype == params.BWD64 and backward["fwd"]["scale"] == 0.1
    assert params.forward(_problem(numpy.float32), x, x, x, x, lse, None, 1, True).dtype == params.FWD
    asserts = params.layout_asserts()
    assert "cuflash::FwdParamsOf<double>" in asserts and "cuflash::BwdParamsOf<double>" in asserts


@pytest.fixture
def fake_gpu(monkeypatch):
    """A CUDA backend that reports itself usable on a compute capability 9.0 GPU (no GPU is
    touched), with the API's plan cache emptied so that no plan made under it outlives the test."""
    monkeypatch.setattr(runtime, "gpu_available", lambda: (True, "a stand-in GPU"))
    monkeypatch.setattr(runtime, "compute_capability", lambda device_id=None: (9, 0))
    monkeypatch.setattr(_api, "_PLANS", {})


def test_auto_routes_float64_by_where_the_operands_live(fake_gpu):
    problem = _problem(numpy.float64)
    chosen = _dispatch.select("auto", problem)
    assert isinstance(chosen, _dispatch.Float64Auto)
    assert chosen._backend(numpy.zeros(1)) is _dispatch.BACKENDS["numpy"]
    assert chosen._backend(object()) is _dispatch.BACKENDS["cuda"]  # CuPy arrays are not NumPy arrays
    assert _dispatch.select("cuda", problem) is _dispatch.BACKENDS["cuda"]
    assert _dispatch.select("auto", _problem(numpy.float32)) is _dispatch.BACKENDS["cuda"]


def test_float64_numpy_operands_under_auto_run_on_the_numpy_backend(fake_gpu):
    rng = numpy.random.default_rng(0)
    q, k, v = (rng.standard_normal((1, 20, 2, 16)) for _ in range(3))
    out, lse = cuflash.attention(q, k, v, causal=True, return_lse=True)
    ref_out, ref_lse = cuflash.reference.attention(q, k, v, causal=True)
    assert isinstance(out, numpy.ndarray) and out.dtype == numpy.float64 and lse.dtype == numpy.float64
    numpy.testing.assert_allclose(out, ref_out, rtol=0, atol=1e-13)
