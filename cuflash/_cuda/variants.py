"""The one variant table: every CUDA kernel, what it serves, and its tiles per architecture family.

A *variant* is a kernel source compiled with a block of ``#define`` lines. This module decides
all of them: the launchers (``forward.py``, ``backward.py``) ask it which tile to use and which
defines to compile, the compile gate (``tests/test_compile_gate.py``) builds everything it lists,
and the benchmarks read the same entries. The kernels check the defines with ``static_assert``s
(shared memory included), so a table entry and its kernel agree by construction.

Tile fields have one naming everywhere: ``block_m`` queries and ``block_n`` keys per tile; which
of the two a CTA owns and which it streams is the kernel's role (stated per kernel below).

Architecture families: "sm90" for compute capability 9.x (built for sm_90a), "sm75" for Turing,
7.5 (built for sm_75: float16 only, ``FAMILY_DTYPES``), "sm80" for every other GPU from 8.0 on
(built for sm_80). A family's variants carry its ``family_defines`` (the sm75 family's select the
sm_75 code of ``core/ptx.cuh``), added by ``runtime.get_kernel`` from the device's family, so a
family forced onto another GPU runs that family's code. bench/NOTES.md records the measurements
behind each entry.

Element kinds: "16bit" (float16, bfloat16), "float32" and "float64". float64 has kernels of its own
(``kernels/fwd_f64.cu``, ``bwd_dkdv_f64.cu``, ``bwd_dq_f64.cu``: FP64 tensor cores, float64
accumulation) with tiles of their own types (``F64FwdTile``, ``F64RowsTile``), in the same tables.
"""

import math
from dataclasses import dataclass, replace

import numpy

from .._errors import BackendUnavailableError

HEAD_DIM_BUCKETS = (32, 64, 96, 128, 160, 192, 224, 256)
DTYPE_CODES = {"float16": 1, "bfloat16": 2, "float32": 3, "float64": 4}
# The architectures the compile gate builds each family for.
FAMILY_ARCHS = {"sm75": ("sm_75",), "sm80": ("sm_80",), "sm90": ("sm_90a",)}
# Dynamic shared memory a CTA may have, and threads an SM holds (the smallest of the family's GPUs:
# sm_86/sm_89 for sm80), which bounds warps x min_blocks of a tile.
SMEM_LIMITS = {"sm75": 64 * 1024, "sm80": 99 * 1024, "sm90": 227 * 1024}
SM_THREADS = {"sm75": 1024, "sm80": 1536, "sm90": 2048}

# Families whose kernels take only some dtypes. A dtype or head dim a family has no kernel for is
# routed as every configuration no kernel serves: backend="auto" runs it on the NumPy backend,
# backend="cuda" refuses it, saying why (``unserved``). Turing has f16 tensor cores only: the
# bfloat16 products, the float32 kernels' tf32 products and the float64 kernels' FP64 tensor cores
# all need sm_80, and computing bfloat16 as float16 would change its range.
FAMILY_DTYPES = {"sm75": ("float16",)}
FAMILY_NAMES = {"sm75": "compute capability 7.5 (Turing)", "sm80": "compute capability 8.0 and newer (Hopper aside)",
                "sm90": "compute capability 9.0 (Hopper)"}
_NO_KERNEL_WHY = {
    ("sm75", "bfloat16"): "Turing has no bfloat16 tensor-core products",
    ("sm75", "float32"): "the float32 kernels multiply on tf32 tensor cores, which need compute capability 8.0",
    ("sm75", "float64"): "the float64 kernels multiply on FP64 tensor cores, which need compute capability 8.0",
}

# What every kernel below serves. A kernel that serves less states its own set, and the launchers
# refuse a problem that asks for more (so a future kernel cannot silently drop a feature).
FEATURES = frozenset({"causal", "window", "softcap", "alibi", "gqa", "strided", "dv_ne_d"})

# Score modifiers, as the SCORE_MODS bits of attn/score_mod.cuh.
SCORE_MOD_BITS = {"softcap": 1, "alibi": 2}


def family(major, minor):
    if major == 9:
        return "sm90"
    return "sm75" if major == 7 and minor >= 5 else "sm80"


def family_dtypes(fam):
    """The dtypes a family's kernels take."""
    return FAMILY_DTYPES.get(fam, tuple(DTYPE_CODES))


def unserved_dtype(fam, dtype_name):
    """Why family ``fam`` has no kernel for ``dtype_name`` (naming the dtype and the compute
    capability), or None when it has."""
    if dtype_name in family_dtypes(fam) or dtype_name not in DTYPE_CODES:
        return None
    return (f"on {FAMILY_NAMES[fam]} the GPU kernels take {' and '.join(family_dtypes(fam))} only, not "
            f"{dtype_name}: {_NO_KERNEL_WHY[(fam, dtype_name)]}")


def unserved(fam, dtype_name, head_dim, head_dim_v, backward=False):
    """Why no kernel of family ``fam`` computes the forward (or the ``backward``) of a problem of
    this dtype and these head dims, or None when one does. A head dim past a family's backward
    table (BWD_TILES) has no backward there."""
    reason = unserved_dtype(fam, dtype_name)
    if reason is not None or not backward or dtype_name not in DTYPE_CODES:
        return reason
    largest = max(BWD_TILES[(fam, kind(dtype_name))])
    d = max(head_dim, head_dim_v)
    if d > largest:
        return (f"on {FAMILY_NAMES[fam]} the backward kernels take head dims up to {largest}, not {d} (no dK/dV "
                f"tile of that width fits the shared memory without spilling registers)")
    return None


def require_dtype(fam, dtype_name):
    """Raise BackendUnavailableError when family ``fam`` has no kernel for ``dtype_name``."""
    reason = unserved_dtype(fam, dtype_name)
    if reason is not None:
        raise BackendUnavailableError(reason)


def family_defines(fam):
    """The defines every variant of family ``fam`` carries besides its own: TURING selects the
    sm_75 code of core/ptx.cuh (runtime.get_kernel adds these from the device's family)."""
    return {"TURING": 1} if fam == "sm75" else {}


def kind(dtype_name):
    """The element kind a tile table is chosen by: "16bit" (float16, bfloat16), "float32" or "float64"."""
    return dtype_name if dtype_name in ("float32", "float64") else "16bit"


def dtypes_of(kind_name):
    return ("float16", "bfloat16") if kind_name == "16bit" else (kind_name,)


def head_dim_bucket(head_dim, head_dim_v, buckets=HEAD_DIM_BUCKETS):
    """The compiled head dim used for D and Dv (both zero-padded to it)."""
    d = max(head_dim, head_dim_v)
    for bucket in sorted(buckets):
        if d <= bucket:
            return bucket
    raise ValueError(f"head_dim {head_dim} / head_dim_v {head_dim_v} exceed the largest bucket {max(buckets)}")


def problem_features(problem):
    """The features of FEATURES a problem uses."""
    used = set()
    if problem.window_right == 0 and problem.causal:
        used.add("causal")
    if not problem.mask.is_full and not (problem.causal and problem.window_left is None):
        used.add("window")
    used.update(problem.score_mods)
    if problem.heads_q != problem.heads_kv:
        used.add("gqa")
    if problem.head_dim != problem.head_dim_v:
        used.add("dv_ne_d")
    return used


def score_mods(problem):
    """The SCORE_MODS define of a problem: the one place score modifiers become compile-time flags."""
    return sum(SCORE_MOD_BITS[name] for name in problem.score_mods)


def require(features, problem, what):
    """Raise BackendUnavailableError when ``problem`` uses a feature the kernel does not serve."""
    missing = problem_features(problem) - features
    if missing:
        raise BackendUnavailableError(f"{what} does not serve {', '.join(sorted(missing))}")


# SEQ_MODE of the attention kernels (cuda_src/attn/seqlen.cuh): dense batches, or ragged ones whose
# sequences' places and lengths the kernel reads from device arrays (packed cu_seqlens, padded
# seqused). Every forward, dK/dV and dQ variant exists in both; the aux kernels serve both as one.
SEQ_DENSE, SEQ_RAGGED = 0, 1
SEQ_MODES = (SEQ_DENSE, SEQ_RAGGED)


# ---------------------------------------------------------------------------------------------
# Forward: kernels/fwd_sm80.cu (mma.sync; every family). A CTA owns block_m queries Q_i and streams
# key tiles of block_n.
# ---------------------------------------------------------------------------------------------

FWD_SOURCE = "kernels/fwd_sm80.cu"
FWD_F64_SOURCE = "kernels/fwd_f64.cu"
FWD_KERNEL = "flash_fwd"


