"""PyTorch autograd for cuflash: ``cuflash.torch.attention`` is differentiable with ``loss.backward()``
and traceable by ``torch.compile``.

``import cuflash`` never imports PyTorch; importing this module does, and needs it installed.

    >>> import torch, cuflash.torch
    >>> q, k, v = (torch.randn(2, 128, 8, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    ...            for _ in range(3))
    >>> out = cuflash.torch.attention(q, k, v, causal=True)
    >>> out.float().square().sum().backward()       # fills q.grad, k.grad, v.grad

Two roads lead to the same implementation. The forward and the backward are PyTorch operators,
``torch.ops.cuflash.attention_forward`` and ``torch.ops.cuflash.attention_backward``
(``torch.library.custom_op``), with fake-tensor functions and an autograd formula, so
``torch.compile(fullgraph=True)``, ``torch.export`` and other tracers see one opaque operator
instead of cuflash's CuPy and DLPack internals, which they cannot trace. A custom operator's
Python dispatch costs tens of microseconds a call, several times the rest of a call's host work,
so eager calls on plain tensors go through a ``torch.autograd.Function`` that runs the operators'
implementation directly. Both roads check the same things and give bitwise-identical results.

Outputs and workspaces come from PyTorch's caching allocator on PyTorch's current stream, and a
call makes no host synchronization, so CUDA-graph capture records it. Run each shape once before
capturing: the first call of a kernel variant compiles it, which a capture cannot contain.
"""

try:
    import torch
except ImportError as exc:
    raise ImportError(
        "cuflash.torch needs PyTorch (pip install torch); the rest of cuflash works without it"
    ) from exc

from typing import Optional

import numpy
from torch.utils._python_dispatch import _get_current_dispatch_mode

from . import _api, _interop, _problem, _ragged_api

__all__ = ["attention", "attention_varlen", "transformers_attention"]

_WHAT = "cuflash.torch.attention"


def _options(causal, causal_alignment, window_left, window_right, softcap, scale):
    return dict(causal=causal, causal_alignment=causal_alignment, window=(window_left, window_right),
                softcap=softcap, scale=scale)


# The operators' non-tensor arguments are the options of ``cuflash.attention`` in a form a schema
# can state: the window as two optional ints, softcap 0.0 for none, and the backend ("numpy" for
# CPU tensors, "auto" for CUDA ones). ``deterministic`` rides on the forward for the backward.
def _forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, alibi_slopes: Optional[torch.Tensor],
             causal: bool, causal_alignment: str, window_left: Optional[int], window_right: Optional[int],
             softcap: float, scale: Optional[float], deterministic: bool,
             backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    options = _options(causal, causal_alignment, window_left, window_right, softcap, scale)
    return _api._forward(q, k, v, alibi_slopes, options, backend, _WHAT)


