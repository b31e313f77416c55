"""Shared test machinery: random inputs, the same-dtype yardstick, error measures, poisoning.

Accuracy rule (FlashAttention's): a backend's max error against the float64 reference may be at
most ``factor`` times the error of a naive computation in the input dtype on the same inputs,
plus a small floor. The naive computation materializes S and P and rounds every intermediate
(S, P, O, dP, dS, and the gradients) to the input dtype, as a framework's plain matmul/softmax
code would; its error is what that dtype can be expected to give on these inputs.
"""

import numpy
from hypothesis import strategies as st

import cuflash
from cuflash._mask import MaskSpec

try:
    import ml_dtypes

    BFLOAT16 = numpy.dtype(ml_dtypes.bfloat16)
except ImportError:  # bfloat16 cases are skipped without ml_dtypes
    BFLOAT16 = None

DTYPES = [numpy.dtype(numpy.float16), numpy.dtype(numpy.float32), numpy.dtype(numpy.float64)]
if BFLOAT16 is not None:
    DTYPES.insert(1, BFLOAT16)

# Floors relative to ``magnitudes``: float32 accumulation noise (float64 for float64 inputs).
_FLOOR = {"float16": 2e-6, "bfloat16": 2e-6, "float32": 2e-6, "float64": 1e-13}


def random_array(rng, shape, dtype, scale=1.0):
    """Standard-normal data in ``dtype`` (never zeros)."""
    return (scale * rng.standard_normal(shape)).astype(dtype)


def make_inputs(rng, B, Sq, Sk, Hq, Hkv, D, Dv, dtype):
    q = random_array(rng, (B, Sq, Hq, D), dtype)
    k = random_array(rng, (B, Sk, Hkv, D), dtype)
    v = random_array(rng, (B, Sk, Hkv, Dv), dtype)
    dout = random_array(rng, (B, Sq, Hq, Dv), dtype)
    return q, k, v, dout


def _rounder(dtype):
    return lambda x: numpy.asarray(x).astype(dtype).astype(numpy.float64)


def windows(causal, sides):
    """Strategy: window=None, or (left, right) with each side drawn from ``sides`` (which may hold
    None, unbounded); with causal=True the right side is only None or 0, the values causal allows."""
    right = st.sampled_from([None, 0]) if causal else sides
    return st.one_of(st.none(), st.tuples(sides, right))


def mask_of(Sq, Sk, *, causal=False, causal_alignment="bottom_right", window=None):
    """The ``MaskSpec`` that the public options ``causal``, ``causal_alignment``, ``window`` describe."""
    left, right = (None, None) if window is None else window
    return MaskSpec(Sq, Sk, Sk - Sq if causal_alignment == "bottom_right" else 0, left, 0 if causal else right)


def alibi_bias(alibi_slopes, B, Hq, Sq, Sk, offset):
    """The ALiBi bias −slope[b, h] · |i + offset − j| as a float64 (B, Hq, Sq, Sk) array."""
    slopes = numpy.broadcast_to(numpy.asarray(alibi_slopes, dtype=numpy.float64), (B, Hq))
    distance = numpy.abs(numpy.arange(Sq)[:, None] + offset - numpy.arange(Sk)[None, :])
    return -slopes[:, :, None, None] * distance


def naive_same_dtype(q, k, v, dout, *, causal=False, causal_alignment="bottom_right", window=None, softcap=None,
                     alibi_slopes=None, scale=None):
    """(out, dq, dk, dv) computed plainly with every intermediate rounded to the input dtype.

    The score modifiers are written out here from their definitions (softcap c · tanh(S / c), then
    the ALiBi bias), independently of ``cuflash._score_mod``."""
    dtype = q.dtype
    r = _rounder(dtype)
    B, Sq, Hq, D = q.shape
    Sk, Hkv, Dv = k.shape[1], k.shape[2], v.shape[3]
    g = Hq // Hkv
    scale = 1.0 / numpy.sqrt(D) if scale is None else scale
    Q = q.astype(numpy.float64).transpose(0, 2, 1, 3)
    K = numpy.repeat(k.astype(numpy.float64).transpose(0, 2, 1, 3), g, axis=1)
    V = numpy.repeat(v.astype(numpy.float64).transpose(0, 2, 1, 3), g, axis=1)
    dO = dout.astype(numpy.float64).transpose(0, 2, 1, 3)
    mask = mask_of(Sq, Sk, causal=causal, causal_alignment=causal_alignment, window=window)
    S = r(scale * (Q @ K.transpose(0, 1, 3, 2)))
    Z = S
    if softcap:
        T = numpy.tanh(S / softcap)
        Z = r(softcap * T)
    if alibi_slopes is not None:
        Z = r(Z + alibi_bias(alibi_slopes, B, Hq, Sq, Sk, mask.offset))
    Z = numpy.where(mask.matrix(), Z, -numpy.inf)
    m = Z.max(axis=-1, keepdims=True, initial=-numpy.inf)
    E = numpy.exp(Z - numpy.where(numpy.isneginf(m), 0, m))
    den = E.sum(axis=-1, keepdims=True)
    P = r(numpy.where(den > 0, E / numpy.where(den > 0, den, 1), 0))
    O = r(P @ V)
    dV = r(P.transpose(0, 1, 3, 2) @ dO)
    dP = r(dO @ V.transpose(0, 1, 3, 2))
    dS = r(P * (dP - (dO * O).sum(axis=-1, keepdims=True)))
    if softcap:
        dS = r(dS * (1 - T * T))
    dQ = r(scale * (dS @ K))
    dK = r(scale * (dS.transpose(0, 1, 3, 2) @ Q))

    def per_kv(x):
        return r(x.reshape(B, Hkv, g, *x.shape[2:]).sum(axis=2)).transpose(0, 2, 1, 3)

    return O.transpose(0, 2, 1, 3), dQ.transpose(0, 2, 1, 3), per_kv(dK), per_kv(dV)