@dataclass(frozen=True)
class FwdTile:
    block_m: int
    block_n: int
    warps: int
    stages: int
    min_blocks: int = 1  # CTAs per SM promised to the register allocator
    max_regs: int = 0    # if > 0: register cap per thread, instead of min_blocks
    split_q: bool = False  # float32 only: Q_i split once into big/small planes in shared memory
    # float32 only: O_i moved out every 1024 keys and l_i compensated, so the error stays at naive
    # float32's over long Sk (fwd_sm80.cu, kFlushKeys). A property of the table entry (the spill
    # tiles of a bucket inherit it); off only where no tile has the registers.
    split_sums: bool = True

    def element_wise(self):
        """The tile of the element-wise loading path: its stride arithmetic needs registers that a
        block_n of 128 leaves no room for."""
        return replace(self, block_n=min(self.block_n, 64))

    def smem_bytes(self, bucket, elem_bytes):
        """Dynamic shared memory of the kernel (``kSmemBytes`` in fwd_sm80.cu). 16-bit: Q_i plus
        ``stages`` K_j and V_j tiles, rows padded by 16 bytes. float32: Q_i (as loaded, or its big
        and small planes of 8 bytes an element), the planes of one K_j and V_j tile, and one raw K_j
        and V_j tile in flight; with split_q, Q_i is loaded into the space after its planes first."""
        row_bytes = bucket * elem_bytes + 16
        if elem_bytes == 2:
            return (self.block_m + 2 * self.stages * self.block_n) * row_bytes
        q_loaded = self.block_m * row_bytes
        kv = 2 * self.block_n * bucket * 8 + 2 * self.block_n * row_bytes
        if self.split_q:
            return self.block_m * bucket * 8 + max(q_loaded, kv)
        return q_loaded + kv


@dataclass(frozen=True)
class F64FwdTile:
    """``fwd_f64.cu``: ``warps`` = (block_m / rows per warp) row groups x ``split_d``; the ``split_d``
    warps of a row group each accumulate bucket / split_d columns of O_i (and each computes the
    group's S); K_j/V_j tiles double buffered."""

    block_m: int
    block_n: int
    warps: int
    split_d: int = 1
    min_blocks: int = 1
    max_regs: int = 0

    def element_wise(self):
        """The element-wise loading path keeps the tile (float64 tiles are narrow already)."""
        return self

    def smem_bytes(self, bucket, elem_bytes=8):
        """Q_i and two K_j and V_j tiles of 8-byte elements, rows padded by 16 bytes. The elements
        are doubles whatever ``elem_bytes`` says (the argument keeps the tables' common interface)."""
        return (self.block_m + 4 * self.block_n) * (bucket * 8 + 16)


_F = FwdTile
# sm80-family entries stay within the 99 KiB a CTA may have on sm_86/sm_89; sm90 entries within
# 227 KiB. Four warps of 32 rows each (two m16 fragments per warp) halve the shared-memory reads
# of K_j/V_j per product compared with 16 rows per warp, and fit two CTAs per SM.
# float32 has no 224 bucket: its 224-wide tiles spill at every register cap tried, so 193..256 run
# in the 256 bucket. Each K_j/V_j tile is split once into shared planes of twice its size, which
# bounds the tiles; Q_i is split once too (split_q) where its planes fit beside them. Register
# caps are the ones that compile without spills.
FWD_TILES = {
    ("sm90", "16bit"): {32: _F(128, 128, 4, 2), 64: _F(128, 128, 4, 2), 96: _F(128, 64, 4, 2),
                        128: _F(128, 64, 4, 2), 160: _F(64, 32, 4, 2), 192: _F(64, 32, 4, 2),
                        224: _F(64, 32, 4, 2), 256: _F(64, 32, 4, 2)},
    ("sm80", "16bit"): {32: _F(128, 64, 4, 2), 64: _F(128, 64, 4, 2), 96: _F(128, 64, 4, 2),
                        128: _F(128, 32, 4, 2), 160: _F(64, 32, 4, 2), 192: _F(64, 32, 4, 2),
                        224: _F(64, 16, 4, 2), 256: _F(64, 16, 4, 2)},
    # The sm80 family's tiles with block_n halved until Q_i and two K_j/V_j stages fit Turing's 64 KiB
    # (then block_m, at d = 256). Not tuned on a Turing GPU.
    ("sm75", "16bit"): {32: _F(128, 64, 4, 2), 64: _F(128, 64, 4, 2), 96: _F(128, 32, 4, 2),
                        128: _F(128, 16, 4, 2), 160: _F(64, 32, 4, 2), 192: _F(64, 16, 4, 2),
                        224: _F(64, 16, 4, 2), 256: _F(32, 16, 2, 2)},
    ("sm90", "float32"): {32: _F(128, 64, 8, 2, min_blocks=2), 64: _F(128, 32, 8, 2),
                          96: _F(128, 32, 8, 2, split_q=True), 128: _F(128, 32, 8, 2, split_q=True),
                          160: _F(128, 32, 8, 2, max_regs=160), 192: _F(128, 16, 8, 2),
                          256: _F(128, 16, 8, 2, max_regs=188)},
    ("sm80", "float32"): {32: _F(64, 64, 4, 2), 64: _F(64, 32, 4, 2), 96: _F(64, 32, 4, 2),
                          128: _F(64, 16, 4, 2), 160: _F(64, 8, 4, 2, split_sums=False),
                          192: _F(64, 8, 4, 2, max_regs=244, split_sums=False),
                          256: _F(32, 8, 2, 2, max_regs=184, split_sums=False)},
}


# Tiles of the variants that spill registers with the table's tile: a score modifier or the
# element-wise loading path keeps more values live. Key: (family, kind, bucket, SCORE_MODS, vec).
# bench/tune_tiles.py finds them (the first spill-free alternative in a fixed order of candidates).
FWD_SPILL_TILES = {
    ('sm90', '16bit', 64, 3, True): _F(block_m=128, block_n=64, warps=4, stages=2, min_blocks=1, max_regs=0, split_q=False),
    ('sm90', '16bit', 96, 0, False): _F(block_m=128, block_n=32, warps=4, stages=2, min_blocks=1, max_regs=0, split_q=False),
    ('sm90', 'float32', 32, 0, False): _F(block_m=128, block_n=64, warps=8, stages=2, min_blocks=1, max_regs=0, split_q=False),
    ('sm90', 'float32', 32, 1, False): _F(block_m=128, block_n=64, warps=8, stages=2, min_blocks=1, max_regs=0, split_q=False),
    ('sm90', 'float32', 32, 2, True): _F(block_m=128, block_n=64, warps=8, stages=2, min_blocks=1, max_regs=0, split_q=False),
    ('sm90', 'float32', 32, 3, True): _F(block_m=128, block_n=64, warps=8, stages=2, min_blocks=1, max_regs=0, split_q=False),
    ('sm90', 'float32', 160, 2, True): _F(block_m=128, block_n=32, warps=8, stages=2, min_blocks=1, max_regs=255, split_q=False),
    ('sm90', 'float32', 160, 2, False): _F(block_m=128, block_n=16, warps=8, stages=2, min_blocks=1, max_regs=160, split_q=False),
    ('sm90', 'float32', 160, 3, True): _F(block_m=128, block_n=32, warps=8, stages=2, min_blocks=1, max_regs=255, split_q=False),
    ('sm90', 'float32', 160, 3, False): _F(block_m=128, block_n=16, warps=8, stages=2, min_blocks=1, max_regs=160, split_q=False),
    ('sm90', 'float32', 192, 0, True): _F(block_m=128, block_n=8, warps=8, stages=2, min_blocks=1, max_regs=0, split_q=False),
    ('sm90', 'float32', 192, 0, False): _F(block_m=128, block_n=8, warps=8, stages=2, min_blocks=1, max_regs=0, split_q=False),
    ('sm90', 'float32', 192, 1, True): _F(block_m=128, block_n=8, warps=8, stages=2, min_blocks=1, max_regs=0, split_q=False),
    ('sm90', 'float32', 192, 1, False): _F(block_m=128, block_n=8, warps=8, stages=2, min_blocks=1, max_regs=0, split_q=False),
    ('sm90', 'float32', 192, 2, True): _F(block_m=128, block_n=8, warps=8, stages=2, min_blocks=1, max_regs=0, split_q=False),
    ('sm90', 'float32', 192, 2, False): _F(block_m=128, block_n=8, warps=8, stages=2, min_blocks=1, max_regs=168, split_q=False),
    ('sm90', 'float32', 192, 3, True): _F(block_m=128, block_n=8, warps=8, stages=2, min_blocks=1, max_regs=0, split_q=False),
    ('sm90', 'float32', 192, 3, False): _F(block_m=128, block_n=8, warps=8, stages=2, min_blocks=1, max_regs=168, split_q=False),
    ('sm80', 'float32', 192, 0, True): _F(block_m=64, block_n=8, warps=4, stages=2, min_blocks=1, max_regs=255, split_q=False),
    ('sm80', 'float32', 192, 0, False): _F(block_m=64, block_n=8, warps=4, stages=2, min_blocks=1, max_regs=176, split_q=False),
    ('sm80', 'float32', 192, 1, True): _F(block_m=64, block_n=8, warps=4, stages=2, min_blocks=1, max_regs=255, split_q=False),
    ('sm80', 'float32', 192, 1, False): _F(block_m=64, block_n=8, warps=4, stages=2, min_blocks=1, max_regs=176, split_q=False),
    ('sm80', 'float32', 192, 2, True): _F(block_m=64, block_n=8, warps=4, stages=2, min_blocks=1, max_regs=176, split_q=False),
    ('sm80', 'float32', 192, 2, False): _F(block_m=64, block_n=8, warps=4, stages=2, min_blocks=1, max_regs=152, split_q=False),
    ('sm80', 'float32', 192, 3, True): _F(block_m=64, block_n=8, warps=4, stages=2, min_blocks=1, max_regs=144, split_q=False),
    ('sm80', 'float32', 192, 3, False): _F(block_m=64, block_n=8, warps=4, stages=2, min_blocks=1, max_regs=152, split_q=False),
}

