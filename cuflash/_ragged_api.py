"""The public functions for ragged batches: packed sequences, padded lengths and key/value caches.

``_ragged`` checks the offsets and lengths and turns them into segments (one dense problem per
sequence), all on the host and before any launch; here they are run and the results handed back in
the caller's array type. Packed and padded calls on GPU operands (``backend="auto"``) run on the
GPU kernels' ragged instantiations (``_cuda/forward.py``, ``_cuda/backward.py``: one launch per
pass for the whole batch, each sequence's place and lengths read on the device);
``backend="cuda"`` runs host operands there too (copied to the GPU and back). These GPU paths are
compile-checked but not yet verified on hardware. Host operands with ``backend="auto"`` or
``"numpy"`` run on the NumPy backend, one dense problem per sequence. Cache calls on GPU caches of
float16 or bfloat16 run on the GPU (``_cuda/decode.py``: append, split-KV decode, merge), every
other cache call on the NumPy backend (a GPU cache is then appended to on the GPU).
"""

from typing import Any, Callable, Optional, Union

import numpy

from . import _dispatch, _numpy_backend, _ragged
from ._errors import BackendUnavailableError
from ._interop import export, import_operands
from ._types import Alignment, Array, Backend, Window


def _host(x):
    return x if x is None or isinstance(x, numpy.ndarray) else x.get()


def _on_gpu(backend, origin, problem, what, backward=False):
    """Whether a packed or padded call (its forward, or its ``backward``) runs on the GPU: ``auto``
    for GPU operands, ``cuda`` always (refused with the reason where the GPU backend cannot run it);
    ``numpy`` never. Called after the checks (bad values of ``backend`` are reported by them, with
    everything else)."""
    if backend == "numpy" or (backend == "auto" and not origin.on_gpu):
        return False
    reason = _dispatch.BACKENDS["cuda"].refusal(problem, backward)
    if reason is None:
        from ._cuda import runtime, variants

        family = variants.family(*runtime.compute_capability())
        if not variants.ragged_served(family, problem.dtype.name, problem.head_dim, problem.head_dim_v,
                                      variants.score_mods(problem)):
            reason = (f"the ragged kernels do not serve {problem.dtype.name} at head dim {problem.head_dim} with "
                      f"these score modifiers on this GPU")
    if reason is not None and backend == "cuda":
        raise BackendUnavailableError(f"backend='cuda' cannot run {what}: {reason}")
    return reason is None


def _gpu_batch(base, segments, alignment, packed, slopes):
    """The kernels' view of a checked ragged call: the base problem (with per-sequence ALiBi slopes
    where given as (B, Hq)) and the ``Ragged`` descriptor (grid sized by the longest sequence)."""
    import dataclasses

    from ._cuda import params

    if slopes is not None and slopes.ndim == 2:
        base = dataclasses.replace(base, alibi="batch_head")
    ragged = params.Ragged(batch=len(segments), max_seqlen_q=max((s.seqlen_q for s in segments), default=0),
                           max_seqlen_k=max((s.seqlen_k for s in segments), default=0), packed=packed,
                           bottom_right=alignment == "bottom_right")
    return base, ragged


def _device(*arrays):
    """CuPy arrays (int32 offsets and lengths C-contiguous, as the kernels index them); None stays None."""
    import cupy

    return [None if x is None else cupy.ascontiguousarray(cupy.asarray(x)) for x in arrays]


def _import(what, **operands):
    """The given operands (None ones skipped) as NumPy/CuPy arrays by name, and their origin."""
    given = {name: x for name, x in operands.items() if x is not None}
    arrays, origin = import_operands(what, **given)
    imported = dict(zip(given, arrays))
    return {name: imported.get(name) for name in operands}, origin


def _deliver(origin, results):
    """Host results as the caller's arrays (copied to the GPU for GPU callers)."""
    return tuple(export(r, origin) for r in results)


def _in_frame(x):
    """A packed operand (rows, H, ·) or lse (H, rows) seen as one batch element."""
    return x[None]


