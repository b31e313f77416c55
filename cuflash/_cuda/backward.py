"""The backward pass on the GPU: which kernels run, with which workspaces, in what order.

Up to four launches on CuPy's current stream (the kernels and their tiles come from the variant
table, ``variants.py``):

1. ``flash_bwd_preprocess``: D = rowsum(dO ∘ O) and L2 = LSE · log2 e per query row (float32;
   float64 for float64 inputs, as every workspace below; padded to a multiple of 128 rows; +inf where
   LSE = −inf so rows that see no key give P = 0).
2. ``flash_bwd_dkdv``: one CTA per key tile K_j, V_j of a key/value head, streaming the query tiles
   it needs (Q_i, dO_i) of the query heads that share it; dK and dV stay in registers. By default
   (``deterministic=False``) it also adds dQ = dS K_j into a workspace (float32; float64 for
   float64) with atomics.
3. ``flash_bwd_dq`` (``deterministic=True``, or where the atomic variant's shared memory does not
   fit): one CTA per query tile, looping over the key tiles it sees and accumulating dQ in
   registers, so dq is bitwise reproducible. It recomputes S and dP: 7 tile products instead of 5.
4. ``flash_bwd_convert``: the workspaces to the output dtype (the atomic dQ; and dK, dV when a
   GQA group is split over several CTAs to fill the GPU, their partial sums added in a fixed order).

Ragged batches (``params.Ragged``) run the SEQ_MODE 1 instantiations over a grid sized by the
longest sequence. Their per-row workspaces are laid out as ``cuda_src/attn/seqlen.cuh``'s
``ws_row0`` says: padded batches as dense ones; packed ones per head, each sequence owning its Sq_b
rows and _ROW_PAD more (so a streamed tile never reads another sequence's L2 or D, nor adds dQ
into its rows), (Hq, total_q + _ROW_PAD · B) instead of a (B, Hq, longest) block.
"""

import math

import numpy

from .._errors import BackendUnavailableError
from . import params, runtime, variants

_MAX_GRID_X = 2**31 - 1
# L2 and D rows are padded to this, so streamed tiles (which divide it) read them without bounds.
_ROW_PAD = 128


def choose_entry(problem, device_id=None, seq_mode=variants.SEQ_DENSE):
    """The table's entry and bucket for ``problem`` on the given (or current) device, and its family."""
    fam = variants.family(*runtime.compute_capability(device_id))
    entry, bucket = variants.bwd_entry(fam, numpy.dtype(problem.dtype).name, problem.head_dim, problem.head_dim_v,
                                       variants.score_mods(problem), seq_mode)
    return entry, bucket, fam


def _device_attribute(device_id, name):
    import cupy

    return cupy.cuda.Device(device_id).attributes[name]


def gqa_splits(problem, n_key_tiles, sm_count, batch=None):
    """How many CTAs share one key tile's GQA group: enough CTAs for two waves, at most one per head.
    ``batch``: the grid's batch where it is not the problem's (a ragged batch's sequences)."""
    group = problem.group_size
    base = (problem.batch if batch is None else batch) * problem.heads_kv * n_key_tiles
    if group <= 1 or base == 0:
        return 1, max(group, 1)
    want = min(group, max(1, math.ceil(2 * sm_count / base)))
    per_split = math.ceil(group / want)
    return math.ceil(group / per_split), per_split


def _check_grid(grid, what):
    if grid > _MAX_GRID_X:
        raise ValueError(f"{what} = {grid} exceeds the CUDA grid limit")


