"""The public functions: check, pick a backend, run, hand results back in the caller's type.

A call's checks and backend choice depend only on the operands' shapes and dtypes and on the
options, so they are made once per such combination and kept (``_plan``): a repeated call pays
for a dictionary lookup instead. Arrays themselves (pointers, strides) are never part of the key.
"""

from typing import Callable, Optional, Union

from . import _dispatch, _ragged_api
from ._interop import export, import_operands
from ._problem import check_backward, check_forward
from ._types import Alignment, Array, Backend, Window

_SEMANTICS = """
    Shapes are "BSHD": q is (B, Sq, Hq, D), k is (B, Sk, Hkv, D), v is (B, Sk, Hkv, Dv), and out
    is (B, Sq, Hq, Dv). Any strides are accepted (data stored as (B, H, S, D) passes in as
    ``x.transpose(0, 2, 1, 3)``); GPU kernels read them in place when the last dimension is
    contiguous. Hq must be a multiple of Hkv: query head h uses key/value head h // (Hq // Hkv)
    (grouped-query and multi-query attention). D and Dv are 1..256.

    S = scale · Q Kᵀ (scale defaults to 1/sqrt(D)), P = softmax(S) over the keys each query may
    see, out = P V. Accumulation is float32 (float64 for float64 inputs); out has the input dtype.

    causal=True masks with the bottom-right alignment by default: query i sees key j iff
    j <= i + (Sk − Sq). For Sq = 2, Sk = 5, and for Sq = 5, Sk = 2 (rows 0–2 see nothing)::

        1 1 1 1 0        0 0
        1 1 1 1 1        0 0
                         0 0
                         1 0
                         1 1

    causal_alignment="top_left" gives PyTorch's ``is_causal`` (j <= i).

    window=(left, right) restricts query i to keys i + off − left <= j <= i + off + right
    (sliding-window / local attention), with the same alignment offset off as causal (Sk − Sq
    bottom-right, 0 top-left); None on a side leaves it unbounded, and causal=True is right = 0.

    softcap=c replaces S by c · tanh(S / c) before the softmax; alibi_slopes (float32, shape (Hq,)
    or (B, Hq)) adds −slope · |i + off − j| to S (ALiBi). Both are differentiated through in the
    backward (the slopes get no gradient).

    A row that sees no key (all masked, or Sk = 0) has out = 0 and lse = −inf, and gets zero
    gradients: never NaN.
"""


def _doc(text):
    return text.replace("%(semantics)s", _SEMANTICS)


def attention(q: Array, k: Array, v: Array, *, causal: bool = False, causal_alignment: Alignment = "bottom_right",
              window: Window = None, softcap: Optional[float] = None, alibi_slopes: Optional[Array] = None,
              scale: Optional[float] = None, return_lse: bool = False, seqlens_q: Optional[Array] = None,
              seqlens_k: Optional[Array] = None, backend: Backend = "auto") -> Union[Array, tuple[Array, Array]]:
    options = dict(causal=causal, causal_alignment=causal_alignment, window=window, softcap=softcap, scale=scale,
                   return_lse=return_lse)
    if seqlens_q is not None or seqlens_k is not None:
        out, lse = _ragged_api.padded_forward(q, k, v, seqlens_q, seqlens_k, alibi_slopes,
                                              dict(options, backend=backend), "cuflash.attention")
    else:
        out, lse = _forward(q, k, v, alibi_slopes, options, backend, "cuflash.attention")
    return (out, lse) if return_lse else out