_F64 = F64FwdTile
# float64: O_i's d / split_d columns take d / split_d registers per 16 rows, S as many as block_n; a
# CTA needs at least d / 2 threads (one per 16-byte chunk of a row). Shared memory is what bounds
# the tiles (8-byte elements): Q_i plus two K_j and V_j stages within 99 KiB (sm80 family) or
# 227 KiB (sm90). bench/NOTES.md ("float64 on the GPU") derives the predicted speed of these tiles.
FWD_TILES[("sm90", "float64")] = {
    32: _F64(128, 32, 4), 64: _F64(64, 32, 4), 96: _F64(64, 32, 4), 128: _F64(64, 32, 4),
    160: _F64(32, 32, 4, split_d=2), 192: _F64(32, 16, 4, split_d=2), 224: _F64(32, 16, 4, split_d=2),
    256: _F64(32, 16, 4, split_d=2),
}
FWD_TILES[("sm80", "float64")] = {
    32: _F64(64, 32, 4), 64: _F64(64, 16, 4), 96: _F64(64, 16, 4), 128: _F64(32, 16, 2),
    160: _F64(32, 8, 4, split_d=2), 192: _F64(32, 8, 4, split_d=2), 224: _F64(16, 8, 4, split_d=4),
    256: _F64(16, 8, 4, split_d=4),
}


# Tiles of ragged forward variants (SEQ_MODE 1) that spill with the dense variant's tile: the
# sequence's place and lengths take registers the tightest tiles do not have. Key as FWD_SPILL_TILES.
RAGGED_FWD_SPILL_TILES = {
    ('sm80', '16bit', 96, 2, False): _F(block_m=128, block_n=64, warps=4, stages=2, min_blocks=1, max_regs=255, split_q=False),
    ('sm80', 'float32', 192, 0, False): _F(block_m=64, block_n=8, warps=4, stages=2, min_blocks=1, max_regs=255, split_q=False),
    ('sm80', 'float32', 192, 1, False): _F(block_m=64, block_n=8, warps=4, stages=2, min_blocks=1, max_regs=255, split_q=False),
    ('sm80', 'float32', 192, 2, False): _F(block_m=32, block_n=8, warps=2, stages=2, min_blocks=1, max_regs=152, split_q=False),
    ('sm80', 'float32', 192, 3, False): _F(block_m=32, block_n=8, warps=2, stages=2, min_blocks=1, max_regs=152, split_q=False),
    ('sm80', 'float32', 256, 0, True): _F(block_m=32, block_n=8, warps=2, stages=2, min_blocks=1, max_regs=200, split_q=False),
    ('sm80', 'float32', 256, 1, True): _F(block_m=32, block_n=8, warps=2, stages=2, min_blocks=1, max_regs=200, split_q=False),
    ('sm80', 'float32', 256, 2, True): _F(block_m=32, block_n=8, warps=2, stages=2, min_blocks=1, max_regs=200, split_q=False),
    ('sm80', 'float32', 256, 3, True): _F(block_m=32, block_n=8, warps=2, stages=2, min_blocks=1, max_regs=200, split_q=False),
    ('sm90', '16bit', 128, 1, False): _F(block_m=128, block_n=32, warps=4, stages=2, min_blocks=1, max_regs=0, split_q=False),
    ('sm90', '16bit', 128, 3, False): _F(block_m=128, block_n=32, warps=4, stages=2, min_blocks=1, max_regs=0, split_q=False),
    ('sm90', '16bit', 64, 0, True): _F(block_m=128, block_n=64, warps=4, stages=2, min_blocks=1, max_regs=0, split_q=False),
    ('sm90', '16bit', 64, 1, True): _F(block_m=128, block_n=64, warps=4, stages=2, min_blocks=1, max_regs=0, split_q=False),
    ('sm90', '16bit', 64, 2, True): _F(block_m=128, block_n=64, warps=4, stages=2, min_blocks=1, max_regs=0, split_q=False),
    ('sm90', '16bit', 96, 2, False): _F(block_m=128, block_n=32, warps=4, stages=2, min_blocks=1, max_regs=0, split_q=False),
    ('sm90', 'float32', 160, 2, True): _F(block_m=64, block_n=8, warps=4, stages=2, min_blocks=1, max_regs=0, split_q=False),
    ('sm90', 'float32', 160, 3, True): _F(block_m=64, block_n=8, warps=4, stages=2, min_blocks=1, max_regs=0, split_q=False),
    ('sm90', 'float32', 192, 2, False): _F(block_m=128, block_n=16, warps=8, stages=2, min_blocks=1, max_regs=184, split_q=False),
    ('sm90', 'float32', 192, 3, False): _F(block_m=64, block_n=8, warps=4, stages=2, min_blocks=1, max_regs=152, split_q=False),
    ('sm90', 'float32', 256, 0, False): _F(block_m=128, block_n=16, warps=8, stages=2, min_blocks=1, max_regs=200, split_q=False),
    ('sm90', 'float32', 256, 1, False): _F(block_m=128, block_n=16, warps=8, stages=2, min_blocks=1, max_regs=200, split_q=False),
    ('sm90', 'float32', 256, 2, False): _F(block_m=128, block_n=16, warps=8, stages=2, min_blocks=1, max_regs=188, split_q=False),
    ('sm90', 'float32', 256, 2, True): _F(block_m=128, block_n=16, warps=8, stages=2, min_blocks=1, max_regs=216, split_q=False),
    ('sm90', 'float32', 256, 3, False): _F(block_m=128, block_n=16, warps=8, stages=2, min_blocks=1, max_regs=200, split_q=False),
    ('sm90', 'float32', 32, 0, True): _F(block_m=128, block_n=64, warps=8, stages=2, min_blocks=2, max_regs=255, split_q=False),
    ('sm90', 'float32', 32, 1, True): _F(block_m=128, block_n=64, warps=8, stages=2, min_blocks=2, max_regs=255, split_q=False),
    ('sm90', 'float32', 32, 2, False): _F(block_m=128, block_n=64, warps=8, stages=2, min_blocks=2, max_regs=255, split_q=False),
    ('sm90', 'float32', 192, 0, True): _F(block_m=128, block_n=16, warps=8, stages=2, min_blocks=1, max_regs=216, split_q=False),
    ('sm90', 'float32', 192, 0, False): _F(block_m=128, block_n=16, warps=8, stages=2, min_blocks=1, max_regs=184, split_q=False),
    ('sm90', 'float32', 192, 1, True): _F(block_m=128, block_n=16, warps=8, stages=2, min_blocks=1, max_regs=216, split_q=False),
    ('sm90', 'float32', 192, 1, False): _F(block_m=128, block_n=16, warps=8, stages=2, min_blocks=1, max_regs=184, split_q=False),
    ('sm90', 'float32', 192, 2, True): _F(block_m=128, block_n=16, warps=8, stages=2, min_blocks=1, max_regs=184, split_q=False),
    ('sm90', 'float32', 192, 3, True): _F(block_m=128, block_n=16, warps=8, stages=2, min_blocks=1, max_regs=184, split_q=False),
}

# Ragged forward variants that no tile serves spill-free (key: family, kind, bucket, SCORE_MODS):
# such calls run on the NumPy backend (``ragged_served``).
RAGGED_FWD_UNSERVED = {("sm90", "float32", 256, 3)}


def ragged_served(fam, dtype_name, head_dim, head_dim_v, mods):
    """Whether the ragged (SEQ_MODE 1) kernels serve this configuration."""
    kind_name = kind(dtype_name)
    table = FWD_TILES.get((fam, kind_name))
    if table is None:
        return True
    bucket = head_dim_bucket(head_dim, head_dim_v, table)
    return (fam, kind_name, bucket, mods) not in RAGGED_FWD_UNSERVED


def fwd_tile(fam, dtype_name, head_dim, head_dim_v, mods=0, vec=True, seq_mode=SEQ_DENSE):
    """``(tile, bucket)`` of the forward for a family, dtype, head dims, SCORE_MODS, load path and
    SEQ_MODE."""
    require_dtype(fam, dtype_name)
    kind_name = kind(dtype_name)
    table = FWD_TILES[(fam, kind_name)]
    bucket = head_dim_bucket(head_dim, head_dim_v, table)
    base = table[bucket] if vec else table[bucket].element_wise()
    key = (fam, kind_name, bucket, mods, bool(vec))
    dense = FWD_SPILL_TILES.get(key, base)
    tile = RAGGED_FWD_SPILL_TILES.get(key, dense) if seq_mode else dense
    if isinstance(tile, FwdTile) and tile.split_sums != base.split_sums:
        tile = replace(tile, split_sums=base.split_sums)
    return tile, bucket