def attention_varlen(q: Array, k: Array, v: Array, cu_seqlens_q: Array, cu_seqlens_k: Array, *,
                     max_seqlen_q: Optional[int] = None, max_seqlen_k: Optional[int] = None, causal: bool = False,
                     causal_alignment: Alignment = "bottom_right", window: Window = None,
                     softcap: Optional[float] = None, alibi_slopes: Optional[Array] = None,
                     scale: Optional[float] = None, return_lse: bool = False,
                     backend: Backend = "auto") -> Union[Array, tuple[Array, Array]]:
    """Attention over packed sequences of different lengths ("varlen", FlashAttention's
    ``flash_attn_varlen_func``).

    q is (total_q, Hq, D), k (total_k, Hkv, D), v (total_k, Hkv, Dv): the B sequences one after the
    other. Sequence b is rows ``cu_seqlens_q[b]:cu_seqlens_q[b+1]`` of q and
    ``cu_seqlens_k[b]:cu_seqlens_k[b+1]`` of k and v (int32 offsets, B + 1 of them, from 0 to the
    number of rows, non-decreasing: empty sequences are allowed). Attention never crosses
    sequences; within one, everything is ``cuflash.attention`` with that sequence's lengths
    (causal and window alignment, ALiBi distances, fully masked rows). ``alibi_slopes`` may be
    (Hq,) or (B, Hq), one row per sequence. ``max_seqlen_q/k`` are optional upper bounds on the
    lengths (checked). Offsets on the GPU are copied to the host to be checked (B + 1 numbers).

    Returns out (total_q, Hq, Dv) and, with ``return_lse=True``, lse (Hq, total_q).
    """
    what = "cuflash.attention_varlen"
    a, origin = _import(what, q=q, k=k, v=v, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k,
                        alibi_slopes=alibi_slopes)
    options = dict(causal=causal, causal_alignment=causal_alignment, window=window, softcap=softcap, scale=scale,
                   backend=backend)
    base, segments = _ragged.check_varlen(a["q"], a["k"], a["v"], a["cu_seqlens_q"], a["cu_seqlens_k"],
                                          max_seqlen_q=max_seqlen_q, max_seqlen_k=max_seqlen_k,
                                          alibi_slopes=a["alibi_slopes"], what=what, return_lse=return_lse,
                                          **options)
    if _on_gpu(backend, origin, base, what):
        out, lse = _varlen_forward_gpu(a, origin, base, segments, causal_alignment)
        return (out, lse) if return_lse else out
    qh, kh, vh, slopes = map(_host, (a["q"], a["k"], a["v"], a["alibi_slopes"]))
    out = _dispatch._empty(numpy, qh.shape[:2] + vh.shape[2:], base.dtype)
    lse = _dispatch._empty(numpy, (qh.shape[1], qh.shape[0]), base.accum_dtype)
    _ragged.run_forward(_numpy_backend.forward, _in_frame(qh), _in_frame(kh), _in_frame(vh), slopes,
                        _in_frame(out), _in_frame(lse), base, segments, causal_alignment)
    out, lse = _deliver(origin, (out, lse))
    return (out, lse) if return_lse else out


