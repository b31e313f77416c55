"""Partial attention results merged with the log-sum-exp rule.

Attention of a query row over keys split into disjoint parts A and B follows from the parts'
results alone. With lse_X = log Σ_{j∈X} exp(z_j) and out_X = Σ_{j∈X} exp(z_j − lse_X) v_j:

    lse = log(exp(lse_A) + exp(lse_B)),    out = exp(lse_A − lse) out_A + exp(lse_B − lse) out_B.

Keys split across devices (ring attention) and across CTAs (split-KV decoding) reduce with it.
The weights are formed against m = max(lse_A, lse_B), so one of them is exactly 1 and nothing
overflows. A part that saw no key (lse = −inf) contributes exactly nothing, whatever its out holds
(an empty split may leave it unwritten); when no part saw a key the row keeps out = 0,
lse = −inf, never NaN. NaN is never hidden: a NaN lse or a NaN in the out of a part that saw keys
makes the merged row NaN.

Shapes: ``lse`` has the shape of ``out`` without its last axis (pass ``lse.transpose(0, 2, 1)``
for cuflash's (B, H, S) lse beside a (B, S, H, Dv) out). Arithmetic is float32, or float64 when
any operand is float64. The functions take NumPy or CuPy arrays (all of one kind) and return
that kind; on the GPU every step is an element-wise kernel on CuPy's current stream, no
synchronization.
"""

import numpy


def array_module(x):
    """``numpy`` for NumPy arrays, ``cupy`` for CuPy arrays."""
    if isinstance(x, numpy.ndarray):
        return numpy
    import cupy

    return cupy


def accum_dtype(*arrays):
    """float64 when any array is float64, else float32 (the dtype partial results merge in)."""
    wide = any(numpy.dtype(x.dtype) == numpy.float64 for x in arrays)
    return numpy.dtype(numpy.float64 if wide else numpy.float32)


def _check(what, outs, lses, out=None, lse=None):
    """One ValueError naming every operand whose shape disagrees; (row shape, Dv)."""
    problems = []
    rows, dv = None, None
    for (name_o, o), (name_l, l) in zip(outs, lses):
        if o.ndim < 1 or tuple(l.shape) != tuple(o.shape[:-1]):
            problems.append(f"{name_l} must have the shape of {name_o} without its last axis, "
                            f"got {name_o}: {tuple(o.shape)}, {name_l}: {tuple(l.shape)}")
        elif rows is None:
            rows, dv = tuple(l.shape), o.shape[-1]
        elif (tuple(l.shape), o.shape[-1]) != (rows, dv):
            problems.append(f"{name_o} has shape {tuple(o.shape)}; expected {rows + (dv,)} like {outs[0][0]}")
    for name, given, shape in (("out", out, None if rows is None else rows + (dv,)), ("lse", lse, rows)):
        if given is not None and shape is not None and tuple(given.shape) != shape:
            problems.append(f"{name} must have shape {shape}, got {tuple(given.shape)}")
    for name, x in outs + lses + [("out", out), ("lse", lse)]:
        if x is not None and numpy.dtype(x.dtype).kind != "f" and numpy.dtype(x.dtype).name != "bfloat16":
            problems.append(f"{name} has dtype {numpy.dtype(x.dtype)}; expected a float dtype")
    if problems:
        raise ValueError(f"invalid arguments to {what}:\n  - " + "\n  - ".join(problems))


def merge(out_a, lse_a, out_b, lse_b, *, out=None, lse=None):
    """Merge two partial results over disjoint key sets into the result over their union.

    Parameters
    ----------
    out_a, out_b : arrays (..., Dv)
        The parts' outputs, any float dtype.
    lse_a, lse_b : arrays (...)
        Their log-sum-exps (natural logarithm), −inf on rows that saw no key.
    out, lse : arrays, optional
        Where to write the result (any strides, a float dtype). ``out`` may be
        ``out_a`` and ``lse`` may be ``lse_a``, to accumulate in place; neither may overlap the
        B operands.

    Returns
    -------
    out, lse : the merged output (float32, float64 for float64 operands, unless ``out`` is given)
        and log-sum-exp.
    """
    _check("cuflash._combine.merge", [("out_a", out_a), ("out_b", out_b)], [("lse_a", lse_a), ("lse_b", lse_b)],
           out, lse)
    xp = array_module(out_a)
    acc = accum_dtype(out_a, lse_a, out_b, lse_b)
    lse_a, lse_b = lse_a.astype(acc, copy=False), lse_b.astype(acc, copy=False)
    # 0 · inf in an empty part's terms and log(0) on rows no part saw are expected; NumPy must not warn.
    with numpy.errstate(divide="ignore", invalid="ignore"):
        m = xp.maximum(lse_a, lse_b)  # propagates NaN
        # Rows where both parts are empty: subtract 0, so the weights are exp(−inf) = 0, not exp(NaN).
        m = xp.where(xp.isneginf(m), 0, m)
        w_a, w_b = xp.exp(lse_a - m), xp.exp(lse_b - m)
        total = w_a + w_b  # in [1, 2] unless both parts are empty (0) or a NaN came in
        merged_lse = m + xp.log(total)  # log(0) = −inf for rows no part saw
        total = xp.where(total == 0, 1, total)
        w_a, w_b = w_a / total, w_b / total
        empty_a, empty_b = xp.isneginf(lse_a)[..., None], xp.isneginf(lse_b)[..., None]
        if out is None:
            out = xp.empty(out_a.shape, dtype=acc)
        # The B term first into a temporary: ``out`` may be ``out_a`` and is written next.
        term_b = out_b.astype(acc)
        term_b *= w_b[..., None]
        xp.copyto(term_b, 0, where=empty_b)  # 0, not 0 · (whatever an empty part's out holds)
        xp.multiply(out_a.astype(acc, copy=False), w_a[..., None], out=out)
        xp.copyto(out, 0, where=empty_a)
        out += term_b
    if lse is None:
        lse = merged_lse
    else:
        xp.copyto(lse, merged_lse)
    return out, lse


def combine(outs, lses):
    """Merge n partial results over disjoint key sets, stacked along the first axis.

    Parameters
    ----------
    outs : array (n, ..., Dv) or a sequence of n arrays (..., Dv)
    lses : array (n, ...) or a sequence of n arrays (...), −inf on rows a part did not see

    Returns
    -------
    out, lse : arrays (..., Dv) and (...), float32 (float64 for float64 operands). The result does
        not depend on the order of the parts beyond rounding.
    """
    xp = array_module(outs if hasattr(outs, "shape") else outs[0])
    outs = outs if hasattr(outs, "shape") else xp.stack(outs)
    lses = lses if hasattr(lses, "shape") else xp.stack(lses)
    _check("cuflash._combine.combine", [("outs", outs)], [("lses", lses)])
    acc = accum_dtype(outs, lses)
    lses = lses.astype(acc, copy=False)
    with numpy.errstate(divide="ignore", invalid="ignore"):
        m = lses.max(axis=0) if lses.shape[0] else xp.full(lses.shape[1:], -numpy.inf, dtype=acc)
        m = xp.where(xp.isneginf(m), 0, m)
        w = xp.exp(lses - m)
        total = w.sum(axis=0)
        lse = m + xp.log(total)
        w = w / xp.where(total == 0, 1, total)
        terms = outs.astype(acc)
        terms *= w[..., None]
        xp.copyto(terms, 0, where=xp.isneginf(lses)[..., None])
        return terms.sum(axis=0), lse
