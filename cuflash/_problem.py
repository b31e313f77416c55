"""The attention problem every backend solves, and the checks that build it from user input.

All checks run before any allocation or launch, collect every problem they find, and raise one
``TypeError`` (wrong kinds of things) or ``ValueError`` (right kinds, wrong values) naming each
operand involved.
"""

import math
import numbers
from dataclasses import dataclass
from typing import Optional

import numpy

from ._mask import MaskSpec

ALIGNMENTS = ("bottom_right", "top_left")
BACKENDS = ("auto", "numpy", "cuda")
MAX_HEAD_DIM = 256

_FLOAT_NAMES = ("float16", "bfloat16", "float32", "float64")
_FLOAT32_MAX = float(numpy.finfo(numpy.float32).max)


@dataclass(frozen=True)
class Problem:
    """Sizes and options of one attention call, already checked and resolved.

    The mask is a band (``mask``, a ``MaskSpec``): query i may see key j iff
    ``i + mask_offset - window_left <= j <= i + mask_offset + window_right`` (None: unbounded),
    where ``mask_offset`` is ``seqlen_k - seqlen_q`` for the bottom-right alignment and 0 for
    top-left; ``causal=True`` has been folded into ``window_right = 0``. Score modifiers:
    ``softcap`` (0.0: off) and ``alibi`` ("none", "head" for slopes of shape (Hq,), "batch_head"
    for (B, Hq)); the slopes themselves are an operand.
    """

    batch: int
    seqlen_q: int
    seqlen_k: int
    heads_q: int
    heads_kv: int
    head_dim: int
    head_dim_v: int
    dtype: numpy.dtype
    causal: bool
    mask_offset: int
    window_left: Optional[int]
    window_right: Optional[int]
    softcap: float
    alibi: str
    scale: float

    @property
    def group_size(self):
        """Query heads per key/value head (1 for MHA, Hq for MQA)."""
        return self.heads_q // self.heads_kv

    @property
    def accum_dtype(self):
        """float64 for float64 inputs, float32 for every other dtype."""
        return numpy.dtype(numpy.float64 if self.dtype == numpy.float64 else numpy.float32)

    @property
    def mask(self):
        return MaskSpec(self.seqlen_q, self.seqlen_k, self.mask_offset, self.window_left, self.window_right)

    @property
    def score_mods(self):
        """The score modifiers in use, by name ("softcap", "alibi"), in a fixed order."""
        return tuple(name for name, on in (("softcap", self.softcap > 0), ("alibi", self.alibi != "none")) if on)

    @property
    def out_shape(self):
        return (self.batch, self.seqlen_q, self.heads_q, self.head_dim_v)

    @property
    def lse_shape(self):
        return (self.batch, self.heads_q, self.seqlen_q)


def is_float_dtype(dtype):
    return numpy.dtype(dtype).name in _FLOAT_NAMES


class _Problems:
    """Collects what is wrong with a call so one exception can report all of it."""

    def __init__(self):
        self.type_errors = []
        self.value_errors = []

    def type(self, message):
        self.type_errors.append(message)

    def value(self, message):
        self.value_errors.append(message)

    def any(self):
        return bool(self.type_errors or self.value_errors)

    def raise_if_any(self, what):
        messages = self.type_errors + self.value_errors
        if not messages:
            return
        text = f"invalid arguments to {what}:\n  - " + "\n  - ".join(messages)
        raise (TypeError if self.type_errors else ValueError)(text)


def _as_float(x):
    """``float(x)``, or inf where x is too large for a float (a huge Python int)."""
    try:
        return float(x)
    except OverflowError:
        return math.inf if x > 0 else -math.inf


def _short(x):
    """A value for an error message, cut short (a huge int prints hundreds of digits)."""
    text = repr(x)
    return text if len(text) <= 40 else text[:37] + "..."


def _check_scale_fits(problems, scale, dtype):
    """16-bit and float32 attention applies the scale in float32 (the accumulation type): a finite
    scale whose float32 value overflows would turn every score into ±inf and the output into NaN."""
    if scale is None or dtype is None or dtype == numpy.float64 or not _is_real(scale):
        return
    value = _as_float(scale)
    if math.isfinite(value) and abs(value) > _FLOAT32_MAX:
        problems.value(f"scale={_short(scale)} overflows float32, the type {dtype} attention applies it in "
                       f"(|scale| must be at most {_FLOAT32_MAX:.4g}; float64 inputs take any finite scale)")


def _is_real(x):
    return isinstance(x, numbers.Real) and not isinstance(x, (bool, numpy.bool_))


def _is_int(x):
    return isinstance(x, numbers.Integral) and not isinstance(x, (bool, numpy.bool_))


