"""float64 on the GPU (kernels/fwd_f64.cu, bwd_dkdv_f64.cu, bwd_dq_f64.cu) against the float64 reference.

The rule for every output (out, lse, dq, dk, dv), on NaN-prefilled outputs: its max error against
``cuflash.reference`` is at most 1e-12 of its scale (the larger of the reference's max |x| and the
natural size ``helpers.magnitudes`` gives it) and at most ``NAIVE_FACTOR`` times the error of a naive
CuPy float64 computation on the same inputs (S and P materialized, cuBLAS products), plus 1e-14 of
the scale. Skipped cleanly where no GPU is usable.
"""

import numpy
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import cuflash
from cuflash._cuda import runtime, variants

from ..helpers import alibi_bias, gpu_skip_reason, magnitudes, mask_of, windows

_SKIP = gpu_skip_reason()
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(_SKIP is not None, reason=f"no usable GPU: {_SKIP}")]

F64 = numpy.dtype(numpy.float64)
TOLERANCE = 1e-12
NAIVE_FACTOR = 3.0
FLOOR = 1e-14


def _cupy():
    import cupy

    return cupy


def naive_cupy(q, k, v, dout, *, causal=False, causal_alignment="bottom_right", window=None, softcap=None,
               alibi_slopes=None, scale=None):
    """(out, lse, dq, dk, dv): softmax(S) V and its gradients written plainly in CuPy float64, the
    yardstick a float64 user has without cuflash."""
    cp = _cupy()
    B, Sq, Hq, D = q.shape
    Sk, Hkv = k.shape[1], k.shape[2]
    g = Hq // Hkv
    scale = 1.0 / numpy.sqrt(D) if scale is None else scale
    Q, dO = q.transpose(0, 2, 1, 3), dout.transpose(0, 2, 1, 3)
    K = cp.repeat(k.transpose(0, 2, 1, 3), g, axis=1)
    V = cp.repeat(v.transpose(0, 2, 1, 3), g, axis=1)
    mask = mask_of(Sq, Sk, causal=causal, causal_alignment=causal_alignment, window=window)
    seen = cp.asarray(mask.matrix())
    S = scale * (Q @ K.transpose(0, 1, 3, 2))
    Z = S
    if softcap:
        T = cp.tanh(S / softcap)
        Z = softcap * T
    if alibi_slopes is not None:
        Z = Z + cp.asarray(alibi_bias(cp.asnumpy(alibi_slopes), B, Hq, Sq, Sk, mask.offset))
    Z = cp.where(seen, Z, -cp.inf)
    m = Z.max(axis=-1, keepdims=True) if Sk else cp.full(Z.shape[:-1] + (1,), -cp.inf)
    m = cp.where(cp.isneginf(m), 0.0, m)
    E = cp.exp(Z - m)
    den = E.sum(axis=-1, keepdims=True)
    P = cp.where(den > 0, E / cp.where(den > 0, den, 1.0), 0.0)
    lse = cp.where(den[..., 0] > 0, m[..., 0] + cp.log(cp.where(den[..., 0] > 0, den[..., 0], 1.0)), -cp.inf)
    O = P @ V
    dV = P.transpose(0, 1, 3, 2) @ dO
    dP = dO @ V.transpose(0, 1, 3, 2)
    dS = P * (dP - (dO * O).sum(axis=-1, keepdims=True))
    if softcap:
        dS = dS * (1 - T * T)
    dQ = scale * (dS @ K)
    dK = scale * (dS.transpose(0, 1, 3, 2) @ Q)

    def per_kv(x):
        return x.reshape(B, Hkv, g, *x.shape[2:]).sum(axis=2).transpose(0, 2, 1, 3)

    return O.transpose(0, 2, 1, 3), lse, dQ.transpose(0, 2, 1, 3), per_kv(dK), per_kv(dV)


def _error(x, ref):
    x = numpy.asarray(x, dtype=numpy.float64)
    return float(numpy.max(numpy.abs(x - ref))) if x.size else 0.0


def _assert_rule(name, x, ref, naive, size):
    assert x.dtype == F64 and x.shape == ref.shape, (name, x.dtype, x.shape)
    scale = max(size, float(numpy.max(numpy.abs(ref), initial=0.0)), 1e-300)
    err, naive_err = _error(x, ref), _error(naive, ref)
    assert err <= TOLERANCE * scale, f"{name}: max error {err:.3g} > {TOLERANCE:g} of its scale {scale:.3g}"
    bound = NAIVE_FACTOR * naive_err + FLOOR * scale
    assert err <= bound, f"{name}: max error {err:.3g} > {bound:.3g} (naive CuPy float64 error {naive_err:.3g})"


