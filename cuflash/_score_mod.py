"""Score modifiers: the one Python place that turns scaled scores into logits and back.

The reference and the NumPy backend call these functions; the CUDA kernels call their
counterpart ``cuda_src/attn/score_mod.cuh``, which applies the same formulas (in the log2 domain).
With S = scale · Q Kᵀ the logit of query i and key j is

    softcap c > 0:  S ← c · tanh(S / c)                     ∂/∂S = 1 − tanh²(S / c)
    ALiBi:          S ← S − slope[b, h] · |i + offset − j|    ∂/∂S = 1 (the slopes get no gradient)

applied in that order (FlashAttention's), ``offset`` being the mask's alignment offset. The softmax,
its LSE and the mask act on the logits; the backward's dS of the logits becomes the dS of S through
``score_grad``. A new modifier adds a line to each function here and to ``score_mod.cuh``.

Score tiles have the shape (*heads, rows, cols), where ``heads`` is (B, Hq) (the reference) or
(B, Hkv, G) (the NumPy backend's grouped heads, Hq = Hkv · G); ``head_slopes`` shapes the slopes
to broadcast over either.
"""

import numpy


def head_slopes(problem, slopes, dtype, heads):
    """ALiBi slopes of each (batch, query head) shaped (*heads, 1, 1) in ``dtype``, for score tiles
    whose leading dimensions are ``heads``; None when ALiBi is off.

    ``slopes`` is the operand as given: (Hq,) for every batch element alike, or (B, Hq).
    """
    if problem.alibi == "none":
        return None
    per_batch_head = numpy.broadcast_to(numpy.asarray(slopes, dtype=dtype), (problem.batch, problem.heads_q))
    return per_batch_head.reshape(*heads, 1, 1)


def logits(S, problem, slopes, i, j):
    """The logits of scaled scores ``S`` (*heads, rows, cols) of queries ``i`` (rows,) and keys
    ``j`` (cols,), absolute indices; ``slopes`` from ``head_slopes``. Returns S itself when no
    modifier is on, a new array otherwise."""
    if problem.softcap > 0:
        cap = S.dtype.type(problem.softcap)
        S = cap * numpy.tanh(S / cap)
    if slopes is not None:
        distance = numpy.abs(i[:, None] + problem.mask_offset - j[None, :]).astype(S.dtype)
        S = S - slopes * distance
    return S


def score_grad(dlogits, S, problem):
    """dS of the scaled scores ``S`` given dS of their logits (same shapes): the chain rule
    through ``logits``. Only the softcap changes it; ALiBi's bias does not depend on S."""
    if problem.softcap > 0:
        cap = S.dtype.type(problem.softcap)
        t = numpy.tanh(S / cap)
        dlogits = dlogits * (1 - t * t)
    return dlogits
