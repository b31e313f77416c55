"""The ground truth: attention and its gradients computed plainly in float64.

Everything is materialized (S and P are full (B, Hq, Sq, Sk) arrays), so memory grows as Sq·Sk:
use it on sizes where that fits. Every backend is tested against these functions.

Semantics (shared by all of cuflash): S = scale · Q Kᵀ; the logits are S after the score
modifiers (softcap c · tanh(S / c), then the ALiBi bias −slope · |i + offset − j|; see
``_score_mod``); P = softmax(logits) over the keys query i may see, O = P V,
LSE = log Σ_j exp(logit_ij) over visible keys. Which keys are visible is ``problem.mask``: key j
to query i iff i + offset − left <= j <= i + offset + right (causal: right = 0), with
offset = Sk − Sq (bottom-right) or 0 (top-left). A row with no visible key has O = 0 and
LSE = −inf, and receives and passes on zero gradient.

NaN and ±inf in the inputs follow the arithmetic exactly, pair by pair: every sum runs over the
visible (query, key) pairs only, so an output is NaN exactly when a term it depends on is, and a
value the mask hides never reaches anything (the backends' tiles may spread it further: see the
README's "NaN and infinity").
"""

import dataclasses

import numpy

from . import _ragged, _score_mod
from ._interop import as_host_arrays
from ._problem import check_forward


def _bhsd(x, heads_per_kv=1):
    """BSHD → BHSD in float64, repeating each head ``heads_per_kv`` times (GQA)."""
    x = numpy.asarray(x, dtype=numpy.float64).transpose(0, 2, 1, 3)
    return numpy.repeat(x, heads_per_kv, axis=1) if heads_per_kv > 1 else x


def _checked(what, options, alibi_slopes, **operands):
    """The operands as host arrays, the ALiBi slopes shaped for (B, Hq, Sq, Sk) scores (float64,
    or None) and the resolved ``Problem``."""
    if alibi_slopes is not None:
        operands["alibi_slopes"] = alibi_slopes
    arrays = dict(zip(operands, as_host_arrays(**operands)))
    given = arrays.pop("alibi_slopes", None)
    problem = check_forward(arrays["q"], arrays["k"], arrays["v"], alibi_slopes=given, backend="numpy", what=what,
                            **options)
    slopes = _score_mod.head_slopes(problem, given, numpy.float64, (problem.batch, problem.heads_q))
    return arrays, slopes, problem


def _visible_matmul(W, X, seen):
    """W @ X summed over the visible pairs only: (…, I, J) @ (…, J, D) with ``seen`` (I, J).

    Exactly what Σ_j over the keys (or rows) the mask lets a pair see gives, with IEEE arithmetic
    on those terms: a NaN or ±inf in a row of X reaches the outputs whose pairs see it and no other
    (a plain product would also give 0 · NaN = NaN where W is 0 on hidden pairs)."""
    W = numpy.where(seen, W, 0.0)
    bad = (~numpy.isfinite(X)).any(axis=(-1, *range(X.ndim - 2)))  # rows of X with a non-finite value
    if not bad.any():
        return W @ X
    out = W @ numpy.where(bad[:, None], 0.0, X)
    terms = W[..., bad][..., None] * X[..., bad, :][..., None, :, :]  # (…, I, n_bad, D)
    return out + numpy.where(seen[:, bad][..., None], terms, 0.0).sum(axis=-2)


def _scores_and_probabilities(problem, slopes, q, k):
    """S (B, Hq, Sq, Sk), before the score modifiers, P and LSE (B, Hq, Sq), all float64.

    Rows that see no key get P = 0 and LSE = −inf by rule; every other row gets what the
    arithmetic gives, NaN and ±inf included (+inf among the logits makes the row NaN; logits that
    are all −inf give P = 0/0 = NaN and LSE = log 0 = −inf)."""
    Q, K = _bhsd(q), _bhsd(k, problem.group_size)
    S = problem.scale * (Q @ K.transpose(0, 1, 3, 2))
    seen = problem.mask.matrix()
    live = seen.any(axis=-1)[:, None]
    logits = _score_mod.logits(S, problem, slopes, numpy.arange(problem.seqlen_q), numpy.arange(problem.seqlen_k))
    logits = numpy.where(seen, logits, -numpy.inf)
    row_max = logits.max(axis=-1, initial=-numpy.inf, keepdims=True)
    # Shifting a row whose logits are all −inf by 0 instead keeps exp(−inf) = 0 rather than NaN.
    shift = numpy.where(numpy.isneginf(row_max), 0.0, row_max)
    with numpy.errstate(divide="ignore", invalid="ignore", over="ignore"):
        E = numpy.where(seen, numpy.exp(logits - shift), 0.0)
        row_sum = E.sum(axis=-1, keepdims=True)
        P = numpy.where(live, E / row_sum, 0.0)
        lse = numpy.where(live, shift + numpy.log(row_sum), -numpy.inf)[..., 0]
    return S, P, lse, seen


