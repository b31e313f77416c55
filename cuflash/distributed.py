"""Ring attention: exact attention over a sequence sharded across ranks (context parallelism).

Each of P ranks holds one shard of the sequence: its queries Q_r and keys/values K_r, V_r, BSHD
blocks of the same tokens. The K/V blocks travel around a ring, rank r to rank r + 1: at step t
rank r holds the block of rank s = r − t (mod P), computes the partial attention of Q_r over
K_s, V_s with cuflash's own functions (``cuflash.attention``: NumPy arrays run the NumPy backend,
CuPy arrays the GPU kernels) and merges it into its running (out, lse) with the log-sum-exp rule
(``_combine.merge``, in float32). After P steps every query has seen every key; no rank ever holds
more than its own shard and two K/V blocks.

Backward. Given the global O_r and LSE_r, block pair (r, s) contributes exactly
``attention_backward(dO_r, Q_r, K_s, V_s, O_r, LSE_r)``: P_rs = exp(S_rs − LSE_r) are the global
probabilities restricted to block s and D_r = rowsum(dO_r ∘ O_r) the global D. dQ_r accumulates at
home; dK_s and dV_s accumulate in float32 buffers that travel with K_s, V_s and take one more hop
at the end, back to their owner.

Masks. Positions are global and the global problem is square, so both causal alignments agree:
query i sees key j iff i − left ≤ j ≤ i + right (causal: right = 0; None: unbounded). For a block
pair the band is shifted by the difference of the two shards' positions; ``_plan`` expresses it as
cuflash calls with a top-left-aligned window on sub-blocks trimmed to the rows and keys that see
something, and skips pairs that see nothing, so cost follows the visible area.

Layouts. "contiguous": rank r holds the r-th of P consecutive chunks. "zigzag" (for causal): the
sequence is cut into 2P chunks and rank r holds chunks r and 2P − 1 − r. Under a causal mask every
rank then does the same work at every step: its own block is one causal call, an earlier rank's
block one full call of all its queries against the block's first chunk, a later rank's block one
full call of its second chunk against the whole block. ``shard`` and ``unshard`` convert.

Overlap. The K/V transfer for step t + 1 is started before the compute of step t (double buffers:
the block in hand is sent while the next arrives into the spare); the dK/dV buffers of step t are
sent once step t has added to them and are awaited only when step t + 1 adds its share.

Communicators. Any object with ``rank``, ``world_size``, ``device`` (None: moves any arrays; an
int: CuPy arrays on that GPU only) and ``start_shift(send, recv)``, which starts sending each array
of ``send`` to rank + 1 and receiving into ``recv`` (same shapes and dtypes, contiguous) from
rank − 1, and returns an object whose ``wait()`` orders the caller's later work after the transfer
(on the GPU: CuPy's current stream waits for it; the send arrays must stay untouched until then).
Three are provided: ``LoopbackRing`` (P virtual ranks of one process, one thread each: NumPy on the
CPU or CuPy on one GPU), ``NcclRing`` (NCCL through CuPy, one process per GPU) and ``TorchRing``
(a ``torch.distributed`` process group). JAX code has ``cuflash.jax.ring_attention`` inside
``jax.shard_map`` instead, whose steps make the calls ``_plan`` makes here.
"""

import math
import os
import threading
from dataclasses import dataclass
from functools import lru_cache
from typing import Optional

import numpy

from ._api import attention, attention_backward
from ._combine import array_module, merge
from ._interop import export, import_operands
from ._problem import _is_int, _Problems, check_backward, check_forward

__all__ = [
    "LAYOUTS", "shard_segments", "shard_order", "shard", "unshard",
    "ring_attention", "ring_attention_backward", "ring_attention_vjp", "torch_ring_attention",
    "LoopbackRing", "NcclRing", "TorchRing",
]

LAYOUTS = ("contiguous", "zigzag")


# ---------------------------------------------------------------------------------------------
# Layouts: which global tokens each rank holds.
# ---------------------------------------------------------------------------------------------

class _Checks(_Problems):
    """``_Problems`` with the checks of this module's arguments; each returns whether its value is usable."""

    def count(self):
        return len(self.type_errors) + len(self.value_errors)

    def layout(self, layout):
        if isinstance(layout, str) and layout in LAYOUTS:
            return True
        self.value(f"layout must be one of {LAYOUTS}, got {layout!r}")
        return False

    def seqlen(self, seqlen, optional=True):
        if seqlen is None and optional:
            return True
        if not _is_int(seqlen):
            self.type(f"seqlen must be an int{' or None' if optional else ''}, got {type(seqlen).__name__}")
        elif seqlen < 0:
            self.value(f"seqlen must be non-negative, got {seqlen}")
        else:
            return True
        return False

    def rank(self, rank, world_size):
        if not _is_int(world_size):
            self.type(f"world_size must be an int, got {type(world_size).__name__}")
        elif world_size < 1:
            self.value(f"world_size must be at least 1, got {world_size}")
        elif not _is_int(rank):
            self.type(f"rank must be an int, got {type(rank).__name__}")
        elif not 0 <= rank < world_size:
            self.value(f"rank must be in 0..{world_size - 1}, got {rank}")
        else:
            return True
        return False

    def array(self, name, x):
        if isinstance(x, numpy.ndarray) or type(x).__module__.split(".")[0] == "cupy":
            return True
        self.type(f"{name} must be a NumPy or CuPy array, got {type(x).__name__}")
        return False

    def axis(self, axis, x, name):
        """The axis as a non-negative int, or None when it is unusable."""
        if not _is_int(axis):
            self.type(f"axis must be an int, got {type(axis).__name__}")
        elif not -x.ndim <= axis < x.ndim:
            self.value(f"axis {axis} is out of range for {name} with {x.ndim} dimensions")
        else:
            return axis % x.ndim
        return None


