"""Ragged batches on the CPU backends: packed sequences (varlen), padded lengths, key/value caches.

The NumPy backend runs each sequence as the dense problem over views, so a sequence computed in a
batch equals the same sequence computed alone bitwise; the reference is held to an independent
brute-force statement of the semantics (one block-diagonal mask over the packed rows)."""

import math

import numpy
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

import cuflash
from cuflash import _numpy_backend, reference
from cuflash._mask import MaskSpec

F16, F32, F64 = numpy.dtype(numpy.float16), numpy.dtype(numpy.float32), numpy.dtype(numpy.float64)
I32 = numpy.int32

LENGTHS = st.lists(st.one_of(st.sampled_from([0, 1]), st.integers(0, 40)), min_size=1, max_size=5)
WINDOW_SIDE = st.one_of(st.none(), st.integers(0, 6))


def _randn(rng, shape, dtype=F32):
    return rng.standard_normal(shape).astype(dtype)


def _offsets(lengths):
    return numpy.concatenate([[0], numpy.cumsum(lengths)]).astype(I32)


@st.composite
def varlen_cases(draw, dtypes=(F32, F64)):
    lengths_q = draw(LENGTHS)
    lengths_k = draw(st.lists(st.one_of(st.sampled_from([0, 1]), st.integers(0, 40)), min_size=len(lengths_q),
                              max_size=len(lengths_q)))
    causal = draw(st.booleans())
    left, right = draw(WINDOW_SIDE), draw(WINDOW_SIDE)
    return dict(
        lengths_q=lengths_q, lengths_k=lengths_k, Hkv=draw(st.integers(1, 2)), group=draw(st.sampled_from([1, 2])),
        D=draw(st.sampled_from([1, 8, 13])), Dv=draw(st.sampled_from([4, 8])), dtype=draw(st.sampled_from(dtypes)),
        causal=causal, causal_alignment=draw(st.sampled_from(["bottom_right", "top_left"])),
        window=None if draw(st.booleans()) else (left, None if causal else right),
        softcap=draw(st.sampled_from([None, 5.0])), alibi=draw(st.sampled_from([None, "head", "batch_head"])),
        seed=draw(st.integers(0, 2**32 - 1)),
    )


def _varlen_inputs(case):
    rng = numpy.random.default_rng(case["seed"])
    B, Hkv, Hq = len(case["lengths_q"]), case["Hkv"], case["Hkv"] * case["group"]
    total_q, total_k = sum(case["lengths_q"]), sum(case["lengths_k"])
    q = _randn(rng, (total_q, Hq, case["D"]), case["dtype"])
    k = _randn(rng, (total_k, Hkv, case["D"]), case["dtype"])
    v = _randn(rng, (total_k, Hkv, case["Dv"]), case["dtype"])
    dout = _randn(rng, (total_q, Hq, case["Dv"]), case["dtype"])
    slopes = {None: None, "head": rng.uniform(0.01, 1, (Hq,)), "batch_head": rng.uniform(0.01, 1, (B, Hq))}
    options = dict(causal=case["causal"], causal_alignment=case["causal_alignment"], window=case["window"],
                   softcap=case["softcap"], alibi_slopes=None if slopes[case["alibi"]] is None
                   else slopes[case["alibi"]].astype(F32))
    return (q, k, v, dout), _offsets(case["lengths_q"]), _offsets(case["lengths_k"]), options


def _alone_options(options, b):
    slopes = options["alibi_slopes"]
    return dict(options, alibi_slopes=None if slopes is None else (slopes if slopes.ndim == 1 else slopes[b]))


# The poisoned fixture patches an allocator once: it holds for every drawn example.
POISONED = settings(suppress_health_check=[HealthCheck.function_scoped_fixture])


