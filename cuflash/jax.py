"""JAX for cuflash: ``cuflash.jax.attention`` under ``jax.jit``, ``jax.grad``, ``jax.vmap`` and eagerly.

``import cuflash`` never imports JAX; importing this module does, and needs it installed.

    >>> import jax, jax.numpy as jnp, cuflash.jax
    >>> q, k, v = (jax.random.normal(key, (2, 128, 8, 64)) for key in jax.random.split(jax.random.key(0), 3))
    >>> loss = lambda q, k, v: cuflash.jax.attention(q, k, v, causal=True).sum()
    >>> dq, dk, dv = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v)

How it runs: the forward and the backward are each one ``jax.experimental.buffer_callback``, an
XLA custom call that hands a Python function XLA's own buffers and, on the GPU, XLA's stream. The
function reads the inputs in place and has the backend write its results straight into XLA's
output buffers: GPU arrays run on the CUDA kernels on XLA's stream, with no copy and no trip
through host memory; CPU arrays run on the NumPy backend, in place. Outside ``jit`` JAX compiles
each call into a small program of its own (once per shapes and options) and runs it the same way.
``jax.custom_vjp`` joins forward and backward, so ``jax.grad``, ``jax.vjp`` and
``jax.value_and_grad`` work inside and outside ``jit``, and in ``jax.lax.scan`` and
``jax.checkpoint``. Second derivatives do not (the backward is not differentiable).

``jax.vmap`` folds the mapped axes into the batch axis: every operand is broadcast to the mapped
size (XLA materializes an operand that is not mapped, such as k and v shared by mapped queries),
and the kernels run once on a batch of N·B. Shapes, dtypes and options are checked when the call
is traced, so a bad call fails with cuflash's TypeError or ValueError before anything runs.

XLA does not record the callback into its CUDA graphs (``command_buffer_compatible`` stays off):
cuflash picks, compiles and sizes its launches in Python on every call.
"""

try:
    import jax
except ImportError as exc:
    raise ImportError(
        "cuflash.jax needs JAX (pip install jax); the rest of cuflash works without it"
    ) from exc

import functools
from dataclasses import dataclass

import numpy
from jax.experimental.buffer_callback import buffer_callback

from . import _api, _interop, _problem

__all__ = ["attention"]

_WHAT = "cuflash.jax.attention"


@dataclass(frozen=True, eq=False)
class _XlaCall(_interop.Origin):
    """The origin of one callback's buffers: the results go into XLA's output buffers (``targets``)."""

    targets: tuple = ()

    def outputs(self, specs):
        return self.targets, self.targets


def _folded(array, rank):
    """``array`` with the leading axes vmap added (beyond ``rank``) folded into its first axis: a
    view, since XLA's buffers are dense and row-major."""
    if array.ndim == rank:
        return array
    return array.reshape((-1,) + array.shape[array.ndim - rank + 1:])


def _folded_slopes(slopes, mapped, batch):
    """ALiBi slopes for the folded batch. (B, Hq) slopes fold like the operands; (Hq,) slopes that
    vmap made (N, Hq) become one row per folded batch entry, (N·B, Hq), a copy of N·B·Hq floats."""
    if slopes is None or mapped == 0:
        return slopes
    if slopes.ndim - mapped == 2:
        return _folded(slopes, 2)
    return slopes.reshape(-1, slopes.shape[-1]).repeat(batch, axis=0)


def _stream_handle(ctx):
    stream = ctx.stream
    return stream.__cuda_stream__()[1] if hasattr(stream, "__cuda_stream__") else int(stream)


# Ranks of the operands and of the results of each callback (lse has three axes).
_FORWARD = ((4, 4, 4), (4, 3))
_BACKWARD = ((4, 4, 4, 4, 4, 3), (4, 4, 4))


def _callback(ranks, options, ctx, outputs, *buffers):
    """Run one forward or backward on XLA's buffers, writing the results into ``outputs``.

    ``buffers`` are the operands in the order of ``ranks`` and, when given, the ALiBi slopes.
    """
    operand_ranks, result_ranks = ranks
    device_type, device_id = (int(n) for n in buffers[0].__dlpack_device__())
    gpu = device_type == _interop._CUDA
    plain = _interop.Origin("jax", device_type, device_id, None, _stream_handle(ctx) if gpu else None)
    with plain.context():
        arrays = [_interop.buffer_array(x) for x in buffers]
        results = [_interop.buffer_array(x) for x in outputs]
        slopes = arrays[len(operand_ranks)] if len(arrays) > len(operand_ranks) else None
        mapped = arrays[0].ndim - operand_ranks[0]  # the leading axes vmap added
        slopes = _folded_slopes(slopes, mapped, arrays[0].shape[mapped])
    operands = [_folded(x, rank) for x, rank in zip(arrays, operand_ranks)]
    targets = tuple(_folded(x, rank) for x, rank in zip(results, result_ranks))
    origin = _XlaCall("jax", device_type, device_id, None, plain.stream, targets=targets)
    # "auto" would send CPU buffers to a GPU when one is present; CPU buffers stay on the CPU.
    backend = "auto" if gpu else "numpy"
    if ranks is _FORWARD:
        _api.forward_arrays(*operands, slopes, dict(options), backend, _WHAT, origin)
    else:
        _api.backward_arrays(*operands, slopes, dict(options), backend, _WHAT, origin)