def _segments(seqlen, rank, world_size, layout):
    chunks = world_size if layout == "contiguous" else 2 * world_size
    base, extra = divmod(seqlen, chunks)

    def chunk(c):
        start = c * base + min(c, extra)
        return start, start + base + (c < extra)

    if layout == "contiguous":
        return (chunk(rank),)
    return chunk(rank), chunk(2 * world_size - 1 - rank)


def shard_segments(seqlen, rank, world_size, layout="contiguous"):
    """The global token ranges (start, stop) that ``rank`` holds, in the order of its local sequence.

    The sequence is cut into P ("contiguous") or 2P ("zigzag") chunks whose lengths differ by at
    most one (the first ``seqlen % chunks`` are one longer, as ``numpy.array_split`` cuts); rank r
    holds chunk r, and under "zigzag" chunk 2P − 1 − r after it. With ``seqlen`` a multiple of P
    every rank holds seqlen / P tokens under both layouts.
    """
    checks = _Checks()
    if all([checks.seqlen(seqlen, optional=False), checks.rank(rank, world_size), checks.layout(layout)]):
        return _segments(seqlen, rank, world_size, layout)
    checks.raise_if_any("cuflash.distributed.shard_segments")


def shard_order(seqlen, world_size, layout="contiguous"):
    """The global token positions of every rank's shard, rank 0's first (an int64 array of
    ``seqlen``): ``x[:, order]`` puts a global sequence in the order whose even split into
    ``world_size`` parts gives rank r its shard, as ``jax.shard_map`` splits a sharded axis (with
    ``seqlen`` a multiple of ``world_size``); ``x[:, numpy.argsort(order)]`` undoes it."""
    checks = _Checks()
    if all([checks.seqlen(seqlen, optional=False), checks.rank(0, world_size), checks.layout(layout)]):
        ranges = [r for rank in range(world_size) for r in _segments(seqlen, rank, world_size, layout)]
        return numpy.concatenate([numpy.arange(start, stop) for start, stop in ranges])
    checks.raise_if_any("cuflash.distributed.shard_order")


def _along(axis, start, stop):
    return (slice(None),) * axis + (slice(start, stop),)


def shard(x, rank, world_size, *, layout="contiguous", axis=1):
    """This rank's part of a global sequence: ``x`` (NumPy or CuPy) cut along ``axis`` to the tokens
    of ``shard_segments``. ``axis`` is 1 for BSHD q, k, v, out and dout, 2 for a (B, H, S) lse.
    A view under "contiguous", a copy under "zigzag"."""
    checks = _Checks()
    axis = checks.axis(axis, x, "x") if checks.array("x", x) else None
    if all([axis is not None, checks.rank(rank, world_size), checks.layout(layout)]):
        pieces = [x[_along(axis, start, stop)] for start, stop in _segments(x.shape[axis], rank, world_size, layout)]
        return pieces[0] if len(pieces) == 1 else array_module(x).concatenate(pieces, axis=axis)
    checks.raise_if_any("cuflash.distributed.shard")


def unshard(shards, *, layout="contiguous", axis=1):
    """The global sequence from every rank's shard (``shards[r]`` from rank r): the inverse of ``shard``."""
    checks = _Checks()
    shards = list(shards)
    if not shards:
        checks.value("shards must hold one array per rank, got none")
    elif all([checks.array(f"shards[{r}]", x) for r, x in enumerate(shards)]):
        axis = checks.axis(axis, shards[0], "shards[0]")
    checks.layout(layout)
    checks.raise_if_any("cuflash.distributed.unshard")
    seqlen = sum(x.shape[axis] for x in shards)
    pieces = []
    for rank, x in enumerate(shards):
        segments = _segments(seqlen, rank, len(shards), layout)
        length = sum(stop - start for start, stop in segments)
        if x.shape[axis] != length:
            checks.value(f"shards[{rank}] holds {x.shape[axis]} tokens along axis {axis}; rank {rank}'s "
                           f"{layout} shard of {seqlen} tokens over {len(shards)} ranks holds {length}")
            continue
        at = 0
        for start, stop in segments:
            pieces.append((start, x[_along(axis, at, at + stop - start)]))
            at += stop - start
    checks.raise_if_any("cuflash.distributed.unshard")
    pieces.sort(key=lambda piece: piece[0])
    return array_module(shards[0]).concatenate([piece for _, piece in pieces], axis=axis)


