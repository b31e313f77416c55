"""The ground truth: attention and its gradients computed plainly in float64.

Everything is materialized (S and P are full (B, Hq, Sq, Sk) arrays), so memory grows as Sq·Sk:
use it on sizes where that fits. Every backend is tested against these functions.

Semantics (shared by all of cuflash): S = scale · Q Kᵀ, P = softmax(S) over the keys query i may
see, O = P V, LSE = log Σ_j exp(S_ij) over visible keys. Causal: key j visible to query i iff
j <= i + offset, offset = Sk − Sq (bottom-right) or 0 (top-left). A row with no visible key
has O = 0 and LSE = −inf, and receives and passes on zero gradient.
"""

import numpy

from ._interop import as_host_arrays
from ._problem import check_backward, check_forward, visible


def _visible_mask(problem):
    """(Sq, Sk) boolean mask of the keys each query may see."""
    i = numpy.arange(problem.seqlen_q)[:, None]
    j = numpy.arange(problem.seqlen_k)[None, :]
    if not problem.causal:
        return numpy.ones((problem.seqlen_q, problem.seqlen_k), dtype=bool)
    return visible(i, j, problem.causal_offset)


def _bhsd(x, heads_per_kv=1):
    """BSHD → BHSD in float64, repeating each head ``heads_per_kv`` times (GQA)."""
    x = numpy.asarray(x, dtype=numpy.float64).transpose(0, 2, 1, 3)
    return numpy.repeat(x, heads_per_kv, axis=1) if heads_per_kv > 1 else x


def _probabilities(problem, q, k):
    """P (B, Hq, Sq, Sk), LSE (B, Hq, Sq) and the visibility mask, all float64."""
    Q, K = _bhsd(q), _bhsd(k, problem.group_size)
    S = problem.scale * (Q @ K.transpose(0, 1, 3, 2))
    mask = _visible_mask(problem)
    S = numpy.where(mask, S, -numpy.inf)
    row_max = S.max(axis=-1, initial=-numpy.inf, keepdims=True)
    # A fully masked row has max −inf; shifting by 0 instead keeps exp(−inf) = 0 rather than NaN.
    shift = numpy.where(numpy.isneginf(row_max), 0.0, row_max)
    E = numpy.exp(S - shift)
    row_sum = E.sum(axis=-1, keepdims=True)
    with numpy.errstate(divide="ignore", invalid="ignore"):
        P = numpy.where(row_sum > 0, E / row_sum, 0.0)
        lse = numpy.where(row_sum[..., 0] > 0, shift[..., 0] + numpy.log(row_sum[..., 0]), -numpy.inf)
    return P, lse


def attention(q, k, v, *, causal=False, causal_alignment="bottom_right", scale=None):
    """Float64 attention: returns ``(out, lse)`` with out (B, Sq, Hq, Dv) and lse (B, Hq, Sq).

    Inputs are BSHD arrays of any float dtype (NumPy, CuPy or DLPack producers); they are
    converted to float64 NumPy arrays first. Options mean what they mean in ``cuflash.attention``.
    """
    q, k, v = as_host_arrays(q=q, k=k, v=v)
    problem = check_forward(q, k, v, causal=causal, causal_alignment=causal_alignment, scale=scale,
                            backend="numpy", what="cuflash.reference.attention")
    P, lse = _probabilities(problem, q, k)
    out = P @ _bhsd(v, problem.group_size)
    return out.transpose(0, 2, 1, 3), lse


def attention_backward(dout, q, k, v, *, causal=False, causal_alignment="bottom_right", scale=None):
    """Float64 gradients ``(dq, dk, dv)`` of ``sum(out * dout)``, shaped like q, k, v.

    Recomputes P from q and k (it does not take out or lse from a forward), and uses the textbook
    softmax Jacobian dS = P ∘ (dP − rowsum(P ∘ dP)), independent of the kernels' D = rowsum(dO ∘ O).
    With GQA, dk and dv sum over the query heads that share each key/value head.
    """
    dout, q, k, v = as_host_arrays(dout=dout, q=q, k=k, v=v)
    problem = check_forward(q, k, v, causal=causal, causal_alignment=causal_alignment, scale=scale,
                            backend="numpy", what="cuflash.reference.attention_backward")
    if tuple(dout.shape) != problem.out_shape:
        raise ValueError(f"dout must have shape (B, Sq, Hq, Dv) = {problem.out_shape}, got {tuple(dout.shape)}")
    g = problem.group_size
    P, _ = _probabilities(problem, q, k)
    Q, K, V, dO = _bhsd(q), _bhsd(k, g), _bhsd(v, g), _bhsd(dout)
    dV = P.transpose(0, 1, 3, 2) @ dO
    dP = dO @ V.transpose(0, 1, 3, 2)
    dS = P * (dP - (P * dP).sum(axis=-1, keepdims=True))
    dQ = problem.scale * (dS @ K)
    dK = problem.scale * (dS.transpose(0, 1, 3, 2) @ Q)

    def per_kv_head(x):
        B, H, S, D = x.shape
        return x.reshape(B, problem.heads_kv, g, S, D).sum(axis=2).transpose(0, 2, 1, 3)

    return dQ.transpose(0, 2, 1, 3), per_kv_head(dK), per_kv_head(dV)