def attention_varlen_backward(dout: Array, q: Array, k: Array, v: Array, out: Array, lse: Array, cu_seqlens_q: Array,
                              cu_seqlens_k: Array, *, max_seqlen_q: Optional[int] = None,
                              max_seqlen_k: Optional[int] = None, causal: bool = False,
                              causal_alignment: Alignment = "bottom_right", window: Window = None,
                              softcap: Optional[float] = None, alibi_slopes: Optional[Array] = None,
                              scale: Optional[float] = None, deterministic: bool = False,
                              backend: Backend = "auto") -> tuple[Array, Array, Array]:
    """Gradients (dq, dk, dv) of ``attention_varlen``, given dout (total_q, Hq, Dv) and the
    forward's out and lse (``return_lse=True``); options must match the forward's."""
    what = "cuflash.attention_varlen_backward"
    a, origin = _import(what, dout=dout, q=q, k=k, v=v, out=out, lse=lse, cu_seqlens_q=cu_seqlens_q,
                        cu_seqlens_k=cu_seqlens_k, alibi_slopes=alibi_slopes)
    options = dict(causal=causal, causal_alignment=causal_alignment, window=window, softcap=softcap, scale=scale,
                   backend=backend)
    base, segments = _ragged.check_varlen(a["q"], a["k"], a["v"], a["cu_seqlens_q"], a["cu_seqlens_k"],
                                          max_seqlen_q=max_seqlen_q, max_seqlen_k=max_seqlen_k,
                                          alibi_slopes=a["alibi_slopes"], what=what, dout=a["dout"], out=a["out"],
                                          lse=a["lse"], deterministic=deterministic, **options)
    if _on_gpu(backend, origin, base, what, backward=True):
        return _backward_gpu(a, origin, base, segments, causal_alignment, deterministic, packed=True)
    host = {name: _host(x) for name, x in a.items()}
    grads = [_dispatch._empty(numpy, host[name].shape, base.dtype) for name in ("q", "k", "v")]
    frames = [_in_frame(host[name]) for name in ("dout", "q", "k", "v", "out", "lse")]
    _ragged.run_backward(_numpy_backend.backward, *frames, host["alibi_slopes"], *map(_in_frame, grads), base,
                         segments, causal_alignment)
    return _deliver(origin, tuple(grads))


def attention_varlen_vjp(q: Array, k: Array, v: Array, cu_seqlens_q: Array, cu_seqlens_k: Array, *,
                         deterministic: bool = False,
                         **options: Any) -> tuple[Array, Callable[[Array], tuple[Array, Array, Array]]]:
    """``attention_varlen`` for code without autograd: returns ``out`` and ``vjp(dout) -> (dq, dk, dv)``."""
    out, lse = attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, return_lse=True, **options)

    def vjp(dout):
        return attention_varlen_backward(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k,
                                         deterministic=deterministic, **options)

    return out, vjp


def padded_forward(q, k, v, seqlens_q, seqlens_k, alibi_slopes, options, what):
    """``cuflash.attention`` with ``seqlens_q``/``seqlens_k``: (out, lse) in the caller's type."""
    a, origin = _import(what, q=q, k=k, v=v, seqlens_q=seqlens_q, seqlens_k=seqlens_k, alibi_slopes=alibi_slopes)
    alignment = options["causal_alignment"]
    base, segments = _ragged.check_padded(a["q"], a["k"], a["v"], a["seqlens_q"], a["seqlens_k"],
                                          alibi_slopes=a["alibi_slopes"], what=what, **options)
    if _on_gpu(options["backend"], origin, base, what):
        return _padded_forward_gpu(a, origin, base, segments, alignment)
    qh, kh, vh, slopes = map(_host, (a["q"], a["k"], a["v"], a["alibi_slopes"]))
    out = _dispatch._empty(numpy, base.out_shape, base.dtype)
    lse = _dispatch._empty(numpy, base.lse_shape, base.accum_dtype)
    _ragged.run_forward(_numpy_backend.forward, qh, kh, vh, slopes, out, lse, base, segments, alignment)
    return _deliver(origin, (out, lse))


def padded_backward(dout, q, k, v, out, lse, seqlens_q, seqlens_k, alibi_slopes, options, what):
    """``cuflash.attention_backward`` with ``seqlens_q``/``seqlens_k``: (dq, dk, dv)."""
    a, origin = _import(what, dout=dout, q=q, k=k, v=v, out=out, lse=lse, seqlens_q=seqlens_q, seqlens_k=seqlens_k,
                        alibi_slopes=alibi_slopes)
    base, segments = _ragged.check_padded(a["q"], a["k"], a["v"], a["seqlens_q"], a["seqlens_k"],
                                          alibi_slopes=a["alibi_slopes"], what=what, dout=a["dout"], out=a["out"],
                                          lse=a["lse"], **options)
    if _on_gpu(options["backend"], origin, base, what, backward=True):
        return _backward_gpu(a, origin, base, segments, options["causal_alignment"], options["deterministic"],
                             packed=False)
    host = {name: _host(x) for name, x in a.items()}
    grads = [_dispatch._empty(numpy, host[name].shape, base.dtype) for name in ("q", "k", "v")]
    _ragged.run_backward(_numpy_backend.backward, *(host[n] for n in ("dout", "q", "k", "v", "out", "lse")),
                         host["alibi_slopes"], *grads, base, segments, options["causal_alignment"])
    return _deliver(origin, tuple(grads))