# ---------------------------------------------------------------------------------------------
# Block pairs: which cuflash calls compute Q_r against K_s, V_s.
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class _Call:
    """One cuflash call of a block pair: local query rows ``rows`` against the block's keys ``cols``,
    masked by the top-left-aligned window (left, right) of that sub-block (None: unbounded)."""

    rows: slice
    cols: slice
    left: Optional[int]
    right: Optional[int]

    def mask_options(self):
        """The call's mask as options of ``cuflash.attention`` (causal where right = 0, so the
        kernels take their causal path)."""
        if self.right == 0:
            return dict(causal=True, causal_alignment="top_left",
                        window=None if self.left is None else (self.left, 0))
        window = None if self.left is None and self.right is None else (self.left, self.right)
        return dict(causal=False, causal_alignment="top_left", window=window)


def _shift(bound, by):
    return None if bound is None else bound + by


def _clip(lo, hi, rows, cols):
    """The values of d = j − i that the band lo ≤ d ≤ hi (None: unbounded) takes on the rectangle
    rows × cols of (query i, key j), as (lo, hi); None when it takes none."""
    (r0, r1), (c0, c1) = rows, cols
    if r0 >= r1 or c0 >= c1:
        return None
    d_min, d_max = c0 - (r1 - 1), (c1 - 1) - r0
    lo = d_min if lo is None else max(lo, d_min)
    hi = d_max if hi is None else min(hi, d_max)
    return (lo, hi) if lo <= hi else None


def _call(rows, cols, lo, hi):
    """The call computing rows × cols under the band lo ≤ j − i ≤ hi (local indices), trimmed to the
    rows and keys that see something; None when nothing is seen.

    In the rectangle's own indices (i, j from 0) row i sees something iff −hi ≤ i ≤ C − 1 − lo and
    key j is seen iff lo ≤ j ≤ R − 1 + hi. The trimmed block starts at (i0, j0) with
    j0 − i0 between lo and hi, so its top-left window (j0 − i0 − lo, hi − (j0 − i0)) has no
    negative side; a side that reaches past the block is dropped (None), which lets a block the
    band covers run unmasked.
    """
    (r0, r1), (c0, c1) = rows, cols
    lo, hi = _shift(lo, r0 - c0), _shift(hi, r0 - c0)
    R, C = r1 - r0, c1 - c0
    i0 = 0 if hi is None else max(0, -hi)
    i1 = R if lo is None else min(R, C - lo)
    j0 = 0 if lo is None else max(0, lo)
    j1 = C if hi is None else min(C, R + hi)
    if i0 >= i1 or j0 >= j1:
        return None
    corner = j0 - i0
    left = None if lo is None or corner - lo >= i1 - i0 - 1 else corner - lo
    right = None if hi is None or hi - corner >= j1 - j0 - 1 else hi - corner
    return _Call(slice(r0 + i0, r0 + i1), slice(c0 + j0, c0 + j1), left, right)


def _local(segments):
    """Each segment as ((local start, local stop), global start)."""
    placed, at = [], 0
    for start, stop in segments:
        placed.append(((at, at + stop - start), start))
        at += stop - start
    return placed


@lru_cache(maxsize=4096)
def _plan(q_segments, k_segments, left, right):
    """The calls that compute queries at ``q_segments`` against keys at ``k_segments`` (global
    token ranges, in local order) under the band i − left ≤ j ≤ i + right of global positions.

    Segment pair (a, b) sees local d = j − i in [−left + σ, right + σ], σ = (start_a − local
    start_a) − (start_b − local start_b). When one band in local indices gives every pair inside
    the bounding box of the pairs that see something exactly what it sees (no band at all, or the
    band of one of them), the block is one call: always for a contiguous shard, and for a zigzag
    shard under a causal mask or none. Otherwise (zigzag with a window) each pair is its own call.
    """
    lo, hi = (None if left is None else -left), right
    qs, ks = _local(q_segments), _local(k_segments)
    pairs = {}
    for a, (rows, q_start) in enumerate(qs):
        for b, (cols, k_start) in enumerate(ks):
            sigma = (q_start - rows[0]) - (k_start - cols[0])
            pairs[a, b] = rows, cols, sigma, _clip(_shift(lo, sigma), _shift(hi, sigma), rows, cols)
    seen = [ab for ab, pair in pairs.items() if pair[3] is not None]
    if not seen:
        return ()
    a0, a1 = min(a for a, _ in seen), max(a for a, _ in seen)
    b0, b1 = min(b for _, b in seen), max(b for _, b in seen)
    box = [(a, b) for a in range(a0, a1 + 1) for b in range(b0, b1 + 1)]
    for band in [(None, None)] + [(_shift(lo, s), _shift(hi, s)) for s in sorted({pairs[ab][2] for ab in seen})]:
        if all(_clip(*band, pairs[ab][0], pairs[ab][1]) == pairs[ab][3] for ab in box):
            call = _call((qs[a0][0][0], qs[a1][0][1]), (ks[b0][0][0], ks[b1][0][1]), *band)
            return (call,)
    calls = (_call(pairs[ab][0], pairs[ab][1], _shift(lo, pairs[ab][2]), _shift(hi, pairs[ab][2])) for ab in seen)
    return tuple(calls)