def flash_backward(dout, q, k, v, out, lse, slopes, dq, dk, dv, problem, deterministic, entry=None, ragged=None,
                   seqlens=(None,) * 4):
    """Write dq, dk, dv (shaped like q, k, v, input dtype, any strides) on the GPU.

    dout and out are (B, Sq, Hq, Dv), lse (B, Hq, Sq) from the forward (float32, float64 for float64;
    −inf on rows that see no key), ``slopes`` the ALiBi slopes or None; every element of dq, dk and dv is written.
    ``deterministic`` selects the dQ pass without atomics (bitwise-identical results across runs).
    Runs on CuPy's current stream. ``entry`` overrides the table's choice (for tuning).

    The kernels, tiles, grids and parameter structs are decided once per (problem, layouts,
    device, mode) and kept in a plan; a repeated call allocates the workspaces, fills in the
    pointers and launches.

    A ragged batch gives ``ragged`` and ``seqlens`` as ``forward.flash_forward`` does (packed
    operands as one batch element; lse (1, Hq, total_q)). Padded rows and keys of a padded batch
    get dq = 0 (past seqused_q) and dk = dv = 0 (past seqused_k), filled here.
    """
    import cupy

    family = variants.family(*runtime.compute_capability(q.device.id))
    arrays = (dout, q, k, v, out, dq, dk, dv)
    key = (problem, bool(deterministic), entry, ragged, q.device.id, family, lse.strides,
           *(runtime.layout_key(x) for x in arrays))
    plan = _plans.get(key)
    with cupy.cuda.Device(q.device.id):
        if plan is None:
            if len(_plans) > _MAX_PLANS:
                _plans.clear()
            copies = runtime.vector_copies(dout, q, k, v)
            dout, q, k, v = runtime.with_copies((dout, q, k, v), copies)
            plan = _plans[key] = _BackwardPlan(problem, deterministic, entry, copies, dout, q, k, v, out, dq, dk, dv,
                                               lse, ragged)
        else:
            dout, q, k, v = runtime.with_copies((dout, q, k, v), plan.copies)
        if ragged is not None and not ragged.packed:
            if seqlens[2] is not None:
                dq.fill(0)
            if seqlens[3] is not None:
                dk.fill(0)
                dv.fill(0)
        if plan.empty:
            return
        plan.run(dout, q, k, v, out, lse, None if slopes is None else cupy.ascontiguousarray(slopes), dq, dk, dv,
                 seqlens)


_plans = {}
_MAX_PLANS = 4096


