"""Properties of attention itself, checked on the reference and the NumPy backend.

The reference's gradients against central finite differences, and invariants that hold for any
correct implementation: key/value permutation, convex combinations, invisibility of keys outside a
row's band (causal and sliding window), the fully-masked-row rule, the softcap's bound on the
logits, and ALiBi against an explicitly written bias.
"""

import numpy
import pytest
from hypothesis import given
from hypothesis import strategies as st

import cuflash

from .helpers import alibi_bias, make_inputs, mask_of, windows

ALIGN = st.sampled_from(["bottom_right", "top_left"])
SMALL_SIDES = st.one_of(st.none(), st.integers(0, 3))
SLOPES = st.sampled_from([None, "head", "batch_head"])
BACKENDS = ["numpy", "reference"]


def _slopes(seed, kind, B, Hq):
    """Positive ALiBi slopes of shape (Hq,) or (B, Hq) from ``seed``, or None."""
    shape = {None: None, "head": (Hq,), "batch_head": (B, Hq)}[kind]
    return None if shape is None else numpy.random.default_rng(seed).uniform(0.05, 1.0, shape).astype(numpy.float32)


def _seen(Sq, Sk, options):
    """The (Sq, Sk) visibility matrix of a call's options (others than the mask's are ignored)."""
    return mask_of(Sq, Sk, causal=options.get("causal", False), window=options.get("window"),
                   causal_alignment=options.get("causal_alignment", "bottom_right")).matrix()


def _run(backend, dout, q, k, v, **options):
    """(out, lse, dq, dk, dv) from the NumPy backend or the reference."""
    if backend == "reference":
        out, lse = cuflash.reference.attention(q, k, v, **options)
        return (out, lse, *cuflash.reference.attention_backward(dout, q, k, v, **options))
    out, lse = cuflash.attention(q, k, v, return_lse=True, backend=backend, **options)
    return (out, lse, *cuflash.attention_backward(dout, q, k, v, out, lse, backend=backend, **options))


def _f64_inputs(seed, B, Sq, Sk, Hq, Hkv, D, Dv):
    return make_inputs(numpy.random.default_rng(seed), B, Sq, Sk, Hq, Hkv, D, Dv, numpy.float64)


@given(seed=st.integers(0, 2**32 - 1), Sq=st.integers(1, 4), Sk=st.integers(1, 4), group=st.sampled_from([1, 2]),
       D=st.integers(1, 3), Dv=st.integers(1, 3), causal=st.booleans(), alignment=ALIGN,
       softcap=st.one_of(st.none(), st.floats(0.5, 5.0)), slopes=SLOPES, data=st.data())
def test_reference_gradients_match_finite_differences(seed, Sq, Sk, group, D, Dv, causal, alignment, softcap, slopes,
                                                      data):
    q, k, v, dout = _f64_inputs(seed, 1, Sq, Sk, group, 1, D, Dv)
    options = dict(causal=causal, causal_alignment=alignment, window=data.draw(windows(causal, SMALL_SIDES)),
                   softcap=softcap, alibi_slopes=_slopes(seed, slopes, 1, group), scale=0.7)

    def loss(q_, k_, v_):
        out, _ = cuflash.reference.attention(q_, k_, v_, **options)
        return float((out * dout).sum())

    analytic = cuflash.reference.attention_backward(dout, q, k, v, **options)
    h = 1e-6
    for which, grad in enumerate(analytic):
        args = [q, k, v]
        x = args[which]
        numeric = numpy.zeros_like(x)
        for idx in numpy.ndindex(x.shape):
            plus, minus = x.copy(), x.copy()
            plus[idx] += h
            minus[idx] -= h
            numeric[idx] = (loss(*[plus if i == which else a for i, a in enumerate(args)])
                            - loss(*[minus if i == which else a for i, a in enumerate(args)])) / (2 * h)
        numpy.testing.assert_allclose(grad, numeric, rtol=1e-5, atol=1e-7, err_msg="dq dk dv"[3 * which:3 * which + 2])