class _Ring:
    """One rank's view of the ring: who it is, which tokens every rank holds, each step's calls."""

    def __init__(self, comm, seqlen, layout, left, right):
        self.comm = comm
        self.rank, self.size = comm.rank, comm.world_size
        self.segments = [_segments(seqlen, s, self.size, layout) for s in range(self.size)]
        self.lengths = [sum(stop - start for start, stop in segments) for segments in self.segments]
        self.left, self.right = left, right

    def source(self, step):
        """The rank whose K/V block this rank holds at ``step``."""
        return (self.rank - step) % self.size

    def calls(self, step):
        return _plan(self.segments[self.rank], self.segments[self.source(step)], self.left, self.right)

    def block_shape(self, x, source):
        """The shape of ``x``'s counterpart (BSHD) on rank ``source``."""
        return (x.shape[0], self.lengths[source]) + tuple(x.shape[2:])

    def buffers(self, xp, like, dtype=None):
        """Two sets of flat buffers, each large enough for any rank's block of every array of ``like``."""
        longest = max(self.lengths)
        sizes = [x.shape[0] * longest * math.prod(x.shape[2:]) for x in like]
        return [[xp.empty(n, dtype=dtype or x.dtype) for n, x in zip(sizes, like)] for _ in range(2)]


def _views(flat, like, shape_of):
    """Contiguous views at the start of the flat buffers, shaped ``shape_of(x)`` for each x of ``like``."""
    return [buffer[:math.prod(shape_of(x))].reshape(shape_of(x)) for buffer, x in zip(flat, like)]


def _circulate(ring, xp, arrays):
    """Yield (step, block) for step = 0..P−1: this rank's own ``arrays`` first, then the blocks that
    arrive from rank − 1. The transfer of step t + 1's block runs while the caller works on step t."""
    current = [xp.ascontiguousarray(x) for x in arrays]
    spare = ring.buffers(xp, arrays) if ring.size > 1 else None
    for step in range(ring.size):
        pending = None
        if step + 1 < ring.size:
            source = ring.source(step + 1)
            incoming = _views(spare[step % 2], arrays, lambda x: ring.block_shape(x, source))
            pending = ring.comm.start_shift(current, incoming)
        yield step, current
        if pending is not None:
            pending.wait()
            current = incoming


# ---------------------------------------------------------------------------------------------
# Forward and backward.
# ---------------------------------------------------------------------------------------------

def _forward(ring, problem, q, k, v, options):
    xp = array_module(q)
    acc = problem.accum_dtype
    out = xp.zeros(problem.out_shape, dtype=acc)
    lse = xp.full(problem.lse_shape, -numpy.inf, dtype=acc)
    lse_rows = lse.transpose(0, 2, 1)  # (B, S, H), beside out's rows, as merge reads it
    for step, (k_s, v_s) in _circulate(ring, xp, (k, v)):
        for call in ring.calls(step):
            rows, cols = call.rows, call.cols
            out_c, lse_c = attention(q[:, rows], k_s[:, cols], v_s[:, cols], return_lse=True, **call.mask_options(),
                                     **options)
            merge(out[:, rows], lse_rows[:, rows], out_c, lse_c.transpose(0, 2, 1), out=out[:, rows],
                  lse=lse_rows[:, rows])
    return out.astype(problem.dtype, copy=False), lse