def _check_options(problems, causal, causal_alignment, scale, backend):
    check_bool(problems, "causal", causal)
    if not isinstance(causal_alignment, str) or causal_alignment not in ALIGNMENTS:
        problems.value(f"causal_alignment must be one of {ALIGNMENTS}, got {causal_alignment!r}")
    if scale is not None:
        if not _is_real(scale):
            problems.type(f"scale must be a real number or None, got {type(scale).__name__}")
        elif not math.isfinite(_as_float(scale)):
            problems.value(f"scale must be a finite number, got {_short(scale)}")
    if not isinstance(backend, str) or backend not in BACKENDS:
        problems.value(f"backend must be one of {BACKENDS}, got {backend!r}")


def _check_window(problems, window, causal):
    """``window`` as ``(left, right)`` with None for unbounded sides, causal folded into right = 0;
    None where the value is unusable (the problem is recorded)."""
    if window is None:
        window = (None, None)
    elif not isinstance(window, (tuple, list)) or len(window) != 2:
        problems.type(f"window must be None or a pair (left, right) of non-negative ints or None, got {window!r}")
        return None
    sides = []
    for side, size in zip(("left", "right"), window):
        if size is None:
            sides.append(None)
        elif not _is_int(size):
            problems.type(f"window {side} size must be a non-negative int or None, got {type(size).__name__}")
        elif size < 0:
            problems.value(f"window {side} size must be non-negative (None for unbounded), got {size}")
        else:
            sides.append(int(size))
    if len(sides) != 2:
        return None
    left, right = sides
    if causal is True or causal is numpy.True_:
        if right not in (None, 0):
            problems.value(f"causal=True means a right window size of 0; got window={tuple(window)!r} "
                           "(pass window=(left, 0), or causal=False with the window you mean)")
            return None
        right = 0
    return left, right


def _check_softcap(problems, softcap):
    """The softcap as a float (0.0: off)."""
    if softcap is None:
        return 0.0
    if not _is_real(softcap):
        problems.type(f"softcap must be a positive real number or None, got {type(softcap).__name__}")
        return 0.0
    value = float(softcap)
    if value == 0.0:
        return 0.0
    if not math.isfinite(value) or value < 0:
        problems.value(f"softcap must be positive and finite (None or 0 to disable), got {softcap!r}")
        return 0.0
    return value


def _check_alibi(problems, slopes, batch, heads_q):
    """"none", "head" or "batch_head" for ALiBi slopes of shape (Hq,) or (B, Hq), float32."""
    if slopes is None:
        return "none"
    if numpy.dtype(slopes.dtype) != numpy.float32:
        problems.type(f"alibi_slopes has dtype {numpy.dtype(slopes.dtype)}; expected float32")
    shape = tuple(slopes.shape)
    if shape == (heads_q,):
        return "head"
    if shape == (batch, heads_q):
        return "batch_head"
    problems.value(f"alibi_slopes must have shape (Hq,) = ({heads_q},) or (B, Hq) = ({batch}, {heads_q}), got {shape}")
    return "none"


def _check_dtypes(problems, named):
    """Every operand a supported float dtype, all the same; returns the common dtype or None."""
    dtypes = {}
    for name, x in named.items():
        dtype = numpy.dtype(x.dtype)
        if not is_float_dtype(dtype):
            problems.type(f"{name} has dtype {dtype}; expected one of float16, bfloat16, float32, float64")
        else:
            dtypes[name] = dtype
    if len(set(dtypes.values())) > 1:
        listed = ", ".join(f"{n}: {d}" for n, d in dtypes.items())
        problems.type(f"q, k, v (and dout, out) must share one dtype, got {listed}")
        return None
    return next(iter(dtypes.values()), None)


@dataclass(frozen=True)
class _Expected:
    """What the forward's operands imply about the backward's, as far as they are readable:
    None where a bad q, k or v leaves it unknown."""

    dtype: Optional[numpy.dtype]  # of q, k, v (of the float ones among them where they differ or one is not)
    accum_dtype: Optional[numpy.dtype]
    out_shape: Optional[tuple]
    lse_shape: Optional[tuple]