def fwd_source(tile):
    """The forward kernel of a tile (its type says which)."""
    return FWD_F64_SOURCE if isinstance(tile, F64FwdTile) else FWD_SOURCE


def fwd_defines(tile, bucket, dtype_name, vec_load, mods, seq_mode=SEQ_DENSE):
    """The ``#define`` block of one forward instantiation."""
    if isinstance(tile, F64FwdTile):
        return {"HEAD_DIM": bucket, "BLOCK_M": tile.block_m, "BLOCK_N": tile.block_n, "NUM_WARPS": tile.warps,
                "SPLIT_D": tile.split_d, "MIN_BLOCKS": tile.min_blocks, "MAX_REGS": tile.max_regs,
                "DTYPE": DTYPE_CODES[dtype_name], "VEC_LOAD": int(vec_load), "SCORE_MODS": mods,
                "SMEM_BYTES": tile.smem_bytes(bucket), "SEQ_MODE": seq_mode}
    return {
        "HEAD_DIM": bucket, "BLOCK_M": tile.block_m, "BLOCK_N": tile.block_n, "NUM_WARPS": tile.warps,
        "STAGES": tile.stages, "MIN_BLOCKS": tile.min_blocks, "MAX_REGS": tile.max_regs,
        "DTYPE": DTYPE_CODES[dtype_name], "VEC_LOAD": int(vec_load), "SPLIT_Q": int(tile.split_q),
        "SPLIT_SUMS": int(tile.split_sums and dtype_name == "float32"), "SCORE_MODS": mods, "SMEM_BYTES": tile.smem_bytes(bucket, numpy.dtype(_NP[dtype_name]).itemsize),
        "SEQ_MODE": seq_mode,
    }


# ---------------------------------------------------------------------------------------------
# Backward. Four kernels, chosen per family, element kind and head dim:
#   kernels/bwd_dkdv_sm90.cu  16-bit dK/dV with warpgroup MMA (sm90, d = 64, 128): WgTile
#   kernels/bwd_dkdv_sm80.cu  16-bit dK/dV with mma.sync warp tiles: KvTile
#   kernels/bwd_dkdv_f32.cu   float32 dK/dV, warps owning 16 keys: RowsTile
#   kernels/bwd_dq.cu         the deterministic dQ pass (every dtype), warps owning 16 queries: RowsTile
# dK/dV kernels own block_n keys and stream query tiles of block_m; the dQ kernel owns block_m
# queries and streams key tiles of block_n. kernels/bwd_aux.cu holds the preprocess and convert
# kernels around them.
# ---------------------------------------------------------------------------------------------

DKDV_KERNEL = "flash_bwd_dkdv"
DQ_KERNEL = "flash_bwd_dq"
AUX_SOURCE = "kernels/bwd_aux.cu"
PREPROCESS_KERNEL = "flash_bwd_preprocess"
CONVERT_KERNEL = "flash_bwd_convert"


@dataclass(frozen=True)
class RowsTile:
    """``bwd_dkdv_f32.cu`` and ``bwd_dq.cu``: 16 owned rows per warp row group; ``split_d`` warps
    share each 16-row group, each accumulating head_dim / split_d columns."""

    block_m: int
    block_n: int
    warps: int
    split_d: int = 1
    stages: int = 2
    min_blocks: int = 1
    kk_unroll: int = 0  # unroll of the k16 loop of S and dP (0: full); lower saves registers
    split_stream: bool = False  # float32 dK/dV: split streamed tiles once into tf32 planes

    def own_stream(self, dkdv):
        return (self.block_n, self.block_m) if dkdv else (self.block_m, self.block_n)

    def smem_bytes(self, bucket, elem_bytes, dkdv, dq_atomic):
        """Dynamic shared memory, mirroring the layout of the two kernels (bwd_rows.cuh)."""
        own, stream = self.own_stream(dkdv)
        row = bucket * elem_bytes + 16
        planes = 2 if self.split_stream else 1
        total = 2 * own * row + 2 * self.stages * stream * row * planes
        if dkdv:
            total += 2 * self.stages * stream * 4
            if dq_atomic:
                total += 2 * own * (stream * elem_bytes + 16)
        return total


@dataclass(frozen=True)
class F64RowsTile(RowsTile):
    """``bwd_dkdv_f64.cu`` and ``bwd_dq_f64.cu``: the RowsTile organisation with 8-byte elements
    (``split_stream`` and ``kk_unroll`` unused: the 16-column blocks of S and dP are unrolled as the
    kernels decide)."""

    def smem_bytes(self, bucket, elem_bytes, dkdv, dq_atomic):
        """The layout of bwd_rows_f64.cuh: owned and streamed tiles of doubles, the L2 and D vectors
        in double, two dS^T staging buffers (atomic dQ). The elements are doubles whatever
        ``elem_bytes`` says (the argument keeps the tables' common interface)."""
        own, stream = self.own_stream(dkdv)
        row = bucket * 8 + 16
        total = 2 * own * row + 2 * self.stages * stream * row
        if dkdv:
            total += 2 * self.stages * stream * 8
            if dq_atomic:
                total += 2 * own * (stream * 8 + 16)
        return total


@dataclass(frozen=True)
class KvTile:
    """``bwd_dkdv_sm80.cu``: the three products cut into warp tiles with ``warps_n_sdp`` warps along
    the keys for S and dP, ``warps_n_dkv`` along the keys for dK and dV and ``warps_m_dq`` along the
    queries for dQ (the other warps along the other dimension)."""

    block_m: int
    block_n: int
    warps: int
    warps_n_sdp: int
    warps_n_dkv: int
    warps_m_dq: int
    stages: int = 2
    min_blocks: int = 1
    kk_unroll: int = 0  # unroll of the k16 loop of S and dP (0: full)
    dq_unroll: int = 0  # unroll of the k16 loop of dQ (0: full)

    def smem_bytes(self, bucket, elem_bytes, dkdv, dq_atomic):
        row = bucket * 2 + 16
        return (2 * self.block_n * row + self.stages * self.block_m * (2 * row + 8)
                + 2 * self.block_n * (self.block_m * 2 + 16))


@dataclass(frozen=True)
class WgTile:
    """``bwd_dkdv_sm90.cu``: each of ``warpgroups`` warpgroups owns 64 keys."""

    block_m: int
    warpgroups: int = 2
    stages: int = 2
    min_blocks: int = 1

    @property
    def block_n(self):
        return 64 * self.warpgroups

    @property
    def warps(self):
        return 4 * self.warpgroups

    def smem_bytes(self, bucket, elem_bytes, dkdv, dq_atomic):
        """Shared memory of the layout in bwd_dkdv_sm90.cu, with 1024 bytes to align its swizzled tiles."""
        n, m = self.block_n, self.block_m
        total = 2 * n * bucket * 2 + 2 * self.stages * m * bucket * 2 + 2 * self.stages * m * 4 + 1024
        return total + (n * m * 2 if dq_atomic else 0)


@dataclass(frozen=True)
class BwdEntry:
    dkdv: object  # RowsTile, KvTile or WgTile
    dq: RowsTile


def dkdv_source(tile):
    """The dK/dV kernel of a tile (its type says which)."""
    return {WgTile: "kernels/bwd_dkdv_sm90.cu", KvTile: "kernels/bwd_dkdv_sm80.cu",
            RowsTile: "kernels/bwd_dkdv_f32.cu", F64RowsTile: "kernels/bwd_dkdv_f64.cu"}[type(tile)]


DQ_SOURCE = "kernels/bwd_dq.cu"
DQ_F64_SOURCE = "kernels/bwd_dq_f64.cu"


def dq_source(tile):
    """The dQ kernel of a tile (its type says which)."""
    return DQ_F64_SOURCE if isinstance(tile, F64RowsTile) else DQ_SOURCE

