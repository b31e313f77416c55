"""Packed (varlen) and padded batches on the GPU kernels (SEQ_MODE 1), forward and backward.

Skipped as a whole when no usable GPU is present. Each sequence of a ragged batch must give what
the dense kernel gives for that sequence alone (bitwise: the same tiles in the same order), a padded
batch what the packed batch of the same sequences gives (bitwise), and every sequence must obey the
same-dtype accuracy rule against the float64 reference (cuflash.testing). Outputs are NaN-filled
first (the ``poisoned`` fixture), so a row the kernels forget fails; NaN in the padding of a padded
batch must never be read.
"""

import numpy
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import cuflash
from cuflash.testing import assert_attention_close, assert_attention_grads_close

from ..helpers import BFLOAT16, gpu_skip_reason

_SKIP = gpu_skip_reason()
pytestmark = pytest.mark.skipif(_SKIP is not None, reason=f"no usable GPU: {_SKIP}")

if _SKIP is None:
    import cupy

DTYPES = [numpy.dtype(numpy.float16), numpy.dtype(numpy.float32), numpy.dtype(numpy.float64)] + (
    [BFLOAT16] if BFLOAT16 is not None else [])
# Empty sequences, length 1, and lengths either side of the tile edges (16 .. 128).
LENGTHS = [0, 1, 2, 15, 16, 17, 63, 64, 65, 127, 128, 129, 200]
I32 = numpy.int32
_SETTINGS = dict(deadline=None, max_examples=30, suppress_health_check=[HealthCheck.function_scoped_fixture])


@st.composite
def ragged_batches(draw):
    """A ragged batch: per-sequence lengths, heads, head dims, dtype and options."""
    batch = draw(st.integers(1, 4))
    lengths_q = draw(st.lists(st.sampled_from(LENGTHS), min_size=batch, max_size=batch))
    lengths_k = draw(st.lists(st.sampled_from(LENGTHS), min_size=batch, max_size=batch))
    heads_q, heads_kv = draw(st.sampled_from([(1, 1), (2, 1), (4, 2), (4, 4)]))
    head_dim = draw(st.sampled_from([16, 40, 64, 128]))
    head_dim_v = draw(st.sampled_from([head_dim, 32]))
    dtype = draw(st.sampled_from(DTYPES))
    causal = draw(st.booleans())
    options = dict(causal=causal, causal_alignment=draw(st.sampled_from(["bottom_right", "top_left"])))
    if draw(st.booleans()):
        left = draw(st.sampled_from([None, 0, 5, 70]))
        right = 0 if causal else draw(st.sampled_from([None, 0, 3, 64]))
        options["window"] = (left, right)
    if draw(st.booleans()):
        options["softcap"] = draw(st.sampled_from([5.0, 30.0]))
    alibi = draw(st.sampled_from([None, "head", "batch_head"]))
    seed = draw(st.integers(0, 2**31 - 1))
    return dict(lengths_q=lengths_q, lengths_k=lengths_k, heads_q=heads_q, heads_kv=heads_kv, head_dim=head_dim,
                head_dim_v=head_dim_v, dtype=dtype, options=options, alibi=alibi, seed=seed)


def _offsets(lengths):
    return numpy.concatenate([[0], numpy.cumsum(lengths)]).astype(I32)


def _packed(case):
    """Host arrays of a packed batch: q, k, v, dout, cu_seqlens_q, cu_seqlens_k, alibi slopes."""
    rng = numpy.random.default_rng(case["seed"])
    tq, tk = sum(case["lengths_q"]), sum(case["lengths_k"])
    Hq, Hkv, D, Dv, dtype = case["heads_q"], case["heads_kv"], case["head_dim"], case["head_dim_v"], case["dtype"]
    q = rng.standard_normal((tq, Hq, D)).astype(dtype)
    k = rng.standard_normal((tk, Hkv, D)).astype(dtype)
    v = rng.standard_normal((tk, Hkv, Dv)).astype(dtype)
    dout = rng.standard_normal((tq, Hq, Dv)).astype(dtype)
    slopes = None
    if case["alibi"] == "head":
        slopes = rng.uniform(0.01, 0.5, Hq).astype(numpy.float32)
    elif case["alibi"] == "batch_head":
        slopes = rng.uniform(0.01, 0.5, (len(case["lengths_q"]), Hq)).astype(numpy.float32)
    return q, k, v, dout, _offsets(case["lengths_q"]), _offsets(case["lengths_k"]), slopes