@POISONED
@given(case=varlen_cases())
def test_varlen_equals_each_sequence_alone_bitwise(case, poisoned):
    (q, k, v, dout), cu_q, cu_k, options = _varlen_inputs(case)
    out, lse = cuflash.attention_varlen(q, k, v, cu_q, cu_k, return_lse=True, **options)
    dq, dk, dv = cuflash.attention_varlen_backward(dout, q, k, v, out, lse, cu_q, cu_k, **options)
    assert out.dtype == q.dtype and lse.shape == (q.shape[1], q.shape[0])
    for b in range(len(cu_q) - 1):
        rq, rk = slice(cu_q[b], cu_q[b + 1]), slice(cu_k[b], cu_k[b + 1])
        alone = _alone_options(options, b)
        o, l = cuflash.attention(q[None, rq], k[None, rk], v[None, rk], return_lse=True, **alone)
        numpy.testing.assert_array_equal(out[rq], o[0])
        numpy.testing.assert_array_equal(lse[:, rq], l[0])
        g = cuflash.attention_backward(dout[None, rq], q[None, rq], k[None, rk], v[None, rk], o, l, **alone)
        for x, alone_x, rows in zip((dq, dk, dv), g, (rq, rk, rk)):
            numpy.testing.assert_array_equal(x[rows], alone_x[0])


def _block_diagonal_reference(q, k, v, cu_q, cu_k, dout, options):
    """Out, lse and gradients of the packed problem as ONE dense float64 computation with a
    block-diagonal mask written out element by element (independent of the segment code)."""
    total_q, total_k = q.shape[0], k.shape[0]
    seen = numpy.zeros((total_q, total_k), dtype=bool)
    bias = numpy.zeros((q.shape[1], total_q, total_k))
    slopes = options["alibi_slopes"]
    for b in range(len(cu_q) - 1):
        Sq, Sk = cu_q[b + 1] - cu_q[b], cu_k[b + 1] - cu_k[b]
        offset = Sk - Sq if options["causal_alignment"] == "bottom_right" else 0
        left, right = options["window"] or (None, None)
        if options["causal"]:
            right = 0
        mask = MaskSpec(Sq, Sk, offset, left, right).matrix()
        seen[cu_q[b]:cu_q[b + 1], cu_k[b]:cu_k[b + 1]] = mask
        if slopes is not None:
            s = (slopes if slopes.ndim == 1 else slopes[b]).astype(F64)
            i, j = numpy.arange(Sq)[:, None], numpy.arange(Sk)[None, :]
            bias[:, cu_q[b]:cu_q[b + 1], cu_k[b]:cu_k[b + 1]] = -s[:, None, None] * numpy.abs(i + offset - j)
    group = q.shape[1] // k.shape[1]
    Q = q.astype(F64).transpose(1, 0, 2)
    K = numpy.repeat(k.astype(F64).transpose(1, 0, 2), group, axis=0)
    V = numpy.repeat(v.astype(F64).transpose(1, 0, 2), group, axis=0)
    scale = 1 / math.sqrt(q.shape[-1])
    S = scale * Q @ K.transpose(0, 2, 1)
    Z = S if options["softcap"] is None else options["softcap"] * numpy.tanh(S / options["softcap"])
    Z = numpy.where(seen, Z + bias, -numpy.inf)
    live = seen.any(axis=1)
    m = numpy.where(live, Z.max(axis=-1, initial=-numpy.inf), 0)
    E = numpy.where(seen, numpy.exp(Z - m[..., None]), 0)
    P = numpy.where(live[:, None], E / numpy.where(live, E.sum(-1), 1)[..., None], 0)
    with numpy.errstate(divide="ignore"):
        lse = numpy.where(live, m + numpy.log(numpy.where(live, E.sum(-1), 1)), -numpy.inf)
    out = (P @ V).transpose(1, 0, 2)
    return out, lse


@given(case=varlen_cases(dtypes=(F64,)))
def test_reference_varlen_is_one_block_diagonal_attention(case):
    (q, k, v, dout), cu_q, cu_k, options = _varlen_inputs(case)
    out, lse = reference.attention_varlen(q, k, v, cu_q, cu_k, **options)
    want_out, want_lse = _block_diagonal_reference(q, k, v, cu_q, cu_k, dout, options)
    numpy.testing.assert_allclose(out, want_out, rtol=1e-10, atol=1e-12)
    numpy.testing.assert_allclose(lse, want_lse, rtol=1e-10, atol=1e-12)


