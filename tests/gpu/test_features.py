"""Sliding windows, softcap and ALiBi on the CUDA kernels, forward and backward, against float64.

Every case runs the GPU forward and backward (both dQ modes) and holds each output to the
same-dtype rule of cuflash.testing against the float64 reference, on NaN-prefilled outputs.
"""

import numpy
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import cuflash
from cuflash._cuda import runtime, variants
from cuflash.testing import assert_attention_close, assert_attention_grads_close, attention_problems

from ..helpers import BFLOAT16, gpu_skip_reason, magnitudes, make_inputs

_SKIP = gpu_skip_reason()
pytestmark = pytest.mark.skipif(_SKIP is not None, reason=f"no usable GPU: {_SKIP}")

GPU_DTYPES = [numpy.dtype(numpy.float16), numpy.dtype(numpy.float32)] + ([BFLOAT16] if BFLOAT16 is not None else [])


def _slopes(rng, B, Hq, per_batch):
    shape = (B, Hq) if per_batch else (Hq,)
    return rng.uniform(0.01, 1.0, size=shape).astype(numpy.float32)


def check(q, k, v, dout, deterministic=False, **options):
    """Forward and backward on the GPU against the reference; returns (out, lse, dq, dk, dv).

    The floors leave out the ALiBi bias's share that the rule allows (``magnitudes``' ``bias``):
    the kernels have always met the tighter bound."""
    sizes = magnitudes(q, k, v, dout, options.get("scale"))
    out, lse = cuflash.attention(q, k, v, return_lse=True, backend="cuda", **options)
    assert_attention_close(out, q, k, v, lse=lse, floor_sizes=sizes, **options)
    grads = cuflash.attention_backward(dout, q, k, v, out, lse, backend="cuda", deterministic=deterministic,
                                       **options)
    assert_attention_grads_close(*grads, q, k, v, dout, floor_sizes=sizes, **options)
    return (out, lse, *grads)


def check_case(B, Sq, Sk, Hq, Hkv, D, Dv, dtype, seed, deterministic=False, alibi=None, **options):
    """``check`` on inputs drawn from ``seed``, with ALiBi slopes of shape (Hq,) ("head") or (B, Hq)."""
    rng = numpy.random.default_rng(seed)
    q, k, v, dout = make_inputs(rng, B, Sq, Sk, Hq, Hkv, D, Dv, dtype)
    if alibi is not None:
        options["alibi_slopes"] = _slopes(rng, B, Hq, alibi == "batch_head")
    return check(q, k, v, dout, deterministic, **options)


@settings(max_examples=40, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(problem=attention_problems(dtypes=GPU_DTYPES, min_seqlen=1, max_seqlen=300,
                                  lengths=[1, 16, 17, 63, 64, 65, 129, 200], max_heads_kv=2, group_sizes=(1, 2, 4),
                                  layouts=("contiguous",), scale_range=(0.05, 1.0)),
       deterministic=st.booleans())
def test_drawn_features_match_reference(problem, deterministic, poisoned):
    p = problem
    check(p.q, p.k, p.v, p.dout, deterministic, **p.options)


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
    """(family, bucket, SCORE_MODS): both modifiers at every bucket of the sm80 and sm90 families
    (the sm75 family's, float16 only, are in test_turing.py), and every modifier set that has tiles
    of its own (the spill tables)."""
    chosen = {(family, bucket, 3) for family in ("sm80", "sm90") for bucket in variants.HEAD_DIM_BUCKETS}
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


@pytest.mark.parametrize("options", [dict(), dict(causal=True), dict(window=(1500, 300)),
                                     dict(softcap=20.0, alibi="head"), dict(causal=True, causal_alignment="top_left")],
                         ids=["full", "causal", "window", "softcap-alibi", "causal-top-left"])
@pytest.mark.parametrize("sizes", [(130, 2100, 64, 64), (70, 4100, 256, 200), (257, 1025, 128, 96)],
                         ids=lambda s: "Sq{}-Sk{}-D{}-Dv{}".format(*s))
def test_float32_rows_across_partial_sum_moves(sizes, options, poisoned):
    """The float32 forward moves O_i's running sum into the out buffer every 1024 keys and adds it
    back at the end (fwd_sm80.cu, kFlushKeys): rows that cross several moves, with row tails, Dv < D
    and the masks and modifiers that change which keys a row sees, against float64 on NaN-filled
    outputs (a first move that read the out buffer would bring the NaN in)."""
    Sq, Sk, D, Dv = sizes
    check_case(1, Sq, Sk, 2, 1, D, Dv, numpy.dtype(numpy.float32), Sq + Sk, **options)


def test_float32_row_max_grows_after_a_partial_sum_moved(poisoned):
    """Keys scaled up towards the start of the sequence: the kernel walks key tiles from the last
    to the first, so the row max keeps growing after O_i has moved out, and what was moved must be
    rescaled to the new max when it comes back."""
    rng = numpy.random.default_rng(11)
    q, k, v, dout = make_inputs(rng, 1, 96, 3000, 2, 2, 64, 64, numpy.dtype(numpy.float32))
    k *= numpy.linspace(4.0, 0.25, k.shape[1], dtype=numpy.float32)[None, :, None, None]
    check(q, k, v, dout)