def _varlen_forward_gpu(a, origin, base, segments, alignment):
    """A packed forward on the GPU, on the caller's stream: (out (total_q, Hq, Dv), lse (Hq, total_q))."""
    from . import _api
    from ._cuda.forward import flash_forward

    problem, ragged = _gpu_batch(base, segments, alignment, True, a["alibi_slopes"])
    total_q = a["q"].shape[0]
    out_shape, lse_shape = (total_q, base.heads_q, base.head_dim_v), (base.heads_q, total_q)

    def run(q, k, v, cu_q, cu_k, slopes):
        import cupy

        q, k, v, cu_q, cu_k, slopes = _device(q, k, v, cu_q, cu_k, slopes)
        with cupy.cuda.Device(q.device.id):
            out = _dispatch._empty(cupy, out_shape, base.dtype)
            lse = _dispatch._empty(cupy, lse_shape, base.accum_dtype)
            flash_forward(q[None], k[None], v[None], slopes, out[None], lse[None], problem, ragged=ragged,
                          seqlens=(cu_q, cu_k, None, None))
        return out, lse

    arrays = tuple(a[n] for n in ("q", "k", "v", "cu_seqlens_q", "cu_seqlens_k", "alibi_slopes"))
    return _api._run(origin, run, arrays, ((out_shape, base.dtype), (lse_shape, base.accum_dtype)))


def _padded_forward_gpu(a, origin, base, segments, alignment):
    """A padded forward on the GPU, on the caller's stream: (out, lse) shaped as the dense call's."""
    from . import _api
    from ._cuda.forward import flash_forward

    problem, ragged = _gpu_batch(base, segments, alignment, False, a["alibi_slopes"])

    def run(q, k, v, used_q, used_k, slopes):
        import cupy

        q, k, v, used_q, used_k, slopes = _device(q, k, v, used_q, used_k, slopes)
        with cupy.cuda.Device(q.device.id):
            out = _dispatch._empty(cupy, base.out_shape, base.dtype)
            lse = _dispatch._empty(cupy, base.lse_shape, base.accum_dtype)
            flash_forward(q, k, v, slopes, out, lse, problem, ragged=ragged, seqlens=(None, None, used_q, used_k))
        return out, lse

    arrays = tuple(a[n] for n in ("q", "k", "v", "seqlens_q", "seqlens_k", "alibi_slopes"))
    return _api._run(origin, run, arrays, ((base.out_shape, base.dtype), (base.lse_shape, base.accum_dtype)))


def _backward_gpu(a, origin, base, segments, alignment, deterministic, packed):
    """A packed or padded backward on the GPU, on the caller's stream: (dq, dk, dv) shaped as q, k, v."""
    from . import _api
    from ._cuda.backward import flash_backward

    problem, ragged = _gpu_batch(base, segments, alignment, packed, a["alibi_slopes"])
    names = ("cu_seqlens_q", "cu_seqlens_k") if packed else ("seqlens_q", "seqlens_k")

    def run(dout, q, k, v, out, lse, first_q, first_k, slopes):
        import cupy

        dout, q, k, v, out, lse, first_q, first_k, slopes = _device(dout, q, k, v, out, lse, first_q, first_k,
                                                                    slopes)
        seqlens = (first_q, first_k, None, None) if packed else (None, None, first_q, first_k)
        with cupy.cuda.Device(q.device.id):
            grads = [_dispatch._empty(cupy, x.shape, base.dtype) for x in (q, k, v)]
            frame = (lambda x: x[None]) if packed else (lambda x: x)
            flash_backward(*map(frame, (dout, q, k, v, out, lse)), slopes, *map(frame, grads), problem,
                           bool(deterministic), ragged=ragged, seqlens=seqlens)
        return tuple(grads)

    arrays = tuple(a[n] for n in ("dout", "q", "k", "v", "out", "lse", *names, "alibi_slopes"))
    specs = tuple((a[n].shape, base.dtype) for n in ("q", "k", "v"))
    return _api._run(origin, run, arrays, specs)