_R, _K, _W, _E = RowsTile, KvTile, WgTile, BwdEntry
# sm90 entries fit 227 KiB of shared memory per CTA; sm80-family entries fit the 99 KiB of
# sm_86/sm_89 (and so the A100's 163 KiB), except the atomic dK/dV variant of float32 at d = 256,
# which there falls back to the dQ kernel.
BWD_TILES = {
    ("sm90", "16bit"): {
        32: _E(_K(128, 128, 8, 4, 4, 4), _R(128, 64, 8)),
        64: _E(_W(128), _R(128, 64, 8)),
        96: _E(_K(64, 128, 8, 4, 4, 4), _R(128, 64, 8)),
        128: _E(_W(64), _R(128, 64, 8)),
        160: _E(_K(64, 64, 8, 4, 4, 4), _R(64, 64, 8, 2)),
        192: _E(_K(64, 64, 8, 4, 4, 4), _R(64, 64, 8, 2)),
        224: _E(_K(64, 64, 8, 4, 4, 4), _R(64, 64, 8, 2)),
        256: _E(_K(64, 64, 8, 4, 4, 4), _R(64, 64, 8, 2)),
    },
    ("sm80", "16bit"): {
        32: _E(_K(64, 64, 4, 2, 2, 2), _R(128, 64, 8)),
        64: _E(_K(64, 64, 4, 2, 2, 2), _R(128, 64, 8)),
        96: _E(_K(32, 64, 4, 2, 2, 2), _R(64, 64, 4)),
        128: _E(_K(32, 64, 8, 4, 4, 2), _R(64, 32, 4)),
        160: _E(_K(32, 32, 4, 2, 2, 2), _R(32, 16, 4, 2)),
        192: _E(_K(32, 32, 4, 2, 2, 2), _R(32, 16, 4, 2)),
        224: _E(_K(32, 32, 4, 2, 2, 2), _R(32, 16, 4, 2)),
        256: _E(_K(32, 32, 4, 2, 2, 2, stages=1), _R(32, 16, 4, 2)),
    },
    # Turing's 64 KiB: the sm80 family's tiles with the streamed tile (dQ) or the keys (dK/dV) halved
    # until they fit, then one query stage (STAGES 1; Turing's loads are synchronous, so a second
    # stage would not overlap them with the products anyway). No bucket 256: the only dK/dV tiles
    # that fit (two warps owning 16 keys, dK and dV in 128 registers a thread) spill with every
    # unroll tried, so head dims past 224 have no backward on Turing (``unserved``).
    # Not tuned on a Turing GPU.
    ("sm75", "16bit"): {
        32: _E(_K(64, 64, 4, 2, 2, 2), _R(128, 64, 8)),
        64: _E(_K(32, 64, 4, 2, 2, 2), _R(128, 32, 8)),
        96: _E(_K(32, 64, 4, 2, 2, 2), _R(64, 32, 4)),
        128: _E(_K(32, 32, 4, 2, 2, 2), _R(64, 16, 4)),
        160: _E(_K(32, 32, 4, 2, 2, 2, stages=1), _R(32, 16, 4, 2)),
        192: _E(_K(32, 32, 4, 2, 2, 2, stages=1), _R(32, 16, 4, 2)),
        224: _E(_K(32, 32, 4, 2, 2, 2, stages=1), _R(32, 16, 4, 2)),
    },
    ("sm90", "float32"): {
        32: _E(_R(32, 128, 8, split_stream=True), _R(64, 32, 8, 2)),
        64: _E(_R(32, 128, 8, split_stream=True), _R(64, 32, 8, 2)),
        96: _E(_R(16, 128, 8, split_stream=True), _R(64, 32, 8, 2)),
        128: _E(_R(16, 128, 8, split_stream=True), _R(64, 32, 8, 2)),
        160: _E(_R(16, 64, 8, 2, split_stream=True), _R(32, 16, 8, 4)),
        192: _E(_R(16, 64, 8, 2, split_stream=True), _R(32, 16, 8, 4)),
        224: _E(_R(16, 64, 8, 2), _R(32, 16, 8, 4)),
        256: _E(_R(16, 32, 8, 4), _R(32, 16, 8, 4)),
    },
    ("sm80", "float32"): {
        32: _E(_R(16, 32, 4, 2), _R(32, 16, 4, 2)),
        64: _E(_R(16, 32, 4, 2), _R(32, 16, 4, 2)),
        96: _E(_R(16, 32, 4, 2), _R(32, 16, 4, 2)),
        128: _E(_R(16, 32, 4, 2), _R(32, 16, 4, 2)),
        160: _E(_R(16, 16, 4, 4), _R(16, 16, 4, 4)),
        192: _E(_R(16, 16, 4, 4), _R(16, 16, 4, 4)),
        224: _E(_R(16, 16, 4, 4), _R(16, 16, 4, 4)),
        256: _E(_R(16, 16, 4, 4), _R(16, 16, 4, 4)),
    },
}

_R64 = F64RowsTile
# float64: dK and dV of d / split_d columns take 2 * d / split_d registers per 16 keys, S and dP
# block_m each (dQ: d / split_d and 2 * block_n); shared memory bounds the tiles as for the forward.
BWD_TILES[("sm90", "float64")] = {
    32: _E(_R64(16, 64, 4), _R64(64, 32, 4)),
    64: _E(_R64(16, 64, 4), _R64(64, 32, 4)),
    96: _E(_R64(16, 64, 8, 2), _R64(64, 16, 8, 2)),
    128: _E(_R64(16, 64, 8, 2), _R64(64, 16, 8, 2)),
    160: _E(_R64(16, 32, 8, 4), _R64(32, 16, 8, 4)),
    192: _E(_R64(16, 32, 8, 4), _R64(32, 16, 8, 4)),
    224: _E(_R64(8, 32, 8, 4), _R64(32, 16, 8, 4)),
    256: _E(_R64(8, 32, 8, 4), _R64(32, 8, 8, 4)),
}
# The sm80 family's 99 KiB leave one streamed tile (stages=1) at d = 224, 256 (192 for the atomic
# dK/dV variant); the atomic variant at d = 256 does not fit there (the launcher takes the dQ kernel).
BWD_TILES[("sm80", "float64")] = {
    32: _E(_R64(16, 64, 4), _R64(64, 32, 4)),
    64: _E(_R64(16, 32, 4, 2), _R64(32, 16, 4, 2)),
    96: _E(_R64(16, 16, 4, 4), _R64(32, 16, 4, 2)),
    128: _E(_R64(8, 16, 4, 4), _R64(16, 16, 4, 4)),
    160: _E(_R64(8, 16, 4, 4), _R64(16, 8, 4, 4)),
    192: _E(_R64(8, 16, 4, 4, stages=1), _R64(16, 8, 4, 4)),
    224: _E(_R64(8, 16, 4, 4, stages=1), _R64(16, 8, 4, 4, stages=1)),
    256: _E(_R64(8, 16, 4, 4, stages=1), _R64(16, 8, 4, 4, stages=1)),
}

_NP = {"float16": numpy.float16, "bfloat16": numpy.uint16, "float32": numpy.float32, "float64": numpy.float64}


def elem_bytes(dtype_name):
    return numpy.dtype(_NP[dtype_name]).itemsize


# As FWD_SPILL_TILES, for the backward. Key: (family, kind, bucket, SCORE_MODS, role), role
# "dkdv_atomic", "dkdv" or "dq".
BWD_SPILL_TILES = {
    ('sm90', '16bit', 32, 3, 'dkdv_atomic'): _K(block_m=64, block_n=128, warps=8, warps_n_sdp=4, warps_n_dkv=4, warps_m_dq=4, stages=2, min_blocks=1, kk_unroll=1, dq_unroll=1),
    ('sm90', '16bit', 32, 3, 'dkdv'): _K(block_m=128, block_n=128, warps=8, warps_n_sdp=4, warps_n_dkv=4, warps_m_dq=4, stages=2, min_blocks=1, kk_unroll=1, dq_unroll=0),
    ('sm90', '16bit', 64, 1, 'dkdv'): _W(block_m=64, warpgroups=2, stages=2, min_blocks=1),
    ('sm90', '16bit', 64, 2, 'dkdv_atomic'): _W(block_m=64, warpgroups=2, stages=2, min_blocks=1),
    ('sm90', '16bit', 64, 2, 'dkdv'): _W(block_m=64, warpgroups=2, stages=2, min_blocks=1),
    ('sm90', '16bit', 64, 3, 'dkdv_atomic'): _W(block_m=64, warpgroups=2, stages=2, min_blocks=1),
    ('sm90', '16bit', 64, 3, 'dkdv'): _W(block_m=64, warpgroups=2, stages=2, min_blocks=1),
    ('sm90', '16bit', 96, 3, 'dkdv_atomic'): _K(block_m=64, block_n=128, warps=8, warps_n_sdp=4, warps_n_dkv=4, warps_m_dq=4, stages=2, min_blocks=1, kk_unroll=2, dq_unroll=0),
    ('sm90', '16bit', 96, 3, 'dkdv'): _K(block_m=64, block_n=64, warps=8, warps_n_sdp=4, warps_n_dkv=4, warps_m_dq=4, stages=2, min_blocks=1, kk_unroll=0, dq_unroll=0),
    ('sm90', '16bit', 128, 2, 'dkdv_atomic'): _K(block_m=64, block_n=128, warps=8, warps_n_sdp=4, warps_n_dkv=4, warps_m_dq=4, stages=2, min_blocks=1, kk_unroll=0, dq_unroll=0),
    ('sm90', '16bit', 128, 2, 'dkdv'): _K(block_m=64, block_n=128, warps=8, warps_n_sdp=4, warps_n_dkv=4, warps_m_dq=4, stages=2, min_blocks=1, kk_unroll=0, dq_unroll=0),
    ('sm90', '16bit', 128, 3, 'dkdv_atomic'): _K(block_m=64, block_n=64, warps=8, warps_n_sdp=4, warps_n_dkv=4, warps_m_dq=4, stages=2, min_blocks=1, kk_unroll=0, dq_unroll=0),
    ('sm90', '16bit', 128, 3, 'dkdv'): _K(block_m=64, block_n=64, warps=8, warps_n_sdp=4, warps_n_dkv=4, warps_m_dq=4, stages=2, min_blocks=1, kk_unroll=0, dq_unroll=0),
    ('sm90', '16bit', 224, 0, 'dq'): _R(block_m=64, block_n=64, warps=8, split_d=2, stages=2, min_blocks=1, kk_unroll=7, split_stream=False),
    ('sm90', '16bit', 224, 2, 'dq'): _R(block_m=64, block_n=64, warps=8, split_d=2, stages=2, min_blocks=1, kk_unroll=7, split_stream=False),
    ('sm90', '16bit', 224, 3, 'dq'): _R(block_m=64, block_n=64, warps=8, split_d=2, stages=2, min_blocks=1, kk_unroll=7, split_stream=False),
    ('sm90', '16bit', 256, 0, 'dq'): _R(block_m=64, block_n=64, warps=8, split_d=2, stages=2, min_blocks=1, kk_unroll=8, split_stream=False),
    ('sm90', '16bit', 256, 1, 'dq'): _R(block_m=64, block_n=64, warps=8, split_d=2, stages=2, min_blocks=1, kk_unroll=8, split_stream=False),
    ('sm90', '16bit', 256, 3, 'dkdv'): _K(block_m=64, block_n=64, warps=8, warps_n_sdp=4, warps_n_dkv=4, warps_m_dq=4, stages=2, min_blocks=1, kk_unroll=8, dq_unroll=0),
    ('sm90', 'float32', 128, 1, 'dkdv_atomic'): _R(block_m=16, block_n=64, warps=8, split_d=2, stages=2, min_blocks=1, kk_unroll=0, split_stream=True),
    ('sm90', 'float32', 128, 2, 'dkdv_atomic'): _R(block_m=16, block_n=128, warps=8, split_d=1, stages=2, min_blocks=1, kk_unroll=0, split_stream=False),
    ('sm90', 'float32', 224, 1, 'dkdv_atomic'): _R(block_m=16, block_n=32, warps=8, split_d=4, stages=2, min_blocks=1, kk_unroll=0, split_stream=False),
    ('sm90', 'float32', 224, 2, 'dkdv_atomic'): _R(block_m=16, block_n=32, warps=8, split_d=4, stages=2, min_blocks=1, kk_unroll=0, split_stream=False),
    ('sm90', 'float32', 224, 3, 'dkdv_atomic'): _R(block_m=16, block_n=32, warps=8, split_d=4, stages=2, min_blocks=1, kk_unroll=0, split_stream=False),
}

