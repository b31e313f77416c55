"""Decoding against a key/value cache on the GPU: the append, split-KV decode and merge kernels.

A cache call is up to three launches on CuPy's current stream:

1. ``kernels/append.cu`` writes k_new, v_new into the cache at ``cache_seqlens[b] + t`` (dense or
   through the block table);
2. ``kernels/decode.cu`` runs one CTA per (batch, kv head, row tile, split): the query heads of a
   GQA group packed into one tile, each split streaming its share of the sequence's key tiles.
   With one split it writes out and lse; with more, each split writes a float32 partial result
   (normalized O and its LSE) to a workspace;
3. ``kernels/combine.cu`` merges the partials by the log-sum-exp rule into out and lse.

Sequence lengths are read on the device (``cache_seqlens[b] + S_new``), so the launches depend on
the host only through the split count, which the longest sequence decides (``variants.decode_splits``).
Everything but the pointers is decided once per (problem, layouts, device, split count) and kept in a
plan. ``splits=`` overrides the heuristic (tests force 1..many; results agree to float32 rounding).
"""

import math

import numpy

from .._errors import BackendUnavailableError
from . import params, runtime, variants
from .forward import MAX_SEQLEN
from .runtime import vector_loadable

_MAX_GRID_X = 2**31 - 1
# Sq * group, the query rows one (batch, kv head) packs into tiles: indexed by int in the kernel,
# with a tile's 16 rows of headroom.
MAX_PACKED_ROWS = MAX_SEQLEN


def supported(problem):
    """``(True, "")`` if the decode kernel computes ``problem`` on the current GPU, else ``(False, reason)``."""
    name = numpy.dtype(problem.dtype).name
    if name not in variants.DECODE_DTYPES:
        return False, (f"the CUDA decode kernel takes {' and '.join(variants.DECODE_DTYPES)} caches, not {name} "
                       f"(use backend=\"numpy\" or \"auto\")")
    # The kernel numbers the packed query rows (t, g) of a (batch, kv head) in 32-bit ints (decode.cu's
    # r0, n_rows, t): past 2^31 they wrap, and the rows read and written go outside q and out.
    rows = problem.seqlen_q * problem.group_size
    if rows > MAX_PACKED_ROWS:
        return False, (f"seqlen_q * (heads_q / heads_kv) = {rows} packed query rows exceed the CUDA decode kernel's "
                       f"{MAX_PACKED_ROWS} (use backend=\"numpy\" or \"auto\")")
    reason = variants.unserved_dtype(variants.family(*runtime.compute_capability()), name)
    if reason is not None:
        return False, reason
    return True, ""


def sm_count(device_id):
    """Streaming multiprocessors of a device, looked up once."""
    count = _sm_counts.get(device_id)
    if count is None:
        import cupy

        count = _sm_counts[device_id] = int(cupy.cuda.Device(device_id).attributes["MultiProcessorCount"])
    return count


_sm_counts = {}


def row_tiles(problem):
    """Tiles of the packed query rows (t, g) of one (batch, kv head)."""
    return math.ceil(problem.seqlen_q * problem.group_size / variants.DecodeTile.block_m)


def choose_splits(problem, max_seqlen_k, fam, sms):
    """The split count for a problem whose longest sequence has ``max_seqlen_k`` keys, on ``sms`` SMs."""
    tile, bucket = variants.decode_tile(fam, numpy.dtype(problem.dtype).name, problem.head_dim, problem.head_dim_v)
    ctas = problem.batch * problem.heads_kv * row_tiles(problem)
    return variants.decode_splits(ctas, math.ceil(max_seqlen_k / tile.block_n), sms, tile.ctas_per_sm(bucket, fam))