attention.__doc__ = _doc("""Exact attention softmax(scale · Q Kᵀ) V, computed tile by tile (FlashAttention).
%(semantics)s
    Parameters
    ----------
    q, k, v : arrays (NumPy, CuPy, or any DLPack producer such as PyTorch or JAX)
        float16, bfloat16, float32 or float64, all of one dtype, from one framework and device.
    causal : bool
        Mask keys after each query (see the alignment rule above).
    causal_alignment : {"bottom_right", "top_left"}
        Alignment of the causal mask and of the window when Sq != Sk.
    window : (left, right), optional
        Sliding-window (local) attention: sizes of the band below and above the aligned
        diagonal; None on a side (or window=None) leaves that side unbounded.
    softcap : float, optional
        Logit soft-capping c > 0: S becomes c · tanh(S / c). None or 0 disables it.
    alibi_slopes : array of shape (Hq,) or (B, Hq), float32, optional
        ALiBi: adds −slope[b, h] · |i + off − j| to S. Same framework and device as q.
    scale : float, optional
        Multiplies Q Kᵀ; defaults to 1/sqrt(D).
    return_lse : bool
        Also return the log-sum-exp of each row, which ``attention_backward`` needs.
    seqlens_q, seqlens_k : int32 arrays of shape (B,), optional
        Padded batches: the valid length of each batch element's queries / keys, at the start of
        its rows. Padded query rows get out = 0 and lse = −inf; padded keys are never read.
        Masks, windows and ALiBi align with each element's own lengths.
    backend : {"auto", "cuda", "numpy"}
        "auto" runs the CUDA kernels when CuPy and a usable GPU are present (NumPy inputs are
        copied there and back) and the NumPy backend otherwise; float64 arrays already on a GPU
        run on the float64 kernels, float64 host arrays on the NumPy backend. Naming one forces
        it, with an error when it cannot run.

    Returns
    -------
    out : array (B, Sq, Hq, Dv), the input dtype, in the caller's array type and device.
    lse : array (B, Hq, Sq), float32 (float64 for float64 inputs), natural logarithm; only with
        ``return_lse=True``.

    Raises
    ------
    TypeError, ValueError
        Before any work, listing every problem with the arguments and naming each operand.
    cuflash.BackendUnavailableError
        When the requested backend cannot run here.
    cuflash.KernelCompileError, cuflash.KernelLaunchError
        When a GPU kernel fails to compile or launch (the message names the kernel).
""")


def _import(what, alibi_slopes, **operands):
    """The operands (and the ALiBi slopes, when given) as NumPy/CuPy arrays, and their origin."""
    if alibi_slopes is not None:
        operands["alibi_slopes"] = alibi_slopes
    arrays, origin = import_operands(what, **operands)
    slopes = arrays.pop() if alibi_slopes is not None else None
    return arrays, slopes, origin


class Spec:
    """Shape and dtype of an operand without its data, for checks made before the data exists
    (``torch.compile``'s fake tensors, ``jax.jit``'s tracers)."""

    __slots__ = ("shape", "dtype", "ndim")

    def __init__(self, shape, dtype):
        self.shape = tuple(shape)
        self.dtype = dtype
        self.ndim = len(self.shape)


_PLANS = {}
_MAX_PLANS = 1024


def _plan(check, what, backend, operands, slopes, options):
    """The checked ``Problem`` of a call and the backend to run it on, made once per key.

    ``check`` raises for bad arguments and nothing is kept then, so every bad call reports itself.
    """
    values = tuple(options.values())
    window = options.get("window")
    # Types beside values, so that values the checks tell apart (True and 1) make different keys.
    key = (check, what, backend, values, tuple(map(type, values)),
           tuple(map(type, window)) if type(window) is tuple else None,
           tuple([(x.shape, x.dtype) for x in operands]), None if slopes is None else (slopes.shape, slopes.dtype))
    try:
        plan = _PLANS.get(key)
    except TypeError:  # an unhashable option value: the checks will say what is wrong with it
        key = plan = None
    if plan is None:
        problem = check(*operands, alibi_slopes=slopes, backend=backend, what=what, **options)
        plan = (problem, _dispatch.select(backend, problem, backward=check is check_backward))
        if key is not None:
            if len(_PLANS) >= _MAX_PLANS:
                _PLANS.clear()
            _PLANS[key] = plan
    return plan


def _run(origin, method, arrays, specs):
    """Run ``method`` (a backend's forward or backward) inside the caller's context and return its
    results as the caller's objects: written straight into memory the caller owns where the origin
    provides it (``specs`` says what to allocate), else exported after the call."""
    with origin.context():
        outputs = origin.outputs(specs)
        if outputs is None:
            results = method(*arrays)
        else:
            callers, views = outputs
            with _dispatch.outputs_into(views) as into:
                results = method(*arrays)
            into.deliver(results)
            return tuple(callers)
    return tuple(export(r, origin) for r in results)


def forward_arrays(q, k, v, slopes, options, backend, what, origin):
    """The forward on imported (NumPy/CuPy) arrays: (out, lse) as the caller's objects."""
    problem, chosen = _plan(check_forward, what, backend, (q, k, v), slopes, options)
    specs = ((problem.out_shape, problem.dtype), (problem.lse_shape, problem.accum_dtype))
    return _run(origin, chosen.forward, (q, k, v, slopes, problem), specs)


def backward_arrays(dout, q, k, v, out, lse, slopes, options, backend, what, origin):
    """The backward on imported arrays (options include ``deterministic``): (dq, dk, dv)."""
    problem, chosen = _plan(check_backward, what, backend, (dout, q, k, v, out, lse), slopes, options)
    specs = tuple((x.shape, problem.dtype) for x in (q, k, v))
    return _run(origin, chosen.backward, (dout, q, k, v, out, lse, slopes, problem, bool(options["deterministic"])),
                specs)