class _BackwardPlan:
    """Every decision of one backward call that does not depend on the data pointers."""

    def __init__(self, problem, deterministic, entry, copies, dout, q, k, v, out, dq, dk, dv, lse, ragged):
        """``copies``: which of dout, q, k, v each call copies first (``runtime.vector_copies``);
        the arrays given here are those copies."""
        import cupy

        self.copies = copies

        name = numpy.dtype(problem.dtype).name
        if name not in variants.DTYPE_CODES:
            raise BackendUnavailableError(
                f"the CUDA backward handles float16, bfloat16, float32 and float64, not {name}")
        variants.require(variants.FEATURES, problem, "the CUDA backward")
        # The operands' frame (B, Sq, Sk; packed: 1, total_q, total_k) and the grid's batch and
        # lengths (a ragged batch's sequences and longest ones).
        B, Sq, Sk = problem.batch, problem.seqlen_q, problem.seqlen_k
        Hq, Hkv, D, Dv = problem.heads_q, problem.heads_kv, problem.head_dim, problem.head_dim_v
        GB, GSq, GSk = (B, Sq, Sk) if ragged is None else (ragged.batch, ragged.max_seqlen_q, ragged.max_seqlen_k)
        packed = ragged is not None and ragged.packed
        seq_mode = variants.SEQ_DENSE if ragged is None else variants.SEQ_RAGGED
        self.empty = GB == 0
        if self.empty:
            return
        self.name, self.problem, self.ragged = name, problem, ragged
        self.accum = params.accum_dtype_of(problem)
        mods = variants.score_mods(problem)
        with cupy.cuda.Device(q.device.id):
            chosen, bucket, fam = choose_entry(problem, q.device.id, seq_mode)
            entry = entry or chosen
            elem = numpy.dtype(problem.dtype).itemsize
            self.sm_count = _device_attribute(q.device.id, "MultiProcessorCount")
            vec_in = runtime.vector_rows(q, k, v, dout)  # by shape: operands whose layout cannot were copied
            fwd = params.forward(problem, q, k, v, out, lse, None, 0, False, ragged)
            # Rows of l2, dsum and dq_accum per (b, h), or packed, per head (kernels' ws_row0).
            self.sq_pad = sq_pad = Sq + _ROW_PAD * GB if packed else math.ceil(Sq / _ROW_PAD) * _ROW_PAD
            if packed and sq_pad > 2**31 - 1:
                raise ValueError(f"total_q + {_ROW_PAD} * batch = {sq_pad} exceeds the workspace's 32-bit row index")
            self.bucket = bucket

            # The atomic variant stages dS^T twice more; where that exceeds the device's shared
            # memory, the dQ kernel does the work instead (same results, bitwise reproducible).
            self.dq_atomic = dq_atomic = not deterministic and (
                entry.dkdv.smem_bytes(bucket, elem, True, dq_atomic=True) <= _device_attribute(
                    q.device.id, "MaxSharedMemoryPerBlockOptin"))
            tile = (entry.dkdv if dq_atomic or entry is not chosen
                    else variants.dkdv_tile(fam, name, bucket, mods, False, seq_mode))
            n_key_tiles = math.ceil(GSk / tile.block_n)
            splits, per_split = gqa_splits(problem, n_key_tiles, self.sm_count, GB)
            self.splits = splits
            if splits > 1:
                # Partial sums of each split (accumulator type), (splits, B, Hkv, Sk, D), added in a fixed order.
                self.partial_shapes = ((splits, B, Hkv, Sk, D), (splits, B, Hkv, Sk, Dv))
                dk_strides, dv_strides = (Hkv * Sk * D, D, Sk * D, 1), (Hkv * Sk * Dv, Dv, Sk * Dv, 1)
                dk_split, dv_split = B * Hkv * Sk * D, B * Hkv * Sk * Dv
            else:
                dk_strides, dv_strides = params.strides(dk), params.strides(dv)
                dk_split = dv_split = 0
            if packed:
                dk_strides, dv_strides = (0, *dk_strides[1:]), (0, *dv_strides[1:])
            pointer_fields = params.BWD_POINTERS + (
                tuple(f"fwd.{name}" for name in params.RAGGED_POINTERS) if ragged is not None else ())

            def template(n_tiles):
                record = params.backward(fwd, dout, None, None, None, dq, dk, dv, dk_strides, dv_strides, dk_split,
                                         dv_split, sq_pad, per_split, splits, n_tiles, vec_in, splits > 1, packed)
                return params.Template(record, pointer_fields)

            # 1. D and L2 per query row.
            rows = B * Hq * sq_pad
            self.preprocess = None
            if rows:
                kernel = runtime.get_kernel(variants.AUX_SOURCE, variants.PREPROCESS_KERNEL, variants.aux_defines(name))
                self.preprocess = runtime.Launch(kernel, (math.ceil(rows / 8), 1, 1), (256, 1, 1), 0, template(0))

            # 2. dK, dV (and the atomic dQ).
            grid = GB * Hkv * splits * n_key_tiles
            _check_grid(grid, f"batch * heads_kv * ceil(seqlen_k / {tile.block_n})")
            self.dkdv = None
            if grid:
                defines = variants.dkdv_defines(tile, bucket, name, dq_atomic, mods, seq_mode)
                kernel = runtime.get_kernel(variants.dkdv_source(tile), variants.DKDV_KERNEL, defines)
                self.dkdv = runtime.Launch(kernel, (grid, 1, 1), (tile.warps * 32, 1, 1), defines["SMEM_BYTES"],
                                           template(n_key_tiles))

            # 3. dQ (the deterministic kernel; the atomic path converts its workspace instead).
            self.dq = None
            if not dq_atomic:
                tile = entry.dq
                n_q_tiles = math.ceil(GSq / tile.block_m)
                grid = GB * Hq * n_q_tiles
                _check_grid(grid, f"batch * heads_q * ceil(seqlen_q / {tile.block_m})")
                if grid:
                    defines = variants.dq_defines(tile, bucket, name, mods, seq_mode)
                    kernel = runtime.get_kernel(variants.dq_source(tile), variants.DQ_KERNEL, defines)
                    self.dq = runtime.Launch(kernel, (grid, 1, 1), (tile.warps * 32, 1, 1), defines["SMEM_BYTES"],
                                             template(n_q_tiles))

    def run(self, dout, q, k, v, out, lse, slopes, dq, dk, dv, seqlens):
        import cupy

        p = self.problem
        B, Hq, Hkv, Sq, Sk, D, Dv = p.batch, p.heads_q, p.heads_kv, p.seqlen_q, p.seqlen_k, p.head_dim, p.head_dim_v
        l2 = cupy.empty((B, Hq, self.sq_pad), dtype=self.accum)
        dsum = cupy.empty((B, Hq, self.sq_pad), dtype=self.accum)
        # Padded to whole tiles and the bucket's columns, so the kernel adds whole vectors unchecked.
        dq_accum = cupy.zeros((B, Hq, self.sq_pad, self.bucket), dtype=self.accum) if self.dq_atomic else None
        dk_out, dv_out = dk, dv
        if self.splits > 1:
            # A ragged batch's CTAs write only its sequences' keys: the padding's partial sums stay 0.
            alloc = cupy.empty if self.ragged is None else cupy.zeros
            dk_out, dv_out = (alloc(shape, dtype=self.accum) for shape in self.partial_shapes)
        pointers = [params.pointer(x) for x in (q, k, v, out, lse, slopes, dout, l2, dsum, dq_accum, dq, dk_out, dv_out)]
        if self.ragged is not None:
            pointers += [params.pointer(x) for x in seqlens]
        for launch in (self.preprocess, self.dkdv, self.dq):
            if launch is not None:
                launch.launch(*pointers)
        if self.splits > 1:
            _convert(self.name, dk_out, self.splits, Sk * D, D, dk, Hkv, Sk, D, 1.0, self.sm_count)
            _convert(self.name, dv_out, self.splits, Sk * Dv, Dv, dv, Hkv, Sk, Dv, 1.0, self.sm_count)
        if self.dq_atomic:
            packed = self.ragged is not None and self.ragged.packed
            _convert(self.name, dq_accum, 1, self.sq_pad * self.bucket, self.bucket, dq, Hq, Sq, D, p.scale,
                     self.sm_count, l2, seqlens[0] if packed else None)