# Ragged dK/dV and dQ variants (SEQ_MODE 1) hold their sequence's offsets and lengths across the
# loop; where that spills at the dense variant's tile (measured by the compile gate), the first
# spill-free candidate of a fixed order replaces it: a lower k16 unroll, then smaller tiles.
RAGGED_SPILL_TILES = {
    ('sm80', '16bit', 64, 3, 'dkdv_atomic'): replace(BWD_TILES[('sm80', '16bit')][64].dkdv, kk_unroll=2),
    ('sm90', 'float64', 64, 3, 'dkdv_atomic'): replace(BWD_TILES[('sm90', 'float64')][64].dkdv, kk_unroll=2),
    ('sm90', 'float64', 64, 3, 'dkdv'): replace(BWD_TILES[('sm90', 'float64')][64].dkdv, kk_unroll=2),
    ('sm80', '16bit', 256, 2, 'dkdv_atomic'): _K(block_m=32, block_n=32, warps=4, warps_n_sdp=2, warps_n_dkv=2, warps_m_dq=2, stages=1, min_blocks=1, kk_unroll=1, dq_unroll=1),
    ('sm80', '16bit', 256, 3, 'dkdv_atomic'): _K(block_m=32, block_n=32, warps=4, warps_n_sdp=2, warps_n_dkv=2, warps_m_dq=2, stages=1, min_blocks=1, kk_unroll=8, dq_unroll=0),
    ('sm90', '16bit', 64, 0, 'dkdv_atomic'): WgTile(block_m=64, warpgroups=2, stages=2, min_blocks=1),
    ('sm90', '16bit', 128, 1, 'dkdv_atomic'): _K(block_m=64, block_n=64, warps=8, warps_n_sdp=4, warps_n_dkv=4, warps_m_dq=4, stages=2, min_blocks=1, kk_unroll=0, dq_unroll=0),
    ('sm90', '16bit', 128, 2, 'dkdv'): _K(block_m=64, block_n=64, warps=8, warps_n_sdp=4, warps_n_dkv=4, warps_m_dq=4, stages=2, min_blocks=1, kk_unroll=0, dq_unroll=0),
    ('sm90', '16bit', 128, 2, 'dkdv_atomic'): _K(block_m=64, block_n=128, warps=8, warps_n_sdp=4, warps_n_dkv=4, warps_m_dq=4, stages=2, min_blocks=1, kk_unroll=1, dq_unroll=0),
    ('sm90', '16bit', 32, 3, 'dkdv'): _K(block_m=64, block_n=128, warps=8, warps_n_sdp=4, warps_n_dkv=4, warps_m_dq=4, stages=2, min_blocks=1, kk_unroll=1, dq_unroll=0),
    ('sm90', '16bit', 96, 1, 'dkdv'): _K(block_m=64, block_n=128, warps=8, warps_n_sdp=4, warps_n_dkv=4, warps_m_dq=4, stages=2, min_blocks=1, kk_unroll=4, dq_unroll=0),
    ('sm90', '16bit', 96, 1, 'dkdv_atomic'): _K(block_m=64, block_n=128, warps=8, warps_n_sdp=4, warps_n_dkv=4, warps_m_dq=4, stages=2, min_blocks=1, kk_unroll=4, dq_unroll=0),
    ('sm90', 'float32', 128, 0, 'dkdv'): _R(block_m=16, block_n=32, warps=4, split_d=2, stages=2, min_blocks=1, kk_unroll=0, split_stream=False),
    ('sm90', 'float32', 128, 1, 'dkdv'): _R(block_m=16, block_n=32, warps=4, split_d=2, stages=2, min_blocks=1, kk_unroll=0, split_stream=False),
    ('sm90', 'float32', 128, 3, 'dkdv'): _R(block_m=16, block_n=32, warps=4, split_d=2, stages=2, min_blocks=1, kk_unroll=0, split_stream=False),
    ('sm90', 'float64', 128, 3, 'dkdv'): F64RowsTile(block_m=16, block_n=64, warps=8, split_d=2, stages=2, min_blocks=1, kk_unroll=4, split_stream=False),
    ('sm90', 'float64', 128, 3, 'dkdv_atomic'): F64RowsTile(block_m=16, block_n=64, warps=8, split_d=2, stages=2, min_blocks=1, kk_unroll=4, split_stream=False),
    ('sm90', 'float64', 192, 1, 'dkdv_atomic'): F64RowsTile(block_m=16, block_n=32, warps=8, split_d=4, stages=2, min_blocks=1, kk_unroll=4, split_stream=False),
    ('sm90', 'float64', 192, 2, 'dkdv_atomic'): F64RowsTile(block_m=16, block_n=32, warps=8, split_d=4, stages=2, min_blocks=1, kk_unroll=4, split_stream=False),
    ('sm90', 'float64', 192, 3, 'dkdv'): F64RowsTile(block_m=16, block_n=32, warps=8, split_d=4, stages=2, min_blocks=1, kk_unroll=4, split_stream=False),
    ('sm90', 'float64', 96, 1, 'dkdv_atomic'): F64RowsTile(block_m=16, block_n=64, warps=8, split_d=2, stages=2, min_blocks=1, kk_unroll=4, split_stream=False),
    ('sm90', '16bit', 256, 2, 'dq'): _R(block_m=64, block_n=64, warps=8, split_d=2, stages=2, min_blocks=1, kk_unroll=4, split_stream=False),
    ('sm75', '16bit', 224, 1, 'dkdv_atomic'): _K(block_m=32, block_n=16, warps=2, warps_n_sdp=1, warps_n_dkv=1, warps_m_dq=1, stages=1, min_blocks=1, kk_unroll=2, dq_unroll=0),
    ('sm75', '16bit', 224, 2, 'dkdv_atomic'): _K(block_m=32, block_n=16, warps=2, warps_n_sdp=1, warps_n_dkv=1, warps_m_dq=1, stages=1, min_blocks=1, kk_unroll=2, dq_unroll=0),
    ('sm75', '16bit', 224, 3, 'dkdv_atomic'): _K(block_m=32, block_n=16, warps=2, warps_n_sdp=1, warps_n_dkv=1, warps_m_dq=1, stages=1, min_blocks=1, kk_unroll=2, dq_unroll=0),
}


