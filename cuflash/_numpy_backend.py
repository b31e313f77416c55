"""The CPU backend: the kernels' tiled algorithm written with NumPy.

Forward: for each tile of query rows Q_i, stream key/value tiles K_j, V_j, keep the running row
maximum m_i and sum l_i, rescale the accumulator O_i when m_i grows, and normalize at the end
(FlashAttention-2's online softmax). Backward: recompute P_ij = exp(S_ij − LSE_i) tile by tile,
with D_i = rowsum(dO_i ∘ O_i), dS = P ∘ (dP − D). No Sq×Sk array is ever formed: working memory is
a few (B, Hq, block_q, block_k) tiles, plus float32 copies of the inputs.

Batch and heads are vectorized: heads are grouped as (B, Hkv, G, S, D), G = Hq / Hkv, so a
key/value tile is read once for all the query heads that share it (GQA/MQA without copies).
"""

import numpy

from ._problem import visible

# Upper bound on the elements of one S tile (B·Hq·block_q·block_k); 4M float32 = 16 MiB.
_TILE_ELEMENTS = 1 << 22
_MIN_BLOCK = 16


def _blocks(problem, max_block_k=512):
    """Tile sizes that keep one S tile near ``_TILE_ELEMENTS`` elements."""
    heads = max(1, problem.batch * problem.heads_q)
    block_k = max(1, min(max_block_k, problem.seqlen_k))
    block_q = _TILE_ELEMENTS // (heads * block_k)
    block_q = max(_MIN_BLOCK, min(block_q, max(1, problem.seqlen_q), 1024))
    return block_q, block_k


def _grouped(x, problem, acc):
    """BSHD → (B, Hkv, G, S, D) view in the accumulation dtype (one copy when casting)."""
    B, S, H, D = x.shape
    g = H // problem.heads_kv
    x = x.astype(acc, copy=False).transpose(0, 2, 1, 3)
    return x.reshape(B, problem.heads_kv, g, S, D)


def _tile_range(problem, i0, i1):
    """Key-tile boundaries [0, end) a query tile i0..i1-1 may touch, and where masking starts.

    Keys beyond ``end`` are invisible to every row of the tile; keys below ``free`` are visible
    to every row, so tiles ending at or before ``free`` need no mask.
    """
    if not problem.causal:
        return problem.seqlen_k, problem.seqlen_k
    end = min(problem.seqlen_k, max(0, i1 - 1 + problem.causal_offset + 1))
    free = min(problem.seqlen_k, max(0, i0 + problem.causal_offset + 1))
    return end, free


def _mask_tile(problem, S, i0, i1, j0, j1):
    i = numpy.arange(i0, i1)[:, None]
    j = numpy.arange(j0, j1)[None, :]
    return numpy.where(visible(i, j, problem.causal_offset), S, -numpy.inf)


def _contract_rows(A, X):
    """Σ over query rows and the G heads of a group: (B, Hkv, G, q, k), (B, Hkv, G, q, d) → (B, Hkv, k, d).

    Folding G into the row axis turns the GQA sum into one batched matrix product.
    """
    B, H, G, rows, cols = A.shape
    A = A.reshape(B, H, G * rows, cols)
    X = X.reshape(B, H, G * rows, X.shape[-1])
    return A.swapaxes(-1, -2) @ X


