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

Inside ``jax.shard_map`` the results vary over the mesh axes that the operands vary over, so
``check_vma`` holds for the forward and the gradients; ``ring_attention`` is attention over a
sequence sharded along a mesh axis (see its notes).

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
from typing import Optional

import jax.numpy as jnp
import numpy
from jax.experimental.buffer_callback import buffer_callback

from . import _api, _dispatch, _interop, _problem, _ragged_api, distributed

__all__ = ["attention", "attention_varlen", "ring_attention"]

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


def _varying(x):
    """The mesh axes ``x`` varies over inside ``jax.shard_map`` (none outside it, or with
    ``check_vma=False``)."""
    return frozenset(getattr(getattr(jax.typeof(x), "mat", None), "varying", ()))


def _vary(x, axes):
    """``x`` typed as varying over ``axes`` too. A callback's results carry no such type of their
    own; without it shard_map's ``check_vma`` refuses them beside the operands they came from."""
    missing = tuple(sorted(frozenset(axes) - _varying(x), key=str))
    return jax.lax.pcast(x, missing, to="varying") if missing else x


def _alike(*arrays):
    """The arrays (None passes through) all typed as varying over every axis any of them varies
    over. Done before ``custom_vjp``, so that the gradient of an operand that varied over fewer
    axes is summed over the others by JAX's own transpose of the cast."""
    axes = frozenset().union(*(_varying(x) for x in arrays if x is not None))
    return tuple(None if x is None else _vary(x, axes) for x in arrays)


def _typed_like(results, operand):
    return tuple(_vary(x, _varying(operand)) for x in results)


def _call_forward(q, k, v, slopes, config):
    out_shape = q.shape[:3] + v.shape[3:]
    lse_shape = (q.shape[0], q.shape[2], q.shape[1])
    result = (jax.ShapeDtypeStruct(out_shape, q.dtype), jax.ShapeDtypeStruct(lse_shape, _lse_dtype(q.dtype)))
    call = buffer_callback(_callbacks(config)[0], result, vmap_method="broadcast_all")
    return _typed_like(call(q, k, v) if slopes is None else call(q, k, v, slopes), q)


def _differentiable(forward_call, backward_call):
    """Attention (q, k, v, extra, config) -> out with ``jax.custom_vjp``: ``forward_call`` gives
    (out, lse), ``backward_call(config, q, k, v, extra, out, lse, dout)`` gives (dq, dk, dv). ``extra``
    holds the operands that get no gradient (the ALiBi slopes; a ragged call's offsets or lengths)."""

    @functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
    def attend(q, k, v, extra, config):
        return forward_call(q, k, v, extra, config)[0]

    def forward(q, k, v, extra, config):
        out, lse = forward_call(q, k, v, extra, config)
        return out, (q, k, v, extra, out, lse)

    def backward(config, saved, dout):
        dq, dk, dv = backward_call(config, *saved, dout)
        return dq, dk, dv, jax.tree_util.tree_map(lambda _: None, saved[3])

    attend.defvjp(forward, backward)
    return attend


def _call_backward(config, q, k, v, slopes, out, lse, dout):
    result = tuple(jax.ShapeDtypeStruct(x.shape, x.dtype) for x in (q, k, v))
    call = buffer_callback(_callbacks(config)[1], result, vmap_method="broadcast_all")
    operands = (dout, q, k, v, out, lse)
    return _typed_like(call(*operands) if slopes is None else call(*operands, slopes), q)


