"""The backward pass on the GPU: which kernels run, with which workspaces, in what order.

Up to four launches on CuPy's current stream (the kernels and their tiles come from the variant
table, ``variants.py``):

1. ``flash_bwd_preprocess``: D = rowsum(dO ∘ O) and L2 = LSE · log2 e per query row (float32,
   padded to a multiple of 128 rows; +inf where LSE = −inf so rows that see no key give P = 0).
2. ``flash_bwd_dkdv``: one CTA per key tile K_j, V_j of a key/value head, streaming the query tiles
   it needs (Q_i, dO_i) of the query heads that share it; dK and dV stay in registers. By default
   (``deterministic=False``) it also adds dQ = dS K_j into a float32 workspace with atomics.
3. ``flash_bwd_dq`` (``deterministic=True``, or where the atomic variant's shared memory does not
   fit): one CTA per query tile, looping over the key tiles it sees and accumulating dQ in
   registers, so dq is bitwise reproducible. It recomputes S and dP: 7 tile products instead of 5.
4. ``flash_bwd_convert``: float32 workspaces to the output dtype (the atomic dQ; and dK, dV when a
   GQA group is split over several CTAs to fill the GPU, their partial sums added in a fixed order).
"""

import math

import numpy

from .._errors import BackendUnavailableError
from . import params, runtime, variants
from .runtime import vector_loadable

_MAX_GRID_X = 2**31 - 1
# L2 and D rows are padded to this, so streamed tiles (which divide it) read them without bounds.
_ROW_PAD = 128


def choose_entry(problem, device_id=None):
    """The table's entry and bucket for ``problem`` on the given (or current) device, and its family."""
    fam = variants.family(*runtime.compute_capability(device_id))
    entry, bucket = variants.bwd_entry(fam, numpy.dtype(problem.dtype).name, problem.head_dim, problem.head_dim_v,
                                       variants.score_mods(problem))
    return entry, bucket, fam


def _device_attribute(device_id, name):
    import cupy

    return cupy.cuda.Device(device_id).attributes[name]


def gqa_splits(problem, n_key_tiles, sm_count):
    """How many CTAs share one key tile's GQA group: enough CTAs for two waves, at most one per head."""
    group = problem.group_size
    base = problem.batch * problem.heads_kv * n_key_tiles
    if group <= 1 or base == 0:
        return 1, max(group, 1)
    want = min(group, max(1, math.ceil(2 * sm_count / base)))
    per_split = math.ceil(group / want)
    return math.ceil(group / per_split), per_split


def _check_grid(grid, what):
    if grid > _MAX_GRID_X:
        raise ValueError(f"{what} = {grid} exceeds the CUDA grid limit")