@given(seed=st.integers(0, 2**32 - 1), Sq=st.integers(1, 40), Sk=st.integers(1, 40), group=st.sampled_from([1, 3]))
def test_permuting_keys_and_values_together_leaves_output_unchanged(seed, Sq, Sk, group):
    q, k, v, _ = _f64_inputs(seed, 2, Sq, Sk, 2 * group, 2, 8, 5)
    perm = numpy.random.default_rng(seed + 1).permutation(Sk)
    out = cuflash.attention(q, k, v, backend="numpy")
    permuted = cuflash.attention(q, k[:, perm], v[:, perm], backend="numpy")
    numpy.testing.assert_allclose(permuted, out, rtol=1e-12, atol=1e-12)


@given(seed=st.integers(0, 2**32 - 1), Sq=st.integers(1, 40), Sk=st.integers(1, 40), causal=st.booleans(),
       alignment=ALIGN, dtype=st.sampled_from([numpy.float32, numpy.float64]))
def test_each_output_row_is_a_convex_combination_of_value_rows(seed, Sq, Sk, causal, alignment, dtype):
    rng = numpy.random.default_rng(seed)
    q, k, v, _ = make_inputs(rng, 1, Sq, Sk, 2, 1, 16, 6, dtype)
    c = dtype(rng.standard_normal())
    v[..., 0] = c  # a constant column: weights that sum to one reproduce it
    out = cuflash.attention(q, k, v, causal=causal, causal_alignment=alignment, backend="numpy")
    seen = _seen(Sq, Sk, dict(causal=causal, causal_alignment=alignment)).any(axis=1)
    lo, hi = v.min(axis=1)[:, None], v.max(axis=1)[:, None]  # (B, 1, Hkv, Dv), broadcast over rows and heads
    eps = 4 * numpy.finfo(dtype).eps * numpy.abs(v).max()
    rows = out[:, seen]
    assert numpy.all(rows >= lo - eps) and numpy.all(rows <= hi + eps)
    numpy.testing.assert_allclose(rows[..., 0], c, rtol=8 * numpy.finfo(dtype).eps)


@given(seed=st.integers(0, 2**32 - 1), Sq=st.integers(1, 50), Sk=st.integers(1, 50), alignment=ALIGN,
       causal=st.booleans(), softcap=st.one_of(st.none(), st.floats(0.5, 50.0)), slopes=SLOPES, data=st.data())
def test_rows_ignore_keys_outside_their_band(seed, Sq, Sk, alignment, causal, softcap, slopes, data):
    """Keys a row cannot see (causal or window) may hold anything: its out, lse and dq stay bit for
    bit the same, and keys that no row sees get dk = dv = 0 exactly."""
    window = data.draw(windows(causal, st.one_of(st.none(), st.integers(0, 8), st.integers(0, 60))))
    q, k, v, dout = _f64_inputs(seed, 1, Sq, Sk, 2, 2, 8, 8)
    i = numpy.random.default_rng(seed).integers(Sq)
    seen = _seen(Sq, Sk, dict(causal=causal, causal_alignment=alignment, window=window))
    hidden = ~seen[i]
    options = dict(causal=causal, causal_alignment=alignment, window=window, softcap=softcap,
                   alibi_slopes=_slopes(seed, slopes, 1, 2), backend="numpy")
    out, lse = cuflash.attention(q, k, v, return_lse=True, **options)
    dq, dk, dv = cuflash.attention_backward(dout, q, k, v, out, lse, **options)
    unseen = ~seen.any(axis=0)
    assert numpy.all(dk[:, unseen] == 0) and numpy.all(dv[:, unseen] == 0)
    if not hidden.any():
        return
    k2, v2 = k.copy(), v.copy()
    k2[:, hidden] = 100 * numpy.random.default_rng(seed + 2).standard_normal(k2[:, hidden].shape)
    v2[:, hidden] = -7.0
    out2, lse2 = cuflash.attention(q, k2, v2, return_lse=True, **options)
    numpy.testing.assert_array_equal(out2[:, i], out[:, i])
    numpy.testing.assert_array_equal(lse2[:, :, i], lse[:, :, i])
    dq2 = cuflash.attention_backward(dout, q, k2, v2, out2, lse2, **options)[0]
    numpy.testing.assert_array_equal(dq2[:, i], dq[:, i])


