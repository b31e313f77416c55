"""The CPU backend: the kernels' tiled algorithm written with NumPy.

Forward: for each tile of query rows Q_i, stream key/value tiles K_j, V_j, keep the running row
maximum m_i and sum l_i, rescale the accumulator O_i when m_i grows, and normalize at the end
(FlashAttention-2's online softmax). Backward: recompute P_ij = exp(Z_ij − LSE_i) tile by tile,
with D_i = rowsum(dO_i ∘ O_i), dZ = P ∘ (dP − D). No Sq×Sk array is ever formed: working memory is
a few (B, Hq, block_q, block_k) tiles, plus float32 copies of the inputs.

S_ij = scale · Q_i K_jᵀ are the scaled scores and Z_ij the logits the softmax sees: S_ij after the
score modifiers (``_score_mod``: softcap, ALiBi), −inf where the mask hides a key. The backward
turns dZ into dS through the modifiers' derivative. Which key tiles a query tile visits, and which
of them need element masking, comes from ``problem.mask`` (a ``MaskSpec``): tiles wholly outside
the band are never touched.

Batch and heads are vectorized: heads are grouped as (B, Hkv, G, S, D), G = Hq / Hkv, so a
key/value tile is read once for all the query heads that share it (GQA/MQA without copies).
"""

import numpy

from . import _score_mod

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


def _key_tiles(mask, i0, i1, block_k):
    """The key tiles (j0, j1, needs_mask) that query rows i0..i1-1 visit: those covering the keys
    some row may see, each flagged when some row of it does not see every key."""
    lo, hi = mask.key_range(i0, i1)
    for j0 in range(lo, hi, block_k):
        j1 = min(hi, j0 + block_k)
        yield j0, j1, not mask.tile_is_full(i0, i1, j0, j1)


def _logits(S_ij, problem, mask, slopes, i0, i1, j0, j1, needs_mask):
    """Z_ij: the score modifiers applied to S_ij, and −inf where the mask hides a key."""
    i, j = numpy.arange(i0, i1), numpy.arange(j0, j1)
    Z_ij = _score_mod.logits(S_ij, problem, slopes, i, j)
    if needs_mask:
        Z_ij = numpy.where(mask.visible(i[:, None], j[None, :]), Z_ij, -numpy.inf)
    return Z_ij


def _contract_rows(A, X):
    """Σ over query rows and the G heads of a group: (B, Hkv, G, q, k), (B, Hkv, G, q, d) → (B, Hkv, k, d).

    Folding G into the row axis turns the GQA sum into one batched matrix product.
    """
    B, H, G, rows, cols = A.shape
    A = A.reshape(B, H, G * rows, cols)
    X = X.reshape(B, H, G * rows, X.shape[-1])
    return A.swapaxes(-1, -2) @ X


def forward(q, k, v, slopes, out, lse, problem):
    """Write out (B, Sq, Hq, Dv) in the input dtype and lse (B, Hq, Sq) in the accumulation dtype.

    ``slopes``: the ALiBi slopes operand ((Hq,) or (B, Hq)), or None without ALiBi."""
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
    mask = problem.mask
    slopes = _score_mod.head_slopes(problem, slopes, acc, Q.shape[:3])
    for i0 in range(0, Sq, block_q):
        i1 = min(Sq, i0 + block_q)
        Q_i = Q[..., i0:i1, :] * scale
        m_i = numpy.full(Q_i.shape[:-1], -numpy.inf, dtype=acc)
        l_i = numpy.zeros(Q_i.shape[:-1], dtype=acc)
        O_i = numpy.zeros(Q_i.shape[:-1] + (Dv,), dtype=acc)
        for j0, j1, needs_mask in _key_tiles(mask, i0, i1, block_k):
            Z_ij = _logits(Q_i @ K_t[..., j0:j1], problem, mask, slopes, i0, i1, j0, j1, needs_mask)
            m_new = numpy.maximum(m_i, Z_ij.max(axis=-1))
            # Rows that have seen no visible key keep m = −inf; subtracting 0 instead avoids
            # exp(−inf − (−inf)) = NaN and leaves their P and l at exactly 0.
            m_safe = numpy.where(numpy.isneginf(m_new), 0, m_new)
            P_ij = numpy.exp(Z_ij - m_safe[..., None])
            alpha = numpy.exp(m_i - m_safe)
            l_i = alpha * l_i + P_ij.sum(axis=-1)
            O_i = alpha[..., None] * O_i + P_ij @ V[..., j0:j1, :]
            m_i = m_new
        empty = l_i == 0
        with numpy.errstate(divide="ignore", invalid="ignore"):
            O_i = numpy.where(empty[..., None], 0, O_i / l_i[..., None])
            lse_view[..., i0:i1] = numpy.where(empty, -numpy.inf, m_i + numpy.log(l_i))
        out_view[..., i0:i1, :] = O_i


