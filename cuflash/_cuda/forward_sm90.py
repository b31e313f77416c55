"""The sm_90a forward: ``kernels/fwd_sm90.cu`` (TMA copies, a producer warpgroup, two consumer
warpgroups running wgmma), opt-in until it has been verified on hardware.

``forward.flash_forward`` offers every call here first. It runs only when the environment sets
``CUFLASH_SM90_FORWARD=1`` (a development switch, bench/NOTES.md), on compute capability 9.0, for
what the kernel serves; ``route`` says why a call goes to the ``mma.sync`` kernel instead:

- float32 and float64, max(D, Dv) > 128 (variants.FWD_SM90_TILES), Sk = 0 (a tensor map has no
  empty dimensions);
- q, k or v in a layout a tensor map cannot describe (``tensor_map.layout_reason``: base or a
  sequence/head/batch stride not 16-byte aligned, a head-dim stride other than 1). Those are
  routed, never copied: the fallback is the existing kernel with its own layout rules.

The output may have any strides (the kernel stores it with ordinary stores). Everything but the
pointers and the tensor maps is decided once per (problem, layouts, device) and kept in a plan;
the maps are cached per (pointer, shape, strides) by ``tensor_map``.
"""

import math
import os

import numpy

from . import params, runtime, tensor_map, variants

ENV_FLAG = "CUFLASH_SM90_FORWARD"
_MAX_GRID_X = 2**31 - 1


def enabled():
    """Whether the development switch is on."""
    return os.environ.get(ENV_FLAG, "") == "1"


def route(problem, q, k, v):
    """``(True, "")`` when the sm_90a forward computes this call, else ``(False, reason)``."""
    if not enabled():
        return False, f"{ENV_FLAG} is not 1"
    major, minor = runtime.compute_capability(q.device.id)
    if (major, minor) != (9, 0):
        return False, f"compute capability {major}.{minor} (the kernel is built for sm_90a)"
    fam = variants.family(major, minor)
    if fam != "sm90":
        return False, f"the {fam} family's kernels are chosen for this GPU"
    name = numpy.dtype(problem.dtype).name
    if variants.fwd_sm90_tile(name, problem.head_dim, problem.head_dim_v) is None:
        return False, f"{name} with D = {problem.head_dim}, Dv = {problem.head_dim_v} (16-bit, max(D, Dv) <= 128 only)"
    missing = variants.problem_features(problem) - variants.FWD_SM90_FEATURES
    if missing:
        return False, f"features {', '.join(sorted(missing))}"
    if problem.seqlen_k == 0:
        return False, "Sk = 0 (a tensor map has no empty dimensions)"
    for label, x in (("q", q), ("k", k), ("v", v)):
        reason = tensor_map.layout_reason(x)
        if reason:
            return False, f"{label}: {reason}"
    return True, ""


def flash_forward_sm90(q, k, v, slopes, out, lse, problem):
    """Compute ``out`` and ``lse`` as ``forward.flash_forward`` does, with the sm_90a kernel, if
    ``route`` allows; return whether it ran (False: nothing was launched)."""
    if not enabled():
        return False
    import cupy

    key = (problem, q.device.id, runtime.layout_key(q), runtime.layout_key(k), runtime.layout_key(v),
           runtime.layout_key(out), lse.strides)
    with cupy.cuda.Device(q.device.id):
        planned = _plans.get(key)
        if planned is None:
            if len(_plans) > _MAX_PLANS:
                _plans.clear()
            planned = _plans[key] = _plan(q, k, v, out, lse, problem)
        runs, launch = planned
        if launch is not None:
            if slopes is not None:
                slopes = cupy.ascontiguousarray(slopes)
            launch.launch(q, k, v, out, lse, slopes)
        return runs


_plans = {}
_MAX_PLANS = 4096


def _plan(q, k, v, out, lse, problem):
    """``(runs, launch)`` of ``problem`` over arrays of these layouts: runs False when ``route`` sends
    the call to the ``mma.sync`` kernel; launch None when there is nothing to compute."""
    ok, _ = route(problem, q, k, v)
    if not ok:
        return False, None
    B, Sq, Hq = problem.batch, problem.seqlen_q, problem.heads_q
    if B == 0 or Sq == 0 or Hq == 0:
        return True, None
    name = numpy.dtype(problem.dtype).name
    tile, bucket = variants.fwd_sm90_tile(name, problem.head_dim, problem.head_dim_v)
    defines = variants.fwd_sm90_defines(tile, bucket, name, variants.score_mods(problem))
    kernel = runtime.get_kernel(variants.FWD_SM90_SOURCE, variants.FWD_SM90_KERNEL, defines)
    num_m = math.ceil(Sq / tile.block_m)
    grid_x = B * Hq * num_m
    if grid_x > _MAX_GRID_X:
        raise ValueError(f"batch * heads_q * ceil(seqlen_q / {tile.block_m}) = {grid_x} exceeds the CUDA grid limit")
    record = params.forward_sm90(params.forward(problem, q, k, v, out, lse, None, num_m, runtime.vector_loadable(out)))
    template = _Template(record, (tile.block_m, tile.block_n, tile.block_n))
    return True, runtime.Launch(kernel, (grid_x, 1, 1), (tile.threads, 1, 1), defines["SMEM_BYTES"], template)


class _Template(params.Template):
    """A FWD_SM90 record whose pointers and q, k, v tensor maps are filled per call."""

    def __init__(self, record, box_rows):
        super().__init__(record, params.FWD_SM90_POINTERS)
        self._maps = tuple(zip(params.map_offsets(), box_rows))

    def __call__(self, q, k, v, out, lse, slopes):
        buf = self._bytes.copy()
        buf.view(numpy.uint64)[self._slots] = [params.pointer(x) for x in (q, k, v, out, lse, slopes)]
        for (offset, rows), x in zip(self._maps, (q, k, v)):
            buf[offset:offset + tensor_map.MAP_BYTES] = tensor_map.bshd(x, rows)
        return buf.view(self._dtype)[0]