_attention = _differentiable(_call_forward, _call_backward)


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
              alibi_slopes=None, scale=None, deterministic=False, seqlens_q=None, seqlens_k=None):
    """``cuflash.attention`` on JAX arrays: differentiable, and usable inside ``jax.jit``, ``jax.vmap``,
    ``jax.lax.scan`` and ``jax.checkpoint`` (see the module's notes for how).

    q, k, v are BSHD arrays — (B, Sq, Hq, D), (B, Sk, Hkv, D), (B, Sk, Hkv, Dv) — of one dtype
    (float16, bfloat16, float32 or float64) on one device. Returns out (B, Sq, Hq, Dv), a JAX array
    of the same dtype on the same device. GPU arrays run on the CUDA kernels (float64 on the
    float64 kernels), which read them in place; CPU arrays run on cuflash's NumPy backend. The
    options mean what they mean
    in ``cuflash.attention``; ``alibi_slopes`` is a float32 array of shape (Hq,) or (B, Hq) and gets
    no gradient; ``deterministic=True`` makes the backward bitwise reproducible on the GPU.

    ``seqlens_q``/``seqlens_k`` (int32 arrays of shape (B,)) make it a padded batch, as in
    ``cuflash.attention`` (padded rows get out = 0 and zero gradients); see ``attention_varlen``
    for how ragged calls run.
    """
    config = _checked(q, k, v, alibi_slopes, causal, causal_alignment, window, softcap, scale, deterministic)
    if seqlens_q is None and seqlens_k is None:
        return _attention(*_alike(q, k, v, alibi_slopes), config)
    extras = _ragged_extras(_WHAT, seqlens_q=seqlens_q, seqlens_k=seqlens_k, alibi_slopes=alibi_slopes)
    return _ragged(q, k, v, extras, ("padded", tuple(n for n, x in extras)) + config)


# Ragged batches: the same custom_vjp and buffer_callback plumbing around ``cuflash``'s ragged
# functions. The offsets or lengths are operands, read by the callback; their values are checked
# there (a bad value fails when the computation runs, as an XLA error carrying cuflash's message),
# and their dtypes and ranks when the call is traced. vmap runs the mapped calls one by one.
_VARLEN = "cuflash.jax.attention_varlen"


def _ragged_extras(what, **named):
    """The given integer (and slopes) operands as (name, array) pairs, checked for type and rank."""
    extras = tuple((name, x) for name, x in named.items() if x is not None)
    wrong = [f"{name} must be a jax.Array, got {type(x).__module__}.{type(x).__qualname__}"
             for name, x in extras if not isinstance(x, jax.Array)]
    wrong += [f"{name} must be int32 with one axis, got {x.dtype} with shape {x.shape}" for name, x in extras
              if name != "alibi_slopes" and isinstance(x, jax.Array) and (x.dtype != numpy.int32 or x.ndim != 1)]
    if wrong:
        raise TypeError(f"invalid arguments to {what}:\n  - " + "\n  - ".join(wrong))
    return extras


def _ragged_call(form, names, options, operands, targets, backend):
    """One ragged forward or backward on imported arrays, writing into ``targets``."""
    a = dict(zip(names, operands))
    slopes = a.get("alibi_slopes")
    if form == ("padded", "forward"):
        options = dict(options, backend=backend, return_lse=True)
        return _ragged_api.padded_forward(a["q"], a["k"], a["v"], a.get("seqlens_q"), a.get("seqlens_k"), slopes,
                                          options, _WHAT)
    if form == ("padded", "backward"):
        options = dict(options, backend=backend)
        return _ragged_api.padded_backward(a["dout"], a["q"], a["k"], a["v"], a["out"], a["lse"], a.get("seqlens_q"),
                                           a.get("seqlens_k"), slopes, options, _WHAT)
    hints = {name: options.pop(name) for name in ("max_seqlen_q", "max_seqlen_k")}
    if form == ("varlen", "forward"):
        return _ragged_api.attention_varlen(a["q"], a["k"], a["v"], a["cu_seqlens_q"], a["cu_seqlens_k"],
                                            alibi_slopes=slopes, return_lse=True, backend=backend, **hints, **options)
    return _ragged_api.attention_varlen_backward(a["dout"], a["q"], a["k"], a["v"], a["out"], a["lse"],
                                                 a["cu_seqlens_q"], a["cu_seqlens_k"], alibi_slopes=slopes,
                                                 backend=backend, **hints, **options)


def _ragged_callback(form, names, options, ctx, outputs, *buffers):
    device_type, device_id = (int(n) for n in buffers[0].__dlpack_device__())
    gpu = device_type == _interop._CUDA
    origin = _interop.Origin("jax", device_type, device_id, None, _stream_handle(ctx) if gpu else None)
    with origin.context():
        operands = [_interop.buffer_array(x) for x in buffers]
        targets = [_interop.buffer_array(x) for x in outputs]
        with _dispatch.outputs_into(targets) as into:
            results = _ragged_call(form, names, dict(options), operands, targets, "auto" if gpu else "numpy")
        into.deliver(results)