def _backward(ring, problem, dout, q, k, v, out, lse, options):
    xp = array_module(q)
    acc = problem.accum_dtype
    dq = xp.zeros(q.shape, dtype=acc)
    # The dK, dV accumulators of the block in hand, and the spare that the next block's arrive in.
    grads = ring.buffers(xp, (k, v), acc)
    pending = None
    for step, (k_s, v_s) in _circulate(ring, xp, (k, v)):
        pieces = []
        for call in ring.calls(step):
            rows, cols = call.rows, call.cols
            dq_c, dk_c, dv_c = attention_backward(dout[:, rows], q[:, rows], k_s[:, cols], v_s[:, cols], out[:, rows],
                                                  lse[:, :, rows], **call.mask_options(), **options)
            dq[:, rows] += dq_c.astype(acc, copy=False)
            pieces.append((cols, dk_c, dv_c))
        source = ring.source(step)
        held = _views(grads[step % 2], (k, v), lambda x: ring.block_shape(x, source))
        if pending is None:  # step 0: this rank's own block, whose accumulators start here
            for g in held:
                g.fill(0)
        else:  # they arrived from rank − 1 while this step computed
            pending.wait()
        for cols, dk_c, dv_c in pieces:
            held[0][:, cols] += dk_c.astype(acc, copy=False)
            held[1][:, cols] += dv_c.astype(acc, copy=False)
        if ring.size > 1:
            # To rank + 1, which adds its share next step; after the last step, home to the owner.
            following = ring.source(step + 1)
            incoming = _views(grads[(step + 1) % 2], (k, v), lambda x: ring.block_shape(x, following))
            pending = ring.comm.start_shift(held, incoming)
    if pending is not None:
        pending.wait()
        held = incoming
    dk, dv = held
    return tuple(x.astype(problem.dtype, copy=False) for x in (dq, dk, dv))


_SEMANTICS = """
    Each rank passes its own shard: q (B, L, Hq, D), k (B, L, Hkv, D), v (B, L, Hkv, Dv), the L
    tokens that ``shard_segments(seqlen, comm.rank, comm.world_size, layout)`` names (``shard``
    cuts them from a global array). Every rank calls with the same options; the world's B, heads
    and head dims agree. Attention is over the global sequence of ``seqlen`` tokens (default:
    world_size × L, every rank holding L): query i sees key j iff i − left ≤ j ≤ i + right with
    window=(left, right) (None: unbounded), causal=True meaning right = 0. GQA/MQA, softcap and
    scale are as in ``cuflash.attention``; ALiBi is not offered (its bias needs global positions
    inside each call).

    Each step's partial output is rounded to the input dtype by the call that makes it and merged
    in float32 (float64 for float64 inputs), so 16-bit results differ from a single-device call by
    about one rounding of the input dtype; float32 and float64 results agree to their rounding.
"""


def _doc(text):
    return text.replace("%(semantics)s", _SEMANTICS)


def _check_comm(problems, comm, q):
    """Record what is wrong with ``comm`` or with q's memory for it; True when the ring can be built."""
    rank, size = getattr(comm, "rank", None), getattr(comm, "world_size", None)
    if not (_is_int(rank) and _is_int(size) and callable(getattr(comm, "start_shift", None))
            and hasattr(comm, "device")):
        problems.type(f"comm must be a ring communicator (LoopbackRing.communicator(rank), NcclRing, TorchRing, "
                      f"or an object with rank, world_size, device and start_shift), got {type(comm).__name__}")
        return False
    if not (size >= 1 and 0 <= rank < size):
        problems.value(f"comm has rank {rank} of world_size {size}; expected 0 <= rank < world_size")
        return False
    if comm.device is not None:
        if isinstance(q, numpy.ndarray):
            problems.type(f"comm ({type(comm).__name__}) moves CUDA memory of device {comm.device}; "
                          "q, k, v are in CPU memory")
            return False
        if q.device.id != comm.device:
            problems.value(f"comm ({type(comm).__name__}) moves memory of device {comm.device}; "
                           f"q, k, v are on device {q.device.id}")
            return False
    return True


def _checked(what, comm, layout, seqlen, check, named, options):
    """The ``_Ring`` and resolved ``Problem`` of a call, after every check; one TypeError or
    ValueError listing every problem otherwise."""
    problems = _Checks()
    q, k = named["q"], named["k"]
    comm_ok = _check_comm(problems, comm, q)
    layout_ok = all([problems.layout(layout), problems.seqlen(seqlen)])
    if q.ndim == 4 and k.ndim == 4:
        length = q.shape[1]
        if k.shape[1] != length:
            problems.value(f"q and k must hold the same tokens (this rank's shard of the sequence), got q: "
                           f"{length}, k: {k.shape[1]} tokens")
        elif comm_ok and layout_ok:
            total = comm.world_size * length if seqlen is None else seqlen
            expected = sum(stop - start for start, stop in _segments(total, comm.rank, comm.world_size, layout))
            if expected != length:
                problems.value(f"q holds {length} tokens; rank {comm.rank}'s {layout} shard of seqlen={total} over "
                               f"{comm.world_size} ranks holds {expected}")
    try:
        problem = check(*named.values(), causal_alignment="top_left", what=what, **options)
    except (TypeError, ValueError) as exc:
        for message in str(exc).split("\n  - ")[1:] or [str(exc)]:
            (problems.type if isinstance(exc, TypeError) else problems.value)(message)
    problems.raise_if_any(what)
    total = comm.world_size * q.shape[1] if seqlen is None else seqlen
    return _Ring(comm, total, layout, problem.window_left, problem.window_right), problem


