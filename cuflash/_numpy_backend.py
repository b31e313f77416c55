"""The CPU backend: the kernels' tiled algorithm written with NumPy.

Forward: for each tile of query rows Q_i, stream key/value tiles K_j, V_j, keep the running row
maximum m_i and sum l_i, rescale the accumulator O_i when m_i grows, and normalize at the end
(FlashAttention-2's online softmax). Backward, as the GPU's dK/dV pass: for each key tile K_j, V_j,
stream the query tiles that see it, recompute P_ij = exp(Z_ij − LSE_i) with D_i = rowsum(dO_i ∘ O_i),
dZ = P ∘ (dP − D), and accumulate dK_j, dV_j in a tile and dQ_i in a float32 (float64) array.

S_ij = scale · Q_i K_jᵀ are the scaled scores and Z_ij the logits the softmax sees: S_ij after the
score modifiers (``_score_mod``: softcap, ALiBi), −inf where the mask hides a key. The backward
turns dZ into dS through the modifiers' derivative. Which key tiles a query tile visits (and the
reverse), and which of them need element masking, comes from ``problem.mask`` (a ``MaskSpec``):
tiles wholly outside the band are never touched.

Batch and heads are vectorized: heads are grouped as (B, Hkv, G, S, D), G = Hq / Hkv, so a
key/value tile is read once for all the query heads that share it (GQA/MQA without copies).

Memory: inputs are read in place, in their own dtype, and converted to the accumulation dtype
tile by tile; one S tile holds at most ``_TILE_ELEMENTS`` elements (batch and heads are split into
chunks where even the smallest tiles of all of them would not fit). Beyond the outputs, the
working set is a few such tiles, plus in the backward D and the LSE (B·Hq·Sq numbers) and, for
16-bit inputs, a float32 dQ accumulator for one chunk of heads (float32 and float64 dq accumulate
in place).
"""

import numpy

from . import _score_mod

# Upper bound on the elements of one S tile (B·Hq·block_q·block_k); 4M float32 = 16 MiB.
_TILE_ELEMENTS = 1 << 22
_MIN_BLOCK = 16


def _blocks(problem, max_block_k=512):
    """Tile sizes (block_q, block_k) that keep one S tile of all heads near ``_TILE_ELEMENTS``
    elements; ``_head_chunks`` splits the heads where even the smallest block_q does not."""
    heads = max(1, problem.batch * problem.heads_q)
    block_k = max(1, min(max_block_k, problem.seqlen_k))
    block_q = _TILE_ELEMENTS // (heads * block_k)
    block_q = max(_MIN_BLOCK, min(block_q, max(1, problem.seqlen_q), 1024))
    return block_q, block_k