def attention_with_kvcache(q: Array, k_cache: Array, v_cache: Array, cache_seqlens: Array, *,
                           k_new: Optional[Array] = None, v_new: Optional[Array] = None,
                           block_table: Optional[Array] = None, causal: bool = False, window: Window = None,
                           softcap: Optional[float] = None, alibi_slopes: Optional[Array] = None,
                           scale: Optional[float] = None, return_lse: bool = False,
                           max_seqlen_k: Optional[int] = None,
                           backend: Backend = "auto") -> Union[Array, tuple[Array, Array]]:
    """Attention of new queries against a key/value cache (decoding; FlashAttention's
    ``flash_attn_with_kvcache``). Forward only.

    q is (B, Sq, Hq, D). The cache is dense, k_cache (B, S_cache, Hkv, D) and v_cache
    (B, S_cache, Hkv, Dv), or paged, (num_pages, page_size, Hkv, ·) with an int32 ``block_table``
    (B, max_pages_per_seq) listing each sequence's pages in order. ``cache_seqlens`` (int32, B)
    is each sequence's valid length. ``k_new``/``v_new`` (B, S_new, Hkv, ·), if given, are
    written into the cache in place at positions ``cache_seqlens[b] : cache_seqlens[b] + S_new``
    (on the caller's stream for GPU caches; ``cache_seqlens`` itself is not changed), and then
    attended to: q attends to the first ``cache_seqlens[b] + S_new`` keys of sequence b, with the
    causal/window rules aligned bottom-right (the queries are the last positions). Two sequences
    may share pages to read them, not to append into the same slot.

    GPU caches of float16 or bfloat16 are decoded on the GPU (``backend="auto"`` or ``"cuda"``):
    the query heads of a GQA group share one read of the keys and values, long caches are split
    across CTAs and merged by the log-sum-exp rule (the result does not depend on the split count
    beyond float32 rounding), and the sequence lengths are read on the device. Every other cache
    call runs on the NumPy backend, which ``backend="cuda"`` refuses.

    ``cache_seqlens`` and ``block_table`` are copied to the host and checked (lengths within the
    cache, pages in range, no two sequences appending into one slot), which waits for the GPU.
    Pass ``max_seqlen_k`` (an int bounding cache_seqlens[b] + S_new) to skip that on the GPU
    path: the two stay on the device, unread by the host, so the call neither synchronizes nor
    copies and can be captured in a CUDA graph (decoding loops); the bound only sizes the split
    heuristic (a wrong one costs speed, not correctness; where the lengths are read, one below
    them is refused). Their values are then unchecked: the kernels clamp every length into the
    cache and every page index into the pages there, and skip appends that would land outside it,
    so wrong values give wrong results, never an access outside the cache. Calls that run on the
    NumPy backend check them as always.

    Returns out (B, Sq, Hq, Dv) and, with ``return_lse=True``, lse (B, Hq, Sq).
    """
    what = "cuflash.attention_with_kvcache"
    a, origin = _import(what, q=q, k_cache=k_cache, v_cache=v_cache, cache_seqlens=cache_seqlens, k_new=k_new,
                        v_new=v_new, block_table=block_table, alibi_slopes=alibi_slopes)

    def writable(x):
        # JAX arrays are immutable (append with .at[].set() instead); read-only NumPy memory too.
        return origin.kind != "jax" and (not isinstance(x, numpy.ndarray) or x.flags.writeable)

    def check(read_lengths):
        return _ragged.check_kvcache(a["q"], a["k_cache"], a["v_cache"], a["cache_seqlens"], a["k_new"], a["v_new"],
                                     a["block_table"], alibi_slopes=a["alibi_slopes"], what=what, writable=writable,
                                     max_seqlen_k=max_seqlen_k, read_lengths=read_lengths, causal=causal,
                                     causal_alignment="bottom_right", window=window, softcap=softcap, scale=scale,
                                     backend=backend, return_lse=return_lse)

    base, plan = check(read_lengths=max_seqlen_k is None or not origin.on_gpu)
    if _kvcache_on_gpu(backend, origin, base, what):
        bound = max_seqlen_k if plan.seqlens_k is None else max(plan.seqlens_k, default=0)
        out, lse = _kvcache_gpu(a, origin, base, bound)
        return (out, lse) if return_lse else out
    if plan.seqlens_k is None:  # the NumPy backend reads the lengths anyway: check them first
        base, plan = check(read_lengths=True)
    if a["k_new"] is not None:
        with origin.context():
            _ragged.append_to_cache(a["k_cache"], a["v_cache"], a["k_new"], a["v_new"], plan)
    qh, kc, vc, slopes = map(_host, (a["q"], a["k_cache"], a["v_cache"], a["alibi_slopes"]))
    out = _dispatch._empty(numpy, base.out_shape, base.dtype)
    lse = _dispatch._empty(numpy, base.lse_shape, base.accum_dtype)
    for b, seqlen_k in enumerate(plan.seqlens_k):
        segment = _ragged.Segment(0, 0, base.seqlen_q, 0, seqlen_k)
        seg_slopes, alibi = _ragged.segment_slopes(None if slopes is None else
                                                   (slopes if slopes.ndim == 1 else slopes[b:b + 1]), 0)
        _numpy_backend.forward(qh[b:b + 1], _ragged.cache_keys(kc, plan, b), _ragged.cache_keys(vc, plan, b),
                               seg_slopes, out[b:b + 1], lse[b:b + 1],
                               _ragged.sequence_problem(base, segment, alibi, "bottom_right"))
    out, lse = _deliver(origin, (out, lse))
    return (out, lse) if return_lse else out