def _ragged_options(config):
    kind, names, causal, causal_alignment, window, softcap, scale, deterministic, *hints = config
    options = dict(causal=causal, causal_alignment=causal_alignment, window=window, softcap=softcap, scale=scale)
    if kind == "varlen":
        options.update(zip(("max_seqlen_q", "max_seqlen_k"), hints))
    return kind, names, options, deterministic


def _ragged_forward_call(q, k, v, extras, config):
    kind, names, options, _ = _ragged_options(config)
    if kind == "varlen":
        out_shape, lse_shape = q.shape[:2] + v.shape[2:], (q.shape[1], q.shape[0])
    else:
        out_shape, lse_shape = q.shape[:3] + v.shape[3:], (q.shape[0], q.shape[2], q.shape[1])
    result = (jax.ShapeDtypeStruct(out_shape, q.dtype), jax.ShapeDtypeStruct(lse_shape, _lse_dtype(q.dtype)))
    callback = functools.partial(_ragged_callback, (kind, "forward"), ("q", "k", "v") + names,
                                 tuple(options.items()))
    return _typed_like(buffer_callback(callback, result, vmap_method="sequential")(q, k, v, *extras), q)


def _ragged_backward_call(config, q, k, v, extras, out, lse, dout):
    kind, names, options, deterministic = _ragged_options(config)
    result = tuple(jax.ShapeDtypeStruct(x.shape, x.dtype) for x in (q, k, v))
    callback = functools.partial(_ragged_callback, (kind, "backward"), ("dout", "q", "k", "v", "out", "lse") + names,
                                 tuple(options.items()) + (("deterministic", deterministic),))
    return _typed_like(buffer_callback(callback, result, vmap_method="sequential")(dout, q, k, v, out, lse, *extras), q)


_ragged_attention = _differentiable(_ragged_forward_call, _ragged_backward_call)


def _ragged(q, k, v, extras, config):
    q, k, v, *others = _alike(q, k, v, *(x for _, x in extras))
    return _ragged_attention(q, k, v, tuple(others), config)


def attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, *, max_seqlen_q=None, max_seqlen_k=None, causal=False,
                     causal_alignment="bottom_right", window=None, softcap=None, alibi_slopes=None, scale=None,
                     deterministic=False):
    """``cuflash.attention_varlen`` on JAX arrays (packed sequences): differentiable, usable inside
    ``jax.jit``; ``jax.vmap`` runs the mapped calls one after the other.

    q (total_q, Hq, D), k (total_k, Hkv, D), v (total_k, Hkv, Dv); ``cu_seqlens_q``/``cu_seqlens_k``
    int32 arrays of B + 1 offsets. Returns out (total_q, Hq, Dv). Types, ranks and dtypes are
    checked when the call is traced, the offsets' values when it runs. Ragged batches run on
    cuflash's NumPy backend in this version (GPU arrays are copied to the host and back).
    """
    for name, x in (("q", q), ("k", k), ("v", v)):
        if isinstance(x, jax.Array) and x.ndim != 3:
            raise ValueError(f"invalid arguments to {_VARLEN}:\n  - {name} must have 3 dimensions "
                             f"(rows, heads, head_dim) for packed sequences, got shape {x.shape}")
    config = _checked(q[None], k[None], v[None], alibi_slopes if alibi_slopes is None or alibi_slopes.ndim == 1
                      else alibi_slopes[0], causal, causal_alignment, window, softcap, scale, deterministic)
    extras = _ragged_extras(_VARLEN, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k, alibi_slopes=alibi_slopes)
    return _ragged(q, k, v, extras, ("varlen", tuple(n for n, x in extras)) + config + (max_seqlen_q, max_seqlen_k))


# Ring attention inside jax.shard_map: the sequence sharded along one mesh axis, K/V blocks passed
# around the ring with ppermute, each step's block pair computed by the calls that
# ``cuflash.distributed`` plans for it, so that the two forms compute the same calls.
_RING = "cuflash.jax.ring_attention"