def _forward(q, k, v, alibi_slopes, options, backend, what):
    (q, k, v), slopes, origin = _import(what, alibi_slopes, q=q, k=k, v=v)
    return forward_arrays(q, k, v, slopes, options, backend, what, origin)


def _backward(dout, q, k, v, out, lse, alibi_slopes, options, backend, what):
    (dout, q, k, v, out, lse), slopes, origin = _import(what, alibi_slopes, dout=dout, q=q, k=k, v=v, out=out,
                                                        lse=lse)
    return backward_arrays(dout, q, k, v, out, lse, slopes, options, backend, what, origin)


def attention_backward(dout: Array, q: Array, k: Array, v: Array, out: Array, lse: Array, *, causal: bool = False,
                       causal_alignment: Alignment = "bottom_right", window: Window = None,
                       softcap: Optional[float] = None, alibi_slopes: Optional[Array] = None,
                       scale: Optional[float] = None, deterministic: bool = False, seqlens_q: Optional[Array] = None,
                       seqlens_k: Optional[Array] = None, backend: Backend = "auto") -> tuple[Array, Array, Array]:
    options = dict(causal=causal, causal_alignment=causal_alignment, window=window, softcap=softcap, scale=scale,
                   deterministic=deterministic)
    if seqlens_q is not None or seqlens_k is not None:
        return _ragged_api.padded_backward(dout, q, k, v, out, lse, seqlens_q, seqlens_k, alibi_slopes,
                                           dict(options, backend=backend), "cuflash.attention_backward")
    return _backward(dout, q, k, v, out, lse, alibi_slopes, options, backend, "cuflash.attention_backward")


attention_backward.__doc__ = _doc("""Gradients (dq, dk, dv) of attention, given dout = ∂loss/∂out.
%(semantics)s
    The backward recomputes P tile by tile from q, k and the forward's lse (no Sq×Sk array),
    with D = rowsum(dout ∘ out) and dS = P ∘ (dP − D). With GQA/MQA, dk and dv sum over the
    query heads that share each key/value head.

    Parameters
    ----------
    dout : array (B, Sq, Hq, Dv), the dtype of q
    q, k, v : the forward's inputs
    out, lse : the forward's outputs (``attention(..., return_lse=True)``)
    causal, causal_alignment, window, softcap, alibi_slopes, scale, seqlens_q, seqlens_k, backend :
        As in ``attention``; they must match the forward call. Padded rows and keys get zero
        gradients.
    deterministic : bool
        GPU only: accumulate dq without atomics, so repeated calls give bitwise-identical
        results (at some cost in speed). The NumPy backend is always deterministic.

    Returns
    -------
    dq, dk, dv : arrays shaped like q, k, v, in their dtype, array type and device.
""")


def attention_vjp(q: Array, k: Array, v: Array, *, causal: bool = False, causal_alignment: Alignment = "bottom_right",
                  window: Window = None, softcap: Optional[float] = None, alibi_slopes: Optional[Array] = None,
                  scale: Optional[float] = None, deterministic: bool = False, seqlens_q: Optional[Array] = None,
                  seqlens_k: Optional[Array] = None,
                  backend: Backend = "auto") -> tuple[Array, Callable[[Array], tuple[Array, Array, Array]]]:
    """Attention for code without autograd: returns ``out`` and a function ``vjp(dout) -> (dq, dk, dv)``.

    Runs the forward once (keeping its lse), and each ``vjp`` call runs the backward on the saved
    inputs and outputs. Options mean what they mean in ``attention`` and ``attention_backward``.

    Example
    -------
    >>> out, vjp = cuflash.attention_vjp(q, k, v, causal=True)
    >>> dq, dk, dv = vjp(dout)
    """
    options = dict(causal=causal, causal_alignment=causal_alignment, window=window, softcap=softcap, scale=scale)
    # deterministic is checked now with the rest, not first when vjp() runs.
    checked = dict(options, deterministic=deterministic)
    if seqlens_q is not None or seqlens_k is not None:
        out, lse = _ragged_api.padded_forward(q, k, v, seqlens_q, seqlens_k, alibi_slopes,
                                              dict(checked, backend=backend), "cuflash.attention_vjp")
    else:
        out, lse = _forward(q, k, v, alibi_slopes, checked, backend, "cuflash.attention_vjp")
    saved = (q, k, v, out, lse)

    def vjp(dout):
        return attention_backward(dout, *saved, alibi_slopes=alibi_slopes, deterministic=deterministic,
                                  seqlens_q=seqlens_q, seqlens_k=seqlens_k, backend=backend, **options)

    return out, vjp