@given(case=varlen_cases(dtypes=(F32,)))
def test_varlen_matches_reference(case):
    (q, k, v, dout), cu_q, cu_k, options = _varlen_inputs(case)
    out, lse = cuflash.attention_varlen(q, k, v, cu_q, cu_k, return_lse=True, **options)
    ref_out, ref_lse = reference.attention_varlen(q, k, v, cu_q, cu_k, **options)
    numpy.testing.assert_allclose(out, ref_out, rtol=2e-5, atol=2e-5)
    numpy.testing.assert_array_equal(numpy.isneginf(lse), numpy.isneginf(ref_lse))
    finite = numpy.isfinite(ref_lse)
    numpy.testing.assert_allclose(lse[finite], ref_lse[finite], rtol=1e-5, atol=1e-5)
    grads = cuflash.attention_varlen_backward(dout, q, k, v, out, lse, cu_q, cu_k, **options)
    ref_grads = reference.attention_varlen_backward(dout, q, k, v, cu_q, cu_k, **options)
    for name, x, ref in zip(("dq", "dk", "dv"), grads, ref_grads):
        numpy.testing.assert_allclose(x, ref, rtol=1e-4, atol=1e-4, err_msg=name)


@POISONED
@given(case=varlen_cases(dtypes=(F32,)), pad=st.integers(0, 5))
def test_padded_equals_varlen_bitwise(case, pad, poisoned):
    """The same sequences, once packed and once padded to a common length: equal results on the
    valid rows, out = 0 / lse = −inf / zero gradients on padded rows and keys."""
    (q, k, v, dout), cu_q, cu_k, options = _varlen_inputs(case)
    out, lse = cuflash.attention_varlen(q, k, v, cu_q, cu_k, return_lse=True, **options)
    grads = cuflash.attention_varlen_backward(dout, q, k, v, out, lse, cu_q, cu_k, **options)
    B = len(cu_q) - 1
    lq, lk = numpy.diff(cu_q), numpy.diff(cu_k)
    Sq, Sk = int(lq.max()) + pad, int(lk.max()) + pad

    def padded(x, cu, S):
        y = numpy.random.default_rng(1).standard_normal((B, S) + x.shape[1:]).astype(x.dtype)  # garbage padding
        for b in range(B):
            y[b, :cu[b + 1] - cu[b]] = x[cu[b]:cu[b + 1]]
        return y

    qp, kp, vp, dop = padded(q, cu_q, Sq), padded(k, cu_k, Sk), padded(v, cu_k, Sk), padded(dout, cu_q, Sq)
    outp, lsep = cuflash.attention(qp, kp, vp, seqlens_q=lq.astype(I32), seqlens_k=lk.astype(I32), return_lse=True,
                                   **options)
    gradsp = cuflash.attention_backward(dop, qp, kp, vp, outp, lsep, seqlens_q=lq.astype(I32),
                                        seqlens_k=lk.astype(I32), **options)
    for b in range(B):
        rq, rk = slice(cu_q[b], cu_q[b + 1]), slice(cu_k[b], cu_k[b + 1])
        numpy.testing.assert_array_equal(outp[b, :lq[b]], out[rq])
        numpy.testing.assert_array_equal(lsep[b, :, :lq[b]], lse[:, rq])
        assert (outp[b, lq[b]:] == 0).all() and numpy.isneginf(lsep[b, :, lq[b]:]).all()
        for x, xp, rows, n in zip(grads, gradsp, (rq, rk, rk), (lq[b], lk[b], lk[b])):
            numpy.testing.assert_array_equal(xp[b, :n], x[rows])
            assert (xp[b, n:] == 0).all()


def test_padded_keys_are_never_read():
    """NaN in the padding of k and v changes nothing."""
    rng = numpy.random.default_rng(2)
    q, k, v = _randn(rng, (2, 5, 2, 8)), _randn(rng, (2, 7, 2, 8)), _randn(rng, (2, 7, 2, 8))
    seqlens_k = numpy.array([3, 7], I32)
    clean = cuflash.attention(q, k, v, seqlens_k=seqlens_k, causal=True)
    k[0, 3:], v[0, 3:] = numpy.nan, numpy.nan
    numpy.testing.assert_array_equal(cuflash.attention(q, k, v, seqlens_k=seqlens_k, causal=True), clean)


