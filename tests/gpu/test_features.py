"""Sliding windows, softcap and ALiBi on the CUDA kernels, forward and backward, against float64.

Every case runs the GPU forward and backward (both dQ modes) and holds each output to the
same-dtype rule of tests/helpers.py against the float64 reference, on NaN-prefilled outputs.
"""

import numpy
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import cuflash
from cuflash._cuda import runtime, variants

from ..helpers import BFLOAT16, assert_close, assert_lse_close, gpu_skip_reason, magnitudes, make_inputs, \
    naive_same_dtype

_SKIP = gpu_skip_reason()
pytestmark = pytest.mark.skipif(_SKIP is not None, reason=f"no usable GPU: {_SKIP}")

GPU_DTYPES = [numpy.dtype(numpy.float16), numpy.dtype(numpy.float32)] + ([BFLOAT16] if BFLOAT16 is not None else [])


def _slopes(rng, B, Hq, per_batch):
    shape = (B, Hq) if per_batch else (Hq,)
    return rng.uniform(0.01, 1.0, size=shape).astype(numpy.float32)


def check_case(B, Sq, Sk, Hq, Hkv, D, Dv, dtype, seed, deterministic=False, alibi=None, **options):
    """Forward and backward on the GPU against the reference; returns (out, lse, dq, dk, dv)."""
    rng = numpy.random.default_rng(seed)
    q, k, v, dout = make_inputs(rng, B, Sq, Sk, Hq, Hkv, D, Dv, dtype)
    if alibi is not None:
        options["alibi_slopes"] = _slopes(rng, B, Hq, alibi == "batch_head")
    out, lse = cuflash.attention(q, k, v, return_lse=True, backend="cuda", **options)
    ref_out, ref_lse = cuflash.reference.attention(q, k, v, **options)
    naive = naive_same_dtype(q, k, v, dout, **options)
    sizes = magnitudes(q, k, v, dout, options.get("scale"))
    assert_close("out", out, ref_out, naive[0], dtype, magnitude=sizes["out"])
    assert_lse_close(lse, ref_lse, dtype)
    grads = cuflash.attention_backward(dout, q, k, v, out, lse, backend="cuda", deterministic=deterministic,
                                       **options)
    ref_grads = cuflash.reference.attention_backward(dout, q, k, v, **options)
    for name, x, ref, nv in zip(("dq", "dk", "dv"), grads, ref_grads, naive[1:]):
        assert_close(name, x, ref, nv, dtype, factor=3.0, magnitude=sizes[name])
    return (out, lse, *grads)


SIZES = st.one_of(st.sampled_from([1, 16, 17, 63, 64, 65, 129, 200]), st.integers(1, 300))
SIDE = st.one_of(st.none(), st.integers(0, 8), st.integers(0, 300))


@st.composite
def cases(draw):
    heads_kv = draw(st.integers(1, 2))
    head_dim = draw(st.one_of(st.sampled_from([32, 59, 64, 128, 200, 256]), st.integers(1, 256)))
    causal = draw(st.booleans())
    return dict(
        B=draw(st.integers(1, 2)), Sq=draw(SIZES), Sk=draw(SIZES), Hq=heads_kv * draw(st.sampled_from([1, 2, 4])),
        Hkv=heads_kv, D=head_dim, Dv=draw(st.one_of(st.just(head_dim), st.integers(1, 256))),
        dtype=draw(st.sampled_from(GPU_DTYPES)), seed=draw(st.integers(0, 2**32 - 1)),
        causal=causal, causal_alignment=draw(st.sampled_from(["bottom_right", "top_left"])),
        window=draw(st.one_of(st.none(), st.tuples(SIDE, st.just(None) if causal else SIDE))),
        softcap=draw(st.one_of(st.none(), st.floats(0.5, 50.0))),
        alibi=draw(st.sampled_from([None, "head", "batch_head"])),
        scale=draw(st.one_of(st.none(), st.floats(0.05, 1.0))),
        deterministic=draw(st.booleans()),
    )


@settings(max_examples=40, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=cases())
def test_drawn_features_match_reference(case, poisoned):
    check_case(**case)


@pytest.mark.parametrize("dtype", GPU_DTYPES, ids=str)
@pytest.mark.parametrize("window", [(0, 0), (5, 3), (64, 0), (127, 129), (None, 17), (300, None)],
                         ids=lambda w: f"w{w[0]},{w[1]}")
@pytest.mark.parametrize("sizes", [(333, 333, 64), (200, 517, 128), (517, 200, 96), (129, 129, 256)],
                         ids=lambda s: "Sq{}-Sk{}-D{}".format(*s))
def test_windows_across_tile_edges(sizes, window, dtype, poisoned):
    Sq, Sk, D = sizes
    for deterministic in (False, True):
        check_case(1, Sq, Sk, 4, 2, D, D, dtype, Sq + Sk + D, deterministic=deterministic, window=window)


@pytest.mark.parametrize("dtype", GPU_DTYPES, ids=str)
@pytest.mark.parametrize("mods", [dict(softcap=30.0), dict(alibi="head"), dict(softcap=5.0, alibi="batch_head")],
                         ids=["softcap", "alibi", "both"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_score_modifiers(mods, causal, dtype, poisoned):
    for deterministic in (False, True):
        check_case(2, 257, 300, 4, 1, 64, 64, dtype, 3, deterministic=deterministic, causal=causal,
                   window=(100, None), **mods)


def test_rows_a_window_leaves_empty_follow_the_masked_row_rule(poisoned):
    """Bottom-right, Sq > Sk, window (10, 0): query rows 0..Sq-Sk-1 see no key."""
    Sq, Sk = 300, 70
    out, lse, dq, dk, dv = check_case(1, Sq, Sk, 2, 1, 64, 64, numpy.dtype(numpy.float16), 1, window=(10, 0))
    empty = Sq - Sk
    assert numpy.all(out[:, :empty] == 0) and numpy.all(numpy.isneginf(lse[:, :, :empty]))
    assert numpy.all(dq[:, :empty] == 0)
    assert numpy.isfinite(dk.astype(numpy.float32)).all() and numpy.isfinite(dv.astype(numpy.float32)).all()


def _modifier_variants():
    """(family, bucket, SCORE_MODS): both modifiers at every bucket of both families, and every
    modifier set that has tiles of its own (the spill tables)."""
    chosen = {(family, bucket, 3) for family in variants.FAMILY_ARCHS for bucket in variants.HEAD_DIM_BUCKETS}
    for family, _, bucket, mods, _ in list(variants.FWD_SPILL_TILES) + list(variants.BWD_SPILL_TILES):
        if mods:
            chosen.add((family, bucket, mods))
    return sorted(chosen)


@pytest.mark.parametrize("family, bucket, mods", _modifier_variants(), ids=lambda x: str(x))
def test_every_table_entry_with_score_modifiers(family, bucket, mods, poisoned, monkeypatch):
    """The variants a score modifier compiles (their own tiles included), in both families' tables
    (the sm80 family's run on whatever GPU this is)."""
    if family == "sm90" and runtime.compute_capability()[0] != 9:
        pytest.skip("sm90 entries use sm_90a instructions")
    monkeypatch.setattr(variants, "family", lambda major, minor: family)
    options = dict(softcap=20.0 if mods & 1 else None, alibi="head" if mods & 2 else None)
    for dtype in GPU_DTYPES:
        for deterministic in (False, True):
            check_case(1, 200, 157, 4, 2, bucket, bucket, dtype, bucket + mods, deterministic=deterministic,
                       causal=True, window=(90, None), **options)