def _lse_rule(lse, ref_lse, naive_lse):
    lse = numpy.asarray(lse)
    assert lse.dtype == F64
    assert numpy.array_equal(numpy.isneginf(lse), numpy.isneginf(ref_lse)), "lse: rows that see no key differ"
    finite = numpy.isfinite(ref_lse)
    _assert_rule("lse", lse[finite], ref_lse[finite], numpy.asarray(naive_lse)[finite], 1.0)


def _layout(cp, x, layout):
    """x (a host array) on the GPU as "contiguous" BSHD, "bhsd" storage seen as BSHD, or "strided":
    every other element of a wider last dimension (the kernels' element-wise loading path)."""
    if layout == "bhsd":
        return cp.ascontiguousarray(cp.asarray(x).transpose(0, 2, 1, 3)).transpose(0, 2, 1, 3)
    if layout == "strided":
        wide = cp.zeros(x.shape[:-1] + (2 * x.shape[-1],), dtype=x.dtype)
        wide[..., ::2] = cp.asarray(x)
        return wide[..., ::2]
    return cp.asarray(x)


def run_case(B, Sq, Sk, Hq, Hkv, D, Dv, seed=0, deterministic=False, alibi=None, layout="contiguous", **options):
    """Forward and backward on the GPU against the reference and the naive CuPy computation;
    returns the GPU results (CuPy arrays)."""
    cp = _cupy()
    rng = numpy.random.default_rng(seed)
    host = [rng.standard_normal(shape) for shape in ((B, Sq, Hq, D), (B, Sk, Hkv, D), (B, Sk, Hkv, Dv), (B, Sq, Hq, Dv))]
    q, k, v, dout = (_layout(cp, x, layout) for x in host)
    bias = 0.0
    if alibi is not None:
        slopes = rng.uniform(0.01, 1.0, size=(B, Hq) if alibi == "batch_head" else (Hq,)).astype(numpy.float32)
        options["alibi_slopes"] = cp.asarray(slopes)
        bias = float(slopes.max()) * (Sq + Sk)
    out, lse = cuflash.attention(q, k, v, return_lse=True, backend="cuda", **options)
    assert isinstance(out, cp.ndarray) and lse.dtype == F64
    dq, dk, dv = cuflash.attention_backward(dout, q, k, v, out, lse, backend="cuda", deterministic=deterministic,
                                            **options)
    ref_options = dict(options)
    if "alibi_slopes" in ref_options:
        ref_options["alibi_slopes"] = cp.asnumpy(ref_options["alibi_slopes"])
    ref_out, ref_lse = cuflash.reference.attention(*host[:3], **ref_options)
    ref_grads = cuflash.reference.attention_backward(host[3], *host[:3], **ref_options)
    naive = [cp.asnumpy(x) for x in naive_cupy(*(cp.asarray(x) for x in host), **options)]
    sizes = magnitudes(*host, options.get("scale"), bias)
    _assert_rule("out", cp.asnumpy(out), ref_out, naive[0], sizes["out"])
    _lse_rule(cp.asnumpy(lse), ref_lse, naive[1])
    for name, x, r, nv in zip(("dq", "dk", "dv"), (dq, dk, dv), ref_grads, naive[2:]):
        _assert_rule(name, cp.asnumpy(x), r, nv, sizes[name])
    return out, lse, dq, dk, dv


@st.composite
def cases(draw):
    heads_kv = draw(st.integers(1, 2))
    group = draw(st.sampled_from([1, 2, 3, 4]))
    head_dim = draw(st.one_of(st.sampled_from([1, 32, 40, 64, 96, 128, 160, 256]), st.integers(1, 256)))
    size = st.one_of(st.sampled_from([1, 2, 8, 16, 17, 63, 64, 65, 129]), st.integers(1, 300))
    causal = draw(st.booleans())
    return dict(
        B=draw(st.integers(1, 2)), Sq=draw(size), Sk=draw(size), Hq=heads_kv * group, Hkv=heads_kv, D=head_dim,
        Dv=draw(st.one_of(st.just(head_dim), st.integers(1, 256))), causal=causal,
        causal_alignment=draw(st.sampled_from(["bottom_right", "top_left"])),
        window=draw(windows(causal, st.one_of(st.none(), st.integers(0, 80)))),
        softcap=draw(st.sampled_from([None, None, 0.5, 5.0])), alibi=draw(st.sampled_from([None, "head", "batch_head"])),
        scale=draw(st.one_of(st.none(), st.floats(0.05, 1.0))), seed=draw(st.integers(0, 2**32 - 1)),
        deterministic=draw(st.booleans()), layout=draw(st.sampled_from(["contiguous", "bhsd", "strided"])),
    )


