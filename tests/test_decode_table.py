"""The decode kernels' table, split heuristic and parameter mirror, checked without a GPU.

What the GPU runs of these (accuracy, splits, paging, appends) is in tests/gpu/test_decode.py.
"""

import numpy
import pytest
from hypothesis import given, strategies as st

import cuflash
from cuflash._cuda import params, runtime, variants

from .test_compile_gate import PTXAS_STRICT, needs_nvrtc

H200_SMS = 132


def test_decode_tiles_fit_shared_memory_and_the_kernel_rules():
    for (fam, kind_name), table in variants.DECODE_TILES.items():
        assert kind_name == "16bit"
        assert sorted(table) == list(variants.HEAD_DIM_BUCKETS), (fam, sorted(table))
        for bucket, tile in table.items():
            where = (fam, bucket, tile)
            assert tile.smem_bytes(bucket) <= variants.SMEM_LIMITS[fam], where
            assert tile.block_n % (16 * tile.warps) == 0, where  # decode.cu: a multiple of 16 keys per warp
            assert 2 <= tile.stages <= 8 and 1 <= tile.warps <= 8, where
            assert tile.warps * 32 >= bucket // 8, where  # one thread per 16-byte chunk of a row
            # The merge of the warps' states reuses the K/V ring or is counted in the total.
            row = bucket * 2 + 16
            assert tile.smem_bytes(bucket) >= tile.block_m * row + 2 * tile.stages * tile.block_n * row, where


def test_every_decode_variant_is_in_the_compile_gate():
    for fam in variants.FAMILY_ARCHS:
        listed = variants.instantiations(fam)
        for entry in variants.decode_instantiations(fam):
            assert entry in listed, entry
    names = {(source, kernel) for source, kernel, _ in variants.instantiations()}
    assert {(variants.DECODE_SOURCE, variants.DECODE_KERNEL), (variants.COMBINE_SOURCE, variants.COMBINE_KERNEL),
            (variants.APPEND_SOURCE, variants.APPEND_KERNEL)} <= names


@pytest.mark.parametrize("fam", ["sm90", "sm80"])
def test_decode_tile_covers_every_head_dim_and_refuses_other_dtypes(fam):
    for d in range(1, 257):
        for name in variants.DECODE_DTYPES:
            tile, bucket = variants.decode_tile(fam, name, d, 1)
            assert bucket >= d and bucket in variants.HEAD_DIM_BUCKETS
            assert variants.decode_tile(fam, name, 1, d) == (tile, bucket)
            assert variants.decode_defines(tile, bucket, name, True, 0)["SMEM_BYTES"] == tile.smem_bytes(bucket)
    with pytest.raises(ValueError, match="float16, bfloat16"):
        variants.decode_tile(fam, "float32", 64, 64)


@given(ctas=st.integers(1, 4096), key_tiles=st.integers(0, 1 << 16), sms=st.sampled_from([16, 108, 132]),
       per_sm=st.integers(1, 4))
def test_split_count_is_bounded_and_keeps_splits_long(ctas, key_tiles, sms, per_sm):
    s = variants.decode_splits(ctas, key_tiles, sms, per_sm)
    assert 1 <= s <= variants.DECODE_MAX_SPLITS
    if s > 1:
        assert key_tiles // s >= variants.DECODE_MIN_TILES_PER_SPLIT
        assert ctas < 0.8 * sms * per_sm  # splitting only where the grid leaves CTA slots idle
    if ctas >= 0.8 * sms * per_sm:
        assert s == 1


