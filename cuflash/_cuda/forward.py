"""Launcher of the forward kernel ``cuda_src/flash_fwd.cu``.

One table, ``CONFIGS``, holds every tile configuration: per architecture family ("sm90" for
compute capability 9.x, "sm80" for the rest of 8.0 and newer) and per kind of element (16-bit
tensor-core path, or the float32 path on 3xTF32), one entry per head-dim bucket. The entry becomes
``#define`` lines that ``flash_fwd.cu`` checks with ``static_assert``s, so the launcher and the
kernel agree by construction.

Layouts: q, k, v and out may have any strides. When every row of q, k and v starts on a 16-byte
boundary with a unit stride along the head dim, tiles move by 16-byte ``cp.async``; otherwise a
second instantiation reads elements one by one with the given strides. No operand is ever copied.
"""

import math
from dataclasses import dataclass, replace

import numpy

from .._errors import BackendUnavailableError
from . import runtime
from .runtime import element_strides, vector_loadable

SOURCE = "flash_fwd.cu"
KERNEL = "flash_fwd"

HEAD_DIM_BUCKETS = (32, 64, 96, 128, 160, 192, 224, 256)
_DTYPE_CODES = {"float16": 1, "bfloat16": 2, "float32": 3}
_LOG2E = 1.4426950408889634
_MAX_GRID_X = 2**31 - 1
_MAX_SEQLEN = 2**31 - 1024


@dataclass(frozen=True)
class Config:
    """One tile configuration: Br (block_m) rows of Q per CTA, Bc (block_n) keys per K/V tile."""

    block_m: int
    block_n: int
    warps: int
    stages: int
    min_blocks: int = 1  # CTAs per SM promised to the register allocator
    max_regs: int = 0    # if > 0: register cap per thread, instead of min_blocks
    split_q: bool = False  # float32 only: Q_i split once into big/small planes in shared memory

    def element_wise(self):
        """The configuration for the element-wise loading path: its stride arithmetic needs
        registers that a Bc of 128 leaves no room for."""
        return replace(self, block_n=min(self.block_n, 64))

    def smem_bytes(self, head_dim, elem_bytes):
        """Dynamic shared memory of the kernel (``kSmemBytes`` in flash_fwd.cu). 16-bit: Q_i plus
        ``stages`` K_j and V_j tiles, rows padded by 16 bytes. float32: Q_i (as loaded, or its big
        and small planes of 8 bytes an element), the planes of one K_j and V_j tile, and one raw K_j
        and V_j tile in flight; with split_q, Q_i is loaded into the space after its planes first."""
        row_bytes = head_dim * elem_bytes + 16
        if elem_bytes == 2:
            return (self.block_m + 2 * self.stages * self.block_n) * row_bytes
        q_loaded = self.block_m * row_bytes
        kv = 2 * self.block_n * head_dim * 8 + 2 * self.block_n * row_bytes
        if self.split_q:
            return self.block_m * head_dim * 8 + max(q_loaded, kv)
        return q_loaded + kv


# (family, "16bit" | "float32") -> {head-dim bucket: Config}. sm80-family entries stay within the
# 99 KiB a CTA may have on sm_86/sm_89; sm90 entries within 227 KiB. Four warps of 32 rows each
# (two m16 fragments per warp) halve the shared-memory reads of K_j/V_j per product compared with
# 16 rows per warp, and fit two CTAs per SM; bench/NOTES.md records the measurements behind each.
CONFIGS = {
    ("sm90", "16bit"): {
        32: Config(128, 128, 4, 2),
        64: Config(128, 128, 4, 2),
        96: Config(128, 64, 4, 2),
        128: Config(128, 64, 4, 2),
        160: Config(64, 32, 4, 2),
        192: Config(64, 32, 4, 2),
        224: Config(64, 32, 4, 2),
        256: Config(64, 32, 4, 2),
    },
    ("sm80", "16bit"): {
        32: Config(128, 64, 4, 2),
        64: Config(128, 64, 4, 2),
        96: Config(128, 64, 4, 2),
        128: Config(128, 32, 4, 2),
        160: Config(64, 32, 4, 2),
        192: Config(64, 32, 4, 2),
        224: Config(64, 16, 4, 2),
        256: Config(64, 16, 4, 2),
    },
    # float32 has no 224 bucket: its 224-wide tiles spill at every register cap tried, so
    # 193..256 run in the 256 bucket. Each K_j/V_j tile is split once into shared planes of twice
    # its size (see Config.smem_bytes), which bounds the tiles; Q_i is split once too (split_q)
    # where its planes fit beside them. Register caps are the ones that compile without spills.
    ("sm90", "float32"): {
        32: Config(128, 64, 8, 2, min_blocks=2),
        64: Config(128, 32, 8, 2),
        96: Config(128, 32, 8, 2, split_q=True),
        128: Config(128, 32, 8, 2, split_q=True),
        160: Config(128, 32, 8, 2, max_regs=160),
        192: Config(128, 16, 8, 2),
        256: Config(128, 16, 8, 2, max_regs=188),
    },
    ("sm80", "float32"): {
        32: Config(64, 64, 4, 2),
        64: Config(64, 32, 4, 2),
        96: Config(64, 32, 4, 2),
        128: Config(64, 16, 4, 2),
        160: Config(64, 8, 4, 2),
        192: Config(64, 8, 4, 2, max_regs=244),
        256: Config(32, 8, 2, 2, max_regs=184),
    },
}

_SM80_SMEM_LIMIT = 99 * 1024
_SM90_SMEM_LIMIT = 227 * 1024