def bwd_entry(fam, dtype_name, head_dim, head_dim_v, mods=0, seq_mode=SEQ_DENSE):
    """``(entry, bucket)`` of the backward for a family, dtype, head dims, SCORE_MODS and SEQ_MODE;
    the entry's dK/dV tile is the atomic variant's (``dkdv_tile`` gives either)."""
    reason = unserved(fam, dtype_name, head_dim, head_dim_v, backward=True)
    if reason is not None:
        raise BackendUnavailableError(reason)
    kind_name = kind(dtype_name)
    bucket = head_dim_bucket(head_dim, head_dim_v)
    base = BWD_TILES[(fam, kind_name)][bucket]
    key = (fam, kind_name, bucket, mods, "dq")
    dq = BWD_SPILL_TILES.get(key, base.dq)
    if seq_mode == SEQ_RAGGED:
        dq = RAGGED_SPILL_TILES.get(key, dq)
    return BwdEntry(dkdv_tile(fam, dtype_name, bucket, mods, True, seq_mode), dq), bucket


def dkdv_tile(fam, dtype_name, bucket, mods, dq_atomic, seq_mode=SEQ_DENSE):
    """The dK/dV tile of one variant."""
    require_dtype(fam, dtype_name)
    kind_name = kind(dtype_name)
    role = "dkdv_atomic" if dq_atomic else "dkdv"
    key = (fam, kind_name, bucket, mods, role)
    dense = BWD_SPILL_TILES.get(key, BWD_TILES[(fam, kind_name)][bucket].dkdv)
    return RAGGED_SPILL_TILES.get(key, dense) if seq_mode == SEQ_RAGGED else dense


