"""Ragged batches: packed sequences ("varlen"), padded lengths, and key/value caches.

Each of them is a set of independent dense attention problems, one per sequence, over views of
the operands. Sequence b of

- a packed batch is rows ``cu_seqlens_q[b]:cu_seqlens_q[b+1]`` of q (and of out, and of lse's
  second axis) and rows ``cu_seqlens_k[b]:cu_seqlens_k[b+1]`` of k and v;
- a padded batch is the first ``seqlens_q[b]`` rows of batch element b of q and the first
  ``seqlens_k[b]`` of k and v (the rest is padding: out = 0, lse = −inf, gradients 0, never read);
- a cache is all of q's rows of batch element b against the first ``cache_seqlens[b] + S_new``
  keys of its cache (after the new keys are written there).

Within a sequence everything is the dense contract with that sequence's own lengths Sq_b, Sk_b:
causal and window alignment (offset Sk_b − Sq_b bottom-right), ALiBi distances, fully masked
rows. ``Segment`` describes where one sequence lives; the checks here turn the user's offsets or
lengths into segments, refusing bad ones before any work; ``run_forward``/``run_backward`` run a
dense backend on each segment's views.
"""

import dataclasses
import math
from dataclasses import dataclass
from typing import Optional

import numpy

from ._problem import _check_forward, _Problems, is_float_dtype

_INT32 = numpy.dtype(numpy.int32)


@dataclass(frozen=True)
class Segment:
    """One sequence: rows [q_start, q_start + seqlen_q) of batch element ``batch`` of q (out, dq)
    and rows [k_start, k_start + seqlen_k) of the same batch element of k and v (dk, dv)."""

    batch: int
    q_start: int
    seqlen_q: int
    k_start: int
    seqlen_k: int


def _host(x):
    """The values of a small integer operand on the host (a GPU array is copied: B + 1 numbers)."""
    return x if isinstance(x, numpy.ndarray) else x.get()


def _check_int_vector(problems, name, x, length, what, read=True):
    """``x`` must be a 1-D int32 array of ``length`` elements; returns its values (or, with
    read=False, an empty array once its dtype and shape are right) or None."""
    if numpy.dtype(x.dtype) != _INT32:
        problems.type(f"{name} must be int32 ({what}), got {numpy.dtype(x.dtype)}")
        return None
    if x.ndim != 1 or (length is not None and x.shape[0] != length):
        expected = f"({length},)" if length is not None else "one-dimensional"
        problems.value(f"{name} must have shape {expected} ({what}), got {tuple(x.shape)}")
        return None
    return _host(x).astype(numpy.int64) if read else numpy.zeros(0, numpy.int64)


def _check_offsets(problems, name, x, total, rows):
    """Offsets of a packed batch: non-decreasing int32 from 0 to ``total`` (the operand's rows)."""
    values = _check_int_vector(problems, name, x, None, "sequence offsets, B + 1 of them")
    if values is None:
        return None
    if values.size == 0:
        problems.value(f"{name} must hold B + 1 >= 1 offsets, got none")
        return None
    if values[0] != 0:
        problems.value(f"{name} must start at 0, got {values[0]}")
    if (numpy.diff(values) < 0).any():
        b = int(numpy.flatnonzero(numpy.diff(values) < 0)[0])
        problems.value(f"{name} must be non-decreasing; {name}[{b + 1}] = {values[b + 1]} < {name}[{b}] = {values[b]}")
    if values[-1] != total:
        problems.value(f"{name} must end at the number of {rows} ({total}), got {values[-1]}")
    return values


def _check_lengths(problems, name, x, batch, limit, axis):
    """Valid lengths of a padded batch: int32 (B,) within 0..limit."""
    values = _check_int_vector(problems, name, x, batch, "valid lengths, one per batch element")
    if values is None:
        return None
    bad = numpy.flatnonzero((values < 0) | (values > limit))
    if bad.size:
        b = int(bad[0])
        problems.value(f"{name}[{b}] = {values[b]} is outside 0..{limit} (the {axis} length of the padded batch)")
        return None
    return values


def _check_hint(problems, name, hint, actual):
    """``max_seqlen_q/k``: an optional upper bound on the sequence lengths (a launch-size hint)."""
    if hint is None:
        return
    if not isinstance(hint, (int, numpy.integer)) or isinstance(hint, (bool, numpy.bool_)):
        problems.type(f"{name} must be an int or None, got {type(hint).__name__}")
    elif hint < 0:
        problems.value(f"{name} must be >= 0, got {hint}")
    elif actual is not None and hint < actual:
        problems.value(f"{name} = {hint} is less than the longest sequence ({actual})")


