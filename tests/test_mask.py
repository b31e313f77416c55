"""``MaskSpec``: its matrix follows the contract's band rule, and its tile questions agree with
that matrix brute force, on awkward sizes, offsets and windows.

The backends trust these answers to skip tiles and masking, so a wrong answer here is a silent
wrong result there; ``tests/gpu/test_mask.py`` holds the CUDA mask to the same answers.
"""

import numpy
import pytest
from hypothesis import given
from hypothesis import strategies as st

from cuflash._mask import MaskSpec
from cuflash._problem import check_forward

SIDES = st.one_of(st.none(), st.integers(0, 3), st.integers(0, 80))


@st.composite
def specs(draw):
    Sq, Sk = draw(st.integers(0, 70)), draw(st.integers(0, 70))
    # Any offset: the alignments give Sk − Sq and 0; others exercise bands that miss the matrix.
    offset = draw(st.one_of(st.sampled_from([Sk - Sq, 0]), st.integers(-80, 80)))
    return MaskSpec(Sq, Sk, offset, draw(SIDES), draw(SIDES))


def _contract_matrix(spec):
    """The rule as the contract writes it, one pair at a time."""
    seen = numpy.zeros((spec.seqlen_q, spec.seqlen_k), dtype=bool)
    for i in range(spec.seqlen_q):
        for j in range(spec.seqlen_k):
            seen[i, j] = ((spec.left is None or i + spec.offset - spec.left <= j)
                          and (spec.right is None or j <= i + spec.offset + spec.right))
    return seen


def _span(Sk_or_Sq, lo, hi):
    """Boolean vector of the indices in [lo, hi) (empty when lo >= hi)."""
    index = numpy.arange(Sk_or_Sq)
    return (index >= lo) & (index < hi)


@st.composite
def ranges(draw, n):
    """A non-empty [a, b) inside 0..n (n > 0)."""
    a = draw(st.integers(0, n - 1))
    return a, draw(st.integers(a + 1, n))


@given(spec=specs())
def test_matrix_follows_the_contract_rule(spec):
    matrix = spec.matrix()
    assert matrix.shape == (spec.seqlen_q, spec.seqlen_k) and matrix.dtype == bool
    numpy.testing.assert_array_equal(matrix, _contract_matrix(spec))


@given(spec=specs())
def test_keys_outside_the_sequence_are_never_visible(spec):
    i = numpy.arange(spec.seqlen_q)[:, None]
    assert not spec.visible(i, numpy.array([-1, spec.seqlen_k])[None, :]).any()


@given(spec=specs())
def test_each_row_sees_exactly_the_keys_between_its_first_and_last(spec):
    matrix = spec.matrix()
    for i in range(spec.seqlen_q):
        numpy.testing.assert_array_equal(matrix[i], _span(spec.seqlen_k, spec.first_key(i), spec.last_key(i) + 1))


@given(spec=specs(), data=st.data())
def test_tile_questions_agree_with_the_matrix(spec, data):
    if spec.seqlen_q == 0 or spec.seqlen_k == 0:
        return
    matrix = spec.matrix()
    for _ in range(8):
        i0, i1 = data.draw(ranges(spec.seqlen_q))
        j0, j1 = data.draw(ranges(spec.seqlen_k))
        rows, cols = matrix[i0:i1], matrix[:, j0:j1]
        where = f"rows {i0}:{i1}, keys {j0}:{j1} of {spec}"
        numpy.testing.assert_array_equal(_span(spec.seqlen_k, *spec.key_range(i0, i1)), rows.any(axis=0),
                                         err_msg=f"key_range, {where}")
        numpy.testing.assert_array_equal(_span(spec.seqlen_k, *spec.keys_seen_by_all(i0, i1)), rows.all(axis=0),
                                         err_msg=f"keys_seen_by_all, {where}")
        numpy.testing.assert_array_equal(_span(spec.seqlen_q, *spec.query_range(j0, j1)), cols.any(axis=1),
                                         err_msg=f"query_range, {where}")
        assert spec.tile_is_full(i0, i1, j0, j1) == matrix[i0:i1, j0:j1].all(), f"tile_is_full, {where}"


@pytest.mark.parametrize("alignment", ["bottom_right", "top_left"])
@pytest.mark.parametrize("left", [None, 0, 2])
@pytest.mark.parametrize("Sq,Sk", [(5, 9), (9, 5), (6, 6)])
def test_problem_mask_folds_causal_into_a_right_window_of_zero(Sq, Sk, left, alignment):
    rng = numpy.random.default_rng(Sq * Sk)
    q, k = rng.standard_normal((1, Sq, 1, 4)), rng.standard_normal((1, Sk, 1, 4))

    def mask(**options):
        return check_forward(q, k, k, causal_alignment=alignment, scale=None, backend="numpy", **options).mask

    causal = mask(causal=True, window=(left, None))
    assert causal == mask(causal=False, window=(left, 0)) == mask(causal=True, window=(left, 0))
    assert causal.offset == (Sk - Sq if alignment == "bottom_right" else 0)
    assert (causal.left, causal.right) == (left, 0)