def _check_forward(problems, q, k, v, *, causal, causal_alignment, scale, backend, window, softcap, alibi_slopes,
                   **flags):
    """Record every problem of a forward call in ``problems``; return the resolved ``Problem``
    (None when anything is wrong) and what its operands imply for a backward call.

    ``flags`` are the caller's other boolean options (``return_lse``, ``deterministic``), checked
    here so that they are reported with everything else, before any work."""
    for name, value in flags.items():
        check_bool(problems, name, value)
    _check_options(problems, causal, causal_alignment, scale, backend)
    sides = _check_window(problems, window, causal)
    cap = _check_softcap(problems, softcap)
    named = {"q": q, "k": k, "v": v}
    dtype = _check_dtypes(problems, named)
    _check_scale_fits(problems, scale, dtype)
    known = dtype or next((numpy.dtype(x.dtype) for x in named.values() if is_float_dtype(x.dtype)), None)
    accum = None if known is None else numpy.dtype(numpy.float64 if known == numpy.float64 else numpy.float32)
    bad_ndim = [name for name, x in named.items() if x.ndim != 4]
    for name in bad_ndim:
        problems.value(f"{name} must have 4 dimensions (batch, seq, heads, head_dim), got shape {tuple(named[name].shape)}")
    if bad_ndim:  # the size checks below need four dimensions to read
        return None, _Expected(known, accum, None, None)
    (B, Sq, Hq, D), (Bk, Sk, Hkv, Dk), (Bv, Skv, Hv, Dv) = q.shape, k.shape, v.shape
    expected = _Expected(known, accum, (B, Sq, Hq, Dv), (B, Hq, Sq))
    if not B == Bk == Bv:
        problems.value(f"batch sizes differ: q has {B}, k has {Bk}, v has {Bv}")
    if Sk != Skv:
        problems.value(f"k and v must have the same sequence length, got k: {Sk}, v: {Skv}")
    if Hkv != Hv:
        problems.value(f"k and v must have the same number of heads, got k: {Hkv}, v: {Hv}")
    if D != Dk:
        problems.value(f"q and k must have the same head_dim, got q: {D}, k: {Dk}")
    if Hkv == 0:
        problems.value("k and v must have at least one head")
    elif Hq % Hkv:
        problems.value(f"the number of query heads ({Hq}, in q) must be a multiple of the key/value heads ({Hkv}, in k and v)")
    for name, d in (("q and k", D), ("v", Dv)):
        if not 1 <= d <= MAX_HEAD_DIM:
            problems.value(f"head_dim of {name} must be in 1..{MAX_HEAD_DIM}, got {d}")
    alibi = _check_alibi(problems, alibi_slopes, B, Hq)
    if problems.any():
        return None, expected
    left, right = sides
    problem = Problem(
        batch=B, seqlen_q=Sq, seqlen_k=Sk, heads_q=Hq, heads_kv=Hkv, head_dim=D, head_dim_v=Dv,
        dtype=dtype, causal=bool(causal),
        mask_offset=(Sk - Sq) if causal_alignment == "bottom_right" else 0,
        window_left=left, window_right=right, softcap=cap, alibi=alibi,
        scale=(1.0 / math.sqrt(D)) if scale is None else float(scale),
    )
    return problem, expected


def check_forward(q, k, v, *, causal, causal_alignment, scale, backend, window=None, softcap=None,
                  alibi_slopes=None, what="cuflash.attention", **flags):
    """Check the operands and options of a forward call; return the resolved ``Problem``.
    ``flags``: boolean options of the caller (see ``_check_forward``)."""
    problems = _Problems()
    problem, _ = _check_forward(problems, q, k, v, causal=causal, causal_alignment=causal_alignment, scale=scale,
                                backend=backend, window=window, softcap=softcap, alibi_slopes=alibi_slopes, **flags)
    problems.raise_if_any(what)
    return problem


def check_bool(problems, name, value):
    """Booleans must be booleans: a string such as "no" is truthy and would silently mean True."""
    if not isinstance(value, (bool, numpy.bool_)):
        problems.type(f"{name} must be a bool, got {type(value).__name__}")


def check_backward(dout, q, k, v, out, lse, *, causal, causal_alignment, scale, deterministic, backend, window=None,
                   softcap=None, alibi_slopes=None, what="cuflash.attention_backward"):
    """Check a backward call: the forward's checks plus dout, out and lse against them, all
    reported in one error."""
    problems = _Problems()
    problem, expected = _check_forward(problems, q, k, v, causal=causal, causal_alignment=causal_alignment,
                                       scale=scale, backend=backend, window=window, softcap=softcap,
                                       alibi_slopes=alibi_slopes, deterministic=deterministic)
    for name, x in (("dout", dout), ("out", out)):
        if not is_float_dtype(x.dtype):
            problems.type(f"{name} has dtype {numpy.dtype(x.dtype)}; expected one of float16, bfloat16, float32, float64")
        elif expected.dtype is not None and numpy.dtype(x.dtype) != expected.dtype:
            problems.type(f"{name} has dtype {numpy.dtype(x.dtype)}; expected {expected.dtype} like q, k, v")
        if expected.out_shape is not None and tuple(x.shape) != expected.out_shape:
            problems.value(f"{name} must have shape (B, Sq, Hq, Dv) = {expected.out_shape}, got {tuple(x.shape)}")
    if expected.accum_dtype is not None and numpy.dtype(lse.dtype) != expected.accum_dtype:
        problems.type(f"lse has dtype {numpy.dtype(lse.dtype)}; expected {expected.accum_dtype} (as returned by attention)")
    if expected.lse_shape is not None and tuple(lse.shape) != expected.lse_shape:
        problems.value(f"lse must have shape (B, Hq, Sq) = {expected.lse_shape}, got {tuple(lse.shape)}")
    problems.raise_if_any(what)
    return problem