class _Spec:
    """Shape and dtype of an operand seen through a different frame (a packed batch as one batch element)."""

    def __init__(self, shape, dtype):
        self.shape, self.dtype, self.ndim = tuple(shape), dtype, len(shape)


def _in_batch_frame(x):
    return _Spec((1,) + tuple(x.shape), x.dtype)


def check_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, *, max_seqlen_q, max_seqlen_k, alibi_slopes, what,
                 dout=None, out=None, lse=None, **options):
    """Check a packed call (forward, or backward when dout/out/lse are given): returns the base
    ``Problem`` (batch 1, all rows as one sequence, for dtype, heads and options) and the segments."""
    problems = _Problems()
    named = {"q": q, "k": k, "v": v}
    for name, x in named.items():
        if x.ndim != 3:
            problems.value(f"{name} must have 3 dimensions (total_{'q' if name == 'q' else 'k'}, heads, head_dim) "
                           f"for packed sequences, got shape {tuple(x.shape)}")
    if problems.any():
        problems.raise_if_any(what)
    slopes = None if alibi_slopes is None else _Spec(alibi_slopes.shape[-1:], alibi_slopes.dtype)
    base, _ = _check_forward(problems, _in_batch_frame(q), _in_batch_frame(k), _in_batch_frame(v),
                             alibi_slopes=slopes, **options)
    cu_q = _check_offsets(problems, "cu_seqlens_q", cu_seqlens_q, q.shape[0], "query rows in q")
    cu_k = _check_offsets(problems, "cu_seqlens_k", cu_seqlens_k, k.shape[0], "key rows in k and v")
    if cu_q is not None and cu_k is not None and cu_q.size != cu_k.size:
        problems.value(f"cu_seqlens_q and cu_seqlens_k must describe the same number of sequences, "
                       f"got {cu_q.size - 1} and {cu_k.size - 1}")
    batch = None if cu_q is None else cu_q.size - 1
    if alibi_slopes is not None and batch is not None and alibi_slopes.ndim == 2 and alibi_slopes.shape[0] != batch:
        problems.value(f"alibi_slopes of shape (B, Hq) must have B = {batch} rows (one per sequence), "
                       f"got {tuple(alibi_slopes.shape)}")
    _check_hint(problems, "max_seqlen_q", max_seqlen_q, None if cu_q is None else int(numpy.diff(cu_q).max(initial=0)))
    _check_hint(problems, "max_seqlen_k", max_seqlen_k, None if cu_k is None else int(numpy.diff(cu_k).max(initial=0)))
    if dout is not None:
        _check_backward_operands(problems, q, dout, out, lse, (q.shape[0], q.shape[1], v.shape[2]),
                                 (q.shape[1], q.shape[0]), "(total_q, Hq, Dv)", "(Hq, total_q)")
    problems.raise_if_any(what)
    segments = tuple(Segment(0, int(cu_q[b]), int(cu_q[b + 1] - cu_q[b]), int(cu_k[b]), int(cu_k[b + 1] - cu_k[b]))
                     for b in range(batch))
    return base, segments


def check_padded(q, k, v, seqlens_q, seqlens_k, *, alibi_slopes, what, dout=None, out=None, lse=None, **options):
    """Check a padded call (BSHD with per-batch valid lengths): the dense ``Problem`` and the segments."""
    problems = _Problems()
    base, expected = _check_forward(problems, q, k, v, alibi_slopes=alibi_slopes, **options)
    lengths = {}
    if q.ndim == 4 and k.ndim == 4:
        B, Sq, Sk = q.shape[0], q.shape[1], k.shape[1]
        for name, x, limit, axis in (("seqlens_q", seqlens_q, Sq, "query"), ("seqlens_k", seqlens_k, Sk, "key")):
            if x is not None:
                lengths[name] = _check_lengths(problems, name, x, B, limit, axis)
    if dout is not None and expected.out_shape is not None:
        _check_backward_operands(problems, q, dout, out, lse, expected.out_shape, expected.lse_shape,
                                 "(B, Sq, Hq, Dv)", "(B, Hq, Sq)")
    problems.raise_if_any(what)
    lq = lengths.get("seqlens_q")
    lk = lengths.get("seqlens_k")
    segments = tuple(Segment(b, 0, base.seqlen_q if lq is None else int(lq[b]), 0,
                             base.seqlen_k if lk is None else int(lk[b])) for b in range(base.batch))
    return base, segments


