"""Turing (compute capability 7.5, the "sm75" family), what can be checked without a GPU: the
family's tables fit 64 KiB of shared memory and 1024 threads an SM, its variants are float16 only
and all carry TURING, the lookups and the dispatcher refuse what Turing has no kernel for (other
dtypes; the backward past d = 224) with the dtype or head dim and the compute capability in the
message, backend="auto" runs those calls on the NumPy backend, and one variant of each kernel
compiles for sm_75 (the compile gate builds them all: ``pytest tests/test_compile_gate.py -k sm75``).

What the GPU runs of it, with the family forced on a newer GPU, is tests/gpu/test_turing.py.
"""

import numpy
import pytest

import cuflash
from cuflash import _api, _dispatch
from cuflash._cuda import decode, runtime, variants
from cuflash._errors import BackendUnavailableError
from cuflash._problem import check_forward

from .helpers import BFLOAT16
from .test_compile_gate import PTXAS_STRICT, needs_nvrtc

TURING_LIMIT = 64 * 1024
NOT_ON_TURING = ("bfloat16", "float32", "float64")


def test_compute_capability_7_5_is_the_sm75_family():
    assert variants.family(7, 5) == "sm75"
    assert variants.family(9, 0) == "sm90"
    assert {variants.family(*cc) for cc in ((8, 0), (8, 6), (8, 9), (10, 0), (12, 0))} == {"sm80"}
    assert variants.FAMILY_ARCHS["sm75"] == ("sm_75",) and variants.SMEM_LIMITS["sm75"] == TURING_LIMIT
    assert variants.family_dtypes("sm75") == ("float16",)
    assert variants.family_defines("sm75") == {"TURING": 1}
    assert variants.family_defines("sm80") == variants.family_defines("sm90") == {}


def _sm75_tiles():
    """(where, tile, shared memory bytes) of every sm75 tile: the tables, the spill tables and the
    element-wise forward tiles."""
    out = []
    for bucket, tile in variants.FWD_TILES[("sm75", "16bit")].items():
        for t in (tile, tile.element_wise()):
            out.append((("fwd", bucket), t, t.smem_bytes(bucket, 2)))
    for bucket, entry in variants.BWD_TILES[("sm75", "16bit")].items():
        for atomic in (True, False):
            out.append((("dkdv", bucket, atomic), entry.dkdv, entry.dkdv.smem_bytes(bucket, 2, True, atomic)))
        out.append((("dq", bucket), entry.dq, entry.dq.smem_bytes(bucket, 2, False, False)))
    for bucket, tile in variants.DECODE_TILES[("sm75", "16bit")].items():
        out.append((("decode", bucket), tile, tile.smem_bytes(bucket)))
    for table in (variants.FWD_SPILL_TILES, variants.RAGGED_FWD_SPILL_TILES):
        for key, tile in table.items():
            if key[0] == "sm75":
                out.append((key, tile, tile.smem_bytes(key[2], 2)))
    for table in (variants.BWD_SPILL_TILES, variants.RAGGED_SPILL_TILES):
        for key, tile in table.items():
            if key[0] == "sm75":
                role = key[4]
                out.append((key, tile, tile.smem_bytes(key[2], 2, role != "dq", role == "dkdv_atomic")))
    return out


def test_turing_tiles_fit_64_kib_and_1024_threads_an_sm():
    tiles = _sm75_tiles()
    assert len(tiles) > 40
    for where, tile, smem in tiles:
        assert smem <= TURING_LIMIT, (where, tile, smem)
        # __launch_bounds__(threads, MIN_BLOCKS) must be achievable: Turing holds 1024 threads an SM.
        assert tile.warps * 32 * tile.min_blocks <= variants.SM_THREADS["sm75"] == 1024, (where, tile)
        if getattr(tile, "max_regs", 0):
            assert tile.warps * 32 * tile.max_regs <= 65536, (where, tile)


def test_launch_bounds_are_achievable_in_every_family():
    for (family, _), table in variants.FWD_TILES.items():
        for tile in table.values():
            assert tile.max_regs or tile.warps * 32 * tile.min_blocks <= variants.SM_THREADS[family], (family, tile)
    for (family, _), table in variants.BWD_TILES.items():
        for entry in table.values():
            for tile in (entry.dkdv, entry.dq):
                assert tile.warps * 32 * tile.min_blocks <= variants.SM_THREADS[family], (family, tile)
    for (family, _), table in variants.DECODE_TILES.items():
        for tile in table.values():
            assert tile.warps * 32 * tile.min_blocks <= variants.SM_THREADS[family], (family, tile)


