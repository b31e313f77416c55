"""The forward pass on the GPU: one launch of ``kernels/fwd_sm80.cu`` (16-bit, float32) or
``kernels/fwd_f64.cu`` (float64); the variant table picks the kernel and its tile.

Layouts: q, k, v and out may have any strides. When every row of q, k and v starts on a 16-byte
boundary with a unit stride along the head dim, tiles move by 16-byte ``cp.async``; otherwise a
second instantiation reads elements one by one with the given strides. No operand is ever copied.

Ragged batches (``params.Ragged``: packed sequences or padded lengths) run the SEQ_MODE 1
instantiation of the same kernel, which reads each sequence's place and lengths on the device
(``cuda_src/attn/seqlen.cuh``); the grid covers the longest sequence.
"""

import math

import numpy

from .._errors import BackendUnavailableError
from . import params, runtime, variants
from .forward_sm90 import flash_forward_sm90
from .runtime import vector_loadable

_MAX_GRID_X = 2**31 - 1
# Sequence indices are 32-bit inside the kernel (offsets are 64-bit).
MAX_SEQLEN = 2**31 - 1024


def supported(problem):
    """``(True, "")`` if the forward kernel computes ``problem``, else ``(False, reason)``."""
    name = numpy.dtype(problem.dtype).name
    if name not in variants.DTYPE_CODES:
        return False, f"the CUDA forward handles float16, bfloat16, float32 and float64, not {name}"
    return True, ""


def choose_tile(problem, vec_load=True, device_id=None, seq_mode=variants.SEQ_DENSE):
    """The table's tile, bucket and family for ``problem`` on the given (or current) device."""
    fam = variants.family(*runtime.compute_capability(device_id))
    tile, bucket = variants.fwd_tile(fam, numpy.dtype(problem.dtype).name, problem.head_dim, problem.head_dim_v,
                                     variants.score_mods(problem), vec_load, seq_mode)
    return tile, bucket, fam


def flash_forward(q, k, v, slopes, out, lse, problem, tile=None, ragged=None, seqlens=(None,) * 4):
    """Compute ``out`` (B, Sq, Hq, Dv) and ``lse`` (B, Hq, Sq, natural log; float32, float64 for
    float64 inputs) on the GPU.

    q (B, Sq, Hq, D), k (B, Sk, Hkv, D), v (B, Sk, Hkv, Dv) and out are CuPy arrays on one device
    with any strides, ``slopes`` the ALiBi slopes (float32 (Hq,) or (B, Hq)) or None; out and lse
    are preallocated and every element is written. Runs on CuPy's current stream. ``tile``
    overrides the table's choice (for tuning).

    A ragged batch gives ``ragged`` (``params.Ragged``) and ``seqlens``, its int32 device arrays
    (cu_seqlens_q, cu_seqlens_k, seqused_q, seqused_k; None where absent), already checked: packed
    operands come as one batch element, q (1, total_q, Hq, D), lse (1, Hq, total_q), and ``problem``
    is the batch's base problem (dtype, heads, options). Padded rows of a padded batch (past
    seqused_q) are filled here, out = 0 and lse = −inf, before the kernel writes the sequences.

    Everything but the data pointers is decided once per (problem, layouts, device) and kept in a
    plan, so a repeated call only fills in the pointers and launches.
    """
    import cupy

    # The sm_90a kernel, where its development switch is on and it serves the call (forward_sm90.route;
    # it has no ragged form).
    if tile is None and ragged is None and flash_forward_sm90(q, k, v, slopes, out, lse, problem):
        return
    family = variants.family(*runtime.compute_capability(q.device.id))
    key = (problem, tile, ragged, q.device.id, family, runtime.layout_key(q), runtime.layout_key(k),
           runtime.layout_key(v), runtime.layout_key(out), lse.strides)
    planned = _plans.get(key)
    with cupy.cuda.Device(q.device.id):
        if planned is None:
            if len(_plans) > _MAX_PLANS:
                _plans.clear()
            copies = runtime.vector_copies(q, k, v)
            q, k, v = runtime.with_copies((q, k, v), copies)
            planned = _plans[key] = (copies, _plan(q, k, v, out, lse, problem, tile, ragged))
        else:
            q, k, v = runtime.with_copies((q, k, v), planned[0])
        plan = planned[1]
        if ragged is not None and not ragged.packed and seqlens[2] is not None:
            out.fill(0)
            lse.fill(-numpy.inf)
        if plan is None:
            return
        if slopes is not None:
            slopes = cupy.ascontiguousarray(slopes)
        pointers = [params.pointer(x) for x in (q, k, v, out, lse, slopes)]
        if ragged is not None:
            pointers += [params.pointer(x) for x in seqlens]
        plan.launch(*pointers)


_plans = {}
_MAX_PLANS = 4096


def _plan(q, k, v, out, lse, problem, tile, ragged):
    """The launch of ``problem`` (or of the ``ragged`` batch) over arrays of these layouts, or None
    when there is nothing to compute."""
    import cupy

    ok, reason = supported(problem)
    if not ok:
        raise BackendUnavailableError(reason)
    variants.require(variants.FEATURES, problem, "the CUDA forward")
    B, Sq, Sk, Hq = problem.batch, problem.seqlen_q, problem.seqlen_k, problem.heads_q
    if ragged is not None:
        B, Sq, Sk = ragged.batch, ragged.max_seqlen_q, ragged.max_seqlen_k
    if B == 0 or Sq == 0 or Hq == 0:
        return None
    if max(Sq, Sk) > MAX_SEQLEN:
        raise ValueError(f"seqlen_q {Sq} / seqlen_k {Sk}: the CUDA forward takes sequences up to {MAX_SEQLEN}")
    with cupy.cuda.Device(q.device.id):
        name = numpy.dtype(problem.dtype).name
        vec_load = runtime.vector_rows(q, k, v)  # by shape: operands whose layout cannot were copied
        seq_mode = variants.SEQ_DENSE if ragged is None else variants.SEQ_RAGGED
        chosen, bucket, _ = choose_tile(problem, vec_load, q.device.id, seq_mode)
        tile = tile or chosen
        defines = variants.fwd_defines(tile, bucket, name, vec_load, variants.score_mods(problem), seq_mode)
        kernel = runtime.get_kernel(variants.fwd_source(tile), variants.FWD_KERNEL, defines)
        num_m = math.ceil(Sq / tile.block_m)
        grid_x = B * Hq * num_m
        if grid_x > _MAX_GRID_X:
            raise ValueError(f"batch * heads_q * ceil(seqlen_q / {tile.block_m}) = {grid_x} exceeds the CUDA grid limit")
        record = params.forward(problem, q, k, v, out, lse, None, num_m, vector_loadable(out), ragged)
        pointer_fields = params.FWD_POINTERS + (params.RAGGED_POINTERS if ragged is not None else ())
        return runtime.Launch(kernel, (grid_x, 1, 1), (tile.warps * 32, 1, 1), defines["SMEM_BYTES"],
                              params.Template(record, pointer_fields))