def flash_decode(q, k_cache, v_cache, cache_seqlens, block_table, slopes, out, lse, problem, *, max_seqlen_k,
                 k_new=None, v_new=None, splits=None):
    """Append ``k_new``, ``v_new`` (if given) and compute ``out`` (B, Sq, Hq, Dv) and ``lse``
    (B, Hq, Sq, float32) of q against the caches.

    CuPy arrays on one device: q (B, Sq, Hq, D); k_cache, v_cache dense (B, S_cache, Hkv, .) or
    paged (num_pages, page_size, Hkv, .) with ``block_table`` (B, max_pages) int32 (None: dense);
    ``cache_seqlens`` (B,) int32; k_new, v_new (B, S_new, Hkv, .) or None. Sequence b's new keys
    go to positions cache_seqlens[b] + t, and its queries attend to its first cache_seqlens[b] +
    S_new keys. ``slopes``: float32 (Hq,) or (B, Hq), or None. ``problem`` is the dense problem of
    q against one sequence (``_ragged.check_kvcache``'s, which has checked that the appends fit), and
    ``max_seqlen_k`` the longest sequence's key count, which only the split heuristic reads. out and
    lse are preallocated and every element is written. Everything that can refuse the call does so
    before the first launch. Runs on CuPy's current stream.
    """
    import cupy

    seqlen_new = 0 if k_new is None else k_new.shape[1]
    B, Sq, Hq = problem.batch, problem.seqlen_q, problem.heads_q
    if B == 0 or Sq == 0 or Hq == 0:
        if seqlen_new:
            append(k_cache, v_cache, k_new, v_new, cache_seqlens, block_table)
        return
    if max_seqlen_k > MAX_SEQLEN:
        raise ValueError(f"a sequence of {max_seqlen_k} keys: the CUDA decode kernel takes up to {MAX_SEQLEN}")
    device = q.device.id
    fam = variants.family(*runtime.compute_capability(device))
    if splits is None:
        splits = choose_splits(problem, max_seqlen_k, fam, sm_count(device))
    paged = block_table is not None
    with cupy.cuda.Device(device):
        cache_seqlens = cupy.ascontiguousarray(cache_seqlens)
        if paged:
            block_table = cupy.ascontiguousarray(block_table)
        if slopes is not None:
            slopes = cupy.ascontiguousarray(slopes)
        # The record holds the cache's extent (_cache_extent): a paged cache's page count and table shape.
        key = (problem, device, fam, splits, seqlen_new, k_cache.shape[:2] if paged else None,
               (block_table.shape, block_table.strides) if paged else None, runtime.layout_key(q),
               runtime.layout_key(k_cache), runtime.layout_key(v_cache), runtime.layout_key(out), lse.strides)
        plan = _plans.get(key)
        if plan is None:
            if len(_plans) > _MAX_PLANS:
                _plans.clear()
            plan = _plans[key] = _Plan(q, k_cache, v_cache, block_table, out, lse, problem, seqlen_new, splits, fam)
        if seqlen_new:
            append(k_cache, v_cache, k_new, v_new, cache_seqlens, block_table)
        plan.run(q, k_cache, v_cache, cache_seqlens, block_table, slopes, out, lse)


_plans = {}
_MAX_PLANS = 4096


class _Plan:
    """The decode launch (and with splits > 1 the workspace shapes and the merge) of one problem
    over arrays of fixed layouts."""

    def __init__(self, q, k_cache, v_cache, block_table, out, lse, problem, seqlen_new, splits, fam):
        ok, reason = supported(problem)
        if not ok:
            raise BackendUnavailableError(reason)
        variants.require(variants.DECODE_FEATURES, problem, "the CUDA decode kernel")
        if not 1 <= splits <= variants.DECODE_MAX_SPLITS:
            raise ValueError(f"splits must be in 1..{variants.DECODE_MAX_SPLITS}, got {splits}")
        name = numpy.dtype(problem.dtype).name
        vec_load = vector_loadable(q) and vector_loadable(k_cache) and vector_loadable(v_cache)
        tile, bucket = variants.decode_tile(fam, name, problem.head_dim, problem.head_dim_v)
        defines = variants.decode_defines(tile, bucket, name, vec_load, variants.score_mods(problem))
        kernel = runtime.get_kernel(variants.DECODE_SOURCE, variants.DECODE_KERNEL, defines)
        tiles = row_tiles(problem)
        grid_x = problem.batch * problem.heads_kv * tiles * splits
        if grid_x > _MAX_GRID_X:
            raise ValueError(f"batch * heads_kv * row tiles * splits = {grid_x} exceeds the CUDA grid limit")
        record = params.decode(problem, q, k_cache, v_cache, block_table, out, lse, seqlen_new, splits, tiles,
                               vector_loadable(out))
        self.decode = runtime.Launch(kernel, (grid_x, 1, 1), (tile.warps * 32, 1, 1), defines["SMEM_BYTES"],
                                     params.Template(record, params.DECODE_POINTERS))
        self.splits = splits
        rows = problem.batch * problem.seqlen_q * problem.heads_q
        self.o_shape = (splits, rows, problem.head_dim_v)
        self.lse_shape = (splits, rows)
        self.combine = (_combine_launch(out, lse, problem.batch, problem.seqlen_q, problem.heads_q,
                                        problem.head_dim_v, splits, name) if splits > 1 else None)

    def run(self, q, k_cache, v_cache, cache_seqlens, block_table, slopes, out, lse):
        import cupy

        o_partial = lse_partial = None
        if self.combine is not None:
            o_partial = cupy.empty(self.o_shape, dtype=numpy.float32)
            lse_partial = cupy.empty(self.lse_shape, dtype=numpy.float32)
        pointer = params.pointer
        self.decode.launch(pointer(q), pointer(k_cache), pointer(v_cache), pointer(out), pointer(lse), pointer(slopes),
                           pointer(cache_seqlens), pointer(block_table), pointer(o_partial), pointer(lse_partial))
        if self.combine is not None:
            self.combine.launch(pointer(o_partial), pointer(lse_partial), pointer(out), pointer(lse))


def _combine_launch(out, lse, batch, seqlen_q, heads, head_dim_v, splits, dtype_name):
    defines = variants.combine_defines(dtype_name)
    kernel = runtime.get_kernel(variants.COMBINE_SOURCE, variants.COMBINE_KERNEL, defines)
    rows = batch * seqlen_q * heads
    grid_x = math.ceil(rows / variants.COMBINE_ROWS_PER_CTA)
    if grid_x > _MAX_GRID_X:
        raise ValueError(f"{rows} rows exceed the CUDA grid limit of the merge")
    record = params.combine(out, lse, batch, seqlen_q, heads, head_dim_v, splits)
    return runtime.Launch(kernel, (grid_x, 1, 1), (variants.COMBINE_ROWS_PER_CTA * 32, 1, 1), 0,
                          params.Template(record, params.COMBINE_POINTERS))