def _gpu(*arrays):
    return [None if x is None else cupy.asarray(x) for x in arrays]


def _host(*arrays):
    return [None if x is None else cupy.asnumpy(x) for x in arrays]


def _sequence_slopes(slopes, b):
    return None if slopes is None else (slopes if slopes.ndim == 1 else slopes[b])


def _varlen(case, q, k, v, dout, cu_q, cu_k, slopes, deterministic=True):
    """Forward and backward of the packed batch on the GPU: host out, lse, dq, dk, dv."""
    gq, gk, gv, gdo, gcq, gck, gs = _gpu(q, k, v, dout, cu_q, cu_k, slopes)
    opts = dict(case["options"], alibi_slopes=gs)
    out, lse = cuflash.attention_varlen(gq, gk, gv, gcq, gck, return_lse=True, **opts)
    grads = cuflash.attention_varlen_backward(gdo, gq, gk, gv, out, lse, gcq, gck, deterministic=deterministic,
                                              **opts)
    return _host(out, lse, *grads)


def _alone(case, q, k, v, dout, slopes, b, deterministic=True):
    """Sequence b alone through the dense GPU path: host out, lse, dq, dk, dv (batch of one)."""
    gq, gk, gv, gdo = _gpu(q[None], k[None], v[None], dout[None])
    opts = dict(case["options"], alibi_slopes=_gpu(_sequence_slopes(slopes, b))[0])
    out, lse = cuflash.attention(gq, gk, gv, return_lse=True, backend="cuda", **opts)
    grads = cuflash.attention_backward(gdo, gq, gk, gv, out, lse, deterministic=deterministic, backend="cuda", **opts)
    return _host(out, lse, *grads)


def _rows(x, cu, b):
    return x[cu[b]:cu[b + 1]]


def _assert_bitwise(name, got, want):
    assert got.shape == want.shape, (name, got.shape, want.shape)
    same = (got == want) | (numpy.isnan(got) & numpy.isnan(want))
    assert same.all(), f"{name}: {numpy.count_nonzero(~same)} elements differ"


@settings(**_SETTINGS)
@given(case=ragged_batches())
def test_varlen_matches_each_sequence_alone(poisoned, case):
    """Forward bitwise; the deterministic backward bitwise where no GQA split can differ (the dense
    call of one sequence may split a group's dK/dV over other CTA counts than the batch does, and the
    partial sums then add in another grouping), else within the accuracy rule below."""
    q, k, v, dout, cu_q, cu_k, slopes = _packed(case)
    out, lse, dq, dk, dv = _varlen(case, q, k, v, dout, cu_q, cu_k, slopes)
    for b in range(len(case["lengths_q"])):
        if case["lengths_q"][b] == 0 and case["lengths_k"][b] == 0:
            continue
        a = _alone(case, _rows(q, cu_q, b), _rows(k, cu_k, b), _rows(v, cu_k, b), _rows(dout, cu_q, b), slopes, b)
        _assert_bitwise(f"out of sequence {b}", _rows(out, cu_q, b), a[0][0])
        _assert_bitwise(f"lse of sequence {b}", lse[:, cu_q[b]:cu_q[b + 1]], a[1][0])
        _assert_bitwise(f"dq of sequence {b}", _rows(dq, cu_q, b), a[2][0])
        if case["heads_q"] == case["heads_kv"]:
            _assert_bitwise(f"dk of sequence {b}", _rows(dk, cu_k, b), a[3][0])
            _assert_bitwise(f"dv of sequence {b}", _rows(dv, cu_k, b), a[4][0])