def _backward(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
              lse: torch.Tensor, alibi_slopes: Optional[torch.Tensor], causal: bool, causal_alignment: str,
              window_left: Optional[int], window_right: Optional[int], softcap: float, scale: Optional[float],
              deterministic: bool, backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    options = _options(causal, causal_alignment, window_left, window_right, softcap, scale)
    options["deterministic"] = deterministic
    return _api._backward(dout, q, k, v, out, lse, alibi_slopes, options, backend, _WHAT)


_forward_op = torch.library.custom_op("cuflash::attention_forward", _forward, mutates_args=())
_backward_op = torch.library.custom_op("cuflash::attention_backward", _backward, mutates_args=())


def _spec(name, x, problems):
    """A fake tensor's shape and NumPy dtype, which cuflash's checks read; None (and a problem
    recorded) for a dtype NumPy cannot name."""
    text = str(x.dtype).removeprefix("torch.")
    if text == "bfloat16":
        dtype = _interop._bfloat16()
        if dtype is None:
            problems.append(f"{name} is bfloat16, which NumPy and CuPy hold through the ml_dtypes package; "
                            "install it (pip install ml_dtypes, or cuflash[bfloat16])")
            return None
    else:
        try:
            dtype = numpy.dtype(text)
        except TypeError:
            problems.append(f"{name} has dtype {x.dtype}; expected one of float16, bfloat16, float32, float64")
            return None
    return _api.Spec(x.shape, dtype)


def _specs(**tensors):
    """Specs of the named tensors (None stays None), raising one TypeError for dtypes NumPy lacks."""
    problems = []
    specs = [None if x is None else _spec(name, x, problems) for name, x in tensors.items()]
    if problems:
        raise TypeError(f"invalid arguments to {_WHAT}:\n  - " + "\n  - ".join(problems))
    return specs


@_forward_op.register_fake
def _forward_fake(q, k, v, alibi_slopes, causal, causal_alignment, window_left, window_right, softcap, scale,
                  deterministic, backend):
    # The same checks as a real call, at trace time, so a bad call fails while compiling.
    *operands, slopes = _specs(q=q, k=k, v=v, alibi_slopes=alibi_slopes)
    problem = _problem.check_forward(*operands, alibi_slopes=slopes, backend=backend, what=_WHAT,
                                     **_options(causal, causal_alignment, window_left, window_right, softcap, scale))
    lse_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    return q.new_empty(problem.out_shape), q.new_empty(problem.lse_shape, dtype=lse_dtype)


@_backward_op.register_fake
def _backward_fake(dout, q, k, v, out, lse, alibi_slopes, causal, causal_alignment, window_left, window_right,
                   softcap, scale, deterministic, backend):
    *operands, slopes = _specs(dout=dout, q=q, k=k, v=v, out=out, lse=lse, alibi_slopes=alibi_slopes)
    _problem.check_backward(*operands, alibi_slopes=slopes, deterministic=deterministic, backend=backend,
                            what=_WHAT,
                            **_options(causal, causal_alignment, window_left, window_right, softcap, scale))
    # Like the real outputs: new contiguous tensors, whatever the inputs' strides.
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output):
    q, k, v, alibi_slopes, *options = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, alibi_slopes)
    ctx.options = options
    ctx.mark_non_differentiable(lse)


def _op_backward(ctx, dout, _dlse):
    q, k, v, out, lse, alibi_slopes = ctx.saved_tensors
    dq, dk, dv = _backward_op(dout, q, k, v, out, lse, alibi_slopes, *ctx.options)
    # alibi_slopes and the options get no gradient.
    return (dq, dk, dv) + (None,) * (1 + len(ctx.options))


_forward_op.register_autograd(_op_backward, setup_context=_setup_context)


class _Attention(torch.autograd.Function):
    """The eager road: the operators' implementations under a plain autograd.Function."""

    @staticmethod
    def forward(ctx, q, k, v, alibi_slopes, *options):
        out, lse = _forward(q, k, v, alibi_slopes, *options)
        ctx.save_for_backward(q, k, v, out, lse, alibi_slopes)
        ctx.options = options
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dout):
        q, k, v, out, lse, alibi_slopes = ctx.saved_tensors
        dq, dk, dv = _backward(dout, q, k, v, out, lse, alibi_slopes, *ctx.options)
        return (dq, dk, dv) + (None,) * (1 + len(ctx.options))


_CHECKED = {}


def _checked_options(causal, causal_alignment, window, softcap, scale, deterministic):
    """The options as the operators take them, or one TypeError/ValueError listing what is wrong
    (before anything runs: the forward would not look at ``deterministic``). Valid option sets
    are remembered, so a repeated call only looks them up."""
    if torch.compiler.is_compiling():  # traced once per compilation: nothing to remember
        return _check_options(causal, causal_alignment, window, softcap, scale, deterministic)
    values = (causal, causal_alignment, window, softcap, scale, deterministic)
    # Types beside values, so that values the checks tell apart (True and 1) make different keys.
    key = (values, tuple(map(type, values)), tuple(map(type, window)) if type(window) is tuple else None)
    try:
        return _CHECKED[key]
    except KeyError:
        pass
    except TypeError:  # an unhashable value, which the checks below report
        key = None
    checked = _check_options(causal, causal_alignment, window, softcap, scale, deterministic)
    if key is not None and len(_CHECKED) < 1024:
        _CHECKED[key] = checked
    return checked


def _check_options(causal, causal_alignment, window, softcap, scale, deterministic):
    problems = _problem._Problems()
    _problem._check_options(problems, causal, causal_alignment, scale, "auto")
    sides = _problem._check_window(problems, window, causal)
    cap = _problem._check_softcap(problems, softcap)
    if not isinstance(deterministic, bool):
        problems.type(f"deterministic must be a bool, got {type(deterministic).__name__}")
    problems.raise_if_any(_WHAT)
    left, right = sides
    return bool(causal), causal_alignment, left, right, cap, None if scale is None else float(scale), deterministic