def dkdv_defines(tile, bucket, dtype_name, dq_atomic, mods, seq_mode=SEQ_DENSE):
    """The ``#define`` block of one dK/dV instantiation. SMEM_BYTES is the dynamic shared memory
    the launcher will give it; the kernel checks it against its layout."""
    common = {"HEAD_DIM": bucket, "DQ_ATOMIC": int(dq_atomic), "DTYPE": DTYPE_CODES[dtype_name],
              "SCORE_MODS": mods, "MIN_BLOCKS": tile.min_blocks, "STAGES": tile.stages, "SEQ_MODE": seq_mode,
              "SMEM_BYTES": tile.smem_bytes(bucket, elem_bytes(dtype_name), True, dq_atomic)}
    if isinstance(tile, WgTile):
        return {**common, "BLOCK_M": tile.block_m, "WARPGROUPS": tile.warpgroups}
    if isinstance(tile, KvTile):
        return {**common, "BLOCK_N": tile.block_n, "BLOCK_M": tile.block_m, "NUM_WARPS": tile.warps,
                "WARPS_N_SDP": tile.warps_n_sdp, "WARPS_N_DKV": tile.warps_n_dkv, "WARPS_M_DQ": tile.warps_m_dq,
                "KK_UNROLL": tile.kk_unroll or bucket // 16, "DQ_UNROLL": tile.dq_unroll or tile.block_n // 16}
    return {**common, **_rows_defines(tile, bucket, True)}


def dq_defines(tile, bucket, dtype_name, mods, seq_mode=SEQ_DENSE):
    """The ``#define`` block of one dQ-kernel instantiation."""
    return {"HEAD_DIM": bucket, "DTYPE": DTYPE_CODES[dtype_name], "SCORE_MODS": mods, "MIN_BLOCKS": tile.min_blocks,
            "SEQ_MODE": seq_mode,
            "STAGES": tile.stages, "SMEM_BYTES": tile.smem_bytes(bucket, elem_bytes(dtype_name), False, False),
            "DQ_ATOMIC": 0, **_rows_defines(tile, bucket, False)}


def _rows_defines(tile, bucket, dkdv):
    own, stream = tile.own_stream(dkdv)
    return {"BLOCK_OWN": own, "BLOCK_STREAM": stream, "NUM_WARPS": tile.warps, "SPLIT_D": tile.split_d,
            "KK_UNROLL": tile.kk_unroll or bucket // 16, "SPLIT_STREAM": int(tile.split_stream)}


def aux_defines(dtype_name):
    return {"DTYPE": DTYPE_CODES[dtype_name], "SCORE_MODS": 0}


# ---------------------------------------------------------------------------------------------
# Forward on sm_90a: kernels/fwd_sm90.cu (TMA copies, a producer warpgroup and two consumer
# warpgroups running wgmma; 16-bit). A CTA owns block_m = 128 queries, 64 per consumer, and streams
# key tiles of block_n through a ring of `stages` shared-memory slots. Opt-in until it has been
# verified on hardware: forward_sm90.py runs it only with CUFLASH_SM90_FORWARD=1. What it does not
# serve runs fwd_sm80.cu: float32 and float64, max(D, Dv) > 128, Sk = 0, ragged batches, and layouts
# a tensor map cannot describe (forward_sm90.tma_layout_reason: q, k, v bases and strides 16-byte
# aligned, unit head-dim stride).
# ---------------------------------------------------------------------------------------------

FWD_SM90_SOURCE = "kernels/fwd_sm90.cu"
FWD_SM90_KERNEL = "flash_fwd_sm90"
FWD_SM90_FEATURES = FEATURES


@dataclass(frozen=True)
class Sm90FwdTile:
    """``fwd_sm90.cu``'s tile: block_m queries (one consumer warpgroup per 64), block_n keys per
    streamed tile, ``stages`` slots of the K_j/V_j ring."""

    block_m: int
    block_n: int
    stages: int

    @property
    def threads(self):
        """The producer warpgroup and one consumer warpgroup per 64 queries."""
        return 128 * (1 + self.block_m // 64)

    def smem_bytes(self, bucket, elem_bytes=2):
        """``kSmemBytes`` of fwd_sm90.cu: Q_i and ``stages`` K_j and V_j tiles of unpadded
        (swizzled) rows, and 1024 bytes to align the base for the 128-byte swizzle."""
        return (self.block_m + 2 * self.stages * self.block_n) * bucket * elem_bytes + 1024


# FlashAttention-3 runs 128 x 128 tiles for causal d = 128 and 128 x 176 otherwise; 128 x 128 with
# two slots is the first, simple point (164 KiB at d = 128): tuning comes with the GPU runs.
FWD_SM90_TILES = {64: Sm90FwdTile(128, 128, 2), 128: Sm90FwdTile(128, 128, 2)}


def fwd_sm90_tile(dtype_name, head_dim, head_dim_v):
    """``(tile, bucket)`` of the sm_90a forward, or None when it does not serve these dtype and head dims."""
    if kind(dtype_name) != "16bit" or max(head_dim, head_dim_v) > max(FWD_SM90_TILES):
        return None
    bucket = head_dim_bucket(head_dim, head_dim_v, FWD_SM90_TILES)
    return FWD_SM90_TILES[bucket], bucket


def fwd_sm90_defines(tile, bucket, dtype_name, mods):
    """The ``#define`` block of one sm_90a forward instantiation."""
    return {"HEAD_DIM": bucket, "BLOCK_M": tile.block_m, "BLOCK_N": tile.block_n, "STAGES": tile.stages,
            "DTYPE": DTYPE_CODES[dtype_name], "SCORE_MODS": mods,
            "SMEM_BYTES": tile.smem_bytes(bucket, elem_bytes(dtype_name))}


def fwd_sm90_instantiations(fam=None):
    """Every sm_90a forward instantiation (none unless ``fam`` is "sm90" or None)."""
    if fam not in (None, "sm90"):
        return []
    return [(FWD_SM90_SOURCE, FWD_SM90_KERNEL, fwd_sm90_defines(tile, bucket, name, mods))
            for bucket, tile in FWD_SM90_TILES.items() for name in dtypes_of("16bit") for mods in SCORE_MOD_SETS]


# ---------------------------------------------------------------------------------------------
# Everything that can be compiled, for the compile gate.
# ---------------------------------------------------------------------------------------------

SCORE_MOD_SETS = (0, 1, 2, 3)


def instantiations(fam=None):
    """Every ``(source, kernel, defines)`` a launcher can choose (on family ``fam`` only, if given),
    each with its family's ``family_defines``. An entry of the "sm90" family runs only on compute
    capability 9.x."""
    seen = []

    def add(entry):
        if entry not in seen:
            seen.append(entry)

    for (f, kind_name), table in FWD_TILES.items():
        if fam is not None and f != fam:
            continue
        extra = family_defines(f)
        for bucket in table:
            for name in _served(f, kind_name):
                for mods in SCORE_MOD_SETS:
                    for vec in (1, 0):
                        for seq in SEQ_MODES:
                            if seq == SEQ_RAGGED and not ragged_served(f, name, bucket, bucket, mods):
                                continue
                            tile, _ = fwd_tile(f, name, bucket, bucket, mods, vec, seq)
                            add((fwd_source(tile), FWD_KERNEL,
                                 {**fwd_defines(tile, bucket, name, vec, mods, seq), **extra}))
    for (f, kind_name), table in BWD_TILES.items():
        if fam is not None and f != fam:
            continue
        extra = family_defines(f)
        for bucket in table:
            for name in _served(f, kind_name):
                for mods in SCORE_MOD_SETS:
                    for seq in SEQ_MODES:
                        for atomic in (True, False):
                            tile = dkdv_tile(f, name, bucket, mods, atomic, seq)
                            add((dkdv_source(tile), DKDV_KERNEL,
                                 {**dkdv_defines(tile, bucket, name, atomic, mods, seq), **extra}))
                        entry, _ = bwd_entry(f, name, bucket, bucket, mods, seq)
                        add((dq_source(entry.dq), DQ_KERNEL, {**dq_defines(entry.dq, bucket, name, mods, seq), **extra}))
    for f in FAMILY_ARCHS if fam is None else (fam,):
        for name in family_dtypes(f):
            add((AUX_SOURCE, PREPROCESS_KERNEL, {**aux_defines(name), **family_defines(f)}))
            add((AUX_SOURCE, CONVERT_KERNEL, {**aux_defines(name), **family_defines(f)}))
    for entry in decode_instantiations(fam):
        add(entry)
    for entry in fwd_sm90_instantiations(fam):
        add(entry)
    return seen


def _served(fam, kind_name):
    """The dtypes of an element kind that family ``fam`` has kernels for."""
    return [name for name in dtypes_of(kind_name) if name in family_dtypes(fam)]


# ---------------------------------------------------------------------------------------------
# Decoding against a key/value cache: kernels/decode.cu (split-KV; 16-bit), kernels/combine.cu (the
# log-sum-exp merge of the splits' partial results), kernels/append.cu (k_new/v_new into the cache).
# A decode CTA owns the packed query rows (t, g) of one (batch, kv head) -- one m16 tile, block_m
# = 16 -- and streams key tiles of block_n, each warp owning block_n / warps of their keys.
# ---------------------------------------------------------------------------------------------

DECODE_SOURCE = "kernels/decode.cu"
DECODE_KERNEL = "flash_decode"
COMBINE_SOURCE = "kernels/combine.cu"
COMBINE_KERNEL = "lse_combine"
APPEND_SOURCE = "kernels/append.cu"
APPEND_KERNEL = "kv_append"
DECODE_DTYPES = ("float16", "bfloat16")
COMBINE_DTYPES = ("float16", "bfloat16", "float32")
COMBINE_ROWS_PER_CTA = 4  # warps of lse_combine, one row each
APPEND_THREADS = 256


@dataclass(frozen=True)
class DecodeTile:
    block_n: int
    warps: int
    stages: int
    min_blocks: int = 1

    block_m = 16  # packed query rows per CTA (decode.cu's kBlockM)

    def smem_bytes(self, bucket, elem_bytes=2):
        """``kSmemBytes`` of decode.cu: Q_i and ``stages`` K_j and V_j tiles of rows padded by 16
        bytes, or the warps' merge buffers (O_i in float32 rows padded by 8 floats, m_i, l_i) where
        those are larger (they reuse the K/V ring)."""
        row = bucket * elem_bytes + 16
        kv = 2 * self.stages * self.block_n * row
        merge = self.warps * self.block_m * ((bucket + 8) * 4 + 8)
        return self.block_m * row + max(kv, merge)

    def ctas_per_sm(self, bucket, fam):
        """CTAs of this tile one SM holds by shared memory (1 KiB reserved per CTA; sm_90: 228 KiB
        per SM, the sm80 family's smallest: 100 KiB, Turing: 64 KiB), at most 4."""
        per_sm = {"sm90": 228 * 1024, "sm80": 100 * 1024, "sm75": 64 * 1024}[fam]
        return max(1, min(4, per_sm // (self.smem_bytes(bucket) + 1024)))


_D = DecodeTile
# Decoding reads every key and value once and computes little on them: the tiles are sized for
# bytes in flight. An SM must keep about 36 KB of loads outstanding to draw its share of 4.8 TB/s
# at ~1 us latency; each entry keeps (stages - 1) tiles of about 32 KB of K and V in flight per
# CTA, with two CTAs per SM where shared memory allows (sm90: 227 KiB per CTA; the sm80 family
# within the 99 KiB of sm_86/sm_89). Not yet tuned on hardware (bench/NOTES.md, "Decoding").
DECODE_TILES = {
    ("sm90", "16bit"): {32: _D(128, 4, 4, min_blocks=2), 64: _D(64, 4, 4, min_blocks=2),
                        96: _D(64, 4, 4, min_blocks=2), 128: _D(64, 4, 3, min_blocks=2),
                        160: _D(64, 4, 2, min_blocks=2), 192: _D(64, 4, 2, min_blocks=2), 224: _D(64, 4, 3),
                        256: _D(64, 4, 3)},
    ("sm80", "16bit"): {32: _D(128, 4, 4), 64: _D(64, 4, 4), 96: _D(64, 4, 3), 128: _D(64, 4, 2),
                        160: _D(64, 4, 2), 192: _D(32, 2, 3), 224: _D(32, 2, 3), 256: _D(32, 2, 2)},
    # Turing loads synchronously, so no stage beyond the second keeps bytes in flight: two stages,
    # block_n (then warps) halved to fit 64 KiB.
    ("sm75", "16bit"): {32: _D(128, 4, 2), 64: _D(64, 4, 2), 96: _D(64, 4, 2), 128: _D(32, 2, 2),
                        160: _D(32, 2, 2), 192: _D(32, 2, 2), 224: _D(16, 1, 2), 256: _D(16, 1, 2)},
}

# What the decode kernel serves: everything the dense forward does (the mask, score modifiers,
# GQA, any strides, Dv != D), for float16 and bfloat16.
DECODE_FEATURES = FEATURES


def decode_tile(fam, dtype_name, head_dim, head_dim_v):
    """``(tile, bucket)`` of the decode kernel for a family, a 16-bit dtype and head dims."""
    if dtype_name not in DECODE_DTYPES:
        raise ValueError(f"the decode kernel takes {', '.join(DECODE_DTYPES)}, not {dtype_name}")
    require_dtype(fam, dtype_name)
    table = DECODE_TILES[(fam, kind(dtype_name))]
    bucket = head_dim_bucket(head_dim, head_dim_v, table)
    return table[bucket], bucket


def decode_defines(tile, bucket, dtype_name, vec_load, mods):
    """The ``#define`` block of one decode instantiation."""
    return {"HEAD_DIM": bucket, "BLOCK_N": tile.block_n, "NUM_WARPS": tile.warps, "STAGES": tile.stages,
            "MIN_BLOCKS": tile.min_blocks, "VEC_LOAD": int(vec_load), "DTYPE": DTYPE_CODES[dtype_name],
            "SCORE_MODS": mods, "SMEM_BYTES": tile.smem_bytes(bucket, elem_bytes(dtype_name))}


def combine_defines(dtype_name):
    return {"DTYPE": DTYPE_CODES[dtype_name]}


def append_defines(elem_size):
    return {"ELEM_BYTES": elem_size}


# Splits: at most this many CTAs share one sequence's keys, and each split keeps at least
# DECODE_MIN_TILES_PER_SPLIT key tiles, so the pipeline's fill and the partial results stay small
# beside the keys streamed.
DECODE_MAX_SPLITS = 128
DECODE_MIN_TILES_PER_SPLIT = 4


def decode_splits(ctas, key_tiles, sm_count, ctas_per_sm):
    """How many splits share each sequence's keys: ``ctas`` CTAs without splitting (batch x kv heads
    x row tiles), ``key_tiles`` key tiles of the longest sequence, ``sm_count`` SMs holding
    ``ctas_per_sm`` CTAs each.

    No split when the grid fills 80 % of the CTA slots already. Among the counts that leave each
    split DECODE_MIN_TILES_PER_SPLIT key tiles or more: the largest when even that leaves slots idle
    (decoding is bound by bytes in flight, so every CTA adds to them); otherwise FlashAttention's
    rule, the smallest count whose last wave is at least 85 % as full as the best count's."""
    slots = sm_count * ctas_per_sm
    most = max(1, min(DECODE_MAX_SPLITS, key_tiles // DECODE_MIN_TILES_PER_SPLIT))
    if ctas <= 0 or ctas >= 0.8 * slots or most == 1:
        return 1
    if ctas * most <= slots:
        return most

    def efficiency(splits):
        waves = ctas * splits / slots
        return waves / math.ceil(waves)

    best = max(efficiency(s) for s in range(1, most + 1))
    return next(s for s in range(1, most + 1) if efficiency(s) >= 0.85 * best)


def decode_instantiations(fam=None):
    """Every decode, combine and append instantiation (on family ``fam`` only, if given), each with
    its family's ``family_defines``."""
    out = []
    for (f, kind_name), table in DECODE_TILES.items():
        if fam is not None and f != fam:
            continue
        extra = family_defines(f)
        for bucket, tile in table.items():
            for name in _served(f, kind_name):
                for mods in SCORE_MOD_SETS:
                    for vec in (1, 0):
                        out.append((DECODE_SOURCE, DECODE_KERNEL, {**decode_defines(tile, bucket, name, vec, mods),
                                                                   **extra}))
    for f in FAMILY_ARCHS if fam is None else (fam,):
        extra = family_defines(f)
        for entry in ([(COMBINE_SOURCE, COMBINE_KERNEL, {**combine_defines(name), **extra})
                       for name in COMBINE_DTYPES if name in family_dtypes(f)]
                      + [(APPEND_SOURCE, APPEND_KERNEL, {**append_defines(size), **extra}) for size in (2, 4, 8)]):
            if entry not in out:
                out.append(entry)
    return out