def _kvcache_on_gpu(backend, origin, problem, what):
    """Whether a cache call runs on the GPU: GPU caches of a dtype the decode kernel takes, with
    backend "auto" or "cuda". ``backend="cuda"`` otherwise raises, saying why (before any work)."""
    if backend == "numpy":
        return False
    from ._cuda import decode, runtime

    reason = None
    if not origin.on_gpu:
        reason = "the cache is in host memory (the GPU path runs on GPU caches, appended to in place)"
    else:
        ok, reason = runtime.gpu_available()
        if ok:
            ok, reason = decode.supported(problem)
        reason = None if ok else reason
    if reason is not None and backend == "cuda":
        raise BackendUnavailableError(f"backend='cuda' cannot run {what}: {reason}")
    return reason is None


def _kvcache_gpu(a, origin, base, max_seqlen_k):
    """The cache call on the GPU, on the caller's stream: append k_new/v_new, then decode (split-KV
    and merge). (out, lse) as the caller's arrays."""
    from . import _api
    from ._cuda import decode

    def run(q, k_cache, v_cache, cache_seqlens, k_new, v_new, block_table, slopes):
        import cupy

        with cupy.cuda.Device(q.device.id):
            out = _dispatch._empty(cupy, base.out_shape, base.dtype)
            lse = _dispatch._empty(cupy, base.lse_shape, numpy.float32)
            decode.flash_decode(q, k_cache, v_cache, cache_seqlens, block_table, slopes, out, lse, base,
                                max_seqlen_k=max_seqlen_k, k_new=k_new, v_new=v_new)
        return out, lse

    arrays = tuple(a[name] for name in ("q", "k_cache", "v_cache", "cache_seqlens", "k_new", "v_new", "block_table",
                                        "alibi_slopes"))
    specs = ((base.out_shape, base.dtype), (base.lse_shape, numpy.dtype(numpy.float32)))
    return _api._run(origin, run, arrays, specs)