def max_error(x, ref):
    """max |x − ref| in float64 (0 for empty arrays); NaN anywhere makes it NaN."""
    x = numpy.asarray(x, dtype=numpy.float64)
    if x.size == 0:
        return 0.0
    return float(numpy.max(numpy.abs(x - ref)))


def magnitudes(q, k, v, dout, scale=None, bias=0.0):
    """Natural sizes of out, dq, dk, dv from the inputs, for the floors of ``assert_close``.

    Every backend accumulates in float32, so its rounding noise is float32's epsilon times the
    size of the terms it sums, which the (float64-summing) yardstick does not show: S and dP are
    bounded by row norms (Cauchy–Schwarz), and a relative error ε·|S| in P reaches every output.
    A gradient can also be near zero by cancellation (one visible key makes dS exactly 0) while
    the terms that cancel are this large. ``bias`` is the largest |ALiBi bias| of a visible key:
    it adds to the logits, and so to the size of their rounding errors.
    """
    scale = 1.0 / numpy.sqrt(q.shape[-1]) if scale is None else scale

    def max_norm(x):
        return float(numpy.sqrt(numpy.max((x.astype(numpy.float64) ** 2).sum(axis=-1), initial=0.0)))

    def max_abs(x):
        return float(numpy.max(numpy.abs(x.astype(numpy.float64)), initial=0.0))

    s = 1.0 + scale * max_norm(q) * max_norm(k) + bias
    p = max_norm(dout) * max_norm(v)
    return {
        "out": max_abs(v) * s,
        "dq": scale * p * max_norm(k) * s,
        "dk": scale * p * max_norm(q) * s,
        "dv": max_abs(dout) * s,
    }


def assert_close(name, x, ref, naive, dtype, factor=2.0, magnitude=0.0):
    """The accuracy rule above; NaN always fails (NaN comparisons are False).

    The floor scales with the larger of the reference's own size and ``magnitude``.
    """
    assert x.shape == ref.shape, f"{name}: shape {x.shape} != {ref.shape}"
    err = max_error(x, ref)
    naive_err = max_error(naive, ref)
    magnitude = max(magnitude, float(numpy.max(numpy.abs(ref))) if ref.size else 0.0)
    bound = factor * naive_err + _FLOOR[numpy.dtype(dtype).name] * max(1.0, magnitude)
    assert err <= bound, f"{name}: max error {err:.3g} > {bound:.3g} (naive {dtype} error {naive_err:.3g})"


def assert_lse_close(lse, ref_lse, dtype):
    """Same −inf pattern as the reference, finite values within float32/64 accuracy."""
    lse = numpy.asarray(lse, dtype=numpy.float64)
    assert numpy.array_equal(numpy.isneginf(lse), numpy.isneginf(ref_lse)), "lse: fully masked rows differ"
    finite = numpy.isfinite(ref_lse)
    tol = 1e-12 if numpy.dtype(dtype) == numpy.float64 else 2e-5
    err = max_error(lse[finite], ref_lse[finite])
    assert err <= tol * max(1.0, float(numpy.max(numpy.abs(ref_lse[finite]), initial=0))), f"lse: max error {err:.3g}"


def gpu_skip_reason():
    ok, reason = cuflash.gpu_available()
    return None if ok else reason