# (Sq, Sk, options): rows that see no key, from causal alignment, an empty key sequence, and windows
# (a left bound empties the last rows, a narrow band beside a short key sequence the first ones).
MASKED_ROW_CASES = [
    (5, 2, dict(causal=True)),
    (7, 3, dict(causal=True)),
    (4, 0, dict(causal=True)),
    (9, 4, dict(causal_alignment="top_left", window=(1, 1))),
    (8, 3, dict(causal_alignment="top_left", window=(2, None))),
    (6, 3, dict(window=(0, 0))),
    (7, 2, dict(window=(None, 1), softcap=3.0)),
    (9, 4, dict(causal=True, causal_alignment="top_left", window=(1, None), alibi_slopes="head")),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("Sq,Sk,options", MASKED_ROW_CASES)
def test_fully_masked_rows_give_zero_output_minus_inf_lse_and_zero_gradients(backend, Sq, Sk, options):
    q, k, v, dout = _f64_inputs(11, 2, Sq, Sk, 4, 2, 8, 8)
    options = dict(options, alibi_slopes=_slopes(11, options.get("alibi_slopes"), 2, 4))
    masked = ~_seen(Sq, Sk, options).any(axis=1)
    assert masked.any() and (Sk == 0 or not masked.all()), "the case must have rows of both kinds"
    out, lse, dq, dk, dv = _run(backend, dout, q, k, v, **options)
    for x in (out, lse, dq, dk, dv):
        assert not numpy.isnan(x).any()
    assert numpy.all(out[:, masked] == 0) and numpy.all(dq[:, masked] == 0)
    assert numpy.all(numpy.isneginf(lse[:, :, masked]))
    assert numpy.all(numpy.isfinite(lse[:, :, ~masked]))
    # dout on masked rows must not reach dk, dv, whatever it holds: NaN there changes nothing.
    dout2 = dout.copy()
    dout2[:, masked] = numpy.nan
    _, _, dq2, dk2, dv2 = _run(backend, dout2, q, k, v, **options)
    numpy.testing.assert_array_equal(dq2[:, ~masked], dq[:, ~masked])
    assert numpy.all(dq2[:, masked] == 0)
    numpy.testing.assert_array_equal(dk2, dk)
    numpy.testing.assert_array_equal(dv2, dv)
    if Sk:  # a NaN in V leaves the masked rows' out, lse and dq as the rule says
        v3 = v.copy()
        v3[:, Sk // 2] = numpy.nan
        out3, lse3, dq3, _, _ = _run(backend, dout2, q, k, v3, **options)
        assert numpy.all(out3[:, masked] == 0) and numpy.all(numpy.isneginf(lse3[:, :, masked]))
        assert numpy.all(dq3[:, masked] == 0)


def test_causal_alignments_match_the_contract_diagrams():
    """Sq = 2, Sk = 5 and Sq = 5, Sk = 2 bottom-right, and top-left, as drawn in the docs."""
    def pattern(Sq, Sk, alignment):
        q, k, v, _ = _f64_inputs(0, 1, Sq, Sk, 1, 1, 4, Sk)
        v = numpy.eye(Sk)[None, :, None, :]  # out row i = P row i
        out = cuflash.attention(q, k, v, causal=True, causal_alignment=alignment, backend="numpy")
        return (out[0, :, 0] > 0).astype(int)

    numpy.testing.assert_array_equal(pattern(2, 5, "bottom_right"), [[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]])
    numpy.testing.assert_array_equal(pattern(5, 2, "bottom_right"), [[0, 0], [0, 0], [0, 0], [1, 0], [1, 1]])
    numpy.testing.assert_array_equal(pattern(2, 5, "top_left"), [[1, 0, 0, 0, 0], [1, 1, 0, 0, 0]])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cap", [0.5, 2.0, 10.0])
def test_softcap_bounds_the_logits(backend, cap):
    """|logit| <= c: within a row the probabilities of visible keys differ by at most a factor
    exp(2c), and lse lies within c of log(number of visible keys)."""
    Sq, Sk = 6, 9
    q, k, _, dout = _f64_inputs(5, 1, Sq, Sk, 2, 1, 16, Sk)
    v = numpy.eye(Sk)[None, :, None, :]  # out row i = P row i
    # scale 30 spreads the raw scores far beyond ±c, so the bound is the cap's doing.
    options = dict(causal=True, causal_alignment="top_left", scale=30.0)
    out, lse = _run(backend, dout, q, k, v, softcap=cap, **options)[:2]
    uncapped = _run(backend, dout, q, k, v, **options)[0]
    seen = _seen(Sq, Sk, options)
    count = seen.sum(axis=1)
    for i in range(Sq):
        P = out[0, i][:, seen[i]]  # (heads, visible keys)
        assert numpy.all(P.max(axis=-1) <= numpy.exp(2 * cap) * P.min(axis=-1) * (1 + 1e-12))
        assert numpy.all(numpy.abs(lse[0, :, i] - numpy.log(count[i])) <= cap * (1 + 1e-12))
    spread = uncapped[0][:, :, seen[-1]]
    assert numpy.any(spread.max(axis=-1) > numpy.exp(2 * cap) * spread.min(axis=-1)), "the cap did no work"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("slopes", ["head", "batch_head"])
@pytest.mark.parametrize("options", [dict(), dict(causal=True), dict(causal_alignment="top_left", window=(3, 2))],
                         ids=["full", "causal", "window top-left"])
@pytest.mark.parametrize("Sq,Sk", [(7, 11), (11, 7)])
def test_alibi_equals_an_explicit_distance_bias(backend, slopes, options, Sq, Sk):
    """softmax(scale · Q Kᵀ − slope · |i + offset − j|) computed here directly, bias matrix and all."""
    B, Hq, Hkv, D, scale = 2, 4, 2, 8, 0.4
    q, k, v, dout = _f64_inputs(3, B, Sq, Sk, Hq, Hkv, D, 5)
    alibi_slopes = _slopes(4, slopes, B, Hq)
    alignment = options.get("causal_alignment", "bottom_right")
    offset = Sk - Sq if alignment == "bottom_right" else 0
    K, V = (numpy.repeat(x.transpose(0, 2, 1, 3), Hq // Hkv, axis=1) for x in (k, v))
    logits = scale * (q.transpose(0, 2, 1, 3) @ K.transpose(0, 1, 3, 2)) + alibi_bias(alibi_slopes, B, Hq, Sq, Sk,
                                                                                        offset)
    seen = _seen(Sq, Sk, options)
    E = numpy.where(seen, numpy.exp(logits), 0.0)
    total = E.sum(axis=-1, keepdims=True)
    with numpy.errstate(divide="ignore", invalid="ignore"):  # rows that see no key: log 0 = −inf, P = 0
        expected_lse = numpy.log(total[..., 0])
        expected_out = numpy.where(total > 0, E / total, 0.0) @ V
    out, lse = _run(backend, dout, q, k, v, alibi_slopes=alibi_slopes, scale=scale, **options)[:2]
    numpy.testing.assert_allclose(out, expected_out.transpose(0, 2, 1, 3), rtol=1e-12, atol=1e-13)
    numpy.testing.assert_allclose(lse, expected_lse, rtol=1e-12, atol=1e-13)


@given(seed=st.integers(0, 2**32 - 1), Sq=st.integers(1, 30), Sk=st.integers(1, 30), alignment=ALIGN)
def test_steep_alibi_attends_to_the_aligned_key_only(seed, Sq, Sk, alignment):
    """With slopes so steep that distance 1 costs e^-1000, each row's output is the value at
    distance 0 (key i + offset), wherever that key exists."""
    q, k, v, _ = _f64_inputs(seed, 2, Sq, Sk, 3, 1, 8, 4)
    out = cuflash.attention(q, k, v, causal_alignment=alignment, backend="numpy",
                            alibi_slopes=numpy.full(3, 1000.0, dtype=numpy.float32))
    i = numpy.arange(Sq)
    j = i + (Sk - Sq if alignment == "bottom_right" else 0)
    rows = (j >= 0) & (j < Sk)
    numpy.testing.assert_allclose(out[:, rows], numpy.broadcast_to(v[:, j[rows]], out[:, rows].shape), rtol=1e-12)