def forward(q, k, v, out, lse, problem):
    """Write out (B, Sq, Hq, Dv) in the input dtype and lse (B, Hq, Sq) in the accumulation dtype."""
    acc = problem.accum_dtype
    B, Sq, Hq, Dv = problem.out_shape
    if out.size == 0 and lse.size == 0:
        return
    Q, K, V = _grouped(q, problem, acc), _grouped(k, problem, acc), _grouped(v, problem, acc)
    K_t = K.swapaxes(-1, -2)
    block_q, block_k = _blocks(problem)
    # Views, never copies (copy=False raises otherwise): the tiles below write through them.
    out_view = out.transpose(0, 2, 1, 3).reshape(B, problem.heads_kv, problem.group_size, Sq, Dv, copy=False)
    lse_view = lse.reshape(B, problem.heads_kv, problem.group_size, Sq, copy=False)
    scale = acc.type(problem.scale)
    for i0 in range(0, Sq, block_q):
        i1 = min(Sq, i0 + block_q)
        Q_i = Q[..., i0:i1, :] * scale
        m_i = numpy.full(Q_i.shape[:-1], -numpy.inf, dtype=acc)
        l_i = numpy.zeros(Q_i.shape[:-1], dtype=acc)
        O_i = numpy.zeros(Q_i.shape[:-1] + (Dv,), dtype=acc)
        end, free = _tile_range(problem, i0, i1)
        for j0 in range(0, end, block_k):
            j1 = min(end, j0 + block_k)
            S_ij = Q_i @ K_t[..., j0:j1]
            if j1 > free:
                S_ij = _mask_tile(problem, S_ij, i0, i1, j0, j1)
            m_new = numpy.maximum(m_i, S_ij.max(axis=-1))
            # Rows that have seen no visible key keep m = −inf; subtracting 0 instead avoids
            # exp(−inf − (−inf)) = NaN and leaves their P and l at exactly 0.
            m_safe = numpy.where(numpy.isneginf(m_new), 0, m_new)
            P_ij = numpy.exp(S_ij - m_safe[..., None])
            alpha = numpy.exp(m_i - m_safe)
            l_i = alpha * l_i + P_ij.sum(axis=-1)
            O_i = alpha[..., None] * O_i + P_ij @ V[..., j0:j1, :]
            m_i = m_new
        empty = l_i == 0
        with numpy.errstate(divide="ignore", invalid="ignore"):
            O_i = numpy.where(empty[..., None], 0, O_i / l_i[..., None])
            lse_view[..., i0:i1] = numpy.where(empty, -numpy.inf, m_i + numpy.log(l_i))
        out_view[..., i0:i1, :] = O_i


def backward(dout, q, k, v, out, lse, dq, dk, dv, problem):
    """Write dq, dk, dv (shaped like q, k, v, input dtype), recomputing P from q, k and lse."""
    acc = problem.accum_dtype
    B, Sq, Hq, _ = q.shape
    Sk = problem.seqlen_k
    Q, K, V = _grouped(q, problem, acc), _grouped(k, problem, acc), _grouped(v, problem, acc)
    dO, O = _grouped(dout, problem, acc), _grouped(out, problem, acc)
    L = numpy.asarray(lse, dtype=acc).reshape(B, problem.heads_kv, problem.group_size, Sq)
    # exp(S − (+inf)) = 0 makes P vanish on fully masked rows (LSE = −inf) without NaN.
    L = numpy.where(numpy.isneginf(L), numpy.inf, L)
    D = (dO * O).sum(axis=-1)
    dK = numpy.zeros(K.shape[:2] + (Sk, K.shape[-1]), dtype=acc)
    dV = numpy.zeros(V.shape[:2] + (Sk, V.shape[-1]), dtype=acc)
    dQ = numpy.empty(Q.shape, dtype=acc)
    K_t, V_t = K.swapaxes(-1, -2), V.swapaxes(-1, -2)
    block_q, block_k = _blocks(problem)
    scale = acc.type(problem.scale)
    for i0 in range(0, Sq, block_q):
        i1 = min(Sq, i0 + block_q)
        Q_i, dO_i = Q[..., i0:i1, :], dO[..., i0:i1, :]
        dQ_i = numpy.zeros(Q_i.shape, dtype=acc)
        end, free = _tile_range(problem, i0, i1)
        for j0 in range(0, end, block_k):
            j1 = min(end, j0 + block_k)
            S_ij = (Q_i * scale) @ K_t[..., j0:j1]
            if j1 > free:
                S_ij = _mask_tile(problem, S_ij, i0, i1, j0, j1)
            P_ij = numpy.exp(S_ij - L[..., i0:i1, None])
            dV[..., j0:j1, :] += _contract_rows(P_ij, dO_i)
            dP_ij = dO_i @ V_t[..., j0:j1]
            dS_ij = P_ij * (dP_ij - D[..., i0:i1, None])
            dQ_i += dS_ij @ K[..., j0:j1, :]
            dK[..., j0:j1, :] += _contract_rows(dS_ij, Q_i)
        dQ[..., i0:i1, :] = dQ_i * scale
    dq[...] = dQ.reshape(B, Hq, Sq, q.shape[-1]).transpose(0, 2, 1, 3)
    dk[...] = (dK * scale).transpose(0, 2, 1, 3)
    dv[...] = dV.transpose(0, 2, 1, 3)