def attention(q, k, v, *, causal=False, causal_alignment="bottom_right", window=None, softcap=None,
              alibi_slopes=None, scale=None, seqlens_q=None, seqlens_k=None):
    """Float64 attention: returns ``(out, lse)`` with out (B, Sq, Hq, Dv) and lse (B, Hq, Sq).

    Inputs are BSHD arrays of any float dtype (NumPy, CuPy or DLPack producers); they are
    converted to float64 NumPy arrays first. Options mean what they mean in ``cuflash.attention``.
    """
    options = dict(causal=causal, causal_alignment=causal_alignment, window=window, softcap=softcap, scale=scale)
    if seqlens_q is not None or seqlens_k is not None:
        return _padded_forward(q, k, v, seqlens_q, seqlens_k, alibi_slopes, options)
    arrays, slopes, problem = _checked("cuflash.reference.attention", options, alibi_slopes, q=q, k=k, v=v)
    _, P, lse, seen = _scores_and_probabilities(problem, slopes, arrays["q"], arrays["k"])
    out = _visible_matmul(P, _bhsd(arrays["v"], problem.group_size), seen)
    return out.transpose(0, 2, 1, 3), lse


def attention_backward(dout, q, k, v, *, causal=False, causal_alignment="bottom_right", window=None, softcap=None,
                       alibi_slopes=None, scale=None, seqlens_q=None, seqlens_k=None):
    """Float64 gradients ``(dq, dk, dv)`` of ``sum(out * dout)``, shaped like q, k, v.

    Recomputes P from q and k (it does not take out or lse from a forward), and uses the textbook
    softmax Jacobian for the logits' gradient, P ∘ (dP − rowsum(P ∘ dP)) (independent of the
    kernels' D = rowsum(dO ∘ O)), then the score modifiers' derivative to get dS.
    With GQA, dk and dv sum over the query heads that share each key/value head.
    """
    options = dict(causal=causal, causal_alignment=causal_alignment, window=window, softcap=softcap, scale=scale)
    if seqlens_q is not None or seqlens_k is not None:
        return _padded_backward(dout, q, k, v, seqlens_q, seqlens_k, alibi_slopes, options)
    arrays, slopes, problem = _checked("cuflash.reference.attention_backward", options, alibi_slopes, dout=dout, q=q,
                                       k=k, v=v)
    if tuple(arrays["dout"].shape) != problem.out_shape:
        raise ValueError(f"dout must have shape (B, Sq, Hq, Dv) = {problem.out_shape}, "
                         f"got {tuple(arrays['dout'].shape)}")
    g = problem.group_size
    S, P, _, seen = _scores_and_probabilities(problem, slopes, arrays["q"], arrays["k"])
    Q, K, V, dO = _bhsd(arrays["q"]), _bhsd(arrays["k"], g), _bhsd(arrays["v"], g), _bhsd(arrays["dout"])
    # Only visible pairs enter any sum, so a row that sees no key passes on no gradient and a key
    # no row sees receives none, whatever dO or the hidden values hold.
    with numpy.errstate(invalid="ignore", over="ignore"):
        dV = _visible_matmul(P.transpose(0, 1, 3, 2), dO, seen.T)
        dP = numpy.where(seen, dO @ V.transpose(0, 1, 3, 2), 0.0)
        dS = numpy.where(seen, _score_mod.score_grad(P * (dP - (P * dP).sum(axis=-1, keepdims=True)), S, problem), 0.0)
        dQ = problem.scale * _visible_matmul(dS, K, seen)
        dK = problem.scale * _visible_matmul(dS.transpose(0, 1, 3, 2), Q, seen.T)

    def per_kv_head(x):
        B, H, S, D = x.shape
        return x.reshape(B, problem.heads_kv, g, S, D).sum(axis=2).transpose(0, 2, 1, 3)

    return dQ.transpose(0, 2, 1, 3), per_kv_head(dK), per_kv_head(dV)


