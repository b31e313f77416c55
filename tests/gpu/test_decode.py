"""The GPU decoding kernels (kernels/append.cu, decode.cu, combine.cu) against the reference and themselves.

Skipped as a whole without a usable GPU. A cache call on GPU caches of float16 or bfloat16 runs
the append, the split-KV decode and the merge (``cuflash/_cuda/decode.py``); these tests hold it to

- the float64 reference (``cuflash.reference.attention_with_kvcache``) by the same-dtype rule of
  ``cuflash.testing``, sequence by sequence, on drawn batches: Sq 1..4, GQA groups, head dims,
  cache lengths with 0 and page-boundary cases, page sizes (dense, 1, odd, 16..256), appends up to
  the last slot, causal/window/softcap/ALiBi, both 16-bit dtypes; outputs NaN-poisoned first;
- the NumPy backend on the same call;
- itself: a paged cache gives bitwise the dense cache's result; split counts 1..many agree to
  float32 rounding (one unit in the last place of the output dtype); appends land exactly in
  their slots and nowhere else;
- the contract's fully masked rows (out = 0, lse = -inf, never NaN, whatever lies past the keys);
- and the merge kernel against ``cuflash._combine.combine``.
"""

import numpy
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

import cuflash
from cuflash import _combine, _ragged, reference
from cuflash.testing import assert_attention_close, assert_lse_close, assert_within_naive_error, naive_same_dtype

from ..helpers import BFLOAT16, gpu_skip_reason

_SKIP = gpu_skip_reason()
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(_SKIP is not None, reason=f"no usable GPU: {_SKIP}")]

if _SKIP is None:
    import cupy

    from cuflash._cuda import decode

F16 = numpy.dtype(numpy.float16)
I32 = numpy.int32
DTYPES = [F16] + ([BFLOAT16] if BFLOAT16 is not None else [])
# None: a dense cache. 1 and 3: pages smaller than any key tile (every row its own lookup); 16..256
# around the tiles' 32..128 keys.
PAGE_SIZES = [None, 1, 3, 16, 64, 256]
POISONED = settings(suppress_health_check=[HealthCheck.function_scoped_fixture], max_examples=30)


# -- cases --------------------------------------------------------------------------------------

def _edge_lengths(capacity, page_size):
    """Cache lengths at the edges that matter: empty, full, and either side of page and key-tile
    boundaries (tiles are 32..128 keys)."""
    edges = {0, 1, capacity}
    for step in {page_size or capacity, 32, 64, 128}:
        for n in range(step, capacity + 1, step):
            edges.update({n - 1, n, n + 1})
    return sorted(n for n in edges if 0 <= n <= capacity)