@settings(max_examples=60, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=cases())
def test_drawn_shapes_and_features_match_reference(case, poisoned):
    run_case(**case)


def _family():
    return variants.family(*runtime.compute_capability())


@pytest.mark.parametrize("bucket", variants.HEAD_DIM_BUCKETS)
def test_every_table_entry(bucket, poisoned):
    """Every float64 instantiation of this device's family runs once: each bucket (at its full width
    and with D, Dv below it, zero-padded), every score-modifier set, both loading paths and both dQ
    modes, with tails in both sequence lengths."""
    table = variants.FWD_TILES[(_family(), "float64")]
    assert bucket in table
    smaller = max(1, bucket - 27)
    runs = [(bucket, bucket, "contiguous", False), (bucket, bucket, "contiguous", True),
            (bucket, smaller, "strided", False), (smaller, bucket, "bhsd", True)]
    for mods, (softcap, alibi) in enumerate([(None, None), (3.0, None), (None, "head"), (3.0, "batch_head")]):
        for D, Dv, layout, deterministic in runs:
            run_case(2, 75, 93, 4, 2, D, Dv, seed=bucket + mods, causal=mods >= 2, softcap=softcap, alibi=alibi,
                     layout=layout, deterministic=deterministic)


@pytest.mark.parametrize("D", [64, 128])
def test_long_sequences_and_windows(D, poisoned):
    run_case(1, 1100, 1300, 4, 1, D, D, seed=D, causal=True, window=(300, 0))
    run_case(1, 700, 513, 2, 2, D, D, seed=D + 1, causal_alignment="top_left", window=(40, 90))


def test_deterministic_mode_is_bitwise_reproducible(poisoned):
    cp = _cupy()
    first = run_case(2, 300, 420, 8, 2, 64, 64, seed=3, causal=True, deterministic=True)
    for _ in range(3):
        again = run_case(2, 300, 420, 8, 2, 64, 64, seed=3, causal=True, deterministic=True)
        for a, b in zip(first, again):
            assert cp.array_equal(a, b)


def test_rows_that_see_no_key_get_zero_output_minus_inf_lse_and_zero_gradients(poisoned):
    """Sq > Sk with a bottom-right causal mask: the first Sq - Sk rows see nothing, and a window
    leaves keys that no row sees."""
    cp = _cupy()
    B, Sq, Sk, H, D = 2, 200, 70, 4, 64
    for deterministic in (False, True):
        out, lse, dq, dk, dv = run_case(B, Sq, Sk, H, H, D, D, seed=11, causal=True, deterministic=deterministic)
        blind = Sq - Sk
        assert cp.all(out[:, :blind] == 0) and cp.all(cp.isneginf(lse[:, :, :blind]))
        assert cp.all(dq[:, :blind] == 0)
        out, lse, dq, dk, dv = run_case(1, 64, 300, 2, 2, D, D, seed=12, causal=True, window=(10, 0),
                                        deterministic=deterministic)
        # Keys before 300 - 64 - 10 are seen by no row.
        assert cp.all(dk[:, :226] == 0) and cp.all(dv[:, :226] == 0)
        out, lse, dq, dk, dv = run_case(1, 5, 0, 1, 1, D, D, seed=13, deterministic=deterministic)
        assert cp.all(out == 0) and cp.all(cp.isneginf(lse)) and cp.all(dq == 0)


def test_auto_backend_runs_gpu_float64_on_the_kernels_and_host_float64_on_numpy(monkeypatch):
    from cuflash import _dispatch

    cp = _cupy()
    calls = []
    for backend in (_dispatch.BACKENDS["cuda"], _dispatch.BACKENDS["numpy"]):
        cls = type(backend)

        def recorded(self, *args, _original=cls.forward, _name=backend.name):
            calls.append(_name)
            return _original(self, *args)

        monkeypatch.setattr(cls, "forward", recorded)
    q = numpy.random.default_rng(0).standard_normal((1, 33, 2, 64))
    cuflash.attention(cp.asarray(q), cp.asarray(q), cp.asarray(q))
    cuflash.attention(q, q, q)
    assert calls == ["cuda", "numpy"]