@settings(**_SETTINGS)
@given(case=ragged_batches(), atomic=st.booleans())
def test_varlen_obeys_the_accuracy_rule(poisoned, case, atomic):
    """Every sequence against the float64 reference by the same-dtype rule, with the atomic dQ path too."""
    q, k, v, dout, cu_q, cu_k, slopes = _packed(case)
    out, lse, dq, dk, dv = _varlen(case, q, k, v, dout, cu_q, cu_k, slopes, deterministic=not atomic)
    for b in range(len(case["lengths_q"])):
        qb, kb, vb, dob = (_rows(x, cu, b)[None] for x, cu in ((q, cu_q), (k, cu_k), (v, cu_k), (dout, cu_q)))
        opts = dict(case["options"], alibi_slopes=_sequence_slopes(slopes, b))
        assert_attention_close(_rows(out, cu_q, b)[None], qb, kb, vb, lse=lse[None, :, cu_q[b]:cu_q[b + 1]], **opts)
        assert_attention_grads_close(_rows(dq, cu_q, b)[None], _rows(dk, cu_k, b)[None], _rows(dv, cu_k, b)[None],
                                     qb, kb, vb, dob, **opts)


def test_float32_long_sequences_match_each_sequence_alone(poisoned):
    """float32 sequences longer than the forward's partial-sum moves (1024 keys, fwd_sm80.cu): the
    moved sums land in each sequence's own rows of the packed out buffer, bitwise as alone."""
    case = dict(lengths_q=[40, 0, 300, 1], lengths_k=[2100, 5, 3000, 1500], heads_q=4, heads_kv=2, head_dim=64,
                head_dim_v=32, dtype=numpy.dtype(numpy.float32), options=dict(causal=True), alibi=None, seed=5)
    q, k, v, dout, cu_q, cu_k, slopes = _packed(case)
    out, lse, dq, dk, dv = _varlen(case, q, k, v, dout, cu_q, cu_k, slopes)
    for b in (0, 2, 3):
        qb, kb, vb, dob = (_rows(x, cu, b) for x, cu in ((q, cu_q), (k, cu_k), (v, cu_k), (dout, cu_q)))
        alone = _alone(case, qb, kb, vb, dob, slopes, b)
        _assert_bitwise(f"out of sequence {b}", _rows(out, cu_q, b), alone[0][0])
        _assert_bitwise(f"lse of sequence {b}", lse[:, cu_q[b]:cu_q[b + 1]], alone[1][0])
        assert_attention_close(_rows(out, cu_q, b)[None], qb[None], kb[None], vb[None],
                               lse=lse[None, :, cu_q[b]:cu_q[b + 1]], **case["options"])


def test_varlen_agrees_with_the_reference_function(poisoned):
    """cuflash.reference.attention_varlen on one fixed batch with empty and length-1 sequences."""
    from cuflash import reference

    case = dict(lengths_q=[3, 0, 1, 130], lengths_k=[5, 4, 0, 129], heads_q=4, heads_kv=2, head_dim=64,
                head_dim_v=64, dtype=numpy.dtype(numpy.float32), options=dict(causal=True), alibi=None, seed=7)
    q, k, v, dout, cu_q, cu_k, _ = _packed(case)
    out, lse, *_ = _varlen(case, q, k, v, dout, cu_q, cu_k, None)
    ref_out, ref_lse = reference.attention_varlen(q, k, v, cu_q, cu_k, causal=True)
    numpy.testing.assert_allclose(out, ref_out, rtol=2e-5, atol=2e-5)
    finite = numpy.isfinite(ref_lse)
    assert (numpy.isfinite(lse) == finite).all()
    numpy.testing.assert_allclose(lse[finite], ref_lse[finite], rtol=2e-5, atol=2e-5)


def _padded(case, q, k, v, dout, cu_q, cu_k, fill):
    """The packed batch as a padded BSHD batch; padding filled with ``fill``."""
    B = len(case["lengths_q"])
    Sq, Sk = max(max(case["lengths_q"]), 1), max(max(case["lengths_k"]), 1)

    def frame(x, cu, S):
        y = numpy.full((B, S) + x.shape[1:], fill, dtype=x.dtype)
        for b in range(B):
            y[b, :cu[b + 1] - cu[b]] = _rows(x, cu, b)
        return y

    return frame(q, cu_q, Sq), frame(k, cu_k, Sk), frame(v, cu_k, Sk), frame(dout, cu_q, Sq)