def test_turing_tables_cover_float16_and_say_what_they_do_not():
    assert {key for key in variants.FWD_TILES if key[0] == "sm75"} == {("sm75", "16bit")}
    assert {key for key in variants.BWD_TILES if key[0] == "sm75"} == {("sm75", "16bit")}
    assert tuple(sorted(variants.FWD_TILES[("sm75", "16bit")])) == variants.HEAD_DIM_BUCKETS
    assert tuple(sorted(variants.DECODE_TILES[("sm75", "16bit")])) == variants.HEAD_DIM_BUCKETS
    # The backward stops at 224: d = 256 has no dK/dV tile that fits without spilling.
    assert max(variants.BWD_TILES[("sm75", "16bit")]) == 224
    assert tuple(sorted(variants.BWD_TILES[("sm75", "16bit")])) == variants.HEAD_DIM_BUCKETS[:-1]


def test_every_turing_variant_is_float16_and_carries_turing():
    listed = variants.instantiations("sm75")
    kernels = {(source, kernel) for source, kernel, _ in listed}
    assert kernels == {
        (variants.FWD_SOURCE, variants.FWD_KERNEL), ("kernels/bwd_dkdv_sm80.cu", variants.DKDV_KERNEL),
        (variants.DQ_SOURCE, variants.DQ_KERNEL), (variants.AUX_SOURCE, variants.PREPROCESS_KERNEL),
        (variants.AUX_SOURCE, variants.CONVERT_KERNEL), (variants.DECODE_SOURCE, variants.DECODE_KERNEL),
        (variants.COMBINE_SOURCE, variants.COMBINE_KERNEL), (variants.APPEND_SOURCE, variants.APPEND_KERNEL)}
    for source, kernel, defines in listed:
        assert defines["TURING"] == 1, (source, defines)
        assert defines.get("DTYPE", variants.DTYPE_CODES["float16"]) == variants.DTYPE_CODES["float16"], defines
        if "HEAD_DIM" in defines and source != variants.DECODE_SOURCE and kernel != variants.FWD_KERNEL:
            assert defines["HEAD_DIM"] <= 224, defines
    # Both load paths, every score modifier, dense and ragged, for every forward bucket.
    fwd = {(d["HEAD_DIM"], d["VEC_LOAD"], d["SCORE_MODS"], d["SEQ_MODE"])
           for _, kernel, d in listed if kernel == variants.FWD_KERNEL}
    assert len(fwd) == len(variants.HEAD_DIM_BUCKETS) * 2 * 4 * 2
    for family in ("sm80", "sm90"):
        assert not [d for _, _, d in variants.instantiations(family) if "TURING" in d]


@pytest.mark.parametrize("dtype_name", NOT_ON_TURING)
def test_lookups_refuse_other_dtypes_on_turing(dtype_name):
    message = rf"compute capability 7\.5 \(Turing\).*float16 only, not {dtype_name}"
    with pytest.raises(BackendUnavailableError, match=message):
        variants.fwd_tile("sm75", dtype_name, 64, 64)
    with pytest.raises(BackendUnavailableError, match=message):
        variants.bwd_entry("sm75", dtype_name, 64, 64)
    with pytest.raises(BackendUnavailableError, match=message):
        variants.dkdv_tile("sm75", dtype_name, 64, 0, True)
    if dtype_name == "bfloat16":
        with pytest.raises(BackendUnavailableError, match=message):
            variants.decode_tile("sm75", dtype_name, 64, 64)


def test_turing_backward_stops_at_head_dim_224():
    assert variants.bwd_entry("sm75", "float16", 224, 200)[1] == 224
    for d, dv in ((225, 64), (64, 256), (256, 256)):
        assert variants.unserved("sm75", "float16", d, dv) is None  # the forward runs
        reason = variants.unserved("sm75", "float16", d, dv, backward=True)
        assert reason and "head dims up to 224, not" in reason and "7.5" in reason
        with pytest.raises(BackendUnavailableError, match="head dims up to 224"):
            variants.bwd_entry("sm75", "float16", d, dv)
    assert variants.unserved("sm80", "bfloat16", 256, 256, backward=True) is None