@functools.lru_cache(maxsize=None)
def _callbacks(config):
    """The forward and backward callbacks of one normalized option set: the same function objects
    for equal options, so JAX reuses what it compiled for them."""
    causal, causal_alignment, window, softcap, scale, deterministic = config
    options = (("causal", causal), ("causal_alignment", causal_alignment), ("window", window),
               ("softcap", softcap), ("scale", scale))
    return (functools.partial(_callback, _FORWARD, options),
            functools.partial(_callback, _BACKWARD, options + (("deterministic", deterministic),)))


def _spec(x):
    return _api.Spec(x.shape, numpy.dtype(x.dtype))


def _lse_dtype(dtype):
    return numpy.float64 if numpy.dtype(dtype) == numpy.float64 else numpy.float32


def _call_forward(q, k, v, slopes, config):
    out_shape = q.shape[:3] + v.shape[3:]
    lse_shape = (q.shape[0], q.shape[2], q.shape[1])
    result = (jax.ShapeDtypeStruct(out_shape, q.dtype), jax.ShapeDtypeStruct(lse_shape, _lse_dtype(q.dtype)))
    call = buffer_callback(_callbacks(config)[0], result, vmap_method="broadcast_all")
    return call(q, k, v) if slopes is None else call(q, k, v, slopes)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _attention(q, k, v, slopes, config):
    return _call_forward(q, k, v, slopes, config)[0]


def _attention_forward(q, k, v, slopes, config):
    out, lse = _call_forward(q, k, v, slopes, config)
    return out, (q, k, v, slopes, out, lse)


def _attention_backward(config, saved, dout):
    q, k, v, slopes, out, lse = saved
    result = tuple(jax.ShapeDtypeStruct(x.shape, x.dtype) for x in (q, k, v))
    call = buffer_callback(_callbacks(config)[1], result, vmap_method="broadcast_all")
    operands = (dout, q, k, v, out, lse)
    dq, dk, dv = call(*operands) if slopes is None else call(*operands, slopes)
    # The slopes get no gradient.
    return dq, dk, dv, None


_attention.defvjp(_attention_forward, _attention_backward)


def _checked(q, k, v, alibi_slopes, causal, causal_alignment, window, softcap, scale, deterministic):
    """The normalized options (hashable), after checking the operands' types, shapes and dtypes and
    every option; one TypeError/ValueError listing what is wrong otherwise."""
    named = (("q", q), ("k", k), ("v", v)) + ((("alibi_slopes", alibi_slopes),) if alibi_slopes is not None else ())
    wrong = [f"{name} must be a jax.Array, got {type(x).__module__}.{type(x).__qualname__}"
             for name, x in named if not isinstance(x, jax.Array)]
    # Checked here as well as by the backward, so a bad value fails before the forward runs.
    if not isinstance(deterministic, bool):
        wrong.append(f"deterministic must be a bool, got {type(deterministic).__name__}")
    if wrong:
        raise TypeError(f"invalid arguments to {_WHAT}:\n  - " + "\n  - ".join(wrong))
    problem = _problem.check_forward(
        _spec(q), _spec(k), _spec(v), causal=causal, causal_alignment=causal_alignment, window=window,
        softcap=softcap, alibi_slopes=None if alibi_slopes is None else _spec(alibi_slopes), scale=scale,
        backend="auto", what=_WHAT)
    return (problem.causal, causal_alignment, (problem.window_left, problem.window_right), problem.softcap,
            problem.scale, deterministic)


def attention(q, k, v, *, causal=False, causal_alignment="bottom_right", window=None, softcap=None,
              alibi_slopes=None, scale=None, deterministic=False):
    """``cuflash.attention`` on JAX arrays: differentiable, and usable inside ``jax.jit``, ``jax.vmap``,
    ``jax.lax.scan`` and ``jax.checkpoint`` (see the module's notes for how).

    q, k, v are BSHD arrays — (B, Sq, Hq, D), (B, Sk, Hkv, D), (B, Sk, Hkv, Dv) — of one dtype
    (float16, bfloat16, float32 or float64) on one device. Returns out (B, Sq, Hq, Dv), a JAX array
    of the same dtype on the same device. GPU arrays run on the CUDA kernels, which read them in
    place; CPU arrays and float64 run on cuflash's NumPy backend. The options mean what they mean
    in ``cuflash.attention``; ``alibi_slopes`` is a float32 array of shape (Hq,) or (B, Hq) and gets
    no gradient; ``deterministic=True`` makes the backward bitwise reproducible on the GPU.
    """
    config = _checked(q, k, v, alibi_slopes, causal, causal_alignment, window, softcap, scale, deterministic)
    return _attention(q, k, v, alibi_slopes, config)