def head_dim_bucket(head_dim, head_dim_v, buckets=HEAD_DIM_BUCKETS):
    """The compiled head dim used for D and Dv (both zero-padded to it)."""
    d = max(head_dim, head_dim_v)
    for bucket in sorted(buckets):
        if d <= bucket:
            return bucket
    raise ValueError(f"head_dim {head_dim} / head_dim_v {head_dim_v} exceed the largest bucket {max(buckets)}")


def family(major, minor):
    return "sm90" if major == 9 else "sm80"


def defines(config, bucket, dtype_name, vec_load):
    """The ``#define`` block of one instantiation."""
    block = {
        "HEAD_DIM": bucket,
        "BLOCK_M": config.block_m,
        "BLOCK_N": config.block_n,
        "NUM_WARPS": config.warps,
        "STAGES": config.stages,
        "MIN_BLOCKS": config.min_blocks,
        "MAX_REGS": config.max_regs,
        "DTYPE": _DTYPE_CODES[dtype_name],
        "VEC_LOAD": int(vec_load),
    }
    if dtype_name == "float32":
        block["SPLIT_Q"] = int(config.split_q)
    return block


def instantiations(family=None):
    """Every ``(kernel name, defines)`` the launcher can choose (on ``family`` only, if given), for the
    compile gate. An entry of the "sm90" family runs only on compute capability 9.x."""
    seen = []
    for (fam, kind), table in CONFIGS.items():
        if family is not None and fam != family:
            continue
        names = ("float16", "bfloat16") if kind == "16bit" else ("float32",)
        for bucket, config in table.items():
            for name in names:
                for vec in (1, 0):
                    entry = (KERNEL, defines(config if vec else config.element_wise(), bucket, name, vec))
                    if entry not in seen:
                        seen.append(entry)
    return seen


# The architectures the compile gate builds each family for: sm_80 stands for the whole sm_8x
# family (and newer GPUs that are not Hopper), sm_90a for Hopper.
FAMILY_ARCHS = {"sm80": ("sm_80",), "sm90": ("sm_90a",)}


def supported(problem):
    """``(True, "")`` if this kernel computes ``problem``, else ``(False, reason)``."""
    name = numpy.dtype(problem.dtype).name
    if name not in _DTYPE_CODES:
        return False, f"the CUDA forward handles float16, bfloat16 and float32, not {name}"
    return True, ""


def flash_forward(q, k, v, out, lse, problem):
    """Compute ``out`` (B, Sq, Hq, Dv) and ``lse`` (B, Hq, Sq, float32, natural log) on the GPU.

    q (B, Sq, Hq, D), k (B, Sk, Hkv, D), v (B, Sk, Hkv, Dv) and out are CuPy arrays on one device
    with any strides; out and lse are preallocated and every element is written. No operand is
    copied: layouts whose rows are not 16-byte aligned with a unit last stride take a slower
    instantiation that loads elements one by one. Runs on CuPy's current stream.
    """
    _launch(q, k, v, out, lse, problem, None)


def choose_config(problem, device_id=None):
    """The table entry, bucket and family for ``problem`` on the given (or current) device."""
    major, minor = runtime.compute_capability(device_id)
    fam = family(major, minor)
    kind = "float32" if numpy.dtype(problem.dtype).name == "float32" else "16bit"
    table = CONFIGS[(fam, kind)]
    bucket = head_dim_bucket(problem.head_dim, problem.head_dim_v, table)
    return table[bucket], bucket, fam


def _launch(q, k, v, out, lse, problem, config):
    """``flash_forward`` with an optional explicit ``Config`` (for tuning)."""
    import cupy

    ok, reason = supported(problem)
    if not ok:
        raise BackendUnavailableError(reason)
    B, Sq, Sk = problem.batch, problem.seqlen_q, problem.seqlen_k
    Hq, Hkv = problem.heads_q, problem.heads_kv
    if B == 0 or Sq == 0 or Hq == 0:
        return
    with cupy.cuda.Device(q.device.id):
        chosen, bucket, _fam = choose_config(problem, q.device.id)
        name = numpy.dtype(problem.dtype).name
        vec_load = vector_loadable(q) and vector_loadable(k) and vector_loadable(v)
        config = config or (chosen if vec_load else chosen.element_wise())
        kernel = runtime.get_kernel(SOURCE, KERNEL, defines(config, bucket, name, vec_load))
        # Sequence indices are 32-bit inside the kernel (offsets are 64-bit).
        if max(Sq, Sk) > _MAX_SEQLEN:
            raise ValueError(f"seqlen_q {Sq} / seqlen_k {Sk}: the CUDA forward takes sequences up to {_MAX_SEQLEN}")
        num_m = math.ceil(Sq / config.block_m)
        grid_x = B * Hq * num_m
        if grid_x > _MAX_GRID_X:
            raise ValueError(f"batch * heads_q * ceil(seqlen_q / {config.block_m}) = {grid_x} exceeds the CUDA grid limit")
        i32 = numpy.int32
        args = (
            q, k, v, out, lse,
            *element_strides(q), *element_strides(k), *element_strides(v), *element_strides(out),
            *element_strides(lse),
            i32(Hq), i32(Hq // Hkv), i32(Sq), i32(Sk), i32(problem.head_dim), i32(problem.head_dim_v),
            i32(bool(problem.causal)), numpy.int64(problem.causal_offset if problem.causal else 0),
            numpy.float32(problem.scale * _LOG2E), i32(num_m), i32(vector_loadable(out)),
        )
        elem_bytes = numpy.dtype(problem.dtype).itemsize
        runtime.launch(kernel, (grid_x, 1, 1), (config.warps * 32, 1, 1), args,
                       shared_mem=config.smem_bytes(bucket, elem_bytes))