@pytest.fixture
def turing(monkeypatch):
    """A usable stand-in GPU of compute capability 7.5 (no GPU is touched), with the API's plan
    cache emptied so that no plan made under it outlives the test."""
    monkeypatch.setattr(runtime, "gpu_available", lambda: (True, "a stand-in Tesla T4"))
    monkeypatch.setattr(runtime, "compute_capability", lambda device_id=None: (7, 5))
    monkeypatch.setattr(_api, "_PLANS", {})


def _host_dtypes():
    return [numpy.dtype(numpy.float32), numpy.dtype(numpy.float64)] + ([BFLOAT16] if BFLOAT16 is not None else [])


def _inputs(dtype, d=16, seed=0):
    rng = numpy.random.default_rng(seed)
    return [rng.standard_normal((1, 20, 2, d)).astype(dtype) for _ in range(4)]


def _problem(dtype, d=16):
    q = numpy.zeros((1, 20, 2, d), dtype)
    return check_forward(q, q, q, causal=False, causal_alignment="bottom_right", scale=None, backend="auto")


@pytest.mark.parametrize("dtype", _host_dtypes(), ids=str)
def test_backend_cuda_refuses_other_dtypes_on_turing_naming_both(turing, dtype):
    q, k, v, dout = _inputs(dtype)
    message = rf"backend='cuda' cannot run this call: on compute capability 7\.5 \(Turing\).*not {dtype.name}"
    with pytest.raises(BackendUnavailableError, match=message):
        cuflash.attention(q, k, v, backend="cuda")
    out, lse = cuflash.attention(q, k, v, return_lse=True, backend="numpy")
    with pytest.raises(BackendUnavailableError, match=message):
        cuflash.attention_backward(dout, q, k, v, out, lse, backend="cuda")
    with pytest.raises(BackendUnavailableError, match=rf"7\.5 \(Turing\).*not {dtype.name}"):
        cuflash.attention_varlen(q[0], k[0], v[0], numpy.array([0, 20], numpy.int32),
                                 numpy.array([0, 20], numpy.int32), backend="cuda")


@pytest.mark.parametrize("dtype", _host_dtypes(), ids=str)
def test_auto_runs_other_dtypes_on_the_numpy_backend_on_turing(turing, dtype):
    problem = _problem(dtype)
    assert _dispatch.select("auto", problem) is _dispatch.BACKENDS["numpy"]
    assert _dispatch.select("auto", problem, backward=True) is _dispatch.BACKENDS["numpy"]
    q, k, v, dout = _inputs(dtype, seed=1)
    out, lse = cuflash.attention(q, k, v, causal=True, return_lse=True)
    expected_out, expected_lse = cuflash.attention(q, k, v, causal=True, return_lse=True, backend="numpy")
    assert isinstance(out, numpy.ndarray) and out.dtype == dtype
    numpy.testing.assert_array_equal(out, expected_out)
    numpy.testing.assert_array_equal(lse, expected_lse)
    grads = cuflash.attention_backward(dout, q, k, v, out, lse, causal=True)
    for got, expected in zip(grads, cuflash.attention_backward(dout, q, k, v, out, lse, causal=True, backend="numpy")):
        numpy.testing.assert_array_equal(got, expected)


def test_float16_goes_to_the_kernels_on_turing_and_the_backward_up_to_224(turing):
    assert _dispatch.select("auto", _problem(numpy.float16)) is _dispatch.BACKENDS["cuda"]
    assert _dispatch.select("auto", _problem(numpy.float16, 224), backward=True) is _dispatch.BACKENDS["cuda"]
    wide = _problem(numpy.float16, 256)
    assert _dispatch.select("auto", wide) is _dispatch.BACKENDS["cuda"]
    assert _dispatch.select("auto", wide, backward=True) is _dispatch.BACKENDS["numpy"]
    with pytest.raises(BackendUnavailableError, match="backward kernels take head dims up to 224, not 256"):
        _dispatch.select("cuda", wide, backward=True)
    q, k, v, dout = _inputs(numpy.float16, 256, seed=2)
    out, lse = cuflash.attention(q, k, v, return_lse=True, backend="numpy")
    with pytest.raises(BackendUnavailableError, match="compute capability 7.5 .*head dims up to 224, not 256"):
        cuflash.attention_backward(dout, q, k, v, out, lse, backend="cuda")
    grads = cuflash.attention_backward(dout, q, k, v, out, lse)  # auto: the NumPy backend
    for got, expected in zip(grads, cuflash.attention_backward(dout, q, k, v, out, lse, backend="numpy")):
        numpy.testing.assert_array_equal(got, expected)