@st.composite
def decode_cases(draw, dtypes=tuple(DTYPES), page_sizes=tuple(PAGE_SIZES)):
    page_size = draw(st.sampled_from(page_sizes))
    if page_size is None:
        capacity = draw(st.one_of(st.sampled_from([1, 64, 65, 130]), st.integers(1, 300)))
    else:
        capacity = page_size * draw(st.integers(1, max(1, min(6, 600 // page_size))))
    S_new = draw(st.integers(0, min(3, capacity)))
    B = draw(st.integers(1, 3))
    edges = _edge_lengths(capacity - S_new, page_size)
    lengths = [draw(st.one_of(st.sampled_from(edges), st.integers(0, capacity - S_new))) for _ in range(B)]
    causal = draw(st.booleans())
    left = draw(st.one_of(st.none(), st.integers(0, 70)))
    right = 0 if causal else draw(st.one_of(st.none(), st.integers(0, 3)))
    D = draw(st.sampled_from([16, 32, 40, 64, 128, 256]))
    return dict(B=B, Sq=draw(st.integers(1, 4)), Hkv=draw(st.integers(1, 2)), group=draw(st.sampled_from([1, 2, 4, 8])),
                D=D, Dv=draw(st.sampled_from([D, D, 32])), page_size=page_size, capacity=capacity, S_new=S_new,
                cache_seqlens=lengths, causal=causal, window=None if draw(st.booleans()) else (left, right),
                softcap=draw(st.sampled_from([None, None, 20.0])),
                alibi=draw(st.sampled_from([None, None, "head", "batch_head"])), dtype=draw(st.sampled_from(dtypes)),
                seed=draw(st.integers(0, 2**32 - 1)))


def host_inputs(case):
    """Host arrays of a case: q, the dense caches (B, capacity, Hkv, .), k_new, v_new, lengths,
    ALiBi slopes (or None) and the options of the call."""
    rng = numpy.random.default_rng(case["seed"])
    B, Hkv, dtype = case["B"], case["Hkv"], case["dtype"]
    Hq = Hkv * case["group"]

    def randn(*shape):
        return rng.standard_normal(shape).astype(dtype)

    q = randn(B, case["Sq"], Hq, case["D"])
    k_cache, v_cache = randn(B, case["capacity"], Hkv, case["D"]), randn(B, case["capacity"], Hkv, case["Dv"])
    k_new, v_new = randn(B, case["S_new"], Hkv, case["D"]), randn(B, case["S_new"], Hkv, case["Dv"])
    slopes = {None: None, "head": rng.uniform(0.01, 0.5, (Hq,)), "batch_head": rng.uniform(0.01, 0.5, (B, Hq))}
    slopes = slopes[case["alibi"]]
    options = dict(causal=case["causal"], window=case["window"], softcap=case["softcap"])
    return (q, k_cache, v_cache, k_new, v_new, numpy.array(case["cache_seqlens"], I32),
            None if slopes is None else slopes.astype(numpy.float32), options)


def paged(cache, page_size, seed):
    """A dense cache (B, capacity, ...) as shuffled pages of ``page_size`` (two spare pages) and
    its block table; the same seed gives k and v the same table."""
    B, capacity = cache.shape[:2]
    n = capacity // page_size
    order = numpy.random.default_rng(seed).permutation(B * n + 2)[:B * n]
    pages = numpy.zeros((B * n + 2, page_size) + cache.shape[2:], dtype=cache.dtype)
    table = order.reshape(B, n).astype(I32)
    for b in range(B):
        for p in range(n):
            pages[table[b, p]] = cache[b, p * page_size:(p + 1) * page_size]
    return pages, table


def dense_view(pages, table, capacity):
    """The dense (B, capacity, ...) cache a paged one holds."""
    return pages[table].reshape((table.shape[0], capacity) + pages.shape[2:])


def appended(cache, new, lengths):
    """The dense cache after k_new/v_new are written at lengths[b] + t."""
    cache = cache.copy()
    for b, n in enumerate(lengths):
        cache[b, n:n + new.shape[1]] = new[b]
    return cache


# -- running ------------------------------------------------------------------------------------

def cache_call(q, k_cache, v_cache, cache_seqlens, k_new, v_new, slopes, options, block_table=None, backend="cuda"):
    """cuflash.attention_with_kvcache on GPU copies of host arrays: host (out, lse, k_cache, v_cache)
    after the call (the caches as the call left them)."""
    dev = cupy.asarray
    kc, vc = dev(k_cache), dev(v_cache)
    new = dict(k_new=dev(k_new), v_new=dev(v_new)) if k_new.shape[1] else {}
    out, lse = cuflash.attention_with_kvcache(
        dev(q), kc, vc, dev(cache_seqlens), block_table=None if block_table is None else dev(block_table),
        alibi_slopes=None if slopes is None else dev(slopes), return_lse=True, backend=backend, **new, **options)
    assert isinstance(out, cupy.ndarray) and isinstance(lse, cupy.ndarray)
    return out.get(), lse.get(), kc.get(), vc.get()


def launcher_call(q, k_cache, v_cache, cache_seqlens, slopes, options, splits, block_table=None):
    """The decode launcher itself (no append) with a forced split count: host (out, lse)."""
    dev = cupy.asarray
    q, kc, vc, lengths = dev(q), dev(k_cache), dev(v_cache), dev(cache_seqlens)
    table = None if block_table is None else dev(block_table)
    options = {"causal": False, "window": None, "softcap": None, "scale": None, **options}
    base, plan = _ragged.check_kvcache(q, kc, vc, lengths, None, None, table, alibi_slopes=slopes,
                                       what="test", writable=lambda x: True, causal_alignment="bottom_right",
                                       backend="cuda", **options)
    out = cupy.full(base.out_shape, numpy.nan, dtype=base.dtype)
    lse = cupy.full(base.lse_shape, numpy.nan, dtype=numpy.float32)
    decode.flash_decode(q, kc, vc, lengths, table, None if slopes is None else dev(slopes), out, lse, base,
                        max_seqlen_k=max(plan.seqlens_k, default=0), splits=splits)
    return out.get(), lse.get()


def check_against_reference(q, k_before, v_before, k_new, v_new, cache_seqlens, slopes, options, out, lse):
    """out and lse of a cache call (host) against the float64 reference: lse as the reference's
    attention_with_kvcache, out by the same-dtype rule over each sequence's keys."""
    new = dict(k_new=k_new, v_new=v_new) if k_new.shape[1] else {}
    _, ref_lse = reference.attention_with_kvcache(q, k_before, v_before, cache_seqlens, alibi_slopes=slopes,
                                                  **new, **options)
    assert_lse_close(lse, ref_lse, q.dtype)
    for b, n in enumerate(cache_seqlens):
        keys = numpy.concatenate([k_before[b:b + 1, :n], k_new[b:b + 1]], axis=1)
        values = numpy.concatenate([v_before[b:b + 1, :n], v_new[b:b + 1]], axis=1)
        seq_slopes = None if slopes is None else (slopes if slopes.ndim == 1 else slopes[b])
        assert_attention_close(out[b:b + 1], q[b:b + 1], keys, values, alibi_slopes=seq_slopes, **options)


def ulp_close(x, y, dtype, what):
    """x and y (host, the output dtype) equal up to float32 rounding before the final rounding to
    the output dtype: at most one unit in its last place apart (plus float32 noise near zero)."""
    x, y = x.astype(numpy.float64), y.astype(numpy.float64)
    eps = float(numpy.finfo(numpy.float16).eps) if dtype == F16 else 2.0**-7
    bound = eps * numpy.abs(y) + 1e-6 * max(1.0, float(numpy.max(numpy.abs(y), initial=0.0)))
    bad = ~(numpy.abs(x - y) <= bound)
    assert not bad.any(), f"{what}: {int(bad.sum())} elements differ by more than one ulp, the first at " \
                          f"{numpy.argwhere(bad)[0]}: {x[bad][0]} vs {y[bad][0]}"


def lse_close(x, y, what):
    """LSEs equal to float32 rounding; -inf in the same places."""
    assert numpy.array_equal(numpy.isneginf(x), numpy.isneginf(y)), f"{what}: -inf rows differ"
    finite = numpy.isfinite(y)
    numpy.testing.assert_allclose(x[finite], y[finite], rtol=1e-5, atol=1e-5, err_msg=what)


# -- the tests ----------------------------------------------------------------------------------

@POISONED
@given(case=decode_cases())
def test_decode_matches_reference_and_appends_land_in_their_slots(case, poisoned):
    q, k_cache, v_cache, k_new, v_new, lengths, slopes, options = host_inputs(case)
    table = None
    if case["page_size"] is None:
        k_call, v_call = k_cache, v_cache
    else:
        k_call, table = paged(k_cache, case["page_size"], case["seed"])
        v_call, _ = paged(v_cache, case["page_size"], case["seed"])
    out, lse, k_after, v_after = cache_call(q, k_call, v_call, lengths, k_new, v_new, slopes, options, table)
    check_against_reference(q, k_cache, v_cache, k_new, v_new, lengths, slopes, options, out, lse)
    if table is None:
        numpy.testing.assert_array_equal(k_after, appended(k_cache, k_new, lengths))
        numpy.testing.assert_array_equal(v_after, appended(v_cache, v_new, lengths))
    else:
        capacity = case["capacity"]
        numpy.testing.assert_array_equal(dense_view(k_after, table, capacity), appended(k_cache, k_new, lengths))
        numpy.testing.assert_array_equal(dense_view(v_after, table, capacity), appended(v_cache, v_new, lengths))
        spare = numpy.setdiff1d(numpy.arange(k_after.shape[0]), table)
        assert not k_after[spare].any() and not v_after[spare].any(), "an append wrote into a page no sequence owns"


@settings(max_examples=20)
@given(case=decode_cases(page_sizes=(1, 3, 16, 64, 256)))
def test_paged_cache_equals_dense_cache_bitwise(case):
    q, k_cache, v_cache, k_new, v_new, lengths, slopes, options = host_inputs(case)
    k_pages, table = paged(k_cache, case["page_size"], case["seed"])
    v_pages, _ = paged(v_cache, case["page_size"], case["seed"])
    dense = cache_call(q, k_cache, v_cache, lengths, k_new, v_new, slopes, options)
    paged_result = cache_call(q, k_pages, v_pages, lengths, k_new, v_new, slopes, options, table)
    numpy.testing.assert_array_equal(paged_result[0], dense[0])
    numpy.testing.assert_array_equal(paged_result[1], dense[1])


@settings(max_examples=15)
@given(case=decode_cases())
def test_gpu_agrees_with_numpy_backend(case):
    q, k_cache, v_cache, k_new, v_new, lengths, slopes, options = host_inputs(case)
    gpu_out, gpu_lse, _, _ = cache_call(q, k_cache, v_cache, lengths, k_new, v_new, slopes, options)
    new = dict(k_new=k_new, v_new=v_new) if case["S_new"] else {}
    cpu_out, cpu_lse = cuflash.attention_with_kvcache(q, k_cache.copy(), v_cache.copy(), lengths, alibi_slopes=slopes,
                                                      return_lse=True, backend="numpy", **new, **options)
    # Both backends obey the accuracy rule, so they differ by at most twice its bound.
    for b, n in enumerate(lengths):
        keys = numpy.concatenate([k_cache[b:b + 1, :n], k_new[b:b + 1]], axis=1)
        values = numpy.concatenate([v_cache[b:b + 1, :n], v_new[b:b + 1]], axis=1)
        seq_slopes = None if slopes is None else (slopes if slopes.ndim == 1 else slopes[b])
        naive = naive_same_dtype(q[b:b + 1], keys, values, None, alibi_slopes=seq_slopes, **options)[0]
        assert_within_naive_error(f"out[{b}], GPU vs NumPy backend", gpu_out[b:b + 1],
                                  cpu_out[b:b + 1].astype(numpy.float64), naive, case["dtype"], factor=4.0)
    numpy.testing.assert_allclose(gpu_lse, cpu_lse, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("page_size", [None, 16, 64, 256])
@pytest.mark.parametrize("causal, window, softcap, alibi", [
    (False, None, None, False), (True, None, None, False), (True, (300, 0), 30.0, True), (False, (None, 2), None, True)])
def test_split_counts_agree_to_float32_rounding(dtype, page_size, causal, window, softcap, alibi):
    """Long and short sequences of one batch with 1..64 forced splits (most splits empty for the
    short ones), GQA group 4, Sq = 3: every count gives the one-split result to float32 rounding."""
    rng = numpy.random.default_rng(7)
    B, Sq, Hkv, group, D = 3, 3, 2, 4, 128
    capacity = 2048
    lengths = numpy.array([2048, 5, 1000], I32)
    q = rng.standard_normal((B, Sq, Hkv * group, D)).astype(dtype)
    k_cache = rng.standard_normal((B, capacity, Hkv, D)).astype(dtype)
    v_cache = rng.standard_normal((B, capacity, Hkv, D)).astype(dtype)
    slopes = rng.uniform(0.01, 0.1, (Hkv * group,)).astype(numpy.float32) if alibi else None
    options = dict(causal=causal, window=window, softcap=softcap)
    table = None
    if page_size is not None:
        k_cache, table = paged(k_cache, page_size, 3)
        v_cache, _ = paged(v_cache, page_size, 3)
    one_out, one_lse = launcher_call(q, k_cache, v_cache, lengths, slopes, options, 1, table)
    for splits in (2, 3, 7, 16, 64):
        out, lse = launcher_call(q, k_cache, v_cache, lengths, slopes, options, splits, table)
        ulp_close(out, one_out, dtype, f"out, {splits} splits vs 1")
        lse_close(lse, one_lse, f"lse, {splits} splits vs 1")
    dense_k = k_cache if table is None else dense_view(k_cache, table, capacity)
    dense_v = v_cache if table is None else dense_view(v_cache, table, capacity)
    empty = numpy.zeros((B, 0, Hkv, D), dtype)
    check_against_reference(q, dense_k, dense_v, empty, empty, lengths, slopes, options, one_out, one_lse)


@pytest.mark.parametrize("splits", [1, 4])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_fully_masked_rows_are_zero_with_lse_minus_inf(splits, dtype):
    """Sequences with no key (cache_seqlens 0) and causal rows before the cache's first key (Sq >
    Sk_b) get out = 0 and lse = -inf, never NaN, though the cache past each sequence is NaN: keys
    past Sk_b are never read."""
    B, Sq, Hkv, group, D = 3, 4, 1, 4, 64
    rng = numpy.random.default_rng(5)
    q = rng.standard_normal((B, Sq, Hkv * group, D)).astype(dtype)
    lengths = numpy.array([0, 2, 300], I32)
    k_cache = numpy.full((B, 320, Hkv, D), numpy.nan, dtype)
    v_cache = numpy.full((B, 320, Hkv, D), numpy.nan, dtype)
    for b, n in enumerate(lengths):
        k_cache[b, :n] = rng.standard_normal((n, Hkv, D))
        v_cache[b, :n] = rng.standard_normal((n, Hkv, D))
    out, lse = launcher_call(q, k_cache, v_cache, lengths, None, dict(causal=True), splits)
    assert not numpy.isnan(out).any() and not numpy.isnan(lse).any()
    assert (out[0] == 0).all() and numpy.isneginf(lse[0]).all()
    # Sequence 1 (2 keys, Sq = 4): queries 0 and 1 see nothing, 2 sees key 0, 3 sees keys 0..1.
    assert (out[1, :2] == 0).all() and numpy.isneginf(lse[1, :, :2]).all()
    assert numpy.isfinite(lse[1, :, 2:]).all() and numpy.isfinite(lse[2]).all()
    empty = numpy.zeros((B, 0, Hkv, D), dtype)
    check_against_reference(q, numpy.nan_to_num(k_cache), numpy.nan_to_num(v_cache), empty, empty, lengths, None,
                            dict(causal=True, window=None, softcap=None), out, lse)


@pytest.mark.parametrize("page_size", [None, 1, 5, 64])
def test_appends_at_cache_boundaries(page_size):
    """Appends that end exactly at the cache's (or a page's) last slot, start on a page boundary,
    and S_new longer than a page: every new key lands at cache_seqlens[b] + t, nothing else moves."""
    rng = numpy.random.default_rng(9)
    B, Hkv, D, S_new = 4, 2, 32, 6
    capacity = 128 if page_size in (None, 64) else 60
    q = rng.standard_normal((B, 1, Hkv * 2, D)).astype(F16)
    k_cache = rng.standard_normal((B, capacity, Hkv, D)).astype(F16)
    v_cache = rng.standard_normal((B, capacity, Hkv, D)).astype(F16)
    k_new = rng.standard_normal((B, S_new, Hkv, D)).astype(F16)
    v_new = rng.standard_normal((B, S_new, Hkv, D)).astype(F16)
    step = page_size or 16
    lengths = numpy.array([capacity - S_new, 0, step, step - 1], I32)
    table = None
    k_call, v_call = k_cache, v_cache
    if page_size is not None:
        k_call, table = paged(k_cache, page_size, 1)
        v_call, _ = paged(v_cache, page_size, 1)
    out, lse, k_after, v_after = cache_call(q, k_call, v_call, lengths, k_new, v_new, None, dict(causal=True), table)
    if table is not None:
        k_after, v_after = dense_view(k_after, table, capacity), dense_view(v_after, table, capacity)
    numpy.testing.assert_array_equal(k_after, appended(k_cache, k_new, lengths))
    numpy.testing.assert_array_equal(v_after, appended(v_cache, v_new, lengths))
    check_against_reference(q, k_cache, v_cache, k_new, v_new, lengths, None,
                            dict(causal=True, window=None, softcap=None), out, lse)


def test_new_rows_that_view_the_cache_are_read_before_they_are_overwritten():
    """k_new/v_new given as a window of the cache itself, one slot before where they land: every new
    row is written over the source of the next one, so the kernel must read them all first (the
    launcher copies such views); the cache ends with the old rows L-1 .. L+S_new-2 at L .. L+S_new-1."""
    rng = numpy.random.default_rng(12)
    B, Hkv, D, S_new, capacity, L = 2, 2, 64, 300, 512, 100
    k_cache, v_cache = (cupy.asarray(rng.standard_normal((B, capacity, Hkv, D)).astype(F16)) for _ in range(2))
    k_before, v_before = cupy.asnumpy(k_cache), cupy.asnumpy(v_cache)
    q = cupy.asarray(rng.standard_normal((B, 1, 2 * Hkv, D)).astype(F16))
    lengths = numpy.full(B, L, I32)
    cuflash.attention_with_kvcache(q, k_cache, v_cache, cupy.asarray(lengths), k_new=k_cache[:, L - 1:L - 1 + S_new],
                                   v_new=v_cache[:, L - 1:L - 1 + S_new], backend="cuda")
    numpy.testing.assert_array_equal(cupy.asnumpy(k_cache), appended(k_before, k_before[:, L - 1:L - 1 + S_new], lengths))
    numpy.testing.assert_array_equal(cupy.asnumpy(v_cache), appended(v_before, v_before[:, L - 1:L - 1 + S_new], lengths))


def _float16_cache_call(rng, B, Sq, group, S_new, capacity, Hkv=2, D=64):
    """q and k_new/v_new (as a keyword dict) on the GPU, dense k/v caches on the host: random float16."""
    q = cupy.asarray(rng.standard_normal((B, Sq, Hkv * group, D)).astype(F16))
    k_cache, v_cache = (rng.standard_normal((B, capacity, Hkv, D)).astype(F16) for _ in range(2))
    new = {name: cupy.asarray(rng.standard_normal((B, S_new, Hkv, D)).astype(F16)) for name in ("k_new", "v_new")}
    return q, k_cache, v_cache, new


@pytest.mark.parametrize("page_size", [None, 16])
def test_lengths_left_on_the_device_give_the_checked_call_bitwise(page_size):
    """max_seqlen_k keeps cache_seqlens and block_table on the device, unread: with the true bound
    the split count is the same, so out, lse and the appended caches are bitwise those of the
    checked call."""
    B, S_new, capacity = 3, 2, 256
    q, k_cache, v_cache, new = _float16_cache_call(numpy.random.default_rng(21), B, 2, 4, S_new, capacity)
    lengths = numpy.array([0, 77, capacity - S_new], I32)
    table = None
    if page_size is not None:
        (k_cache, table), (v_cache, _) = paged(k_cache, page_size, 2), paged(v_cache, page_size, 2)
        table = cupy.asarray(table)
    results = []
    for bound in (None, int(lengths.max()) + S_new):
        kc, vc = cupy.asarray(k_cache), cupy.asarray(v_cache)
        out, lse = cuflash.attention_with_kvcache(q, kc, vc, cupy.asarray(lengths), block_table=table, causal=True,
                                                  return_lse=True, max_seqlen_k=bound, backend="cuda", **new)
        results.append([x.get() for x in (out, lse, kc, vc)])
    for checked, unchecked, name in zip(*results, ("out", "lse", "k_cache", "v_cache")):
        numpy.testing.assert_array_equal(unchecked, checked, err_msg=name)


@pytest.mark.parametrize("page_size", [None, 16])
def test_a_decoding_step_with_max_seqlen_k_replays_in_a_cupy_graph(page_size):
    """One decoding step (append one token, attend) captured once and replayed while the lengths
    advance on the device: each replay equals the eager call at that length, bitwise (same split
    count: the heuristic reads only the bound), and appends where the eager call appends."""
    rng = numpy.random.default_rng(23)
    B, Hkv, D, capacity = 2, 2, 64, 128
    k_cache = rng.standard_normal((B, capacity, Hkv, D)).astype(F16)
    v_cache = rng.standard_normal((B, capacity, Hkv, D)).astype(F16)
    table = None
    if page_size is not None:
        (k_cache, table), (v_cache, _) = paged(k_cache, page_size, 4), paged(v_cache, page_size, 4)
        table = cupy.asarray(table)
    q, k_new, v_new = (cupy.asarray(rng.standard_normal((B, 1, Hkv * s, D)).astype(F16)) for s in (4, 1, 1))
    kc, vc = cupy.asarray(k_cache), cupy.asarray(v_cache)
    lengths = cupy.asarray(numpy.array([5, 40], I32))

    def step(k_cache_, v_cache_, lengths_):
        return cuflash.attention_with_kvcache(q, k_cache_, v_cache_, lengths_, k_new=k_new, v_new=v_new,
                                              block_table=table, causal=True, return_lse=True, max_seqlen_k=capacity,
                                              backend="cuda")

    stream = cupy.cuda.Stream(non_blocking=True)
    with stream:
        step(kc.copy(), vc.copy(), lengths.copy())  # compiles the kernels, which a capture cannot contain
        stream.begin_capture()
        captured = step(kc, vc, lengths)
        graph = stream.end_capture()
        for _ in range(3):
            kc_eager, vc_eager, lengths_eager = kc.copy(), vc.copy(), lengths.copy()
            graph.launch()
            expected = step(kc_eager, vc_eager, lengths_eager)
            stream.synchronize()
            for got, want in zip((*captured, kc, vc), (*expected, kc_eager, vc_eager)):
                numpy.testing.assert_array_equal(got.get(), want.get())
            lengths += 1
            q[...] = cupy.asarray(rng.standard_normal(q.shape).astype(F16))


@pytest.mark.parametrize("paged_cache", [False, True])
def test_unchecked_bad_lengths_and_pages_stay_inside_the_cache(paged_cache):
    """Lengths past the cache or negative and page indices outside it, left unchecked on the
    device: nothing is written outside the cache (appends that would land there are skipped), the
    reads are clamped into it, and every output is finite. The memory side of this is what
    compute-sanitizer checks in bench/check_decode.sh; here the cache must come back unchanged."""
    B, capacity = 3, 64
    q, k_cache, v_cache, new = _float16_cache_call(numpy.random.default_rng(22), B, 1, 2, 2, capacity)
    lengths = numpy.array([capacity + 5, -7, 2**31 - 2], I32)
    table = None
    if paged_cache:
        (k_cache, table), (v_cache, _) = paged(k_cache, 16, 3), paged(v_cache, 16, 3)
        table[1] = [-1, 10**6, -(2**31), 2**31 - 1]  # every page of sequence 1 outside the cache
        table = cupy.asarray(table)
    kc, vc = cupy.asarray(k_cache), cupy.asarray(v_cache)
    out, lse = cuflash.attention_with_kvcache(q, kc, vc, cupy.asarray(lengths), block_table=table, return_lse=True,
                                              max_seqlen_k=capacity, backend="cuda", **new)
    cupy.cuda.Device().synchronize()
    numpy.testing.assert_array_equal(kc.get(), k_cache)
    numpy.testing.assert_array_equal(vc.get(), v_cache)
    assert bool(cupy.isfinite(out).all()) and bool(cupy.isfinite(lse).all())


def test_more_packed_query_rows_than_an_int_indexes_are_refused_before_any_work():
    """Sq * group = 2^31 query rows of one kv head (2^25 queries, 64 query heads on one kv head; q
    broadcast, so it takes no memory): the kernel's 32-bit packed row index would wrap and read and
    write outside q and out, so backend="cuda" refuses the call before allocating or launching
    anything, and so does the launcher itself."""
    Sq, group, D = 2**25, 64, 16
    q = cupy.broadcast_to(cupy.ones((1, 1, 1, D), F16), (1, Sq, group, D))
    cache = cupy.zeros((1, 32, 1, D), F16)
    lengths = cupy.asarray(numpy.array([8], I32))
    with pytest.raises(cuflash.BackendUnavailableError, match="2147483648 packed query rows"):
        cuflash.attention_with_kvcache(q, cache, cache, lengths, causal=True, backend="cuda")
    problem, _ = _ragged.check_kvcache(q, cache, cache, lengths, None, None, None, alibi_slopes=None,
                                       what="test", writable=lambda x: True, causal=True,
                                       causal_alignment="bottom_right", window=None, softcap=None, scale=None,
                                       backend="cuda")
    out = cupy.broadcast_to(cupy.zeros((1, 1, 1, D), F16), (1, Sq, group, D))
    lse = cupy.broadcast_to(cupy.zeros((1, 1, 1), numpy.float32), (1, group, Sq))
    with pytest.raises(cuflash.BackendUnavailableError, match="packed query rows"):
        decode.flash_decode(q, cache, cache, lengths, None, None, out, lse, problem, max_seqlen_k=8)


def test_long_cache_many_splits_against_reference():
    """A 20k-key bf16 (or f16) cache in paged form with MQA-like grouping (16 query heads on one kv
    head, two row tiles) against the reference, with the heuristic's split count."""
    dtype = DTYPES[-1]
    rng = numpy.random.default_rng(21)
    B, Sq, Hkv, group, D = 2, 2, 1, 16, 128
    capacity = 20480
    lengths = numpy.array([20470, 7001], I32)
    q = rng.standard_normal((B, Sq, Hkv * group, D)).astype(dtype)
    k_cache = rng.standard_normal((B, capacity, Hkv, D)).astype(dtype)
    v_cache = rng.standard_normal((B, capacity, Hkv, D)).astype(dtype)
    k_new = rng.standard_normal((B, 2, Hkv, D)).astype(dtype)
    v_new = rng.standard_normal((B, 2, Hkv, D)).astype(dtype)
    k_pages, table = paged(k_cache, 256, 4)
    v_pages, _ = paged(v_cache, 256, 4)
    options = dict(causal=True, window=None, softcap=None)
    out, lse, _, _ = cache_call(q, k_pages, v_pages, lengths, k_new, v_new, None, options, table)
    check_against_reference(q, k_cache, v_cache, k_new, v_new, lengths, None, options, out, lse)


def test_strided_operands_take_the_element_path():
    """q and a cache seen through views with a head-dim stride of 2 (the element-wise loads) give
    the contiguous operands' result bitwise."""
    rng = numpy.random.default_rng(13)
    B, Sq, Hkv, group, D = 2, 2, 2, 2, 64
    lengths = numpy.array([100, 37], I32)
    q = cupy.asarray(rng.standard_normal((B, Sq, Hkv * group, 2 * D)).astype(F16))
    k = cupy.asarray(rng.standard_normal((B, 128, Hkv, 2 * D)).astype(F16))
    v = cupy.asarray(rng.standard_normal((B, 128, Hkv, 2 * D)).astype(F16))
    seqlens = cupy.asarray(lengths)
    strided = cuflash.attention_with_kvcache(q[..., ::2], k[..., ::2], v[..., ::2], seqlens, causal=True,
                                             return_lse=True, backend="cuda")
    contiguous = cuflash.attention_with_kvcache(*(cupy.ascontiguousarray(x[..., ::2]) for x in (q, k, v)), seqlens,
                                                causal=True, return_lse=True, backend="cuda")
    for x, y in zip(strided, contiguous):
        numpy.testing.assert_array_equal(x.get(), y.get())


def test_combine_kernel_matches_the_python_merge():
    """The merge kernel against cuflash._combine.combine: partials with empty splits (lse = -inf and
    NaN in their O, which must not be read), a row no split saw, and a NaN lse that must surface."""
    rng = numpy.random.default_rng(17)
    S, B, Sq, H, Dv = 9, 2, 3, 4, 72
    o = rng.standard_normal((S, B, Sq, H, Dv)).astype(numpy.float32)
    lse = (rng.standard_normal((S, B, Sq, H)) * 5).astype(numpy.float32)
    lse[2:5, 0] = -numpy.inf
    o[2:5, 0] = numpy.nan
    lse[:, 1, 2, 3] = -numpy.inf
    o[:, 1, 2, 3] = numpy.nan
    lse[4, 1, 0, 0] = numpy.nan
    ref_out, ref_lse = _combine.combine(o, lse)
    for dtype in (numpy.float32, F16):
        out = cupy.full((B, Sq, H, Dv), numpy.nan, dtype=dtype)
        merged = cupy.full((B, H, Sq), numpy.nan, dtype=numpy.float32)
        decode.combine(cupy.asarray(o), cupy.asarray(lse), out, merged)
        out, merged = out.get().astype(numpy.float64), merged.get().transpose(0, 2, 1)
        assert (out[1, 2, 3] == 0).all() and numpy.isneginf(merged[1, 2, 3])
        assert numpy.isnan(out[1, 0, 0]).all() and numpy.isnan(merged[1, 0, 0])
        tolerance = 1e-5 if dtype == numpy.float32 else 1e-3
        numpy.testing.assert_allclose(out, ref_out, rtol=tolerance, atol=tolerance)
        numpy.testing.assert_allclose(merged, ref_lse, rtol=1e-5, atol=1e-5)


def test_float32_caches_with_backend_cuda_are_refused_naming_the_kernel():
    q = cupy.zeros((1, 1, 2, 16), cupy.float32)
    cache = cupy.zeros((1, 8, 1, 16), cupy.float32)
    with pytest.raises(cuflash.BackendUnavailableError, match="decode kernel takes float16 and bfloat16"):
        cuflash.attention_with_kvcache(q, cache, cache, cupy.array([3], I32), backend="cuda")
    out = cuflash.attention_with_kvcache(q, cache, cache, cupy.array([3], I32))  # auto: the NumPy backend
    assert isinstance(out, cupy.ndarray) and out.shape == (1, 1, 2, 16)