def test_padded_vjp_passes_lengths_to_the_backward():
    rng = numpy.random.default_rng(3)
    q, k, v = _randn(rng, (2, 5, 2, 8)), _randn(rng, (2, 6, 2, 8)), _randn(rng, (2, 6, 2, 8))
    lengths = dict(seqlens_q=numpy.array([5, 2], I32), seqlens_k=numpy.array([1, 6], I32))
    out, vjp = cuflash.attention_vjp(q, k, v, causal=True, **lengths)
    dout = _randn(rng, out.shape)
    out2, lse = cuflash.attention(q, k, v, causal=True, return_lse=True, **lengths)
    numpy.testing.assert_array_equal(out, out2)
    for x, y in zip(vjp(dout), cuflash.attention_backward(dout, q, k, v, out2, lse, causal=True, **lengths)):
        numpy.testing.assert_array_equal(x, y)


# Key/value caches.

@st.composite
def cache_cases(draw):
    B = draw(st.integers(1, 3))
    page_size = draw(st.sampled_from([1, 4, 16]))
    pages_per_seq = draw(st.integers(1, 5))
    capacity = page_size * pages_per_seq
    S_new = draw(st.integers(0, min(3, capacity)))
    cache_seqlens = [draw(st.integers(0, capacity - S_new)) for _ in range(B)]
    causal = draw(st.booleans())
    return dict(B=B, page_size=page_size, pages_per_seq=pages_per_seq, S_new=S_new, cache_seqlens=cache_seqlens,
                Sq=draw(st.integers(1, 4)), Hkv=draw(st.integers(1, 2)), group=draw(st.sampled_from([1, 4])),
                causal=causal, window=draw(st.sampled_from([None, (2, 0 if causal else 1), (None, 0 if causal else 3)])),
                softcap=draw(st.sampled_from([None, 7.0])), dtype=draw(st.sampled_from([F16, F32])),
                seed=draw(st.integers(0, 2**32 - 1)))


def _cache_inputs(case):
    rng = numpy.random.default_rng(case["seed"])
    B, Hkv, dtype = case["B"], case["Hkv"], case["dtype"]
    capacity = case["page_size"] * case["pages_per_seq"]
    q = _randn(rng, (B, case["Sq"], Hkv * case["group"], 16), dtype)
    k_cache, v_cache = _randn(rng, (B, capacity, Hkv, 16), dtype), _randn(rng, (B, capacity, Hkv, 8), dtype)
    k_new, v_new = _randn(rng, (B, case["S_new"], Hkv, 16), dtype), _randn(rng, (B, case["S_new"], Hkv, 8), dtype)
    options = dict(causal=case["causal"], window=case["window"], softcap=case["softcap"])
    return q, k_cache, v_cache, numpy.array(case["cache_seqlens"], I32), k_new, v_new, options


def _paged(cache, page_size, rng):
    """The dense cache (B, capacity, ...) as shuffled pages of ``page_size`` and a block table."""
    B, capacity = cache.shape[:2]
    n = capacity // page_size
    order = rng.permutation(B * n)
    pages = numpy.empty((B * n + 2, page_size) + cache.shape[2:], dtype=cache.dtype)  # two spare pages
    table = order.reshape(B, n).astype(I32)
    for b in range(B):
        for p in range(n):
            pages[table[b, p]] = cache[b, p * page_size:(p + 1) * page_size]
    return pages, table


