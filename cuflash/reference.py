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

import numpy

from . import _score_mod
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
              alibi_slopes=None, scale=None):
    """Float64 attention: returns ``(out, lse)`` with out (B, Sq, Hq, Dv) and lse (B, Hq, Sq).

    Inputs are BSHD arrays of any float dtype (NumPy, CuPy or DLPack producers); they are
    converted to float64 NumPy arrays first. Options mean what they mean in ``cuflash.attention``.
    """
    options = dict(causal=causal, causal_alignment=causal_alignment, window=window, softcap=softcap, scale=scale)
    arrays, slopes, problem = _checked("cuflash.reference.attention", options, alibi_slopes, q=q, k=k, v=v)
    _, P, lse, seen = _scores_and_probabilities(problem, slopes, arrays["q"], arrays["k"])
    out = _visible_matmul(P, _bhsd(arrays["v"], problem.group_size), seen)
    return out.transpose(0, 2, 1, 3), lse


def attention_backward(dout, q, k, v, *, causal=False, causal_alignment="bottom_right", window=None, softcap=None,
                       alibi_slopes=None, scale=None):
    """Float64 gradients ``(dq, dk, dv)`` of ``sum(out * dout)``, shaped like q, k, v.

    Recomputes P from q and k (it does not take out or lse from a forward), and uses the textbook
    softmax Jacobian for the logits' gradient, P ∘ (dP − rowsum(P ∘ dP)) (independent of the
    kernels' D = rowsum(dO ∘ O)), then the score modifiers' derivative to get dS.
    With GQA, dk and dv sum over the query heads that share each key/value head.
    """
    options = dict(causal=causal, causal_alignment=causal_alignment, window=window, softcap=softcap, scale=scale)
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