def attention(q, k, v, *, causal=False, causal_alignment="bottom_right", window=None, softcap=None,
              alibi_slopes=None, scale=None, deterministic=False, seqlens_q=None, seqlens_k=None):
    """``cuflash.attention`` on torch tensors, differentiable through ``torch.autograd`` and
    traceable by ``torch.compile``.

    q, k, v are BSHD tensors — (B, Sq, Hq, D), (B, Sk, Hkv, D), (B, Sk, Hkv, Dv) — of one dtype
    (float16, bfloat16, float32 or float64) on one device, with any strides (BHSD storage passes
    in as ``x.transpose(1, 2)``). Returns out (B, Sq, Hq, Dv), a new contiguous tensor of the same
    dtype and device. CUDA tensors run on the GPU kernels, on PyTorch's current stream, reading
    the tensors in place (float64 ones on the float64 kernels); CPU tensors run on cuflash's NumPy
    backend, in place. The options mean what they mean in
    ``cuflash.attention``; ``alibi_slopes`` is a float32 tensor of shape (Hq,) or (B, Hq) on q's
    device and gets no gradient; ``deterministic=True`` makes the backward bitwise reproducible on
    the GPU.

    The backward recomputes attention tile by tile from the saved q, k, v, out and the
    log-sum-exp of the forward, so memory stays O(sequence length). Second derivatives are not
    supported.

    ``seqlens_q``/``seqlens_k`` (int32 tensors of shape (B,) on q's device) make it a padded
    batch, as in ``cuflash.attention``: padded rows get out = 0 and zero gradients.
    """
    _require_tensors(_WHAT, q=q, k=k, v=v, alibi_slopes=alibi_slopes, seqlens_q=seqlens_q, seqlens_k=seqlens_k)
    options = _checked_options(causal, causal_alignment, window, softcap, scale, deterministic)
    # "auto" would copy CPU tensors to a GPU when one is present; CPU tensors stay on the CPU.
    backend = "numpy" if q.device.type == "cpu" else "auto"
    if seqlens_q is not None or seqlens_k is not None:
        out, _lse = _padded_forward_op(q, k, v, seqlens_q, seqlens_k, alibi_slopes, *options, backend)
        return out
    if _eager(q, k, v, alibi_slopes):
        return _Attention.apply(q, k, v, alibi_slopes, *options, backend)
    out, _lse = _forward_op(q, k, v, alibi_slopes, *options, backend)
    return out


def _eager(*tensors):
    """Whether this call runs on real tensors with nothing tracing it: then the direct road."""
    if torch.compiler.is_compiling() or _get_current_dispatch_mode() is not None:
        return False
    return all(x is None or type(x) is torch.Tensor for x in tensors)


def _require_tensors(what, **named):
    """One TypeError listing every given operand that is not a torch.Tensor."""
    wrong = [f"{name} must be a torch.Tensor, got {type(x).__module__}.{type(x).__qualname__}"
             for name, x in named.items() if x is not None and not isinstance(x, torch.Tensor)]
    if wrong:
        raise TypeError(f"invalid arguments to {what}:\n  - " + "\n  - ".join(wrong))


# Ragged batches: operators over ``cuflash``'s ragged functions, with the same conventions as the
# dense ones (options in schema form, ``deterministic`` riding on the forward). Their fake
# functions state the output shapes without reading the offsets or lengths, which a tracer
# does not know; the real call checks them before any work.
_VARLEN = "cuflash.torch.attention_varlen"


def _ragged_options(causal, causal_alignment, window_left, window_right, softcap, scale, backend):
    return dict(_options(causal, causal_alignment, window_left, window_right, softcap, scale), backend=backend)


def _varlen_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor,
                    cu_seqlens_k: torch.Tensor, alibi_slopes: Optional[torch.Tensor], max_seqlen_q: Optional[int],
                    max_seqlen_k: Optional[int], causal: bool, causal_alignment: str, window_left: Optional[int],
                    window_right: Optional[int], softcap: float, scale: Optional[float], deterministic: bool,
                    backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    return _ragged_api.attention_varlen(
        q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q=max_seqlen_q, max_seqlen_k=max_seqlen_k,
        alibi_slopes=alibi_slopes, return_lse=True,
        **_ragged_options(causal, causal_alignment, window_left, window_right, softcap, scale, backend))