@POISONED
@given(case=cache_cases())
def test_decode_equals_attention_over_the_concatenated_cache(case, poisoned):
    q, k_cache, v_cache, cache_seqlens, k_new, v_new, options = _cache_inputs(case)
    k_before, v_before = k_cache.copy(), v_cache.copy()
    new = dict(k_new=k_new, v_new=v_new) if case["S_new"] else {}
    out, lse = cuflash.attention_with_kvcache(q, k_cache, v_cache, cache_seqlens, return_lse=True, **new, **options)
    for b, n in enumerate(cache_seqlens):
        keys = numpy.concatenate([k_before[b:b + 1, :n], k_new[b:b + 1]], axis=1)
        values = numpy.concatenate([v_before[b:b + 1, :n], v_new[b:b + 1]], axis=1)
        o, l = cuflash.attention(q[b:b + 1], keys, values, return_lse=True, **options)
        numpy.testing.assert_array_equal(out[b:b + 1], o)
        numpy.testing.assert_array_equal(lse[b:b + 1], l)
        # The append wrote exactly the new slots.
        end = n + case["S_new"]
        numpy.testing.assert_array_equal(k_cache[b, n:end], k_new[b])
        numpy.testing.assert_array_equal(v_cache[b, n:end], v_new[b])
        numpy.testing.assert_array_equal(k_cache[b, :n], k_before[b, :n])
        numpy.testing.assert_array_equal(k_cache[b, end:], k_before[b, end:])
    ref_out, ref_lse = reference.attention_with_kvcache(q, k_before, v_before, cache_seqlens, **new, **options)
    tolerance = 2e-2 if case["dtype"] == F16 else 2e-5
    numpy.testing.assert_allclose(out.astype(F64), ref_out, rtol=tolerance, atol=tolerance)