@pytest.mark.skipif(BFLOAT16 is None, reason="bfloat16 host arrays need ml_dtypes")
def test_turing_decode_takes_float16_caches_only(turing):
    assert decode.supported(_problem(numpy.float16)) == (True, "")
    ok, reason = decode.supported(_problem(BFLOAT16))
    assert not ok and "7.5 (Turing)" in reason and "bfloat16" in reason


def test_turing_gets_sm_75_from_nvrtc():
    assert runtime.arch_options(7, 5) == ("-arch=sm_75",)
    assert runtime.arch_options(9, 0) == ("-arch=sm_90a",) and runtime.arch_options(8, 6) == ()


@needs_nvrtc  # gpu_available loads NVRTC once it accepts the device
@pytest.mark.parametrize("cc, usable", [((7, 5), True), ((7, 0), False), ((6, 1), False), ((8, 0), True)])
def test_gpu_available_accepts_compute_capability_7_5(monkeypatch, cc, usable):
    import cupy

    monkeypatch.setattr(cupy.cuda.runtime, "getDeviceCount", lambda: 1)
    monkeypatch.setattr(cupy.cuda.runtime, "getDevice", lambda: 0)
    monkeypatch.setattr(cupy.cuda.runtime, "getDeviceProperties",
                        lambda device: {"major": cc[0], "minor": cc[1], "name": b"A stand-in GPU"})
    available, reason = runtime.gpu_available.__wrapped__()
    assert available == usable, reason
    if not usable:
        assert f"compute capability {cc[0]}.{cc[1]}" in reason and "7.5 or newer" in reason


def _quick_jobs():
    """One variant of each sm75 kernel: d = 64 forward on both load paths (one with every score
    modifier), the backward's four kernels, decode with ALiBi, the merge and the append."""
    fwd, _ = variants.fwd_tile("sm75", "float16", 64, 64)
    entry, _ = variants.bwd_entry("sm75", "float16", 64, 64)
    dec, _ = variants.decode_tile("sm75", "float16", 128, 128)
    jobs = [(variants.FWD_SOURCE, variants.FWD_KERNEL, variants.fwd_defines(fwd, 64, "float16", 1, 0)),
            (variants.FWD_SOURCE, variants.FWD_KERNEL, variants.fwd_defines(fwd.element_wise(), 64, "float16", 0, 3)),
            (variants.dkdv_source(entry.dkdv), variants.DKDV_KERNEL,
             variants.dkdv_defines(entry.dkdv, 64, "float16", True, 0)),
            (variants.DQ_SOURCE, variants.DQ_KERNEL, variants.dq_defines(entry.dq, 64, "float16", 0)),
            (variants.AUX_SOURCE, variants.PREPROCESS_KERNEL, variants.aux_defines("float16")),
            (variants.AUX_SOURCE, variants.CONVERT_KERNEL, variants.aux_defines("float16")),
            (variants.DECODE_SOURCE, variants.DECODE_KERNEL, variants.decode_defines(dec, 128, "float16", 1, 2)),
            (variants.COMBINE_SOURCE, variants.COMBINE_KERNEL, variants.combine_defines("float16")),
            (variants.APPEND_SOURCE, variants.APPEND_KERNEL, variants.append_defines(2))]
    return [(source, kernel, {**defines, **variants.family_defines("sm75")}) for source, kernel, defines in jobs]


@needs_nvrtc
def test_one_variant_of_each_turing_kernel_compiles_for_sm_75_without_spills():
    """A quick stand-in for the compile gate's sm75 sweep."""
    listed = variants.instantiations("sm75")
    for source, kernel, defines in _quick_jobs():
        assert (source, kernel, defines) in listed
        runtime.compile_cubin(source, kernel, defines, "sm_75", PTXAS_STRICT)


@needs_nvrtc
def test_turing_variants_need_the_family_define_and_float16():
    """Built for sm_75 without TURING, a kernel stops with an error that says so; under TURING the
    bfloat16 products do not exist, on any architecture."""
    source, kernel, defines = _quick_jobs()[0]
    without = {name: value for name, value in defines.items() if name != "TURING"}
    with pytest.raises(cuflash.KernelCompileError, match="TURING must be 1"):
        runtime.compile_cubin(source, kernel, without, "sm_75")
    bf16 = {**defines, "DTYPE": variants.DTYPE_CODES["bfloat16"]}
    with pytest.raises(cuflash.KernelCompileError, match="mma_m16n8k16"):
        runtime.compile_cubin(source, kernel, bf16, "sm_80")