def _convert(dtype_name, src, splits, src_sh, src_ss, dst, heads, seqlen, dim, scale, sm_count, l2=None,
             cu_seqlens=None):
    """dst (B, S, H, dim), any strides = scale · Σ_split src[split]; src in the accumulator type
    (float32, float64 for float64), each split (B, H, S, ≥dim) with ``src_sh`` elements per head and
    ``src_ss`` per row. With ``l2`` (B, H, S_pad), rows whose L2 is +inf (no visible key) get 0.
    With ``cu_seqlens`` (packed queries, dst (1, total_q, H, dim)), the workspace rows of sequence b
    start _ROW_PAD · b further on (the kernels' ws_row0)."""
    rows = dst.size // dim if dim else 0
    if rows == 0:
        return
    split_stride = src.size // splits
    kernel = runtime.get_kernel(variants.AUX_SOURCE, variants.CONVERT_KERNEL, variants.aux_defines(dtype_name))
    blocks = min(math.ceil(rows / 8), sm_count * 16)  # 8 warps of 256 threads, one row each
    i32, i64 = numpy.int32, numpy.int64
    runtime.launch(kernel, (blocks, 1, 1), (256, 1, 1), (
        src, i64(split_stride), i64(src_sh), i64(src_ss), i32(splits), dst, *runtime.element_strides(dst),
        i32(heads), i32(seqlen), i32(dim), src.dtype.type(scale), i64(rows),
        numpy.uint64(0) if l2 is None else l2, i64(0 if l2 is None else l2.shape[-1]),  # a null pointer: no rows zeroed
        numpy.uint64(0) if cu_seqlens is None else cu_seqlens, i32(0 if cu_seqlens is None else cu_seqlens.size - 1)))