def _check_backward_operands(problems, q, dout, out, lse, out_shape, lse_shape, out_form, lse_form):
    """dout, out and lse of a ragged backward against the forward's operands."""
    dtype = numpy.dtype(q.dtype)
    accum = numpy.dtype(numpy.float64 if dtype == numpy.float64 else numpy.float32)
    for name, x in (("dout", dout), ("out", out)):
        if is_float_dtype(dtype) and numpy.dtype(x.dtype) != dtype:
            problems.type(f"{name} has dtype {numpy.dtype(x.dtype)}; expected {dtype} like q, k, v")
        if tuple(x.shape) != tuple(out_shape):
            problems.value(f"{name} must have shape {out_form} = {tuple(out_shape)}, got {tuple(x.shape)}")
    if is_float_dtype(dtype) and numpy.dtype(lse.dtype) != accum:
        problems.type(f"lse has dtype {numpy.dtype(lse.dtype)}; expected {accum} (as returned by the forward)")
    if tuple(lse.shape) != tuple(lse_shape):
        problems.value(f"lse must have shape {lse_form} = {tuple(lse_shape)}, got {tuple(lse.shape)}")


@dataclass(frozen=True)
class CachePlan:
    """Where a cache call reads and writes: per batch element its key count after the append and,
    for a paged cache, the pages holding them."""

    seqlens_k: Optional[tuple]  # cache_seqlens[b] + S_new; None where the lengths stay unread on the device
    cache_seqlens: Optional[tuple]
    page_size: int  # 0 for a dense cache
    table: Optional[numpy.ndarray]  # the block table on the host (int64), paged and read only

    def pages(self, b, n):
        """The pages holding the first n keys of sequence b (a paged cache)."""
        return self.table[b, :-(-n // self.page_size)]


def check_kvcache(q, k_cache, v_cache, cache_seqlens, k_new, v_new, block_table, *, alibi_slopes, what,
                  writable, max_seqlen_k=None, read_lengths=True, **options):
    """Check a cache call: the dense ``Problem`` of q against one sequence of the cache, and the
    plan. With read_lengths=False, cache_seqlens and block_table are checked by dtype and shape
    only, never copied from the device (the plan then has no lengths and no table)."""
    problems = _Problems()
    paged = block_table is not None
    for name, x in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache)):
        if x.ndim != 4:
            form = "(num_pages, page_size, Hkv, D)" if paged and name != "q" else "(B, S, H, D)"
            problems.value(f"{name} must have 4 dimensions {form}, got shape {tuple(x.shape)}")
    if (k_new is None) != (v_new is None):
        problems.value("k_new and v_new go together: pass both or neither")
    if problems.any():
        problems.raise_if_any(what)
    B = q.shape[0]
    num_slots, slot_len = k_cache.shape[0], k_cache.shape[1]
    # The dense checks (dtypes, heads, head dims, options) on q against one sequence of the cache.
    frame = _Spec((B,) + tuple(k_cache.shape[1:]), k_cache.dtype)
    frame_v = _Spec((B,) + tuple(v_cache.shape[1:]), v_cache.dtype)
    base, _ = _check_forward(problems, q, frame, frame_v, alibi_slopes=alibi_slopes, **options)
    if options.get("causal_alignment", "bottom_right") != "bottom_right":
        problems.value("a cache call aligns causal masks and windows bottom-right (the new queries are the last rows)")
    if tuple(v_cache.shape[:2]) != tuple(k_cache.shape[:2]):
        problems.value(f"k_cache and v_cache must hold the same slots, got {tuple(k_cache.shape[:2])} and "
                       f"{tuple(v_cache.shape[:2])}")
    if not paged and num_slots != B:
        problems.value(f"k_cache must have B = {B} rows like q (a dense cache), got {num_slots}")
    S_new = 0
    if k_new is not None:
        S_new = k_new.shape[1] if k_new.ndim == 4 else 0
        for name, x, cache in (("k_new", k_new, k_cache), ("v_new", v_new, v_cache)):
            want = (B, x.shape[1] if x.ndim == 4 else 0, cache.shape[2], cache.shape[3])
            if x.ndim != 4 or tuple(x.shape) != want or (name == "v_new" and x.shape[1] != S_new):
                problems.value(f"{name} must have shape (B, S_new, Hkv, ·) = {want[:1] + (S_new,) + want[2:]}, "
                               f"got {tuple(x.shape)}")
            if numpy.dtype(x.dtype) != numpy.dtype(cache.dtype):
                problems.type(f"{name} has dtype {numpy.dtype(x.dtype)}; expected {numpy.dtype(cache.dtype)} like the cache")
        for name, x in (("k_cache", k_cache), ("v_cache", v_cache)):
            if not writable(x):
                problems.value(f"{name} is read-only, but k_new/v_new are written into it")
    if not read_lengths:
        _check_int_vector(problems, "cache_seqlens", cache_seqlens, B, "valid lengths, one per batch element",
                          read=False)
        capacity = slot_len
        if paged:
            _check_int_vector_2d(problems, block_table, B, read=False)
            capacity = block_table.shape[-1] * slot_len
        if S_new > capacity:
            problems.value(f"S_new = {S_new} new keys cannot fit a cache of {capacity} keys per sequence")
        _check_hint(problems, "max_seqlen_k", max_seqlen_k, None)
        problems.raise_if_any(what)
        return base, CachePlan(None, None, slot_len if paged else 0, None)
    lengths = _check_lengths(problems, "cache_seqlens", cache_seqlens, B, math.inf, "cache")
    if lengths is None:
        problems.raise_if_any(what)
    _check_hint(problems, "max_seqlen_k", max_seqlen_k, int((lengths + S_new).max(initial=0)))
    page_size, table = 0, None
    if paged:
        page_size = slot_len
        table = _check_int_vector_2d(problems, block_table, B)
        if table is not None:
            _check_pages(problems, table, lengths, S_new, page_size, num_slots)
    else:
        over = numpy.flatnonzero(lengths + S_new > slot_len)
        if over.size:
            b = int(over[0])
            problems.value(f"cache_seqlens[{b}] + S_new = {lengths[b] + S_new} exceeds the cache length {slot_len}")
    problems.raise_if_any(what)
    plan = CachePlan(tuple(int(n) + S_new for n in lengths), tuple(int(n) for n in lengths), page_size, table)
    return base, plan