@given(case=cache_cases())
def test_paged_cache_equals_dense_cache_bitwise(case):
    q, k_cache, v_cache, cache_seqlens, k_new, v_new, options = _cache_inputs(case)
    rng = numpy.random.default_rng(case["seed"] + 1)
    k_pages, table = _paged(k_cache, case["page_size"], rng)
    v_pages, _ = _paged(v_cache, case["page_size"], numpy.random.default_rng(case["seed"] + 1))
    new = dict(k_new=k_new, v_new=v_new) if case["S_new"] else {}
    dense = cuflash.attention_with_kvcache(q, k_cache, v_cache, cache_seqlens, **new, **options)
    paged = cuflash.attention_with_kvcache(q, k_pages, v_pages, cache_seqlens, block_table=table, **new, **options)
    numpy.testing.assert_array_equal(paged, dense)
    for b, n in enumerate(cache_seqlens):  # the appends landed in the right pages
        for t in range(case["S_new"]):
            position = n + t
            page, slot = table[b, position // case["page_size"]], position % case["page_size"]
            numpy.testing.assert_array_equal(k_pages[page, slot], k_new[b, t])


def test_append_fills_the_cache_to_its_last_slot():
    rng = numpy.random.default_rng(4)
    q = _randn(rng, (1, 2, 2, 8))
    k_cache, v_cache = _randn(rng, (1, 6, 2, 8)), _randn(rng, (1, 6, 2, 8))
    k_new, v_new = _randn(rng, (1, 2, 2, 8)), _randn(rng, (1, 2, 2, 8))
    out = cuflash.attention_with_kvcache(q, k_cache, v_cache, numpy.array([4], I32), k_new=k_new, v_new=v_new,
                                         causal=True)
    numpy.testing.assert_array_equal(k_cache[0, 4:], k_new[0])
    numpy.testing.assert_array_equal(out, cuflash.attention(q, k_cache, v_cache, causal=True))


# Refusals.

def _varlen_args():
    rng = numpy.random.default_rng(5)
    return _randn(rng, (6, 2, 8)), _randn(rng, (5, 2, 8)), _randn(rng, (5, 2, 8))


@pytest.mark.parametrize("cu_q, cu_k, error, message", [
    (numpy.array([0, 2, 6]), numpy.array([0, 1, 5], I32), TypeError, "cu_seqlens_q must be int32"),
    (numpy.array([0, 4, 2, 6], I32), numpy.array([0, 1, 2, 5], I32), ValueError, "must be non-decreasing"),
    (numpy.array([1, 2, 6], I32), numpy.array([0, 1, 5], I32), ValueError, "cu_seqlens_q must start at 0"),
    (numpy.array([0, 2, 7], I32), numpy.array([0, 1, 5], I32), ValueError, r"end at the number of query rows in q \(6\)"),
    (numpy.array([0, 2, 6], I32), numpy.array([0, 5], I32), ValueError, "same number of sequences"),
    (numpy.array([[0, 2, 6]], I32), numpy.array([0, 1, 5], I32), ValueError, "cu_seqlens_q must have shape"),
])
def test_bad_offsets_are_refused(cu_q, cu_k, error, message, monkeypatch):
    monkeypatch.setattr(_numpy_backend, "forward", None)  # nothing may run
    q, k, v = _varlen_args()
    with pytest.raises(error, match=message):
        cuflash.attention_varlen(q, k, v, cu_q, cu_k)


def test_varlen_reports_every_problem_at_once():
    q, k, v = _varlen_args()
    with pytest.raises(TypeError) as error:
        cuflash.attention_varlen(q.astype(numpy.int16), k, v, numpy.array([0, 6], numpy.int64),
                                 numpy.array([0, 3, 5], I32), causal="yes", max_seqlen_q=2)
    for expected in ("q has dtype int16", "cu_seqlens_q must be int32", "causal must be a bool"):
        assert expected in str(error.value)


def test_max_seqlen_hint_below_the_longest_sequence_is_refused():
    q, k, v = _varlen_args()
    with pytest.raises(ValueError, match=r"max_seqlen_k = 3 is less than the longest sequence \(4\)"):
        cuflash.attention_varlen(q, k, v, numpy.array([0, 2, 6], I32), numpy.array([0, 1, 5], I32), max_seqlen_k=3)


@pytest.mark.parametrize("seqlens, message", [
    (numpy.array([3, 9], I32), r"seqlens_q\[1\] = 9 is outside 0..5"),
    (numpy.array([3, -1], I32), r"seqlens_q\[1\] = -1 is outside"),
    (numpy.array([3], I32), r"seqlens_q must have shape \(2,\)"),
    (numpy.array([3.0, 1.0]), "seqlens_q must be int32"),
])
def test_bad_padded_lengths_are_refused(seqlens, message):
    rng = numpy.random.default_rng(6)
    q, k = _randn(rng, (2, 5, 2, 8)), _randn(rng, (2, 4, 2, 8))
    with pytest.raises((TypeError, ValueError), match=message):
        cuflash.attention(q, k, k, seqlens_q=seqlens)


def _cache_args(page_size=None):
    rng = numpy.random.default_rng(7)
    q = _randn(rng, (2, 1, 4, 8))
    if page_size is None:
        return q, _randn(rng, (2, 8, 2, 8)), _randn(rng, (2, 8, 2, 8))
    return q, _randn(rng, (6, page_size, 2, 8)), _randn(rng, (6, page_size, 2, 8))


def test_cache_overflow_is_refused():
    q, k_cache, v_cache = _cache_args()
    new = _randn(numpy.random.default_rng(8), (2, 3, 2, 8))
    with pytest.raises(ValueError, match=r"cache_seqlens\[1\] \+ S_new = 9 exceeds the cache length 8"):
        cuflash.attention_with_kvcache(q, k_cache, v_cache, numpy.array([2, 6], I32), k_new=new, v_new=new)


@pytest.mark.parametrize("table, lengths, message", [
    (numpy.array([[0, 1], [2, 9]], I32), [3, 7], r"block_table\[1\] has page indices outside 0..5"),
    (numpy.array([[0, 1], [2, 3]], I32), [3, 9], "sequence 1 needs 9 keys"),
    (numpy.array([[0, 1], [2, 3]], numpy.int64), [3, 3], "block_table must be int32"),
    (numpy.array([[0, 1]], I32), [3, 3], r"block_table must have shape \(B, max_pages_per_seq\)"),
])
def test_bad_block_tables_are_refused(table, lengths, message):
    q, k_pages, v_pages = _cache_args(page_size=4)
    with pytest.raises((TypeError, ValueError), match=message):
        cuflash.attention_with_kvcache(q, k_pages, v_pages, numpy.array(lengths, I32), block_table=table)


def test_two_sequences_appending_into_one_slot_are_refused():
    q, k_pages, v_pages = _cache_args(page_size=4)
    new = _randn(numpy.random.default_rng(9), (2, 1, 2, 8))
    with pytest.raises(ValueError, match="both append into page 0 slot 2"):
        cuflash.attention_with_kvcache(q, k_pages, v_pages, numpy.array([2, 2], I32),
                                       block_table=numpy.array([[0, 1], [0, 2]], I32), k_new=new, v_new=new)


def test_read_only_cache_with_appends_is_refused_and_unchanged():
    q, k_cache, v_cache = _cache_args()
    k_cache.flags.writeable = False
    new = _randn(numpy.random.default_rng(10), (2, 1, 2, 8))
    with pytest.raises(ValueError, match="k_cache is read-only"):
        cuflash.attention_with_kvcache(q, k_cache, v_cache, numpy.array([1, 1], I32), k_new=new, v_new=new)


@pytest.mark.parametrize("bound, error, message", [
    (2.0, TypeError, "max_seqlen_k must be an int or None, got float"),
    (-1, ValueError, "max_seqlen_k must be >= 0, got -1"),
    (4, ValueError, r"max_seqlen_k = 4 is less than the longest sequence \(5\)"),
])
def test_bad_max_seqlen_k_of_a_cache_call_is_refused(bound, error, message):
    """Host lengths are read and checked whatever the bound: one below them is refused."""
    q, k_cache, v_cache = _cache_args()
    new = _randn(numpy.random.default_rng(11), (2, 1, 2, 8))
    with pytest.raises(error, match=message):
        cuflash.attention_with_kvcache(q, k_cache, v_cache, numpy.array([4, 2], I32), k_new=new, v_new=new,
                                       max_seqlen_k=bound)


def test_max_seqlen_k_on_the_host_changes_nothing():
    q, k_cache, v_cache = _cache_args(page_size=4)
    table = numpy.array([[0, 1], [2, 3]], I32)
    lengths = numpy.array([3, 7], I32)
    plain = cuflash.attention_with_kvcache(q, k_cache, v_cache, lengths, block_table=table, return_lse=True)
    bounded = cuflash.attention_with_kvcache(q, k_cache, v_cache, lengths, block_table=table, return_lse=True,
                                             max_seqlen_k=8)
    for x, y in zip(plain, bounded):
        numpy.testing.assert_array_equal(x, y)
    with pytest.raises(ValueError, match=r"block_table\[1\] has page indices outside 0..5"):
        cuflash.attention_with_kvcache(q, k_cache, v_cache, lengths, block_table=numpy.array([[0, 1], [2, 9]], I32),
                                       max_seqlen_k=8)


def test_k_new_without_v_new_is_refused():
    q, k_cache, v_cache = _cache_args()
    with pytest.raises(ValueError, match="k_new and v_new go together"):
        cuflash.attention_with_kvcache(q, k_cache, v_cache, numpy.array([1, 1], I32), k_new=k_cache[:, :1])


def test_ragged_calls_forced_to_an_unusable_gpu_say_why(monkeypatch):
    from cuflash._cuda import runtime

    monkeypatch.setattr(runtime, "gpu_available", lambda: (False, "no GPU in this test"))
    q, k, v = _varlen_args()
    with pytest.raises(cuflash.BackendUnavailableError, match="backend='cuda' cannot run .*no GPU in this test"):
        cuflash.attention_varlen(q, k, v, numpy.array([0, 6], I32), numpy.array([0, 5], I32), backend="cuda")


def test_readme_ragged_example_runs():
    """The README's "Ragged batches and decoding" example, run as written (after the "Use" example
    it continues)."""
    import pathlib
    import re

    text = (pathlib.Path(__file__).parent.parent / "README.md").read_text()
    use = re.search(r"## Use\n\n```python\n(.*?)```", text, re.S).group(1)
    ragged = re.search(r"### Ragged batches and decoding\n.*?```python\n(.*?)```", text, re.S).group(1)
    namespace = {}
    exec(use.replace("1024", "64"), namespace)
    exec(ragged.replace("1024", "64").replace("[0, 300, 301, 64]", "[0, 30, 31, 64]").replace("517", "17"), namespace)
    assert namespace["out"].shape == (2, 1, 8, 64)
    assert (namespace["k_cache"][:, 0] == namespace["k1"][:, 0]).all()