def _varlen_backward(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                     lse: torch.Tensor, cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor,
                     alibi_slopes: Optional[torch.Tensor], max_seqlen_q: Optional[int], max_seqlen_k: Optional[int],
                     causal: bool, causal_alignment: str, window_left: Optional[int], window_right: Optional[int],
                     softcap: float, scale: Optional[float], deterministic: bool,
                     backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _ragged_api.attention_varlen_backward(
        dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q=max_seqlen_q, max_seqlen_k=max_seqlen_k,
        alibi_slopes=alibi_slopes, deterministic=deterministic,
        **_ragged_options(causal, causal_alignment, window_left, window_right, softcap, scale, backend))


def _padded_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, seqlens_q: Optional[torch.Tensor],
                    seqlens_k: Optional[torch.Tensor], alibi_slopes: Optional[torch.Tensor], causal: bool,
                    causal_alignment: str, window_left: Optional[int], window_right: Optional[int], softcap: float,
                    scale: Optional[float], deterministic: bool, backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    options = dict(_ragged_options(causal, causal_alignment, window_left, window_right, softcap, scale, backend),
                   return_lse=True)
    return _ragged_api.padded_forward(q, k, v, seqlens_q, seqlens_k, alibi_slopes, options, _WHAT)


def _padded_backward(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                     lse: torch.Tensor, seqlens_q: Optional[torch.Tensor], seqlens_k: Optional[torch.Tensor],
                     alibi_slopes: Optional[torch.Tensor], causal: bool, causal_alignment: str,
                     window_left: Optional[int], window_right: Optional[int], softcap: float, scale: Optional[float],
                     deterministic: bool, backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    options = dict(_ragged_options(causal, causal_alignment, window_left, window_right, softcap, scale, backend),
                   deterministic=deterministic)
    return _ragged_api.padded_backward(dout, q, k, v, out, lse, seqlens_q, seqlens_k, alibi_slopes, options, _WHAT)


_varlen_forward_op = torch.library.custom_op("cuflash::attention_varlen_forward", _varlen_forward, mutates_args=())
_varlen_backward_op = torch.library.custom_op("cuflash::attention_varlen_backward", _varlen_backward,
                                              mutates_args=())
_padded_forward_op = torch.library.custom_op("cuflash::attention_padded_forward", _padded_forward, mutates_args=())
_padded_backward_op = torch.library.custom_op("cuflash::attention_padded_backward", _padded_backward,
                                              mutates_args=())


def _lse_like(q, shape):
    return q.new_empty(shape, dtype=torch.float64 if q.dtype == torch.float64 else torch.float32)


@_varlen_forward_op.register_fake
def _varlen_forward_fake(q, k, v, cu_seqlens_q, cu_seqlens_k, alibi_slopes, *options):
    return q.new_empty(q.shape[:2] + v.shape[2:]), _lse_like(q, (q.shape[1], q.shape[0]))


@_padded_forward_op.register_fake
def _padded_forward_fake(q, k, v, seqlens_q, seqlens_k, alibi_slopes, *options):
    return q.new_empty(q.shape[:3] + v.shape[3:]), _lse_like(q, (q.shape[0], q.shape[2], q.shape[1]))


def _grads_fake(dout, q, k, v, *rest):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


_varlen_backward_op.register_fake(_grads_fake)
_padded_backward_op.register_fake(_grads_fake)


def _ragged_setup_context(ctx, inputs, output):
    q, k, v, lengths_q, lengths_k, alibi_slopes, *options = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, lengths_q, lengths_k, alibi_slopes)
    ctx.options = options
    ctx.mark_non_differentiable(lse)


def _ragged_autograd(backward_op):
    def backward(ctx, dout, _dlse):
        q, k, v, out, lse, lengths_q, lengths_k, alibi_slopes = ctx.saved_tensors
        dq, dk, dv = backward_op(dout, q, k, v, out, lse, lengths_q, lengths_k, alibi_slopes, *ctx.options)
        # The offsets or lengths, the slopes and the options get no gradient.
        return (dq, dk, dv) + (None,) * (3 + len(ctx.options))

    return backward


_varlen_forward_op.register_autograd(_ragged_autograd(_varlen_backward_op), setup_context=_ragged_setup_context)
_padded_forward_op.register_autograd(_ragged_autograd(_padded_backward_op), setup_context=_ragged_setup_context)


def attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, *, max_seqlen_q=None, max_seqlen_k=None, causal=False,
                     causal_alignment="bottom_right", window=None, softcap=None, alibi_slopes=None, scale=None,
                     deterministic=False):
    """``cuflash.attention_varlen`` on torch tensors (packed sequences), differentiable and traceable.

    q (total_q, Hq, D), k (total_k, Hkv, D), v (total_k, Hkv, Dv); ``cu_seqlens_q``/``cu_seqlens_k``
    int32 tensors of B + 1 offsets on q's device. Returns out (total_q, Hq, Dv). Ragged batches
    run on cuflash's NumPy backend in this version (CUDA tensors are copied to the host and back).
    """
    _require_tensors(_VARLEN, q=q, k=k, v=v, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k,
                     alibi_slopes=alibi_slopes)
    options = _checked_options(causal, causal_alignment, window, softcap, scale, deterministic)
    backend = "numpy" if q.device.type == "cpu" else "auto"
    out, _lse = _varlen_forward_op(q, k, v, cu_seqlens_q, cu_seqlens_k, alibi_slopes, max_seqlen_q, max_seqlen_k,
                                   *options, backend)
    return out