def backward(dout, q, k, v, out, lse, slopes, dq, dk, dv, problem):
    """Write dq, dk, dv (shaped like q, k, v, input dtype), recomputing P from q, k and lse.

    ``slopes``: the ALiBi slopes operand ((Hq,) or (B, Hq)), or None without ALiBi."""
    acc = problem.accum_dtype
    B, Sq, Hq, _ = q.shape
    Sk = problem.seqlen_k
    Q, K, V = _grouped(q, problem, acc), _grouped(k, problem, acc), _grouped(v, problem, acc)
    dO, O = _grouped(dout, problem, acc), _grouped(out, problem, acc)
    L = numpy.asarray(lse, dtype=acc).reshape(B, problem.heads_kv, problem.group_size, Sq)
    masked = numpy.isneginf(L)  # rows that see no key
    # exp(Z − (+inf)) = 0 makes P vanish on fully masked rows without NaN. Their dO and D are
    # zeroed too: they pass on no gradient whatever dO holds, and P = 0 times a NaN there would not be 0.
    L = numpy.where(masked, numpy.inf, L)
    if masked.any():
        dO = numpy.where(masked[..., None], 0, dO)
    D = numpy.where(masked, 0, (dO * O).sum(axis=-1))
    dK = numpy.zeros(K.shape[:2] + (Sk, K.shape[-1]), dtype=acc)
    dV = numpy.zeros(V.shape[:2] + (Sk, V.shape[-1]), dtype=acc)
    dQ = numpy.empty(Q.shape, dtype=acc)
    K_t, V_t = K.swapaxes(-1, -2), V.swapaxes(-1, -2)
    block_q, block_k = _blocks(problem)
    scale = acc.type(problem.scale)
    mask = problem.mask
    slopes = _score_mod.head_slopes(problem, slopes, acc, Q.shape[:3])
    for i0 in range(0, Sq, block_q):
        i1 = min(Sq, i0 + block_q)
        Q_i, dO_i = Q[..., i0:i1, :], dO[..., i0:i1, :]
        dQ_i = numpy.zeros(Q_i.shape, dtype=acc)
        for j0, j1, needs_mask in _key_tiles(mask, i0, i1, block_k):
            S_ij = (Q_i * scale) @ K_t[..., j0:j1]
            Z_ij = _logits(S_ij, problem, mask, slopes, i0, i1, j0, j1, needs_mask)
            P_ij = numpy.exp(Z_ij - L[..., i0:i1, None])
            dV[..., j0:j1, :] += _contract_rows(P_ij, dO_i)
            dP_ij = dO_i @ V_t[..., j0:j1]
            dS_ij = _score_mod.score_grad(P_ij * (dP_ij - D[..., i0:i1, None]), S_ij, problem)
            dQ_i += dS_ij @ K[..., j0:j1, :]
            dK[..., j0:j1, :] += _contract_rows(dS_ij, Q_i)
        # A NaN in V reaches a fully masked row's dS as 0 · NaN within a shared tile; its dQ is 0 by rule.
        dQ[..., i0:i1, :] = numpy.where(masked[..., i0:i1, None], 0, dQ_i * scale)
    dq[...] = dQ.reshape(B, Hq, Sq, q.shape[-1]).transpose(0, 2, 1, 3)
    dk[...] = (dK * scale).transpose(0, 2, 1, 3)
    dv[...] = dV.transpose(0, 2, 1, 3)