def combine(o_partial, lse_partial, out, lse):
    """Merge partial attention results by the log-sum-exp rule, on the GPU.

    ``o_partial`` (S, B, Sq, H, Dv) float32 holds S normalized partial outputs over disjoint sets
    of keys and ``lse_partial`` (S, B, Sq, H) float32 their natural-log LSEs, both C-contiguous
    (a part that saw no key of a row has LSE -inf there; its O is then not read). Writes
    out (B, Sq, H, Dv) in its dtype (float16, bfloat16 or float32; any strides) and lse (B, H, Sq)
    float32: LSE = log sum_s exp(LSE_s), O = sum_s exp(LSE_s - LSE) O_s; a row no part saw is fully
    masked (O = 0, LSE = -inf). Runs on CuPy's current stream.
    """
    import cupy

    splits, B, Sq, H, Dv = o_partial.shape
    problems = []
    if tuple(lse_partial.shape) != (splits, B, Sq, H):
        problems.append(f"lse_partial must have shape (S, B, Sq, H) = {(splits, B, Sq, H)}, got {lse_partial.shape}")
    if tuple(out.shape) != (B, Sq, H, Dv) or tuple(lse.shape) != (B, H, Sq):
        problems.append(f"out must be (B, Sq, H, Dv) = {(B, Sq, H, Dv)} and lse (B, H, Sq) = {(B, H, Sq)}, "
                        f"got {out.shape} and {lse.shape}")
    for name, x in (("o_partial", o_partial), ("lse_partial", lse_partial), ("lse", lse)):
        if x.dtype != numpy.float32:
            problems.append(f"{name} must be float32, got {x.dtype}")
    for name, x in (("o_partial", o_partial), ("lse_partial", lse_partial)):
        if not x.flags.c_contiguous:
            problems.append(f"{name} must be C-contiguous")
    name = numpy.dtype(out.dtype).name
    if name not in variants.COMBINE_DTYPES:
        problems.append(f"out must be one of {', '.join(variants.COMBINE_DTYPES)}, got {name}")
    if problems:
        raise ValueError("cuflash combine: " + "; ".join(problems))
    if out.size == 0 and lse.size == 0:
        return
    if splits == 0:
        raise ValueError("cuflash combine: at least one partial result is needed")
    with cupy.cuda.Device(out.device.id):
        key = ("combine", out.device.id, name, o_partial.shape, out.strides, lse.strides)
        launch = _plans.get(key)
        if launch is None:
            launch = _plans[key] = _combine_launch(out, lse, B, Sq, H, Dv, splits, name)
        pointer = params.pointer
        launch.launch(pointer(o_partial), pointer(lse_partial), pointer(out), pointer(lse))


def append(k_cache, v_cache, k_new, v_new, cache_seqlens, block_table):
    """Write k_new, v_new (B, S_new, Hkv, .) into the caches at positions ``cache_seqlens[b] + t``
    (dense, or paged through ``block_table``), on CuPy's current stream. Any dtype and strides; the
    caller has checked that the positions fit and that no two sequences write one slot."""
    import cupy

    B, S_new, Hkv = k_new.shape[:3]
    total = B * S_new * Hkv * (k_new.shape[3] + v_new.shape[3])
    if total == 0:
        return
    device = k_cache.device.id
    paged = block_table is not None
    with cupy.cuda.Device(device):
        cache_seqlens = cupy.ascontiguousarray(cache_seqlens)
        if paged:
            block_table = cupy.ascontiguousarray(block_table)
        # The kernel reads the new rows while it writes the cache; new rows that are themselves a
        # view into the cache (a window of it, say) would be overwritten before every thread has
        # read them, so they are read from a copy.
        if cupy.may_share_memory(k_new, k_cache) or cupy.may_share_memory(k_new, v_cache):
            k_new = k_new.copy()
        if cupy.may_share_memory(v_new, k_cache) or cupy.may_share_memory(v_new, v_cache):
            v_new = v_new.copy()
        key = ("append", device, k_cache.itemsize, total)
        launch = _appends.get(key)
        if launch is None:
            if len(_appends) > _MAX_PLANS:
                _appends.clear()
            kernel = runtime.get_kernel(variants.APPEND_SOURCE, variants.APPEND_KERNEL,
                                        variants.append_defines(k_cache.itemsize))
            blocks = min(math.ceil(total / variants.APPEND_THREADS), 8 * sm_count(device))
            launch = _appends[key] = (kernel, (blocks, 1, 1), (variants.APPEND_THREADS, 1, 1))
        kernel, grid, block = launch
        record = params.append(k_new, v_new, k_cache, v_cache, cache_seqlens, block_table)
        runtime.launch(kernel, grid, block, (record,))


_appends = {}
