"""Properties of attention itself, checked on the reference and the NumPy backend.

The reference's gradients against central finite differences, and invariants that hold for any
correct implementation: key/value permutation, convex combinations, causal invisibility, and the
fully-masked-row rule.
"""

import numpy
import pytest
from hypothesis import given
from hypothesis import strategies as st

import cuflash

from .helpers import make_inputs

ALIGN = st.sampled_from(["bottom_right", "top_left"])


def _f64_inputs(seed, B, Sq, Sk, Hq, Hkv, D, Dv):
    return make_inputs(numpy.random.default_rng(seed), B, Sq, Sk, Hq, Hkv, D, Dv, numpy.float64)


@given(seed=st.integers(0, 2**32 - 1), Sq=st.integers(1, 4), Sk=st.integers(1, 4), group=st.sampled_from([1, 2]),
       D=st.integers(1, 3), Dv=st.integers(1, 3), causal=st.booleans(), alignment=ALIGN)
def test_reference_gradients_match_finite_differences(seed, Sq, Sk, group, D, Dv, causal, alignment):
    q, k, v, dout = _f64_inputs(seed, 1, Sq, Sk, group, 1, D, Dv)
    options = dict(causal=causal, causal_alignment=alignment, scale=0.7)

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
    offset = Sk - Sq if alignment == "bottom_right" else 0
    seen = numpy.arange(Sq) + offset >= 0 if causal else numpy.ones(Sq, bool)
    lo, hi = v.min(axis=1)[:, None], v.max(axis=1)[:, None]  # (B, 1, Hkv, Dv), broadcast over rows and heads
    eps = 4 * numpy.finfo(dtype).eps * numpy.abs(v).max()
    rows = out[:, seen]
    assert numpy.all(rows >= lo - eps) and numpy.all(rows <= hi + eps)
    numpy.testing.assert_allclose(rows[..., 0], c, rtol=8 * numpy.finfo(dtype).eps)


@given(seed=st.integers(0, 2**32 - 1), Sq=st.integers(1, 50), Sk=st.integers(1, 50), alignment=ALIGN)
def test_causal_rows_ignore_keys_they_cannot_see(seed, Sq, Sk, alignment):
    q, k, v, dout = _f64_inputs(seed, 1, Sq, Sk, 2, 2, 8, 8)
    offset = Sk - Sq if alignment == "bottom_right" else 0
    i = numpy.random.default_rng(seed).integers(Sq)
    hidden = numpy.arange(Sk) > i + offset
    if not hidden.any():
        return
    k2, v2 = k.copy(), v.copy()
    k2[:, hidden] = 100 * numpy.random.default_rng(seed + 2).standard_normal(k2[:, hidden].shape)
    v2[:, hidden] = -7.0
    options = dict(causal=True, causal_alignment=alignment, backend="numpy")
    out, lse = cuflash.attention(q, k, v, return_lse=True, **options)
    out2, lse2 = cuflash.attention(q, k2, v2, return_lse=True, **options)
    numpy.testing.assert_array_equal(out2[:, i], out[:, i])
    numpy.testing.assert_array_equal(lse2[:, :, i], lse[:, :, i])
    dq = cuflash.attention_backward(dout, q, k, v, out, lse, **options)[0]
    dq2 = cuflash.attention_backward(dout, q, k2, v2, out2, lse2, **options)[0]
    numpy.testing.assert_array_equal(dq2[:, i], dq[:, i])


@pytest.mark.parametrize("backend", ["numpy", "reference"])
@pytest.mark.parametrize("Sq,Sk", [(5, 2), (7, 3), (4, 0)])
def test_fully_masked_rows_give_zero_output_minus_inf_lse_and_zero_gradients(backend, Sq, Sk):
    q, k, v, dout = _f64_inputs(11, 2, Sq, Sk, 4, 2, 8, 8)
    masked = numpy.arange(Sq) + (Sk - Sq) < 0  # bottom-right: rows that see no key
    if backend == "reference":
        out, lse = cuflash.reference.attention(q, k, v, causal=True)
        dq, dk, dv = cuflash.reference.attention_backward(dout, q, k, v, causal=True)
    else:
        out, lse = cuflash.attention(q, k, v, causal=True, return_lse=True, backend=backend)
        dq, dk, dv = cuflash.attention_backward(dout, q, k, v, out, lse, causal=True, backend=backend)
    for x in (out, lse, dq, dk, dv):
        assert not numpy.isnan(x).any()
    assert numpy.all(out[:, masked] == 0) and numpy.all(dq[:, masked] == 0)
    assert numpy.all(numpy.isneginf(lse[:, :, masked]))
    assert numpy.all(numpy.isfinite(lse[:, :, ~masked]))
    # dout on masked rows must not reach dk, dv: change it there and nothing moves.
    dout2 = dout.copy()
    dout2[:, masked] = 5.0
    if backend == "reference":
        grads2 = cuflash.reference.attention_backward(dout2, q, k, v, causal=True)
    else:
        grads2 = cuflash.attention_backward(dout2, q, k, v, out, lse, causal=True, backend=backend)
    numpy.testing.assert_array_equal(grads2[1], dk)
    numpy.testing.assert_array_equal(grads2[2], dv)


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