@settings(**_SETTINGS)
@given(case=ragged_batches(), fill=st.sampled_from([0.0, numpy.nan]))
def test_padded_matches_varlen(poisoned, case, fill):
    """Valid rows bitwise as the packed batch's (NaN in the padding never read); padded query rows
    give out = 0, lse = -inf, dq = 0, padded keys dk = dv = 0."""
    q, k, v, dout, cu_q, cu_k, slopes = _packed(case)
    out, lse, dq, dk, dv = _varlen(case, q, k, v, dout, cu_q, cu_k, slopes)
    pq, pk, pv, pdo = _padded(case, q, k, v, dout, cu_q, cu_k, fill)
    lq, lk = numpy.diff(cu_q).astype(I32), numpy.diff(cu_k).astype(I32)
    gq, gk, gv, gdo, glq, glk, gs = _gpu(pq, pk, pv, pdo, lq, lk, slopes)
    opts = dict(case["options"], alibi_slopes=gs, seqlens_q=glq, seqlens_k=glk)
    p_out, p_lse = cuflash.attention(gq, gk, gv, return_lse=True, **opts)
    if fill != 0.0:
        # out's padding is the forward's (zeros); poison it to show the backward never reads it.
        for b, n in enumerate(lq):
            p_out[b, n:] = numpy.nan
    grads = cuflash.attention_backward(gdo, gq, gk, gv, p_out, p_lse, deterministic=True, **opts)
    p_out, p_lse, p_dq, p_dk, p_dv = _host(p_out, p_lse, *grads)
    for b in range(len(lq)):
        nq, nk = lq[b], lk[b]
        if fill == 0.0:
            assert (p_out[b, nq:] == 0).all() and (p_lse[b, :, nq:] == -numpy.inf).all()
        assert (p_dq[b, nq:] == 0).all() and (p_dk[b, nk:] == 0).all() and (p_dv[b, nk:] == 0).all()
        _assert_bitwise(f"out of sequence {b}", p_out[b, :nq], _rows(out, cu_q, b))
        _assert_bitwise(f"lse of sequence {b}", p_lse[b, :, :nq], lse[:, cu_q[b]:cu_q[b + 1]])
        _assert_bitwise(f"dq of sequence {b}", p_dq[b, :nq], _rows(dq, cu_q, b))
        _assert_bitwise(f"dk of sequence {b}", p_dk[b, :nk], _rows(dk, cu_k, b))
        _assert_bitwise(f"dv of sequence {b}", p_dv[b, :nk], _rows(dv, cu_k, b))


def test_one_long_sequence_among_many_short_ones(poisoned):
    """The grid follows the longest sequence; the short ones' later tiles do nothing, and the
    packed dQ workspace keeps every sequence's rows apart (1000 short sequences beside a long one)."""
    lengths = [3] * 999 + [700]
    case = dict(lengths_q=lengths, lengths_k=lengths, heads_q=2, heads_kv=1, head_dim=64, head_dim_v=64,
                dtype=numpy.dtype(numpy.float16), options=dict(causal=True), alibi=None, seed=3)
    q, k, v, dout, cu_q, cu_k, _ = _packed(case)
    out, lse, dq, dk, dv = _varlen(case, q, k, v, dout, cu_q, cu_k, None, deterministic=False)
    for b in (0, 500, 999):
        qb, kb, vb, dob = (_rows(x, cu, b)[None] for x, cu in ((q, cu_q), (k, cu_k), (v, cu_k), (dout, cu_q)))
        assert_attention_close(_rows(out, cu_q, b)[None], qb, kb, vb, lse=lse[None, :, cu_q[b]:cu_q[b + 1]],
                               causal=True)
        assert_attention_grads_close(_rows(dq, cu_q, b)[None], _rows(dk, cu_k, b)[None], _rows(dv, cu_k, b)[None],
                                     qb, kb, vb, dob, causal=True)