@pytest.mark.parametrize("batch", [1, 2, 4])
@pytest.mark.parametrize("seqlen_k", [4096, 32768, 131072])
def test_split_count_fills_the_gpu_for_small_batches(batch, seqlen_k):
    """The benchmark's small-batch shapes (Hkv = 8, d = 128, bf16) on an H200: the split grid fills
    at least 80 % of the CTA slots in at most two waves, or takes every split the sequence allows."""
    tile, bucket = variants.decode_tile("sm90", "bfloat16", 128, 128)
    per_sm = tile.ctas_per_sm(bucket, "sm90")
    ctas = batch * 8
    key_tiles = seqlen_k // tile.block_n
    s = variants.decode_splits(ctas, key_tiles, H200_SMS, per_sm)
    slots = H200_SMS * per_sm
    most = min(variants.DECODE_MAX_SPLITS, key_tiles // variants.DECODE_MIN_TILES_PER_SPLIT)
    assert ctas * s >= 0.8 * slots or s == most
    assert ctas * s <= 2 * slots


def test_split_count_is_one_when_the_batch_fills_the_gpu():
    tile, bucket = variants.decode_tile("sm90", "bfloat16", 128, 128)
    per_sm = tile.ctas_per_sm(bucket, "sm90")
    assert variants.decode_splits(64 * 8, 131072 // tile.block_n, H200_SMS, per_sm) == 1


def test_parameter_mirrors_are_in_the_layout_checks():
    text = params.layout_asserts()
    for name in ("cuflash::DecodeParams", "cuflash::CombineParams", "cuflash::AppendParams"):
        assert f"sizeof({name}{{" in text, name
    assert params.DECODE.fields["fwd"][0] == params.FWD
    for fields, dtype in ((params.DECODE_POINTERS, params.DECODE), (params.COMBINE_POINTERS, params.COMBINE),
                          (params.APPEND_POINTERS, params.APPEND)):
        for field in fields:
            sub = dtype
            for part in field.split("."):
                sub = sub.fields[part][0]
            assert sub == numpy.dtype(numpy.uint64), field


def test_host_cache_with_backend_cuda_is_refused_before_any_work():
    """The GPU decode runs on GPU caches (appended to in place); a host cache with backend="cuda"
    is refused, naming why, and the cache is left unchanged."""
    rng = numpy.random.default_rng(0)
    q = rng.standard_normal((1, 1, 4, 16)).astype(numpy.float16)
    k_cache = rng.standard_normal((1, 8, 2, 16)).astype(numpy.float16)
    before = k_cache.copy()
    new = k_cache[:, :1].copy()
    with pytest.raises(cuflash.BackendUnavailableError, match="host memory"):
        cuflash.attention_with_kvcache(q, k_cache, k_cache.copy(), numpy.array([3], numpy.int32), k_new=new,
                                       v_new=new, backend="cuda")
    numpy.testing.assert_array_equal(k_cache, before)


def test_decode_refuses_more_packed_query_rows_than_an_int_indexes(monkeypatch):
    """Sq * group query rows of one (batch, kv head) are numbered by int in decode.cu: the kernel
    takes up to decode.MAX_PACKED_ROWS of them and refuses one more (q broadcast, no memory)."""
    from cuflash._cuda import decode
    from cuflash._problem import check_forward

    monkeypatch.setattr(runtime, "compute_capability", lambda device_id=None: (9, 0))
    group, D = 64, 16
    cache = numpy.zeros((1, 32, 1, D), numpy.float16)

    def problem(Sq):
        q = numpy.broadcast_to(numpy.zeros((1, 1, 1, D), numpy.float16), (1, Sq, group, D))
        return check_forward(q, cache, cache, causal=True, causal_alignment="bottom_right", scale=None, backend="cuda")

    assert decode.MAX_PACKED_ROWS % group == 0
    assert decode.supported(problem(decode.MAX_PACKED_ROWS // group)) == (True, "")
    ok, reason = decode.supported(problem(2**31 // group))
    assert not ok and "2147483648 packed query rows" in reason


@needs_nvrtc
@pytest.mark.parametrize("arch", ["sm_80", "sm_90a"])
def test_one_variant_of_each_decode_kernel_compiles_without_spills(arch):
    """A quick stand-in for the compile gate's full sweep: d = 128 bf16 decode (plain and with every
    score modifier on the element path), the merge and the append."""
    fam = "sm90" if arch == "sm_90a" else "sm80"
    tile, bucket = variants.decode_tile(fam, "bfloat16", 128, 128)
    jobs = [(variants.DECODE_SOURCE, variants.DECODE_KERNEL, variants.decode_defines(tile, bucket, "bfloat16", 1, 0)),
            (variants.DECODE_SOURCE, variants.DECODE_KERNEL, variants.decode_defines(tile, bucket, "bfloat16", 0, 3)),
            (variants.COMBINE_SOURCE, variants.COMBINE_KERNEL, variants.combine_defines("bfloat16")),
            (variants.APPEND_SOURCE, variants.APPEND_KERNEL, variants.append_defines(2))]
    for source, kernel, defines in jobs:
        runtime.compile_cubin(source, kernel, defines, arch, PTXAS_STRICT)