@dataclass(frozen=True)
class _RingSpec:
    """The static description of one ring: the mesh axis, its size, the layout of the global
    sequence of ``seqlen`` tokens, its band i − left <= j <= i + right (None: unbounded) and the
    options of every call. Hashable: it is ``custom_vjp``'s non-differentiable argument."""

    axis_name: object
    world_size: int
    seqlen: int
    layout: str
    left: Optional[int]
    right: Optional[int]
    softcap: Optional[float]
    scale: float
    deterministic: bool

    def step(self, step):
        """The calls of ``step`` as (which, plans): ``plans`` are the distinct call lists the ranks
        need at that step, and rank r runs ``plans[which[r]]`` (on the block of rank r − step)."""
        segments = [distributed._segments(self.seqlen, r, self.world_size, self.layout)
                    for r in range(self.world_size)]
        per_rank = [distributed._plan(segments[r], segments[(r - step) % self.world_size], self.left, self.right)
                    for r in range(self.world_size)]
        plans = []  # equal plans compared, not hashed: a call's slices hash only from Python 3.12
        for plan in per_rank:
            if plan not in plans:
                plans.append(plan)
        return tuple(plans.index(plan) for plan in per_rank), tuple(plans)

    def shift(self, arrays):
        """Each device's ``arrays`` sent to the next device along the axis (rank r to r + 1)."""
        ring = [(r, (r + 1) % self.world_size) for r in range(self.world_size)]
        return jax.lax.ppermute(arrays, self.axis_name, ring)

    def by_rank(self, step, body, carry, operands):
        """``body(plan, carry, operands)`` with this device's plan of ``step``: new ``carry``.

        The rank is a traced value inside shard_map (``axis_index``), but a plan is host data:
        which sub-blocks, which window, what the kernels launch. So the step switches over the
        plans the ranks need, which are few and often one: a mask-free ring needs no switch at
        all, a causal one two plans per step (blocks before and after the rank's own). Offsets
        made traced operands of the kernels could not skip the calls a rank does not need, and
        the calls would have to cover every rank's sub-blocks. A switch costs XLA a read of its
        index per step (on the GPU, a copy to the host that waits for the work queued before it).
        """
        which, plans = self.step(step)
        branches = [functools.partial(body, plan) for plan in plans]
        if len(branches) == 1:
            return branches[0](carry, operands)
        index = jnp.asarray(which, dtype=jnp.int32)[jax.lax.axis_index(self.axis_name)]
        return jax.lax.switch(index, branches, carry, operands)

    def config(self, call, q, k, v):
        """The normalized options of one planned call on the sub-blocks q, k, v."""
        return _checked(q, k, v, None, softcap=self.softcap, scale=self.scale, deterministic=self.deterministic,
                        **call.mask_options())


def _merge(out_a, lse_a, out_b, lse_b):
    """``cuflash._combine.merge`` on JAX arrays: partial results over disjoint keys, out (B, R, H, Dv)
    and lse (B, H, R), merged in the dtype of ``out_a``. A part that saw no key (lse = −inf)
    contributes nothing; rows no part saw keep out = 0, lse = −inf."""
    lse_b = lse_b.astype(lse_a.dtype)
    m = jnp.maximum(lse_a, lse_b)
    m = jnp.where(jnp.isneginf(m), 0, m)
    w_a, w_b = jnp.exp(lse_a - m), jnp.exp(lse_b - m)
    total = w_a + w_b
    lse = m + jnp.log(total)
    total = jnp.where(total == 0, 1, total)

    def term(out, w, part_lse):
        weighted = out.astype(out_a.dtype) * (w / total).transpose(0, 2, 1)[..., None]
        return jnp.where(jnp.isneginf(part_lse).transpose(0, 2, 1)[..., None], 0, weighted)

    return term(out_a, w_a, lse_a) + term(out_b, w_b, lse_b), lse