def ring_attention(q, k, v, *, comm, causal=False, window=None, softcap=None, scale=None, layout="contiguous",
                   seqlen=None, return_lse=False, backend="auto"):
    what = "cuflash.distributed.ring_attention"
    (q, k, v), origin = import_operands(what, q=q, k=k, v=v)
    options = dict(causal=causal, window=window, softcap=softcap, scale=scale, backend=backend)
    ring, problem = _checked(what, comm, layout, seqlen, check_forward, dict(q=q, k=k, v=v), options)
    calls = dict(softcap=softcap, scale=problem.scale, backend=backend)
    with origin.context():
        results = _forward(ring, problem, q, k, v, calls)
        results = tuple(export(x, origin) for x in results)
    return results if return_lse else results[0]


ring_attention.__doc__ = _doc("""Attention over a sequence sharded across the ranks of ``comm`` (ring attention).

    Every rank of the ring calls it at the same time with its own shard; K/V blocks travel the
    ring while each rank computes (see the module's notes).
%(semantics)s
    Parameters
    ----------
    q, k, v : arrays (NumPy, CuPy or any DLPack producer), this rank's shard
    comm : ring communicator
        ``LoopbackRing(P).communicator(rank)``, ``NcclRing``, ``TorchRing`` or any object with the
        same four members.
    causal, window, softcap, scale, backend :
        As in ``cuflash.attention``, over global positions.
    layout : {"contiguous", "zigzag"}
        Which tokens each rank holds; "zigzag" balances the work of a causal mask.
    seqlen : int, optional
        Tokens in the global sequence, when ranks hold different numbers of them.
    return_lse : bool
        Also return this rank's rows of the global log-sum-exp (for ``ring_attention_backward``).

    Returns
    -------
    out : array (B, L, Hq, Dv), this rank's rows of the global output, in the input dtype
    lse : array (B, Hq, L), float32 (float64 for float64); only with ``return_lse=True``

    Raises
    ------
    TypeError, ValueError
        Before any work or communication, listing every problem and naming each operand.
""")


def ring_attention_backward(dout, q, k, v, out, lse, *, comm, causal=False, window=None, softcap=None, scale=None,
                            layout="contiguous", seqlen=None, deterministic=False, backend="auto"):
    what = "cuflash.distributed.ring_attention_backward"
    (dout, q, k, v, out, lse), origin = import_operands(what, dout=dout, q=q, k=k, v=v, out=out, lse=lse)
    options = dict(causal=causal, window=window, softcap=softcap, scale=scale, deterministic=deterministic,
                   backend=backend)
    ring, problem = _checked(what, comm, layout, seqlen, check_backward,
                             dict(dout=dout, q=q, k=k, v=v, out=out, lse=lse), options)
    calls = dict(softcap=softcap, scale=problem.scale, deterministic=deterministic, backend=backend)
    with origin.context():
        results = _backward(ring, problem, dout, q, k, v, out, lse, calls)
        return tuple(export(x, origin) for x in results)


ring_attention_backward.__doc__ = _doc("""Gradients (dq, dk, dv) of ``ring_attention`` for this rank's shard.

    dK and dV of each block accumulate in float32 as they travel the ring with K and V, and arrive
    home after one more hop; dq stays on its rank.
%(semantics)s
    Parameters
    ----------
    dout : array (B, L, Hq, Dv), ∂loss/∂out for this rank's rows
    q, k, v : this rank's shard, as given to the forward
    out, lse : this rank's rows of the forward's results (``ring_attention(..., return_lse=True)``)
    comm, causal, window, softcap, scale, layout, seqlen, backend :
        As in the forward; they must match it.
    deterministic : bool
        As in ``cuflash.attention_backward``; the ring adds the steps in a fixed order.

    Returns
    -------
    dq, dk, dv : arrays shaped like q, k, v, in their dtype and array type.
""")


def ring_attention_vjp(q, k, v, *, comm, causal=False, window=None, softcap=None, scale=None, layout="contiguous",
                       seqlen=None, deterministic=False, backend="auto"):
    """Ring attention for code without autograd: returns ``out`` and ``vjp(dout) -> (dq, dk, dv)``.

    Runs the forward once (keeping its lse); each ``vjp`` call runs ``ring_attention_backward``,
    and every rank must call it together. Options mean what they mean in ``ring_attention``.
    """
    options = dict(comm=comm, causal=causal, window=window, softcap=softcap, scale=scale, layout=layout,
                   seqlen=seqlen, backend=backend)
    out, lse = ring_attention(q, k, v, return_lse=True, **options)

    def vjp(dout):
        return ring_attention_backward(dout, q, k, v, out, lse, deterministic=deterministic, **options)

    return out, vjp


@lru_cache(maxsize=1)
def _torch_function():
    """The ``torch.autograd.Function`` of ring attention, made on first use (PyTorch is optional)."""
    import torch

    class RingAttention(torch.autograd.Function):
        @staticmethod
        def forward(ctx, q, k, v, options, deterministic):
            out, lse = ring_attention(q, k, v, return_lse=True, **options)
            ctx.save_for_backward(q, k, v, out, lse)
            ctx.options, ctx.deterministic = options, deterministic
            return out

        @staticmethod
        def backward(ctx, dout):
            grads = ring_attention_backward(dout, *ctx.saved_tensors, deterministic=ctx.deterministic, **ctx.options)
            return (*grads, None, None)

    return RingAttention