# Ragged batches: every sequence is the dense problem above with its own lengths.

def _segments_run(dense, segments, frames, slopes, options):
    """Run ``dense`` (``attention`` or ``attention_backward``) on each segment's (1, rows, ...)
    slices of ``frames`` ((side, array) pairs in the (batch, seq) frame); yields the segment and
    the results."""
    for index, segment in enumerate(segments):
        b = slice(segment.batch, segment.batch + 1)
        rows = {"q": slice(segment.q_start, segment.q_start + segment.seqlen_q),
                "k": slice(segment.k_start, segment.k_start + segment.seqlen_k)}
        sliced = [x[b, rows[side]] for side, x in frames]
        seg_slopes = None if slopes is None else (slopes if slopes.ndim == 1 else slopes[index])
        yield segment, dense(*sliced, alibi_slopes=seg_slopes, **options)


def _ragged_forward(q, k, v, segments, slopes, options, out_shape, lse_shape):
    out = numpy.zeros(out_shape)
    lse = numpy.full(lse_shape, -numpy.inf)
    for segment, (o, l) in _segments_run(attention, segments, (("q", q), ("k", k), ("k", v)), slopes, options):
        rows = slice(segment.q_start, segment.q_start + segment.seqlen_q)
        out[segment.batch, rows] = o[0]
        lse[segment.batch, :, rows] = l[0]
    return out, lse


def _ragged_backward(dout, q, k, v, segments, slopes, options):
    grads = [numpy.zeros(x.shape) for x in (q, k, v)]
    frames = (("q", dout), ("q", q), ("k", k), ("k", v))
    for segment, (dq, dk, dv) in _segments_run(attention_backward, segments, frames, slopes, options):
        rows_q = slice(segment.q_start, segment.q_start + segment.seqlen_q)
        rows_k = slice(segment.k_start, segment.k_start + segment.seqlen_k)
        grads[0][segment.batch, rows_q] = dq[0]
        grads[1][segment.batch, rows_k] = dk[0]
        grads[2][segment.batch, rows_k] = dv[0]
    return grads


def _host_operands(**operands):
    """The given operands as host arrays by name (None where not given)."""
    given = {name: x for name, x in operands.items() if x is not None}
    return {**dict.fromkeys(operands), **dict(zip(given, as_host_arrays(**given)))}


def _padded_forward(q, k, v, seqlens_q, seqlens_k, alibi_slopes, options):
    """``attention`` with valid lengths: padded query rows get out = 0 and lse = −inf."""
    a = _host_operands(q=q, k=k, v=v, seqlens_q=seqlens_q, seqlens_k=seqlens_k, alibi_slopes=alibi_slopes)
    base, segments = _ragged.check_padded(a["q"], a["k"], a["v"], a["seqlens_q"], a["seqlens_k"],
                                          alibi_slopes=a["alibi_slopes"], what="cuflash.reference.attention",
                                          backend="numpy", **options)
    return _ragged_forward(a["q"], a["k"], a["v"], segments, a["alibi_slopes"], options, base.out_shape,
                           base.lse_shape)


def _padded_backward(dout, q, k, v, seqlens_q, seqlens_k, alibi_slopes, options):
    """``attention_backward`` with valid lengths: zero gradients on padded rows and keys."""
    a = _host_operands(dout=dout, q=q, k=k, v=v, seqlens_q=seqlens_q, seqlens_k=seqlens_k, alibi_slopes=alibi_slopes)
    _, segments = _ragged.check_padded(a["q"], a["k"], a["v"], a["seqlens_q"], a["seqlens_k"],
                                       alibi_slopes=a["alibi_slopes"], what="cuflash.reference.attention_backward",
                                       backend="numpy", **options)
    return tuple(_ragged_backward(a["dout"], a["q"], a["k"], a["v"], segments, a["alibi_slopes"], options))


def attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, *, causal=False, causal_alignment="bottom_right",
                     window=None, softcap=None, alibi_slopes=None, scale=None):
    """Float64 ``cuflash.attention_varlen``: out (total_q, Hq, Dv) and lse (Hq, total_q)."""
    options = dict(causal=causal, causal_alignment=causal_alignment, window=window, softcap=softcap, scale=scale)
    a = _host_operands(q=q, k=k, v=v, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k, alibi_slopes=alibi_slopes)
    _, segments = _ragged.check_varlen(a["q"], a["k"], a["v"], a["cu_seqlens_q"], a["cu_seqlens_k"], max_seqlen_q=None,
                                       max_seqlen_k=None, alibi_slopes=a["alibi_slopes"],
                                       what="cuflash.reference.attention_varlen", backend="numpy", **options)
    out, lse = _ragged_forward(a["q"][None], a["k"][None], a["v"][None], segments, a["alibi_slopes"], options,
                               (1,) + a["q"].shape[:2] + a["v"].shape[2:], (1, a["q"].shape[1], a["q"].shape[0]))
    return out[0], lse[0]


def attention_varlen_backward(dout, q, k, v, cu_seqlens_q, cu_seqlens_k, *, causal=False,
                              causal_alignment="bottom_right", window=None, softcap=None, alibi_slopes=None,
                              scale=None):
    """Float64 gradients of ``attention_varlen``: (dq, dk, dv) shaped like q, k, v."""
    options = dict(causal=causal, causal_alignment=causal_alignment, window=window, softcap=softcap, scale=scale)
    a = _host_operands(dout=dout, q=q, k=k, v=v, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k,
                       alibi_slopes=alibi_slopes)
    _, segments = _ragged.check_varlen(a["q"], a["k"], a["v"], a["cu_seqlens_q"], a["cu_seqlens_k"], max_seqlen_q=None,
                                       max_seqlen_k=None, alibi_slopes=a["alibi_slopes"],
                                       what="cuflash.reference.attention_varlen_backward", backend="numpy",
                                       **options)
    grads = _ragged_backward(a["dout"][None], a["q"][None], a["k"][None], a["v"][None], segments,
                             a["alibi_slopes"], options)
    return tuple(g[0] for g in grads)


def attention_with_kvcache(q, k_cache, v_cache, cache_seqlens, *, k_new=None, v_new=None, block_table=None,
                           causal=False, window=None, softcap=None, alibi_slopes=None, scale=None):
    """Float64 ``cuflash.attention_with_kvcache``: (out, lse). The caches are not modified: each
    sequence's keys are its first ``cache_seqlens[b]`` cached keys followed by k_new[b]."""
    options = dict(causal=causal, causal_alignment="bottom_right", window=window, softcap=softcap, scale=scale)
    a = _host_operands(q=q, k_cache=k_cache, v_cache=v_cache, cache_seqlens=cache_seqlens, k_new=k_new, v_new=v_new,
                       block_table=block_table, alibi_slopes=alibi_slopes)
    base, plan = _ragged.check_kvcache(a["q"], a["k_cache"], a["v_cache"], a["cache_seqlens"], a["k_new"],
                                       a["v_new"], a["block_table"], alibi_slopes=a["alibi_slopes"],
                                       what="cuflash.reference.attention_with_kvcache", writable=lambda x: True,
                                       backend="numpy", **options)
    before_append = dataclasses.replace(plan, seqlens_k=plan.cache_seqlens)
    out = numpy.zeros(base.out_shape)
    lse = numpy.full(base.lse_shape, -numpy.inf)
    slopes = a["alibi_slopes"]
    for b in range(base.batch):
        keys = [_ragged.cache_keys(a["k_cache"], before_append, b)]
        values = [_ragged.cache_keys(a["v_cache"], before_append, b)]
        if a["k_new"] is not None:
            keys.append(a["k_new"][b:b + 1])
            values.append(a["v_new"][b:b + 1])
        seg_slopes = None if slopes is None else (slopes if slopes.ndim == 1 else slopes[b])
        o, l = attention(a["q"][b:b + 1], numpy.concatenate(keys, axis=1), numpy.concatenate(values, axis=1),
                         alibi_slopes=seg_slopes, **options)
        out[b], lse[b] = o[0], l[0]
    return out, lse
