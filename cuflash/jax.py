"""JAX autodiff for cuflash: ``cuflash.jax.attention`` is a ``jax.custom_vjp`` function for eager code.

``import cuflash`` never imports JAX; importing this module does, and needs it installed.

    >>> import jax, jax.numpy as jnp, cuflash.jax
    >>> q, k, v = (jax.random.normal(key, (2, 128, 8, 64)) for key in jax.random.split(jax.random.key(0), 3))
    >>> loss = lambda q, k, v: cuflash.jax.attention(q, k, v, causal=True).sum()
    >>> dq, dk, dv = jax.grad(loss, argnums=(0, 1, 2))(q, k, v)

Eager only: cuflash's kernels run on concrete arrays handed over through DLPack, which a traced
value inside ``jax.jit`` (or ``vmap``, or a gradient of this gradient) does not have yet. Such calls
raise a TypeError rather than tracing. ``jax.grad``, ``jax.vjp`` and ``jax.value_and_grad`` of eager
code work: JAX calls the forward and backward below on concrete arrays.
"""

try:
    import jax
except ImportError as exc:
    raise ImportError(
        "cuflash.jax needs JAX (pip install jax); the rest of cuflash works without it"
    ) from exc

import functools

from . import _api

__all__ = ["attention"]

_WHAT = "cuflash.jax.attention"
_CPU = 1


def _refuse_traced(**operands):
    """TypeError for traced values, which have no memory to hand to the kernels yet."""
    traced = [name for name, x in operands.items() if isinstance(x, jax.core.Tracer)]
    if traced:
        raise TypeError(
            f"{_WHAT} got a traced value for {', '.join(traced)}: it cannot run inside jax.jit, jax.vmap, "
            "a gradient of its gradient, or any other transformation that traces. cuflash runs its kernels "
            "eagerly on concrete arrays handed over through DLPack, and a traced value has no memory yet. "
            "Call it outside jax.jit; jax.grad and jax.vjp of eager code work."
        )


def _backend(q):
    # "auto" would copy CPU arrays to a GPU when one is present; CPU arrays stay on the CPU.
    return "numpy" if q.__dlpack_device__()[0] == _CPU else "auto"


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6))
def _attention(q, k, v, causal, causal_alignment, scale, deterministic):
    _refuse_traced(q=q, k=k, v=v)
    return _api.attention(q, k, v, causal=causal, causal_alignment=causal_alignment, scale=scale,
                          backend=_backend(q))


def _forward(q, k, v, causal, causal_alignment, scale, deterministic):
    _refuse_traced(q=q, k=k, v=v)
    out, lse = _api.attention(q, k, v, causal=causal, causal_alignment=causal_alignment, scale=scale,
                              return_lse=True, backend=_backend(q))
    return out, (q, k, v, out, lse)


def _backward(causal, causal_alignment, scale, deterministic, saved, dout):
    _refuse_traced(dout=dout)
    q, k, v, out, lse = saved
    return _api.attention_backward(dout, q, k, v, out, lse, causal=causal, causal_alignment=causal_alignment,
                                   scale=scale, deterministic=deterministic, backend=_backend(q))


_attention.defvjp(_forward, _backward)


def attention(q, k, v, *, causal=False, causal_alignment="bottom_right", scale=None, deterministic=False):
    """``cuflash.attention`` on JAX arrays, differentiable with ``jax.grad``/``jax.vjp`` (eagerly).

    q, k, v are BSHD arrays — (B, Sq, Hq, D), (B, Sk, Hkv, D), (B, Sk, Hkv, Dv) — of one dtype
    (float16, bfloat16, float32 or float64) on one device. Returns out (B, Sq, Hq, Dv), a JAX array
    of the same dtype on the same device. GPU arrays run on the CUDA kernels, which read them in
    place; CPU arrays and float64 run on cuflash's NumPy backend. The options mean what they mean
    in ``cuflash.attention``; ``deterministic=True`` makes the backward bitwise reproducible on the GPU.

    Raises TypeError inside ``jax.jit`` and other tracing transformations (see the module's notes).
    """
    problems = [f"{name} must be a jax.Array, got {type(x).__module__}.{type(x).__qualname__}"
                for name, x in (("q", q), ("k", k), ("v", v)) if not isinstance(x, jax.Array)]
    # Checked here as well as by the backward, so a bad value fails before the forward runs.
    if not isinstance(deterministic, bool):
        problems.append(f"deterministic must be a bool, got {type(deterministic).__name__}")
    if problems:
        raise TypeError(f"invalid arguments to {_WHAT}:\n  - " + "\n  - ".join(problems))
    return _attention(q, k, v, causal, causal_alignment, scale, deterministic)