def _head_chunks(problem, block_q, block_k):
    """Slices (batch, kv-heads) of at most ``_TILE_ELEMENTS`` S elements per tile; the whole problem
    in one chunk whenever it fits."""
    B, H, G = problem.batch, problem.heads_kv, problem.group_size
    per_head = max(1, G * min(block_q, problem.seqlen_q) * block_k)  # one kv head's S tile
    heads = max(1, _TILE_ELEMENTS // per_head)  # kv heads per chunk
    if heads >= B * H:
        yield slice(0, B), slice(0, H)
    elif heads >= H:
        for b0 in range(0, B, heads // H):
            yield slice(b0, min(B, b0 + heads // H)), slice(0, H)
    else:
        for b in range(B):
            for h0 in range(0, H, heads):
                yield slice(b, b + 1), slice(h0, min(H, h0 + heads))


def _grouped(x, problem):
    """BSHD → (B, Hkv, G, S, D) view, no copy: tiles are converted to the accumulation dtype as read."""
    B, S, H, D = x.shape
    return x.transpose(0, 2, 1, 3).reshape(B, problem.heads_kv, H // problem.heads_kv, S, D)


def _key_tiles(mask, i0, i1, block_k):
    """The key tiles (j0, j1, needs_mask) that query rows i0..i1-1 visit: those covering the keys
    some row may see, each flagged when some row of it does not see every key."""
    lo, hi = mask.key_range(i0, i1)
    for j0 in range(lo, hi, block_k):
        j1 = min(hi, j0 + block_k)
        yield j0, j1, not mask.tile_is_full(i0, i1, j0, j1)


def _query_tiles(mask, j0, j1, block_q):
    """The query tiles (i0, i1, needs_mask) that see some key of j0..j1-1 (the transposed question)."""
    lo, hi = mask.query_range(j0, j1)
    for i0 in range(lo, hi, block_q):
        i1 = min(hi, i0 + block_q)
        yield i0, i1, not mask.tile_is_full(i0, i1, j0, j1)


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
    if out.size == 0 and lse.size == 0:
        return
    B, Sq, Hq, Dv = problem.out_shape
    # Views, never copies (copy=False raises otherwise): the tiles below write through them.
    out_view = out.transpose(0, 2, 1, 3).reshape(B, problem.heads_kv, problem.group_size, Sq, Dv, copy=False)
    lse_view = lse.reshape(B, problem.heads_kv, problem.group_size, Sq, copy=False)
    Q, K, V = _grouped(q, problem), _grouped(k, problem), _grouped(v, problem)
    slopes = _score_mod.head_slopes(problem, slopes, problem.accum_dtype, Q.shape[:3])
    block_q, block_k = _blocks(problem)
    for b, h in _head_chunks(problem, block_q, block_k):
        _forward_chunk(Q[b, h], K[b, h], V[b, h], None if slopes is None else slopes[b, h], out_view[b, h],
                       lse_view[b, h], problem, block_q, block_k)


def _forward_chunk(Q, K, V, slopes, out, lse, problem, block_q, block_k):
    acc = problem.accum_dtype
    scale = acc.type(problem.scale)
    mask = problem.mask
    Sq = Q.shape[-2]
    for i0 in range(0, Sq, block_q):
        i1 = min(Sq, i0 + block_q)
        Q_i = Q[..., i0:i1, :].astype(acc) * scale
        m_i = numpy.full(Q_i.shape[:-1], -numpy.inf, dtype=acc)
        l_i = numpy.zeros(Q_i.shape[:-1], dtype=acc)
        O_i = numpy.zeros(Q_i.shape[:-1] + (V.shape[-1],), dtype=acc)
        for j0, j1, needs_mask in _key_tiles(mask, i0, i1, block_k):
            K_j, V_j = K[..., j0:j1, :].astype(acc), V[..., j0:j1, :].astype(acc)
            Z_ij = _logits(Q_i @ K_j.swapaxes(-1, -2), problem, mask, slopes, i0, i1, j0, j1, needs_mask)
            m_new = numpy.maximum(m_i, Z_ij.max(axis=-1))
            # Rows that have seen no finite logit keep m = −inf; subtracting 0 instead avoids
            # exp(−inf − (−inf)) = NaN and leaves their P and l at exactly 0.
            m_safe = numpy.where(numpy.isneginf(m_new), 0, m_new)
            P_ij = numpy.exp(Z_ij - m_safe[..., None])
            alpha = numpy.exp(m_i - m_safe)
            l_i = alpha * l_i + P_ij.sum(axis=-1)
            O_i = alpha[..., None] * O_i + P_ij @ V_j
            m_i = m_new
        # Rows that see no key give out = 0 and lse = −inf by rule; any other row gets what the
        # arithmetic gives (l = 0 only when every logit it sees is −inf: out = 0/0 = NaN).
        live = mask.sees_any(numpy.arange(i0, i1))
        with numpy.errstate(divide="ignore", invalid="ignore"):
            out[..., i0:i1, :] = numpy.where(live[:, None], O_i / l_i[..., None], 0)
            lse[..., i0:i1] = numpy.where(live, m_i + numpy.log(l_i), -numpy.inf)


def backward(dout, q, k, v, out, lse, slopes, dq, dk, dv, problem):
    """Write dq, dk, dv (shaped like q, k, v, input dtype), recomputing P from q, k and lse.

    ``slopes``: the ALiBi slopes operand ((Hq,) or (B, Hq)), or None without ALiBi."""
    if dq.size == 0 and dk.size == 0:
        return
    Q, K, V = _grouped(q, problem), _grouped(k, problem), _grouped(v, problem)
    dO, O = _grouped(dout, problem), _grouped(out, problem)
    dQ, dK, dV = _grouped(dq, problem), _grouped(dk, problem), _grouped(dv, problem)
    B, Sq = problem.batch, problem.seqlen_q
    L = lse.reshape(B, problem.heads_kv, problem.group_size, Sq)
    slopes = _score_mod.head_slopes(problem, slopes, problem.accum_dtype, Q.shape[:3])
    block_q, block_k = _blocks(problem)
    for b, h in _head_chunks(problem, block_q, block_k):
        _backward_chunk(dO[b, h], Q[b, h], K[b, h], V[b, h], O[b, h], L[b, h], None if slopes is None else slopes[b, h],
                        dQ[b, h], dK[b, h, 0], dV[b, h, 0], problem, block_q, block_k)


def _backward_chunk(dO, Q, K, V, O, L, slopes, dq, dk, dv, problem, block_q, block_k):
    """One chunk of heads: dO, Q, O, dq (b, h, G, Sq, ·); K, V (b, h, G = 1, Sk, ·); dk, dv (b, h, Sk, ·)."""
    acc = problem.accum_dtype
    scale = acc.type(problem.scale)
    mask = problem.mask
    Sq, Sk = Q.shape[-2], K.shape[-2]
    # Rows that see no key pass on no gradient whatever dO, O or the keys hold: their dO and D are
    # zeroed and their dS selected to 0 (P = 0 times a NaN would not be 0), their dQ written as 0.
    # exp(Z − (+inf)) = 0 makes their P vanish without NaN.
    live = mask.sees_any(numpy.arange(Sq))
    L = numpy.where(live, L.astype(acc), numpy.inf)
    D = numpy.empty(L.shape, dtype=acc)
    for i0 in range(0, Sq, block_q):
        i1 = min(Sq, i0 + block_q)
        D_i = (dO[..., i0:i1, :].astype(acc) * O[..., i0:i1, :].astype(acc)).sum(axis=-1)
        D[..., i0:i1] = numpy.where(live[i0:i1], D_i, 0)
    # dQ accumulates over key tiles: in place when dq has the accumulation dtype, else in a copy.
    dQ = dq if dq.dtype == acc else numpy.empty(dq.shape, dtype=acc)
    dQ[...] = 0
    for j0 in range(0, Sk, block_k):
        j1 = min(Sk, j0 + block_k)
        K_j, V_j = K[..., j0:j1, :].astype(acc), V[..., j0:j1, :].astype(acc)
        dK_j = numpy.zeros(K_j.shape[:2] + K_j.shape[-2:], dtype=acc)
        dV_j = numpy.zeros(V_j.shape[:2] + V_j.shape[-2:], dtype=acc)
        for i0, i1, needs_mask in _query_tiles(mask, j0, j1, block_q):
            Q_i = Q[..., i0:i1, :].astype(acc)
            dO_i = dO[..., i0:i1, :].astype(acc)
            dead = ~live[i0:i1]
            if dead.any():
                dO_i = numpy.where(dead[:, None], 0, dO_i)
            S_ij = (Q_i * scale) @ K_j.swapaxes(-1, -2)
            Z_ij = _logits(S_ij, problem, mask, slopes, i0, i1, j0, j1, needs_mask)
            P_ij = numpy.exp(Z_ij - L[..., i0:i1, None])
            dV_j += _contract_rows(P_ij, dO_i)
            dP_ij = dO_i @ V_j.swapaxes(-1, -2)
            dS_ij = _score_mod.score_grad(P_ij * (dP_ij - D[..., i0:i1, None]), S_ij, problem)
            if dead.any():
                dS_ij = numpy.where(dead[:, None], 0, dS_ij)
            dQ[..., i0:i1, :] += dS_ij @ K_j
            dK_j += _contract_rows(dS_ij, Q_i)
        dk[..., j0:j1, :] = dK_j * scale
        dv[..., j0:j1, :] = dV_j
    dq[...] = numpy.where(live[:, None], dQ * scale, 0)