def flash_backward(dout, q, k, v, out, lse, slopes, dq, dk, dv, problem, deterministic, entry=None):
    """Write dq, dk, dv (shaped like q, k, v, input dtype, any strides) on the GPU.

    dout and out are (B, Sq, Hq, Dv), lse (B, Hq, Sq) float32 from the forward (−inf on rows that
    see no key), ``slopes`` the ALiBi slopes or None; every element of dq, dk and dv is written.
    ``deterministic`` selects the dQ pass without atomics (bitwise-identical results across runs).
    Runs on CuPy's current stream. ``entry`` overrides the table's choice (for tuning).
    """
    import cupy

    name = numpy.dtype(problem.dtype).name
    if name not in variants.DTYPE_CODES:
        raise BackendUnavailableError(f"the CUDA backward handles float16, bfloat16 and float32, not {name}")
    variants.require(variants.FEATURES, problem, "the CUDA backward")
    B, Sq, Sk = problem.batch, problem.seqlen_q, problem.seqlen_k
    Hq, Hkv, D, Dv = problem.heads_q, problem.heads_kv, problem.head_dim, problem.head_dim_v
    if B == 0:
        return
    mods = variants.score_mods(problem)
    with cupy.cuda.Device(q.device.id):
        chosen, bucket, fam = choose_entry(problem, q.device.id)
        entry = entry or chosen
        elem = numpy.dtype(problem.dtype).itemsize
        sm_count = _device_attribute(q.device.id, "MultiProcessorCount")
        vec_in = all(vector_loadable(x) for x in (q, k, v, dout))
        slopes = None if slopes is None else cupy.ascontiguousarray(slopes)
        fwd = params.forward(problem, q, k, v, out, lse, slopes, 0, False)

        sq_pad = math.ceil(Sq / _ROW_PAD) * _ROW_PAD
        l2 = cupy.empty((B, Hq, sq_pad), dtype=numpy.float32)
        dsum = cupy.empty((B, Hq, sq_pad), dtype=numpy.float32)

        # The atomic variant stages dS^T twice more; where that exceeds the device's shared memory,
        # the dQ kernel does the work instead (same results, bitwise reproducible).
        dq_atomic = not deterministic and (
            entry.dkdv.smem_bytes(bucket, elem, True, dq_atomic=True) <= _device_attribute(
                q.device.id, "MaxSharedMemoryPerBlockOptin"))
        tile = entry.dkdv if dq_atomic or entry is not chosen else variants.dkdv_tile(fam, name, bucket, mods, False)
        # Padded to whole tiles and the bucket's columns, so the kernel adds whole vectors unchecked.
        dq_accum = cupy.zeros((B, Hq, sq_pad, bucket), dtype=numpy.float32) if dq_atomic else None
        n_key_tiles = math.ceil(Sk / tile.block_n)
        splits, per_split = gqa_splits(problem, n_key_tiles, sm_count)
        if splits > 1:
            dk_out = cupy.empty((splits, B, Hkv, Sk, D), dtype=numpy.float32)
            dv_out = cupy.empty((splits, B, Hkv, Sk, Dv), dtype=numpy.float32)
            dk_strides, dv_strides = (Hkv * Sk * D, D, Sk * D, 1), (Hkv * Sk * Dv, Dv, Sk * Dv, 1)
            dk_split, dv_split = B * Hkv * Sk * D, B * Hkv * Sk * Dv
        else:
            dk_out, dv_out = dk, dv
            dk_strides, dv_strides = params.strides(dk), params.strides(dv)
            dk_split = dv_split = 0

        def bwd_params(n_tiles):
            return params.backward(fwd, dout, l2, dsum, dq_accum, dq, dk_out, dv_out, dk_strides, dv_strides,
                                   dk_split, dv_split, sq_pad, per_split, splits, n_tiles, vec_in, splits > 1)

        # 1. D and L2 per query row.
        rows = B * Hq * sq_pad
        if rows:
            kernel = runtime.get_kernel(variants.AUX_SOURCE, variants.PREPROCESS_KERNEL, variants.aux_defines(name))
            runtime.launch(kernel, (math.ceil(rows / 8), 1, 1), (256, 1, 1), (bwd_params(0),))

        # 2. dK, dV (and the atomic dQ).
        grid = B * Hkv * splits * n_key_tiles
        _check_grid(grid, f"batch * heads_kv * ceil(seqlen_k / {tile.block_n})")
        if grid:
            defines = variants.dkdv_defines(tile, bucket, name, dq_atomic, mods)
            kernel = runtime.get_kernel(variants.dkdv_source(tile), variants.DKDV_KERNEL, defines)
            runtime.launch(kernel, (grid, 1, 1), (tile.warps * 32, 1, 1), (bwd_params(n_key_tiles),),
                           shared_mem=defines["SMEM_BYTES"])
        if splits > 1:
            _convert(name, dk_out, splits, Sk * D, D, dk, Hkv, Sk, D, 1.0, sm_count)
            _convert(name, dv_out, splits, Sk * Dv, Dv, dv, Hkv, Sk, Dv, 1.0, sm_count)

        # 3. dQ.
        if dq_atomic:
            _convert(name, dq_accum, 1, sq_pad * bucket, bucket, dq, Hq, Sq, D, problem.scale, sm_count)
            return
        tile = entry.dq
        n_q_tiles = math.ceil(Sq / tile.block_m)
        grid = B * Hq * n_q_tiles
        _check_grid(grid, f"batch * heads_q * ceil(seqlen_q / {tile.block_m})")
        if grid:
            defines = variants.dq_defines(tile, bucket, name, mods)
            kernel = runtime.get_kernel(variants.DQ_SOURCE, variants.DQ_KERNEL, defines)
            runtime.launch(kernel, (grid, 1, 1), (tile.warps * 32, 1, 1), (bwd_params(n_q_tiles),),
                           shared_mem=defines["SMEM_BYTES"])


def _convert(dtype_name, src, splits, src_sh, src_ss, dst, heads, seqlen, dim, scale, sm_count):
    """dst (B, S, H, dim), any strides = scale · Σ_split src[split]; src float32, each split
    (B, H, S, ≥dim) with ``src_sh`` elements per head and ``src_ss`` per row."""
    rows = dst.size // dim if dim else 0
    if rows == 0:
        return
    split_stride = src.size // splits
    kernel = runtime.get_kernel(variants.AUX_SOURCE, variants.CONVERT_KERNEL, variants.aux_defines(dtype_name))
    blocks = min(math.ceil(rows / 8), sm_count * 16)  # 8 warps of 256 threads, one row each
    i32, i64 = numpy.int32, numpy.int64
    runtime.launch(kernel, (blocks, 1, 1), (256, 1, 1), (
        src, i64(split_stride), i64(src_sh), i64(src_ss), i32(splits), dst, *runtime.element_strides(dst),
        i32(heads), i32(seqlen), i32(dim), numpy.float32(scale), i64(rows)))