def _ring_forward_calls(spec, plan, carry, operands):
    out, lse = carry
    q, k, v = operands
    for call in plan:
        rows, cols = call.rows, call.cols
        blocks = (q[:, rows], k[:, cols], v[:, cols])
        out_c, lse_c = _call_forward(*blocks, None, spec.config(call, *blocks))
        out_r, lse_r = _merge(out[:, rows], lse[:, :, rows], out_c, lse_c)
        out, lse = out.at[:, rows].set(out_r), lse.at[:, :, rows].set(lse_r)
    return out, lse


def _ring_forward(spec, q, k, v):
    acc = _lse_dtype(q.dtype)
    axes = _varying(q)
    out = _vary(jnp.zeros(q.shape[:3] + v.shape[3:], acc), axes)
    lse = _vary(jnp.full((q.shape[0], q.shape[2], q.shape[1]), -numpy.inf, acc), axes)
    blocks = (k, v)
    for step in range(spec.world_size):
        # The next block is requested before this one is used, so the transfer can overlap the calls.
        following = spec.shift(blocks) if step + 1 < spec.world_size else None
        out, lse = spec.by_rank(step, functools.partial(_ring_forward_calls, spec), (out, lse), (q,) + blocks)
        blocks = following
    return out.astype(q.dtype), lse


def _ring_backward_calls(spec, plan, carry, operands):
    dq, (dk, dv) = carry
    dout, q, k, v, out, lse = operands
    acc = dq.dtype
    for call in plan:
        rows, cols = call.rows, call.cols
        blocks = (q[:, rows], k[:, cols], v[:, cols])
        dq_c, dk_c, dv_c = _call_backward(spec.config(call, *blocks), *blocks, None, out[:, rows], lse[:, :, rows],
                                          dout[:, rows])
        dq = dq.at[:, rows].add(dq_c.astype(acc))
        dk, dv = dk.at[:, cols].add(dk_c.astype(acc)), dv.at[:, cols].add(dv_c.astype(acc))
    return dq, (dk, dv)