def torch_ring_attention(q, k, v, *, comm, causal=False, window=None, softcap=None, scale=None, layout="contiguous",
                         seqlen=None, deterministic=False, backend="auto"):
    """``ring_attention`` of torch tensors, differentiable: ``loss.backward()`` runs
    ``ring_attention_backward``, which every rank of the ring must reach together (as it does
    when every rank runs the same training step). Options mean what they mean in ``ring_attention``.
    """
    options = dict(comm=comm, causal=causal, window=window, softcap=softcap, scale=scale, layout=layout,
                   seqlen=seqlen, backend=backend)
    return _torch_function().apply(q, k, v, options, deterministic)


# ---------------------------------------------------------------------------------------------
# Communicators.
# ---------------------------------------------------------------------------------------------

def _is_gpu(arrays):
    return bool(arrays) and not isinstance(arrays[0], numpy.ndarray)


def _record(arrays):
    """An event on CuPy's current stream after the work queued so far, for CuPy arrays; None for NumPy."""
    if not _is_gpu(arrays):
        return None
    import cupy

    event = cupy.cuda.Event(disable_timing=True)
    event.record()
    return event


class _StreamPending:
    """A transfer that ends at ``event``: ``wait`` makes CuPy's current stream wait for it (nothing
    to wait for when there is no event). Keeps the arrays alive until then."""

    def __init__(self, event, arrays=()):
        self._event, self._arrays = event, arrays

    def wait(self):
        if self._event is not None:
            import cupy

            cupy.cuda.get_current_stream().wait_event(self._event)
        self._event = self._arrays = None


