"""Property tests for attention, the way cuflash tests itself: drawn problems and one accuracy rule.

For an attention implementation of your own (or cuflash inside your model), in your test suite::

    from hypothesis import given
    from cuflash.testing import assert_attention_close, attention_problems

    @given(attention_problems(max_seqlen=64, features={"causal", "window"}))
    def test_my_attention(problem):
        out = my_attention(problem.q, problem.k, problem.v, **problem.options)
        assert_attention_close(out, problem.q, problem.k, problem.v, **problem.options)

**The accuracy rule** (FlashAttention's). Against the float64 reference (``cuflash.reference``),
a result's max error may be at most ``factor`` times the max error of a naive computation in the
input dtype on the same inputs (``naive_same_dtype``: S, P, O and every backward intermediate
materialized and rounded to that dtype, as plain matmul/softmax code would), plus a floor for the
float32 accumulation every implementation does: a small multiple of float32's (float64's) epsilon
times the natural size of the result (``magnitudes``). The error a dtype gives on these inputs
is thus measured, not guessed, so one rule holds for float16, bfloat16, float32 and float64.
cuflash's own tests use ``factor`` 2 for the output and 3 for the gradients.

Non-finite values are held to the contract: where the reference is NaN or ±inf the result must be
the same; a NaN where the reference is finite always fails.

The assertions take any array cuflash takes (NumPy, CuPy, PyTorch, JAX or any DLPack producer),
read the way cuflash reads its operands. Hypothesis is optional: without it the assertions and
the NumPy helpers work, and the strategies (``attention_problems``, ``windows``) raise ImportError
when called.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Collection, Mapping, Optional, Sequence, Union

import numpy

from . import reference
from ._interop import import_operands

if TYPE_CHECKING:
    from hypothesis.strategies import SearchStrategy

__all__ = ["AttentionProblem", "BFLOAT16", "DTYPES", "FEATURES", "HEAD_DIMS", "LAYOUTS", "alibi_bias",
           "assert_attention_close", "assert_attention_grads_close", "assert_lse_close", "assert_within_naive_error",
           "attention_problems", "magnitudes", "naive_same_dtype", "random_inputs", "windows"]

try:
    import ml_dtypes

    BFLOAT16: Optional[numpy.dtype] = numpy.dtype(ml_dtypes.bfloat16)
except ImportError:  # NumPy holds bfloat16 only through ml_dtypes
    BFLOAT16 = None

#: The dtypes cuflash computes in that NumPy can hold here (bfloat16 needs ml_dtypes).
DTYPES: tuple = tuple(d for d in (numpy.dtype(numpy.float16), BFLOAT16, numpy.dtype(numpy.float32),
                                  numpy.dtype(numpy.float64)) if d is not None)

#: The features ``attention_problems`` can draw: the options of ``cuflash.attention``.
FEATURES = frozenset({"causal", "top_left", "window", "softcap", "alibi", "scale"})

#: How ``attention_problems`` can store an operand: contiguous BSHD; (B, H, S, D) storage passed as
#: a transposed view; a last dimension with stride 2 (a slice of a wider array).
LAYOUTS = ("contiguous", "bhsd", "strided")

#: Head dims drawn often: tile sizes (multiples of 32) and sizes between them.
HEAD_DIMS = (1, 8, 32, 40, 59, 64, 96, 111, 128, 200, 256)

# Floors relative to ``magnitudes``: float32 accumulation noise (float64 for float64 inputs).
_FLOOR = {"float16": 2e-6, "bfloat16": 2e-6, "float32": 2e-6, "float64": 1e-13}

Array = Any  # NumPy, CuPy, PyTorch, JAX or any DLPack producer
Window = Optional[tuple]


# -- inputs -------------------------------------------------------------------------------------


def random_inputs(rng: numpy.random.Generator, B: int, Sq: int, Sk: int, Hq: int, Hkv: int, D: int, Dv: int,
                  dtype: Any) -> tuple:
    """``(q, k, v, dout)``: standard-normal BSHD NumPy arrays in ``dtype``. Never zeros or constants,
    which would let an implementation that drops or mixes up an operand pass."""
    def draw(shape):
        return rng.standard_normal(shape).astype(dtype)

    return draw((B, Sq, Hq, D)), draw((B, Sk, Hkv, D)), draw((B, Sk, Hkv, Dv)), draw((B, Sq, Hq, Dv))


def _host(name: str, x: Array) -> numpy.ndarray:
    """``x`` as a NumPy array, imported the way cuflash imports an operand (copied from the GPU)."""
    if type(x) is numpy.ndarray:
        return x
    (array,), origin = import_operands("cuflash.testing", **{name: x})
    with origin.context():
        return array if isinstance(array, numpy.ndarray) else array.get()


def _options(causal, causal_alignment, window, softcap, alibi_slopes, scale):
    return dict(causal=causal, causal_alignment=causal_alignment, window=window, softcap=softcap,
                alibi_slopes=None if alibi_slopes is None else _host("alibi_slopes", alibi_slopes), scale=scale)


def _visible(Sq, Sk, causal, causal_alignment, window):
    """(offset, seen): the alignment offset and the (Sq, Sk) matrix of the pairs a query may see,
    written out from the contract (key j to query i iff i + offset − left <= j <= i + offset + right,
    causal meaning right = 0) rather than asked of cuflash, whose answers it checks."""
    offset = Sk - Sq if causal_alignment == "bottom_right" else 0
    left, right = (None, None) if window is None else window
    right = 0 if causal else right
    d = numpy.arange(Sk)[None, :] - numpy.arange(Sq)[:, None] - offset  # j − (i + offset)
    seen = numpy.ones((Sq, Sk), dtype=bool)
    if left is not None:
        seen &= d >= -left
    if right is not None:
        seen &= d <= right
    return offset, seen


def alibi_bias(alibi_slopes: Array, B: int, Hq: int, Sq: int, Sk: int, offset: int) -> numpy.ndarray:
    """The ALiBi bias −slope[b, h] · |i + offset − j| as a float64 (B, Hq, Sq, Sk) array, from slopes
    of shape (Hq,) or (B, Hq) and the alignment offset (Sk − Sq bottom-right, 0 top-left)."""
    slopes = numpy.broadcast_to(_host("alibi_slopes", alibi_slopes).astype(numpy.float64), (B, Hq))
    distance = numpy.abs(numpy.arange(Sq)[:, None] + offset - numpy.arange(Sk)[None, :])
    return -slopes[:, :, None, None] * distance


def _largest_visible_bias(q, k, options):
    """max |ALiBi bias| over the visible (query, key) pairs; 0 without ALiBi or without such pairs."""
    if options["alibi_slopes"] is None:
        return 0.0
    (B, Sq, Hq, _), Sk = q.shape, k.shape[1]
    offset, seen = _visible(Sq, Sk, options["causal"], options["causal_alignment"], options["window"])
    bias = numpy.abs(alibi_bias(options["alibi_slopes"], B, Hq, Sq, Sk, offset))
    return float(numpy.max(bias[..., seen], initial=0.0))


# -- the yardstick ------------------------------------------------------------------------------


def naive_same_dtype(q: Array, k: Array, v: Array, dout: Optional[Array], *, causal: bool = False,
                     causal_alignment: str = "bottom_right", window: Window = None, softcap: Optional[float] = None,
                     alibi_slopes: Optional[Array] = None, scale: Optional[float] = None) -> tuple:
    """``(out, dq, dk, dv)`` computed plainly with every intermediate rounded to the input dtype.

    The yardstick of the accuracy rule: S and P are materialized, and S, the logits, P, O, dP,
    dS and the gradients are each rounded to q's dtype, as a framework's plain code would. The
    mask and the score modifiers (softcap c · tanh(S / c), then the ALiBi bias) are written out
    here from their definitions, independently of cuflash. With ``dout=None`` only ``out`` is
    computed (the gradients come back as None). Returns BSHD float64 NumPy arrays; the inputs may
    be any array cuflash takes.
    """
    q, k, v = _host("q", q), _host("k", k), _host("v", v)
    dtype = q.dtype

    def r(x):
        return numpy.asarray(x).astype(dtype).astype(numpy.float64)

    B, Sq, Hq, D = q.shape
    Sk, Hkv = k.shape[1], k.shape[2]
    g = Hq // Hkv
    scale = 1.0 / numpy.sqrt(D) if scale is None else scale
    Q = q.astype(numpy.float64).transpose(0, 2, 1, 3)
    K = numpy.repeat(k.astype(numpy.float64).transpose(0, 2, 1, 3), g, axis=1)
    V = numpy.repeat(v.astype(numpy.float64).transpose(0, 2, 1, 3), g, axis=1)
    offset, seen = _visible(Sq, Sk, causal, causal_alignment, window)
    S = r(scale * (Q @ K.transpose(0, 1, 3, 2)))
    Z = S
    if softcap:
        T = numpy.tanh(S / softcap)
        Z = r(softcap * T)
    if alibi_slopes is not None:
        Z = r(Z + alibi_bias(alibi_slopes, B, Hq, Sq, Sk, offset))
    Z = numpy.where(seen, Z, -numpy.inf)
    m = Z.max(axis=-1, keepdims=True, initial=-numpy.inf)
    E = numpy.exp(Z - numpy.where(numpy.isneginf(m), 0, m))
    den = E.sum(axis=-1, keepdims=True)
    P = r(numpy.where(den > 0, E / numpy.where(den > 0, den, 1), 0))
    O = r(P @ V)
    if dout is None:
        return O.transpose(0, 2, 1, 3), None, None, None
    dO = _host("dout", dout).astype(numpy.float64).transpose(0, 2, 1, 3)
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


def magnitudes(q: Array, k: Array, v: Array, dout: Optional[Array], scale: Optional[float] = None,
               bias: float = 0.0) -> dict:
    """Natural sizes of out, dq, dk, dv (dict keys) from the inputs, which the rule's floors scale with.

    Every implementation accumulates in float32 (float64 for float64), so its rounding noise is
    that epsilon times the size of the terms it sums, which the float64-summing naive yardstick
    does not show: S and dP are bounded by row norms (Cauchy–Schwarz), and a relative error ε·|S|
    in P reaches every output. A gradient can also be near zero by cancellation (one visible key
    makes dS exactly 0) while the terms that cancel are this large. ``bias`` is the largest
    |ALiBi bias| of a visible key: it adds to the logits, and so to the size of their rounding
    errors. With ``dout=None`` only "out" is given.
    """
    q, k, v = _host("q", q), _host("k", k), _host("v", v)
    scale = 1.0 / numpy.sqrt(q.shape[-1]) if scale is None else scale

    def max_norm(x):
        return float(numpy.sqrt(numpy.max((x.astype(numpy.float64) ** 2).sum(axis=-1), initial=0.0)))

    def max_abs(x):
        return float(numpy.max(numpy.abs(x.astype(numpy.float64)), initial=0.0))

    s = 1.0 + scale * max_norm(q) * max_norm(k) + bias
    sizes = {"out": max_abs(v) * s}
    if dout is not None:
        dout = _host("dout", dout)
        p = max_norm(dout) * max_norm(v)
        sizes.update(dq=scale * p * max_norm(k) * s, dk=scale * p * max_norm(q) * s, dv=max_abs(dout) * s)
    return sizes


# -- the assertions -----------------------------------------------------------------------------


def _at(axes, index):
    return f" at ({axes}) = {tuple(int(i) for i in index)}" if axes else f" at {tuple(int(i) for i in index)}"


def _default_axes(ndim):
    return "b, s, h, d" if ndim == 4 else ""


def _non_finite_failure(name, x, ref, axes):
    """Where the reference is NaN or ±inf the result must be the same: the first place it is not."""
    odd = ~numpy.isfinite(ref) & ~((x == ref) | (numpy.isnan(x) & numpy.isnan(ref)))
    if not odd.any():
        return None
    index = numpy.unravel_index(numpy.argmax(odd), odd.shape)
    return (f"{name}{_at(axes, index)}: got {x[index]:.8g}, reference {ref[index]:.8g}; where the reference is "
            f"NaN or ±inf the result must be too ({int(odd.sum())} of {x.size} elements differ there)")


def _worst(err):
    """Index of the largest error, NaN counting as the largest."""
    nan = numpy.isnan(err)
    return numpy.unravel_index(numpy.argmax(nan) if nan.any() else numpy.argmax(err), err.shape)


def _rule_failure(name, x, ref, naive, dtype, factor, magnitude, axes):
    """The accuracy rule on one tensor: None when it holds, else what went wrong and where."""
    x, ref = numpy.asarray(x, dtype=numpy.float64), numpy.asarray(ref, dtype=numpy.float64)
    if x.shape != ref.shape:
        return f"{name}: shape {x.shape}, expected {ref.shape}"
    if x.size == 0:
        return None
    failure = _non_finite_failure(name, x, ref, axes)
    if failure:
        return failure
    finite = numpy.isfinite(ref)
    with numpy.errstate(invalid="ignore"):  # inf − inf where the reference is not finite, masked below
        err = numpy.where(finite, numpy.abs(x - ref), 0.0)
        naive_err = float(numpy.max(numpy.abs(numpy.asarray(naive, dtype=numpy.float64) - ref)[finite], initial=0.0))
    dtype = numpy.dtype(dtype).name
    size = max(1.0, magnitude, float(numpy.max(numpy.abs(ref[finite]), initial=0.0)))
    bound = factor * naive_err + _FLOOR[dtype] * size
    over = ~(err <= bound)  # NaN compares False: a NaN result fails
    if not over.any():
        return None
    index = _worst(err)
    return (f"{name}: {int(over.sum())} of {x.size} elements exceed the allowed error {bound:.3g}; the worst"
            f"{_at(axes, index)}: got {x[index]:.8g}, reference {ref[index]:.8g}, error {err[index]:.3g} "
            f"(allowed = {factor:g} × naive {dtype} error {naive_err:.3g} + floor {_FLOOR[dtype]:g} × {size:.3g})")


def _lse_failure(lse, ref_lse, dtype, axes="b, h, s"):
    """LSE against the reference's: the same −inf rows (and NaN, +inf), finite values within float32
    (float64) accuracy relative to their size."""
    lse, ref_lse = numpy.asarray(lse, dtype=numpy.float64), numpy.asarray(ref_lse, dtype=numpy.float64)
    if lse.shape != ref_lse.shape:
        return f"lse: shape {lse.shape}, expected (B, Hq, Sq) = {ref_lse.shape}"
    if lse.size == 0:
        return None
    failure = _non_finite_failure("lse", lse, ref_lse, axes)
    if failure:
        return failure + " (rows that see no key have lse = −inf)"
    finite = numpy.isfinite(ref_lse)
    with numpy.errstate(invalid="ignore"):
        err = numpy.where(finite, numpy.abs(lse - ref_lse), 0.0)
    # LSE is float32 whatever the input dtype, float64 for float64 inputs.
    tolerance = 1e-12 if numpy.dtype(dtype) == numpy.float64 else 2e-5
    bound = tolerance * max(1.0, float(numpy.max(numpy.abs(ref_lse[finite]), initial=0.0)))
    over = ~(err <= bound)
    if not over.any():
        return None
    index = _worst(err)
    return (f"lse: {int(over.sum())} of {lse.size} elements exceed the allowed error {bound:.3g}; the worst"
            f"{_at(axes, index)}: got {lse[index]:.8g}, reference {ref_lse[index]:.8g}, error {err[index]:.3g}")


def _raise(failures):
    failures = [f for f in failures if f]
    if failures:
        raise AssertionError("\n".join(failures))


def assert_within_naive_error(name: str, x: Array, ref: Array, naive: Array, dtype: Any, factor: float = 2.0,
                              magnitude: float = 0.0, axes: Optional[str] = None) -> None:
    """The accuracy rule on one tensor ``x`` against ``ref`` (float64), with ``naive`` the same-dtype
    computation's result: max |x − ref| <= factor · max |naive − ref| + floor(dtype) · size, where
    size is the larger of 1, ``magnitude`` and max |ref|. Raises AssertionError naming ``name``, the
    worst element's index (``axes`` names them; BSHD by default for 4-D arrays), the value, the
    reference, the error and the allowed error."""
    x = _host(name, x)
    _raise([_rule_failure(name, x, ref, naive, dtype, factor, magnitude,
                          _default_axes(x.ndim) if axes is None else axes)])


def assert_lse_close(lse: Array, ref_lse: Array, dtype: Any) -> None:
    """LSE (B, Hq, Sq) against the reference's: the same −inf rows, finite values within float32
    accuracy (float64 for float64 inputs, ``dtype``) relative to their size."""
    _raise([_lse_failure(_host("lse", lse), ref_lse, dtype)])


def _dtype_failure(name, x, dtype, which="the input dtype"):
    if x.dtype != dtype:
        return f"{name}: dtype {x.dtype}, expected {numpy.dtype(dtype)} ({which})"
    return None


def assert_attention_close(out: Array, q: Array, k: Array, v: Array, *, lse: Optional[Array] = None,
                           factor: float = 2.0, floor_sizes: Optional[Mapping[str, float]] = None,
                           causal: bool = False, causal_alignment: str = "bottom_right", window: Window = None,
                           softcap: Optional[float] = None, alibi_slopes: Optional[Array] = None,
                           scale: Optional[float] = None) -> None:
    """``out`` (and ``lse`` when given) is attention of q, k, v to the accuracy of their dtype.

    ``out`` must have q's dtype and shape (B, Sq, Hq, Dv) and obey the accuracy rule (module
    docstring) with ``factor`` against ``cuflash.reference.attention``; ``lse`` must be float32
    (float64 for float64 inputs), (B, Hq, Sq), with −inf on exactly the rows that see no key and
    the other values within float32 (float64) accuracy. The options mean what they mean in
    ``cuflash.attention`` (pass the call's own). ``floor_sizes`` overrides the sizes the floor
    scales with (a dict like ``magnitudes()``'s; by default ``magnitudes`` of the inputs, with the
    largest visible ALiBi bias). Arrays of any type cuflash takes; AssertionError lists each failure with
    the worst element's (b, s, h, d), its value, the reference value, the error and the allowed error.
    """
    q, k, v, out = _host("q", q), _host("k", k), _host("v", v), _host("out", out)
    options = _options(causal, causal_alignment, window, softcap, alibi_slopes, scale)
    ref_out, ref_lse = reference.attention(q, k, v, **options)
    naive = naive_same_dtype(q, k, v, None, **options)[0]
    if floor_sizes is None:
        floor_sizes = magnitudes(q, k, v, None, scale, _largest_visible_bias(q, k, options))
    failures = [_dtype_failure("out", out, q.dtype),
                _rule_failure("out", out, ref_out, naive, q.dtype, factor, floor_sizes["out"], "b, s, h, d")]
    if lse is not None:
        lse = _host("lse", lse)
        lse_dtype = numpy.float64 if q.dtype == numpy.float64 else numpy.float32
        failures += [_dtype_failure("lse", lse, lse_dtype, "float32, or float64 for float64 inputs"),
                     _lse_failure(lse, ref_lse, q.dtype)]
    _raise(failures)


def assert_attention_grads_close(dq: Array, dk: Array, dv: Array, q: Array, k: Array, v: Array, dout: Array, *,
                                 factor: float = 3.0, floor_sizes: Optional[Mapping[str, float]] = None,
                                 causal: bool = False, causal_alignment: str = "bottom_right", window: Window = None,
                                 softcap: Optional[float] = None, alibi_slopes: Optional[Array] = None,
                                 scale: Optional[float] = None) -> None:
    """``(dq, dk, dv)`` are the gradients of sum(attention(q, k, v) ∘ dout) to the accuracy of the dtype.

    Each must have the dtype and shape of q, k, v and obey the accuracy rule (module docstring)
    with ``factor`` against ``cuflash.reference.attention_backward``; the options and
    ``floor_sizes`` as in ``assert_attention_close``. AssertionError lists every failing gradient
    with its worst element.
    """
    q, k, v, dout = _host("q", q), _host("k", k), _host("v", v), _host("dout", dout)
    grads = _host("dq", dq), _host("dk", dk), _host("dv", dv)
    options = _options(causal, causal_alignment, window, softcap, alibi_slopes, scale)
    ref = reference.attention_backward(dout, q, k, v, **options)
    naive = naive_same_dtype(q, k, v, dout, **options)[1:]
    if floor_sizes is None:
        floor_sizes = magnitudes(q, k, v, dout, scale, _largest_visible_bias(q, k, options))
    failures = []
    for name, x, r, nv in zip(("dq", "dk", "dv"), grads, ref, naive):
        failures += [_dtype_failure(name, x, q.dtype),
                     _rule_failure(name, x, r, nv, q.dtype, factor, floor_sizes[name], "b, s, h, d")]
    _raise(failures)


# -- strategies ---------------------------------------------------------------------------------


def _strategies():
    """hypothesis.strategies, or an ImportError that says what to install."""
    try:
        from hypothesis import strategies
    except ImportError as exc:
        raise ImportError("cuflash.testing's strategies need the hypothesis package: pip install hypothesis "
                          "(the assertions work without it)") from exc
    return strategies


def windows(causal: bool, sides: SearchStrategy) -> SearchStrategy:
    """Strategy: ``window=None``, or ``(left, right)`` with each side drawn from ``sides`` (which may
    hold None, unbounded); with ``causal=True`` the right side is only None or 0, the values causal
    allows."""
    st = _strategies()
    right = st.sampled_from([None, 0]) if causal else sides
    return st.one_of(st.none(), st.tuples(sides, right))


@dataclass(frozen=True, eq=False, repr=False)
class AttentionProblem:
    """One drawn attention problem: BSHD operands and the options to call attention with.

    ``q``, ``k``, ``v`` and ``dout`` (for the backward) hold standard-normal values in ``dtype``
    drawn from ``seed``, stored as ``layouts`` says (one entry of ``LAYOUTS`` per operand), as NumPy
    arrays or whatever ``attention_problems``' ``xp`` made of them. ``options`` holds the keyword
    arguments of ``cuflash.attention`` the problem uses (only the drawn features), ALiBi slopes
    included; pass them on with ``**problem.options``.
    """

    B: int
    Sq: int
    Sk: int
    Hq: int
    Hkv: int
    D: int
    Dv: int
    dtype: numpy.dtype
    options: dict
    seed: int
    layouts: tuple
    q: Array
    k: Array
    v: Array
    dout: Array

    def __repr__(self):
        # Shapes and options, not the data: the seed regenerates it.
        options = {n: (f"<slopes {tuple(x.shape)}>" if n == "alibi_slopes" and x is not None else x)
                   for n, x in self.options.items()}
        return (f"AttentionProblem(B={self.B}, Sq={self.Sq}, Sk={self.Sk}, Hq={self.Hq}, Hkv={self.Hkv}, D={self.D}, "
                f"Dv={self.Dv}, dtype={self.dtype.name}, options={options}, seed={self.seed}, "
                f"layouts={self.layouts})")

    def _repr_pretty_(self, printer, cycle):
        """Hypothesis (and IPython) print a falsifying example through this: the short repr."""
        printer.text(repr(self))


def _edge_lengths(lo, hi):
    """Sequence lengths worth drawing often: 0–3, one either side of each power of two from 16 (tile
    edges), and the largest."""
    edges, t = {0, 1, 2, 3, hi}, 16
    while t - 1 <= hi:
        edges |= {t - 1, t, t + 1}
        t *= 2
    return sorted(n for n in edges if lo <= n <= hi)


def _as_dtypes(dtypes):
    chosen = []
    for d in dtypes:
        if str(d) == "bfloat16" or (BFLOAT16 is not None and numpy.dtype(d) == BFLOAT16):
            if BFLOAT16 is None:
                raise ImportError("bfloat16 NumPy arrays need the ml_dtypes package: pip install ml_dtypes")
            chosen.append(BFLOAT16)
            continue
        d = numpy.dtype(d)
        if d.name not in _FLOOR:
            raise ValueError(f"dtypes: {d} is not one cuflash computes in (float16, bfloat16, float32, float64)")
        chosen.append(d)
    if not chosen:
        raise ValueError("dtypes: give at least one")
    return chosen


def _permute_bhsd(x):
    """x viewed with axes 1 and 2 swapped, in its own framework (PyTorch's tensors call it permute)."""
    return x.permute(0, 2, 1, 3) if hasattr(x, "permute") else x.transpose(0, 2, 1, 3)


def _stored(x, layout, rng, to_array):
    """The NumPy array ``x`` as an array of ``to_array``'s type stored as ``layout`` says (same values)."""
    if layout == "contiguous":
        return to_array(x)
    if layout == "bhsd":
        return _permute_bhsd(to_array(numpy.ascontiguousarray(x.transpose(0, 2, 1, 3))))
    wide = rng.standard_normal(x.shape[:-1] + (2 * x.shape[-1],)).astype(x.dtype)  # the skipped half: not zeros
    wide[..., ::2] = x
    return to_array(wide)[..., ::2]


def attention_problems(*, dtypes: Optional[Collection[Any]] = None, max_batch: int = 2, min_seqlen: int = 0,
                       max_seqlen: int = 80, lengths: Optional[Sequence[int]] = None, max_heads_kv: int = 3,
                       group_sizes: Sequence[int] = (1, 2, 3, 4), max_head_dim: int = 256,
                       head_dims: Optional[Sequence[int]] = None, features: Collection[str] = FEATURES,
                       layouts: Collection[str] = LAYOUTS, scale_range: tuple = (0.01, 2.0),
                       softcap_range: tuple = (0.5, 50.0),
                       xp: Union[None, Callable[[numpy.ndarray], Array], Any] = None) -> SearchStrategy:
    """Strategy drawing valid attention problems (``AttentionProblem``), for ``hypothesis.given``.

    Shapes: B in 1..``max_batch``; Sq and Sk in ``min_seqlen``..``max_seqlen``, often one of
    ``lengths`` (default: 0–3, either side of each power of two from 16, and the largest); Hkv in
    1..``max_heads_kv`` with Hq = Hkv · a group size from ``group_sizes`` (GQA, MQA); D and Dv in
    1..``max_head_dim``, often one of ``head_dims`` (default ``HEAD_DIMS``), Dv often equal to D.
    ``dtypes``: names or dtypes (default ``DTYPES``, all that NumPy holds here).

    ``features`` (a subset of ``FEATURES``) are the options drawn: "causal" (True or False),
    "top_left" (either causal alignment), "window" (None, or sides None or 0 up to past the
    sequence; with causal the right side None or 0), "softcap" (None or in ``softcap_range``),
    "alibi" (None, or slopes in [0.01, 1] of shape (Hq,) or (B, Hq)), "scale" (None or in
    ``scale_range``); the others are left out of ``options``. Each operand is stored as one of
    ``layouts`` (``LAYOUTS``: contiguous, a BHSD-storage view, a stride-2 last dimension).

    ``xp`` turns the drawn NumPy arrays into your framework's: a function (``torch.from_numpy``,
    ``cupy.asarray``) or a module with ``asarray`` (``cupy``, ``jax.numpy``); the layouts are then
    made in that framework. Default: NumPy arrays. Raises ImportError without Hypothesis.
    """
    st = _strategies()
    chosen_dtypes = _as_dtypes(DTYPES if dtypes is None else dtypes)
    unknown = set(features) - FEATURES
    if unknown:
        raise ValueError(f"features: unknown {sorted(unknown)}; choose from {sorted(FEATURES)}")
    if not layouts or set(layouts) - set(LAYOUTS):
        raise ValueError(f"layouts: choose one or more of {LAYOUTS}, got {tuple(layouts)}")
    if not 0 <= min_seqlen <= max_seqlen or max_batch < 1 or max_heads_kv < 1 or not 1 <= max_head_dim <= 256:
        raise ValueError("need 0 <= min_seqlen <= max_seqlen, max_batch >= 1, max_heads_kv >= 1 and "
                         "1 <= max_head_dim <= 256")
    lengths = _edge_lengths(min_seqlen, max_seqlen) if lengths is None else list(lengths)
    if not lengths or not all(min_seqlen <= n <= max_seqlen for n in lengths):
        raise ValueError(f"lengths: need values in {min_seqlen}..{max_seqlen}, got {lengths}")
    head_dims = [d for d in (HEAD_DIMS if head_dims is None else head_dims) if 1 <= d <= max_head_dim]
    if not head_dims:
        raise ValueError(f"head_dims: need values in 1..{max_head_dim}")
    to_array = (lambda x: x) if xp is None else xp if callable(xp) else xp.asarray
    features = frozenset(features)
    layouts = [layout for layout in LAYOUTS if layout in layouts]  # shrinks toward contiguous

    seqlens = st.one_of(st.sampled_from(lengths), st.integers(min_seqlen, max_seqlen))
    head_dim = st.one_of(st.sampled_from(head_dims), st.integers(1, max_head_dim))
    # One side of a window: unbounded, a band a few keys wide, or anything up to past the sequence.
    sides = st.one_of(st.none(), st.integers(0, 8), st.integers(0, max_seqlen + 10))

    @st.composite
    def problems(draw):
        heads_kv = draw(st.integers(1, max_heads_kv))
        group = draw(st.sampled_from(group_sizes))
        D = draw(head_dim)
        shape = dict(B=draw(st.integers(1, max_batch)), Sq=draw(seqlens), Sk=draw(seqlens), Hq=heads_kv * group,
                     Hkv=heads_kv, D=D, Dv=draw(st.one_of(st.just(D), st.integers(1, max_head_dim))))
        dtype = draw(st.sampled_from(chosen_dtypes))
        options = {}
        causal = draw(st.booleans()) if "causal" in features else False
        if "causal" in features:
            options["causal"] = causal
        if "top_left" in features:
            options["causal_alignment"] = draw(st.sampled_from(["bottom_right", "top_left"]))
        if "window" in features:
            options["window"] = draw(windows(causal, sides))
        if "softcap" in features:
            options["softcap"] = draw(st.one_of(st.none(), st.floats(*softcap_range)))
        alibi = draw(st.sampled_from([None, "head", "batch_head"])) if "alibi" in features else None
        if "scale" in features:
            options["scale"] = draw(st.one_of(st.none(), st.floats(*scale_range)))
        stored_as = tuple(draw(st.sampled_from(layouts)) for _ in range(4))
        seed = draw(st.integers(0, 2**32 - 1))

        rng = numpy.random.default_rng(seed)
        operands = random_inputs(rng, *shape.values(), dtype)
        if "alibi" in features:
            slopes_shape = {None: None, "head": (shape["Hq"],), "batch_head": (shape["B"], shape["Hq"])}[alibi]
            options["alibi_slopes"] = (None if slopes_shape is None else
                                       to_array(rng.uniform(0.01, 1.0, slopes_shape).astype(numpy.float32)))
        q, k, v, dout = (_stored(x, layout, rng, to_array) for x, layout in zip(operands, stored_as))
        return AttentionProblem(**shape, dtype=dtype, options=options, seed=seed, layouts=stored_as,
                                q=q, k=k, v=v, dout=dout)

    return problems()