# transformers: an attention function for its ``AttentionInterface``. transformers hands BHSD
# tensors and a mask built by the mask function registered under the same name; cuflash takes
# the mask only where it can compute exactly what it says (right-padded keys, a causal reach),
# and refuses it otherwise.
_TRANSFORMERS = "cuflash.torch.transformers_attention"


def transformers_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None,
                           softcap=None, **kwargs):
    """``cuflash.torch.attention`` in the calling convention of transformers' ``AttentionInterface``.

        from transformers import AttentionInterface, AttentionMaskInterface
        from transformers.masking_utils import sdpa_mask
        AttentionInterface.register("cuattention", cuflash.torch.transformers_attention)
        AttentionMaskInterface.register("cuattention", sdpa_mask)
        model = AutoModelForCausalLM.from_pretrained(..., attn_implementation="cuattention")

    (Any name without "flash" in it: transformers takes such names for its own FlashAttention.)
    query (B, Hq, Sq, D), key and value (B, Hkv, Sk, ·) as transformers passes them (read in
    place, no copies for grouped-query heads); returns (attn_output (B, Sq, Hq, Dv), None).
    ``scaling`` and ``softcap`` are cuflash's ``scale`` and ``softcap``.

    ``attention_mask`` None means what it means in transformers' SDPA path: causal (top-left, as
    SDPA's ``is_causal``) when ``is_causal`` (default ``module.is_causal``, else True) and Sq > 1,
    full attention otherwise. A boolean (B, 1 or Hq, Sq, Sk) mask (True = attend), as
    ``sdpa_mask`` builds it, is run when it is exactly "key j < L[b] and j ≤ i + r" for per-batch
    lengths L (right padding) and one reach r ≥ 0 (or no reach); a (B, Sk) padding mask (nonzero =
    token) when Sq = Sk, combined with ``is_causal``. Padded keys become ``seqlens_k``; padded
    query rows are computed like the others, as in SDPA. Reading a mask waits for the GPU.
    Everything else raises ValueError rather than computing something else: left padding,
    packed sequences, sliding windows, additive float masks, ``dropout`` > 0, attention weights
    (``output_attentions``), ``position_bias``, attention sinks, and a model whose implementation
    name has another mask function than ``sdpa_mask`` registered (without one, transformers
    drops the padding mask before calling).
    """
    problems = []
    if dropout:
        problems.append(f"dropout={dropout}: cuflash has no attention dropout (use model.eval() or dropout 0)")
    if kwargs.get("output_attentions"):
        problems.append("output_attentions=True: cuflash never forms the attention weights")
    for name in ("position_bias", "s_aux", "sinks"):
        if kwargs.get(name) is not None:
            problems.append(f"{name} is given; cuflash has no such term")
    problems += _mask_function_problems(module)
    if problems:
        raise ValueError(f"invalid arguments to {_TRANSFORMERS}:\n  - " + "\n  - ".join(problems))
    if is_causal is None:
        is_causal = getattr(module, "is_causal", True)
    q, k, v = (x.transpose(1, 2) for x in (query, key, value))
    if attention_mask is None:
        seqlens_k, reach = None, 0 if is_causal and q.shape[1] > 1 else None
    else:
        seqlens_k, reach = _mask_pattern(attention_mask, q.shape[0], q.shape[1], k.shape[1], is_causal)
        seqlens_k = seqlens_k if seqlens_k is None else seqlens_k.to(q.device)
    out = attention(q, k, v, causal=reach == 0, causal_alignment="top_left",
                    window=(None, reach) if reach else None, softcap=softcap, scale=scaling, seqlens_k=seqlens_k)
    return out, None