def _check_pages(problems, table, lengths, S_new, page_size, num_pages):
    """The pages each sequence uses exist, fit its block_table row, and no two sequences append into
    one slot (sharing pages to read is fine). Vectorized: a paged cache of a large batch holds
    hundreds of thousands of pages."""
    needed = lengths + S_new
    pages_needed = -(-needed // page_size)
    over = numpy.flatnonzero(pages_needed > table.shape[1])
    if over.size:
        b = int(over[0])
        problems.value(f"sequence {b} needs {needed[b]} keys (cache_seqlens[{b}] + S_new) but its block_table row "
                       f"holds {table.shape[1]} pages of {page_size}")
        return
    in_use = numpy.arange(table.shape[1])[None, :] < pages_needed[:, None]
    bad = numpy.flatnonzero((in_use & ((table < 0) | (table >= num_pages))).any(axis=1))
    if bad.size:
        b = int(bad[0])
        problems.value(f"block_table[{b}] has page indices outside 0..{num_pages - 1} among the "
                       f"{pages_needed[b]} pages in use")
        return
    if S_new == 0:
        return
    positions = lengths[:, None] + numpy.arange(S_new)[None, :]  # (B, S_new) positions appended to
    pages = numpy.take_along_axis(table, positions // page_size, axis=1)
    slots = (pages * page_size + positions % page_size).ravel()
    unique, counts = numpy.unique(slots, return_counts=True)
    if (counts > 1).any():
        slot = unique[counts > 1][0]
        writers = sorted({int(i) // S_new for i in numpy.flatnonzero(slots == slot)})
        problems.value(f"sequences {writers[0]} and {writers[1]} both append into page {slot // page_size} "
                       f"slot {slot % page_size}")


def _check_int_vector_2d(problems, block_table, batch, read=True):
    if numpy.dtype(block_table.dtype) != _INT32:
        problems.type(f"block_table must be int32 (page indices), got {numpy.dtype(block_table.dtype)}")
        return None
    if block_table.ndim != 2 or block_table.shape[0] != batch:
        problems.value(f"block_table must have shape (B, max_pages_per_seq) with B = {batch}, got {tuple(block_table.shape)}")
        return None
    return _host(block_table).astype(numpy.int64) if read else None


def sequence_problem(base, segment, alibi, alignment):
    """The dense ``Problem`` of one sequence: its own lengths and alignment offset."""
    offset = segment.seqlen_k - segment.seqlen_q if alignment == "bottom_right" else 0
    return dataclasses.replace(base, batch=1, seqlen_q=segment.seqlen_q, seqlen_k=segment.seqlen_k,
                               mask_offset=offset, alibi=alibi)


def _views(segment, *frames):
    """Each (batch, seq, ...) frame's rows of the segment, as (1, rows, ...) views: q-side frames
    take the query rows, the rest the key rows; ``None`` stays None."""
    b = slice(segment.batch, segment.batch + 1)
    rows_q = slice(segment.q_start, segment.q_start + segment.seqlen_q)
    rows_k = slice(segment.k_start, segment.k_start + segment.seqlen_k)
    return [None if x is None else x[b, rows_q if side == "q" else rows_k] for side, x in frames]


def run_forward(forward, q, k, v, slopes, out, lse, base, segments, alignment):
    """``forward`` (a dense backend's, on views) for every segment. Operands in the (batch, seq)
    frame: q, out (B, Sq, Hq, ·), k, v (B, Sk, Hkv, ·), lse (B, Hq, Sq). Rows no segment covers
    (padding) get out = 0 and lse = −inf."""
    covered = numpy.zeros(out.shape[:2], dtype=bool)
    for index, segment in enumerate(segments):
        seg_slopes, alibi = segment_slopes(slopes, index)
        q_b, out_b, k_b, v_b = _views(segment, ("q", q), ("q", out), ("k", k), ("k", v))
        lse_b = lse[segment.batch:segment.batch + 1, :, segment.q_start:segment.q_start + segment.seqlen_q]
        forward(q_b, k_b, v_b, seg_slopes, out_b, lse_b, sequence_problem(base, segment, alibi, alignment))
        covered[segment.batch, segment.q_start:segment.q_start + segment.seqlen_q] = True
    out[~covered] = 0
    lse.transpose(0, 2, 1)[~covered] = -numpy.inf


def run_backward(backward, dout, q, k, v, out, lse, slopes, dq, dk, dv, base, segments, alignment):
    """``backward`` for every segment, in the frame of ``run_forward``; rows no segment covers get
    zero gradients (padded queries and keys)."""
    covered_q = numpy.zeros(dq.shape[:2], dtype=bool)
    covered_k = numpy.zeros(dk.shape[:2], dtype=bool)
    for index, segment in enumerate(segments):
        seg_slopes, alibi = segment_slopes(slopes, index)
        dout_b, q_b, out_b, dq_b, k_b, v_b, dk_b, dv_b = _views(
            segment, ("q", dout), ("q", q), ("q", out), ("q", dq), ("k", k), ("k", v), ("k", dk), ("k", dv))
        lse_b = lse[segment.batch:segment.batch + 1, :, segment.q_start:segment.q_start + segment.seqlen_q]
        backward(dout_b, q_b, k_b, v_b, out_b, lse_b, seg_slopes, dq_b, dk_b, dv_b,
                 sequence_problem(base, segment, alibi, alignment))
        covered_q[segment.batch, segment.q_start:segment.q_start + segment.seqlen_q] = True
        covered_k[segment.batch, segment.k_start:segment.k_start + segment.seqlen_k] = True
    dq[~covered_q] = 0
    dk[~covered_k] = 0
    dv[~covered_k] = 0


def segment_slopes(slopes, index):
    """The ALiBi slopes of sequence ``index`` as a (Hq,) operand (or None), and the alibi kind."""
    if slopes is None:
        return None, "none"
    return (slopes if slopes.ndim == 1 else slopes[index]), "head"


def append_to_cache(k_cache, v_cache, k_new, v_new, plan):
    """Write k_new, v_new into the caches at positions cache_seqlens[b]:cache_seqlens[b] + S_new
    (any array module: a GPU cache is written on the GPU, on the current stream)."""
    S_new = k_new.shape[1]
    for b, start in enumerate(plan.cache_seqlens):
        if plan.page_size == 0:
            k_cache[b, start:start + S_new] = k_new[b]
            v_cache[b, start:start + S_new] = v_new[b]
            continue
        for t in range(S_new):
            position = start + t
            page, slot = int(plan.table[b, position // plan.page_size]), position % plan.page_size
            k_cache[page, slot] = k_new[b, t]
            v_cache[page, slot] = v_new[b, t]


def cache_keys(cache, plan, b):
    """Batch element b's keys (1, seqlen_k, Hkv, ·): a view of a dense cache, the pages of a paged one."""
    n = plan.seqlens_k[b]
    if plan.page_size == 0:
        return cache[b:b + 1, :n]
    return cache[plan.pages(b, n)].reshape((1, -1) + cache.shape[2:])[:, :n]