def _ring_backward(spec, q, k, v, out, lse, dout):
    """The ring backward, as ``cuflash.distributed`` runs it: with the global out and lse, block
    pair (r, s) contributes exactly the single-device backward of Q_r against K_s, V_s; dK and dV
    of each block accumulate in float32 (float64) as they travel with it, and take one more hop
    at the end, home to the device that holds the block."""
    acc = _lse_dtype(q.dtype)
    axes = _varying(q)
    dq = _vary(jnp.zeros(q.shape, acc), axes)
    grads = tuple(_vary(jnp.zeros(x.shape, acc), axes) for x in (k, v))
    blocks = (k, v)
    for step in range(spec.world_size):
        following = spec.shift(blocks) if step + 1 < spec.world_size else None
        dq, grads = spec.by_rank(step, functools.partial(_ring_backward_calls, spec), (dq, grads),
                                 (dout, q) + blocks + (out, lse))
        if spec.world_size > 1:
            grads = spec.shift(grads)
        blocks = following
    return dq.astype(q.dtype), grads[0].astype(k.dtype), grads[1].astype(v.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _ring_attention(q, k, v, spec):
    return _ring_forward(spec, q, k, v)


def _ring_attention_forward(q, k, v, spec):
    out, lse = _ring_forward(spec, q, k, v)
    return (out, lse), (q, k, v, out, lse)


def _ring_attention_backward(spec, saved, cotangents):
    # lse leaves ring_attention through stop_gradient, so its cotangent is zero.
    return _ring_backward(spec, *saved, cotangents[0])


_ring_attention.defvjp(_ring_attention_forward, _ring_attention_backward)


def _ring_checked(q, k, v, axis_name, causal, window, softcap, scale, layout, deterministic, return_lse):
    """The ``_RingSpec`` of a call, after every check; one TypeError or ValueError listing every
    problem otherwise."""
    problems = _problem._Problems()
    named = (("q", q), ("k", k), ("v", v))
    arrays = [name for name, x in named if isinstance(x, jax.Array)]
    for name, x in named:
        if name not in arrays:
            problems.type(f"{name} must be a jax.Array, got {type(x).__module__}.{type(x).__qualname__}")
    if not isinstance(layout, str) or layout not in distributed.LAYOUTS:
        problems.value(f"layout must be one of {distributed.LAYOUTS}, got {layout!r}")
    world_size = None
    if isinstance(axis_name, (tuple, list)):
        problems.type(f"axis_name must name one mesh axis, got {axis_name!r}")
    else:
        try:
            world_size = jax.lax.psum(1, axis_name)
        except (NameError, TypeError):
            problems.value(f"axis_name={axis_name!r} is not an axis of an enclosing jax.shard_map "
                           "(ring_attention runs inside shard_map, on each device's shard of the sequence)")
    if len(arrays) == 3:
        if q.ndim == k.ndim == 4 and q.shape[1] != k.shape[1]:
            problems.value(f"q and k must hold the same tokens (this device's shard of the sequence), got q: "
                           f"{q.shape[1]}, k: {k.shape[1]} tokens")
        try:
            problem = _problem.check_forward(
                _spec(q), _spec(k), _spec(v), causal=causal, causal_alignment="top_left", window=window,
                softcap=softcap, scale=scale, backend="auto", what=_RING, deterministic=deterministic,
                return_lse=return_lse)
        except (TypeError, ValueError) as exc:
            for message in str(exc).split("\n  - ")[1:] or [str(exc)]:
                (problems.type if isinstance(exc, TypeError) else problems.value)(message)
    problems.raise_if_any(_RING)
    return _RingSpec(axis_name, world_size, world_size * q.shape[1], layout, problem.window_left,
                     problem.window_right, softcap, problem.scale, deterministic)


def ring_attention(q, k, v, *, axis_name, causal=False, window=None, softcap=None, scale=None, layout="contiguous",
                   deterministic=False, return_lse=False):
    """Attention over a sequence sharded along the mesh axis ``axis_name``, called inside
    ``jax.shard_map`` (ring attention, context parallelism); differentiable.

    Every device passes its shard: q (B, L, Hq, D), k (B, L, Hkv, D), v (B, L, Hkv, Dv), the L
    tokens that ``cuflash.distributed.shard_segments(P · L, rank, P, layout)`` names, P being the
    axis' size and rank the device's index along it. Under "contiguous" that is shard_map's own
    split of the global sequence; for "zigzag" (rank r holds chunks r and 2P − 1 − r of 2P, which
    gives every device the same causal work) put the global sequence in that order first, with
    ``x[:, cuflash.distributed.shard_order(N, P, "zigzag")]``. Attention is over the global
    sequence of P · L tokens: query i sees key j iff i − left <= j <= i + right with
    window=(left, right) (None: unbounded), causal=True meaning right = 0. GQA/MQA, softcap,
    scale and ``deterministic`` are as in ``attention``; ALiBi is not offered.

    At each of P steps every device computes its queries against the K/V block it holds, with
    the calls ``cuflash.distributed`` makes for that block pair (cuflash's kernels on GPU arrays,
    its NumPy backend on CPU arrays), merges the partial result into its own by the log-sum-exp
    rule in float32 (float64 for float64), and passes the block to the next device along the
    axis with ``jax.lax.ppermute``. The gradient (``jax.custom_vjp``) is the ring backward: K, V
    and their float32 dK, dV travel the ring again, each step running cuflash's backward with the
    global out and lse. Each step's partial output is rounded to the input dtype by the call that
    makes it, so 16-bit results differ from a single-device call by about one rounding; float32
    and float64 results agree to their rounding.

    Returns out (B, L, Hq, Dv) in the input dtype, this device's rows of the global output, and
    with ``return_lse=True`` also lse (B, Hq, L), float32 (float64 for float64), its rows of the
    global log-sum-exp, which carries no gradient (``jax.lax.stop_gradient``). Arguments are
    checked when the call is traced: one TypeError or ValueError lists every problem.
    """
    spec = _ring_checked(q, k, v, axis_name, causal, window, softcap, scale, layout, deterministic, return_lse)
    # Shards vary over the ring's axis; typed so even where the caller's type says otherwise.
    axes = frozenset({axis_name}).union(*(_varying(x) for x in (q, k, v)))
    q, k, v = (_vary(x, axes) for x in (q, k, v))
    out, lse = _ring_attention(q, k, v, spec)
    return (out, jax.lax.stop_gradient(lse)) if return_lse else out