def _mask_function_problems(module):
    """Without ``sdpa_mask`` registered for the model's implementation, the mask that reaches the
    attention function may have lost the padding (none registered) or windows and packing
    (``flash_attention_mask``): say so, since the call could not tell."""
    import sys  # transformers is imported by whoever calls this from a model, never by cuflash

    masks = sys.modules.get("transformers.masking_utils")
    name = getattr(getattr(module, "config", None), "_attn_implementation", None)
    if masks is None or not isinstance(name, str):
        return []
    if masks.ALL_MASK_ATTENTION_FUNCTIONS._global_mapping.get(name) is masks.sdpa_mask:
        return []
    return [f"the attention implementation {name!r} needs transformers' sdpa_mask as its mask function: "
            f"AttentionMaskInterface.register({name!r}, transformers.masking_utils.sdpa_mask)"]


def _mask_pattern(mask, batch, sq, sk, is_causal):
    """(seqlens_k or None, reach or None) such that query i of batch b sees key j exactly when
    j < seqlens_k[b] (all keys for None) and j ≤ i + reach (no limit for None); ValueError when
    ``mask`` is not of that form."""
    def refuse(why):
        raise ValueError(f"invalid arguments to {_TRANSFORMERS}:\n  - attention_mask {why}")

    if not isinstance(mask, torch.Tensor):
        refuse(f"must be a torch.Tensor or None, got {type(mask).__name__}")
    if mask.ndim == 2:
        if tuple(mask.shape) != (batch, sk):
            refuse(f"of shape {tuple(mask.shape)} is not a (B, Sk) = {(batch, sk)} padding mask")
        if sq != sk:
            refuse(f"is a (B, Sk) padding mask but Sq = {sq} differs from Sk = {sk}, so the queries' positions "
                   "are unknown; pass the (B, 1, Sq, Sk) mask of transformers' sdpa_mask")
        keys = mask != 0
    elif mask.ndim == 4:
        if mask.dtype != torch.bool:
            refuse(f"has dtype {mask.dtype}; cuflash takes boolean masks (True = attend), as transformers' "
                   "sdpa_mask makes them, not additive ones")
        if mask.shape[0] != batch or tuple(mask.shape[2:]) != (sq, sk):
            refuse(f"of shape {tuple(mask.shape)} is not (B, H, Sq, Sk) with B, Sq, Sk = {(batch, sq, sk)}")
        keys = mask.any(dim=(1, 2))
    else:
        refuse(f"has {mask.ndim} dimensions; expected a (B, Sk) padding mask or a (B, H, Sq, Sk) boolean mask")
    lengths = keys.sum(dim=1)
    columns = torch.arange(sk, device=mask.device)
    if not torch.equal(keys, columns < lengths[:, None]):
        refuse("masks keys that are followed by unmasked ones (left padding or packed sequences); cuflash "
               "takes right-padded batches only")
    if mask.ndim == 2:
        reach = 0 if is_causal else None
        host_lengths = lengths.tolist()
    else:
        # Row 0 sees reach + 1 keys unless its batch element's length cuts it off first.
        first = mask[:, 0, 0, :].sum(dim=1) if sq else lengths
        host_lengths, host_first = torch.stack((lengths, first)).tolist()
        reaches = {count - 1 for length, count in zip(host_lengths, host_first) if count < length}
        reach = min(reaches) if reaches else None
        if reach is not None and reach < 0:
            refuse("leaves the first query row with no key, which a causal reach of 0 or more cannot say")
        expected = columns < lengths[:, None, None]
        if reach is not None:
            expected = expected & (columns <= torch.arange(sq, device=mask.device)[:, None] + reach)
        if not torch.equal(mask, expected[:, None].expand(mask.shape)):
            refuse("is not right padding combined with a causal mask (a sliding window, chunked or packed "
                   "attention, or a per-head pattern); cuflash cannot apply it exactly")
    full = all(length == sk for length in host_lengths)
    return None if full else lengths.to(torch.int32), reach