class LoopbackRing:
    """P virtual ranks in one process, one thread each: the ring on the CPU (NumPy) or on one GPU
    (CuPy, every rank on the same device).

    ``run(fn)`` calls ``fn(comm)`` on every rank's communicator, each in its own thread, and returns
    the results by rank; an exception on any rank stops the others and is raised. A shift copies
    each array into the receiver's buffer (on the GPU, on the receiver's current stream after the
    sender's work, and the sender's later work waits for the copy), so buffer reuse is exercised
    as with real transfers.

    >>> ring = LoopbackRing(4)
    >>> outs = ring.run(lambda comm: ring_attention(shard(q, comm.rank, 4), shard(k, comm.rank, 4),
    ...                                             shard(v, comm.rank, 4), comm=comm))
    >>> out = unshard(outs)
    """

    def __init__(self, world_size):
        if not _is_int(world_size) or world_size < 1:
            raise ValueError(f"invalid arguments to cuflash.distributed.LoopbackRing:\n  - world_size must be an "
                             f"int of at least 1, got {world_size!r}")
        self.world_size = int(world_size)
        self._barrier = threading.Barrier(self.world_size)
        self._sent = [None] * self.world_size
        self._copied = [None] * self.world_size
        self._communicators = [_LoopbackCommunicator(self, rank) for rank in range(self.world_size)]

    def communicator(self, rank):
        return self._communicators[rank]

    def run(self, fn):
        results, errors = [None] * self.world_size, [None] * self.world_size

        def body(rank):
            try:
                results[rank] = fn(self._communicators[rank])
            except BaseException as exc:
                errors[rank] = exc
                self._barrier.abort()  # the other ranks would wait for this one forever

        threads = [threading.Thread(target=body, args=(rank,)) for rank in range(self.world_size)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        self._barrier.reset()
        raised = [e for e in errors if e is not None]
        if raised:
            # The first error that is not another rank's broken barrier is the cause.
            raise next((e for e in raised if not isinstance(e, threading.BrokenBarrierError)), raised[0])
        return results


class _LoopbackCommunicator:
    device = None

    def __init__(self, ring, rank):
        self._ring, self.rank, self.world_size = ring, rank, ring.world_size

    def start_shift(self, send, recv):
        ring = self._ring
        ring._sent[self.rank] = (send, _record(send))
        ring._barrier.wait()  # every rank has posted its arrays
        arrays, ready = ring._sent[(self.rank - 1) % self.world_size]
        if [(x.shape, x.dtype) for x in arrays] != [(x.shape, x.dtype) for x in recv]:
            raise ValueError(f"rank {self.rank} expects blocks {[(x.shape, x.dtype) for x in recv]} from rank "
                             f"{(self.rank - 1) % self.world_size}, which sent {[(x.shape, x.dtype) for x in arrays]} "
                             "(do the ranks agree on seqlen, layout and shapes?)")
        if ready is not None:
            import cupy

            cupy.cuda.get_current_stream().wait_event(ready)
        for target, source in zip(recv, arrays):
            target[...] = source
        ring._copied[self.rank] = _record(recv)
        ring._barrier.wait()  # every rank has copied out of its neighbour's arrays
        return _StreamPending(ring._copied[(self.rank + 1) % self.world_size], (send, recv))


class NcclRing:
    """The ring over NCCL point-to-point calls (``cupy.cuda.nccl``), one process per GPU.

    Each shift is one NCCL group (send to rank + 1, receive from rank − 1) on a dedicated stream
    that first waits for the work queued on CuPy's current stream; ``wait`` makes the current
    stream wait for the group. Arrays travel as bytes, so every dtype (bfloat16 included) goes.

    Create one per process with ``NcclRing.create(rank, world_size, NcclRing.unique_id())`` (the
    unique id made once, by one process, and handed to all), or wrap an existing
    ``cupy.cuda.nccl.NcclCommunicator``. ``create`` sets ``NCCL_NVLS_ENABLE=0`` in the environment
    before NCCL starts: NVLink SHARP (multicast) stays off, and nothing here creates multicast
    objects; create your own communicator with the same setting.
    """

    def __init__(self, communicator, *, stream=None):
        import cupy

        self.communicator = communicator
        self.rank, self.world_size = communicator.rank_id(), communicator.size()
        self.device = communicator.device_id()
        with cupy.cuda.Device(self.device):
            self.stream = stream if stream is not None else cupy.cuda.Stream(non_blocking=True)

    @staticmethod
    def unique_id():
        """A new NCCL unique id (a tuple of ints: picklable, for the other processes)."""
        from cupy.cuda import nccl

        return nccl.get_unique_id()

    @classmethod
    def create(cls, rank, world_size, unique_id, *, device=None):
        """This process's rank of a new NCCL communicator on ``device`` (default: the current one)."""
        import cupy
        from cupy.cuda import nccl

        os.environ["NCCL_NVLS_ENABLE"] = "0"
        with cupy.cuda.Device(cupy.cuda.Device().id if device is None else device):
            return cls(nccl.NcclCommunicator(world_size, unique_id, rank))

    def start_shift(self, send, recv):
        import cupy
        from cupy.cuda import nccl

        ready = cupy.cuda.Event(disable_timing=True)
        ready.record()
        self.stream.wait_event(ready)
        following, preceding = (self.rank + 1) % self.world_size, (self.rank - 1) % self.world_size
        nccl.groupStart()
        try:
            for x in send:
                if x.nbytes:
                    self.communicator.send(x.data.ptr, x.nbytes, nccl.NCCL_UINT8, following, self.stream.ptr)
            for x in recv:
                if x.nbytes:
                    self.communicator.recv(x.data.ptr, x.nbytes, nccl.NCCL_UINT8, preceding, self.stream.ptr)
        finally:
            nccl.groupEnd()
        done = cupy.cuda.Event(disable_timing=True)
        done.record(self.stream)
        return _StreamPending(done, (send, recv))


class TorchRing:
    """The ring over a ``torch.distributed`` process group (NCCL for CUDA arrays, Gloo for CPU ones).

    Arrays travel as bytes through ``batch_isend_irecv``. On the GPU the transfers are queued
    behind, and awaited on, CuPy's current stream (given to PyTorch as an external stream).
    """

    device = None

    def __init__(self, group=None):
        import torch.distributed as dist

        self.group = group
        self.rank, self.world_size = dist.get_rank(group), dist.get_world_size(group)

        def global_rank(r):
            return r if group is None else dist.get_global_rank(group, r)

        self._following = global_rank((self.rank + 1) % self.world_size)
        self._preceding = global_rank((self.rank - 1) % self.world_size)

    @staticmethod
    def _bytes(x):
        import torch

        flat = x.reshape(-1).view(numpy.uint8)
        return torch.from_numpy(flat) if isinstance(flat, numpy.ndarray) else torch.from_dlpack(flat)

    def _on_cupy_stream(self, arrays):
        import contextlib

        import torch

        if not _is_gpu(arrays):
            return contextlib.nullcontext()
        import cupy

        return torch.cuda.stream(torch.cuda.ExternalStream(cupy.cuda.get_current_stream().ptr))

    def start_shift(self, send, recv):
        import torch.distributed as dist

        ops = [dist.P2POp(dist.isend, self._bytes(x), self._following, self.group) for x in send if x.nbytes]
        ops += [dist.P2POp(dist.irecv, self._bytes(x), self._preceding, self.group) for x in recv if x.nbytes]
        with self._on_cupy_stream(send):
            works = dist.batch_isend_irecv(ops) if ops else []
        return _TorchPending(self, works, (send, recv))


class _TorchPending:
    def __init__(self, ring, works, arrays):
        self._ring, self._works, self._arrays = ring, works, arrays

    def wait(self):
        with self._ring._on_cupy_stream(self._arrays[0]):
            for work in self._works:
                work.wait()
        self._works = self._arrays = None
