"""Launcher of the backward kernels ``cuda_src/flash_bwd_dkdv_sm90.cu`` (float16/bfloat16 dK/dV
with warpgroup MMA, sm_90 at head dims 64 and 128), ``cuda_src/flash_bwd_dkdv.cu`` (float16/bfloat16
dK/dV elsewhere), ``cuda_src/flash_bwd.cu`` (float32 dK/dV and the deterministic dQ kernel) and
``cuda_src/flash_bwd_aux.cu``.

The backward runs as up to four launches on CuPy's current stream:

1. ``flash_bwd_preprocess``: D = rowsum(dO ∘ O) and L2 = LSE · log2 e per query row (float32,
   padded to a multiple of 128 rows; +inf where LSE = −inf so fully masked rows give P = 0).
2. ``flash_bwd_dkdv``: one CTA per key tile K_j, V_j of a key/value head, streaming Q_i, dO_i of
   the query heads that share it; dK and dV stay in registers. By default (``deterministic=False``)
   it also adds dQ = dS K_j into a float32 workspace with atomics. On sm_90 at head dims 64 and
   128 the 16-bit kernel uses warpgroup MMA, two warpgroups of 64 keys keeping P and dS in registers
   (``WgConfig``); elsewhere the 16-bit kernel passes P and dS through shared memory between warp
   tiles of 32 rows (``KvConfig``); the float32 one keeps them in registers of warps that own 16
   keys (``Config``).
3. ``flash_bwd_dq`` (``deterministic=True`` only): one CTA per query tile, looping over key tiles
   and accumulating dQ in registers, so dq is bitwise reproducible. It recomputes S and dP: the
   backward then does 7 tile products instead of 5, about 1.4× the tensor-core work of the atomic path.
4. ``flash_bwd_convert``: float32 workspaces to the output dtype (the atomic dQ; and dK, dV when a
   GQA group is split over several CTAs to fill the GPU, their partial sums added in a fixed order).

One table, ``CONFIGS``, holds the tile configuration of both main kernels per architecture family
and element kind, one entry per head-dim bucket; its entries become ``#define`` lines that the
kernel checks with ``static_assert``s.
"""

import math
from dataclasses import dataclass

import numpy

from .._errors import BackendUnavailableError
from . import runtime
from .runtime import element_strides, vector_loadable

SOURCE = "flash_bwd.cu"
DKDV16_SOURCE = "flash_bwd_dkdv.cu"
DKDV_SM90_SOURCE = "flash_bwd_dkdv_sm90.cu"
AUX_SOURCE = "flash_bwd_aux.cu"
KERNEL_DKDV = "flash_bwd_dkdv"
KERNEL_DQ = "flash_bwd_dq"
KERNEL_PREPROCESS = "flash_bwd_preprocess"
KERNEL_CONVERT = "flash_bwd_convert"

HEAD_DIM_BUCKETS = (32, 64, 96, 128, 160, 192, 224, 256)
_DTYPE_CODES = {"float16": 1, "bfloat16": 2, "float32": 3}
_ELEM_BYTES = {"float16": 2, "bfloat16": 2, "float32": 4}
_LOG2E = 1.4426950408889634
_MAX_GRID_X = 2**31 - 1
# L2 and D rows are padded to this, so streamed tiles (which divide it) read them without bounds.
_ROW_PAD = 128


@dataclass(frozen=True)
class Config:
    """A configuration of ``flash_bwd.cu`` (the float32 dK/dV kernel and the dQ kernel): the CTA
    owns ``block_own`` rows (keys for dK/dV, queries for dQ) and streams tiles of ``block_stream``
    rows; ``split_d`` warps share each 16-row group, each accumulating head_dim / split_d columns."""

    block_own: int
    block_stream: int
    warps: int
    split_d: int = 1
    stages: int = 2
    min_blocks: int = 1
    kk_unroll: int = 0  # unroll of the k16 loop of S and dP (0: full); lower saves registers
    split_stream: bool = False  # float32 dK/dV: split streamed tiles once into tf32 planes

    def smem_bytes(self, bucket, elem_bytes, dkdv, dq_atomic):
        """Dynamic shared memory, mirroring the layout in ``flash_bwd.cu``."""
        row = bucket * elem_bytes + 16
        planes = 2 if self.split_stream else 1
        total = 2 * self.block_own * row + 2 * self.stages * self.block_stream * row * planes
        if dkdv:
            total += 2 * self.stages * self.block_stream * 4
            if dq_atomic:
                total += 2 * self.block_own * (self.block_stream * elem_bytes + 16)
        return total


@dataclass(frozen=True)
class KvConfig:
    """A configuration of the 16-bit dK/dV kernel (``flash_bwd_dkdv.cu``): the CTA owns ``block_n``
    keys and streams tiles of ``block_m`` queries. The three products are cut into warp tiles with
    ``warps_n_sdp`` warps along the keys for S and dP, ``warps_n_dkv`` along the keys for dK and dV
    and ``warps_m_dq`` along the queries for dQ (the other warps along the other dimension)."""

    block_n: int
    block_m: int
    warps: int
    warps_n_sdp: int
    warps_n_dkv: int
    warps_m_dq: int
    stages: int = 2
    min_blocks: int = 1
    kk_unroll: int = 0  # unroll of the k16 loop of S and dP (0: full)
    dq_unroll: int = 0  # unroll of the k16 loop of dQ (0: full)

    @property
    def block_own(self):
        return self.block_n

    def smem_bytes(self, bucket, elem_bytes, dkdv, dq_atomic):
        """Dynamic shared memory, mirroring the layout in ``flash_bwd_dkdv.cu``."""
        row = bucket * 2 + 16
        return (2 * self.block_n * row + self.stages * self.block_m * (2 * row + 8)
                + 2 * self.block_n * (self.block_m * 2 + 16))


@dataclass(frozen=True)
class WgConfig:
    """A configuration of the sm_90a 16-bit dK/dV kernel (``flash_bwd_dkdv_sm90.cu``, warpgroup MMA):
    each of ``warpgroups`` warpgroups owns 64 keys and the CTA streams tiles of ``block_m`` queries."""

    block_m: int
    warpgroups: int = 2
    stages: int = 2
    min_blocks: int = 1

    @property
    def block_own(self):
        return 64 * self.warpgroups

    @property
    def warps(self):
        return 4 * self.warpgroups

    def smem_bytes(self, bucket, elem_bytes, dkdv, dq_atomic):
        """Dynamic shared memory, mirroring the layout in ``flash_bwd_dkdv_sm90.cu`` (with 1024 bytes
        to align its swizzled tiles)."""
        n, m = self.block_own, self.block_m
        total = 2 * n * bucket * 2 + 2 * self.stages * m * bucket * 2 + 2 * self.stages * m * 4 + 1024
        return total + (n * m * 2 if dq_atomic else 0)


@dataclass(frozen=True)
class Entry:
    dkdv: Config
    dq: Config


_C, _K, _W = Config, KvConfig, WgConfig
# (family, "16bit" | "float32") -> {head-dim bucket: Entry}. sm90 entries fit 227 KiB of shared
# memory per CTA; sm80-family entries fit the 99 KiB of sm_86/sm_89 (and so the A100's 163 KiB),
# except the atomic dK/dV variant of float32 at d = 256, which there falls back to the dQ kernel.
CONFIGS = {
    ("sm90", "16bit"): {
        32: Entry(_K(128, 128, 8, 4, 4, 4), _C(128, 64, 8)),
        64: Entry(_W(128), _C(128, 64, 8)),
        96: Entry(_K(128, 64, 8, 4, 4, 4), _C(128, 64, 8)),
        128: Entry(_W(64), _C(128, 64, 8)),
        160: Entry(_K(64, 64, 8, 4, 4, 4), _C(64, 64, 8, 2)),
        192: Entry(_K(64, 64, 8, 4, 4, 4), _C(64, 64, 8, 2)),
        224: Entry(_K(64, 64, 8, 4, 4, 4), _C(64, 64, 8, 2)),
        256: Entry(_K(64, 64, 8, 4, 4, 4), _C(64, 64, 8, 2)),
    },
    ("sm80", "16bit"): {
        32: Entry(_K(64, 64, 4, 2, 2, 2), _C(128, 64, 8)),
        64: Entry(_K(64, 64, 4, 2, 2, 2), _C(128, 64, 8)),
        96: Entry(_K(64, 32, 4, 2, 2, 2), _C(64, 64, 4)),
        128: Entry(_K(64, 32, 8, 4, 4, 2), _C(64, 32, 4)),
        160: Entry(_K(32, 32, 4, 2, 2, 2), _C(32, 16, 4, 2)),
        192: Entry(_K(32, 32, 4, 2, 2, 2), _C(32, 16, 4, 2)),
        224: Entry(_K(32, 32, 4, 2, 2, 2), _C(32, 16, 4, 2)),
        256: Entry(_K(32, 32, 4, 2, 2, 2, stages=1), _C(32, 16, 4, 2)),
    },
    ("sm90", "float32"): {
        32: Entry(_C(128, 32, 8, split_stream=True), _C(64, 32, 8, 2)),
        64: Entry(_C(128, 32, 8, split_stream=True), _C(64, 32, 8, 2)),
        96: Entry(_C(128, 16, 8, split_stream=True), _C(64, 32, 8, 2)),
        128: Entry(_C(128, 16, 8, split_stream=True), _C(64, 32, 8, 2)),
        160: Entry(_C(64, 16, 8, 2, split_stream=True), _C(32, 16, 8, 4)),
        192: Entry(_C(64, 16, 8, 2, split_stream=True), _C(32, 16, 8, 4)),
        224: Entry(_C(64, 16, 8, 2), _C(32, 16, 8, 4)),
        256: Entry(_C(32, 16, 8, 4), _C(32, 16, 8, 4)),
    },
    ("sm80", "float32"): {
        32: Entry(_C(32, 16, 4, 2), _C(32, 16, 4, 2)),
        64: Entry(_C(32, 16, 4, 2), _C(32, 16, 4, 2)),
        96: Entry(_C(32, 16, 4, 2), _C(32, 16, 4, 2)),
        128: Entry(_C(32, 16, 4, 2), _C(32, 16, 4, 2)),
        160: Entry(_C(16, 16, 4, 4), _C(16, 16, 4, 4)),
        192: Entry(_C(16, 16, 4, 4), _C(16, 16, 4, 4)),
        224: Entry(_C(16, 16, 4, 4), _C(16, 16, 4, 4)),
        256: Entry(_C(16, 16, 4, 4), _C(16, 16, 4, 4)),
    },
}


def head_dim_bucket(head_dim, head_dim_v):
    """The compiled head dim used for D and Dv (both zero-padded to it)."""
    d = max(head_dim, head_dim_v)
    for bucket in HEAD_DIM_BUCKETS:
        if d <= bucket:
            return bucket
    raise ValueError(f"head_dim {head_dim} / head_dim_v {head_dim_v} exceed the largest bucket {HEAD_DIM_BUCKETS[-1]}")


def family(major, minor):
    return "sm90" if major == 9 else "sm80"


def _kind(dtype_name):
    return "float32" if dtype_name == "float32" else "16bit"


def main_source(config):
    if isinstance(config, WgConfig):
        return DKDV_SM90_SOURCE
    return DKDV16_SOURCE if isinstance(config, KvConfig) else SOURCE


def main_defines(config, bucket, dtype_name, role, dq_atomic):
    """The ``#define`` block of one main-kernel instantiation (role 0: dK/dV, 1: dQ). SMEM_BYTES is
    the dynamic shared memory the launcher will give it; the kernel checks it against its layout."""
    smem = config.smem_bytes(bucket, _ELEM_BYTES[dtype_name], role == 0, dq_atomic)
    if isinstance(config, WgConfig):
        return {
            "HEAD_DIM": bucket,
            "BLOCK_M": config.block_m,
            "WARPGROUPS": config.warpgroups,
            "STAGES": config.stages,
            "MIN_BLOCKS": config.min_blocks,
            "DQ_ATOMIC": int(dq_atomic),
            "SMEM_BYTES": smem,
            "DTYPE": _DTYPE_CODES[dtype_name],
        }
    if isinstance(config, KvConfig):
        return {
            "HEAD_DIM": bucket,
            "BLOCK_N": config.block_n,
            "BLOCK_M": config.block_m,
            "NUM_WARPS": config.warps,
            "WARPS_N_SDP": config.warps_n_sdp,
            "WARPS_N_DKV": config.warps_n_dkv,
            "WARPS_M_DQ": config.warps_m_dq,
            "STAGES": config.stages,
            "MIN_BLOCKS": config.min_blocks,
            "KK_UNROLL": config.kk_unroll or bucket // 16,
            "DQ_UNROLL": config.dq_unroll or config.block_n // 16,
            "DQ_ATOMIC": int(dq_atomic),
            "SMEM_BYTES": smem,
            "DTYPE": _DTYPE_CODES[dtype_name],
        }
    return {
        "ROLE": role,
        "HEAD_DIM": bucket,
        "BLOCK_OWN": config.block_own,
        "BLOCK_STREAM": config.block_stream,
        "NUM_WARPS": config.warps,
        "SPLIT_D": config.split_d,
        "STAGES": config.stages,
        "MIN_BLOCKS": config.min_blocks,
        "KK_UNROLL": config.kk_unroll or bucket // 16,
        "DQ_ATOMIC": int(dq_atomic),
        "SPLIT_STREAM": int(config.split_stream),
        "SMEM_BYTES": smem,
        "DTYPE": _DTYPE_CODES[dtype_name],
    }


def aux_defines(dtype_name):
    return {"DTYPE": _DTYPE_CODES[dtype_name]}


def instantiations(family=None):
    """Every ``(source, kernel name, defines)`` the launcher can choose (on ``family`` only, if
    given), for the compile gate. An entry of the "sm90" family runs only on compute capability 9.x."""
    seen = []

    def add(entry):
        if entry not in seen:
            seen.append(entry)

    for (fam, kind), table in CONFIGS.items():
        if family is not None and fam != family:
            continue
        names = ("float16", "bfloat16") if kind == "16bit" else ("float32",)
        for bucket, entry in table.items():
            for name in names:
                src = main_source(entry.dkdv)
                add((src, KERNEL_DKDV, main_defines(entry.dkdv, bucket, name, 0, True)))
                add((src, KERNEL_DKDV, main_defines(entry.dkdv, bucket, name, 0, False)))
                add((SOURCE, KERNEL_DQ, main_defines(entry.dq, bucket, name, 1, False)))
    for name in _DTYPE_CODES:
        add((AUX_SOURCE, KERNEL_PREPROCESS, aux_defines(name)))
        add((AUX_SOURCE, KERNEL_CONVERT, aux_defines(name)))
    return seen


# The architectures the compile gate builds each family for (as in forward.py).
FAMILY_ARCHS = {"sm80": ("sm_80",), "sm90": ("sm_90a",)}


def choose_entry(problem, device_id=None):
    """The table entry and bucket for ``problem`` on the given (or current) device."""
    major, minor = runtime.compute_capability(device_id)
    kind = _kind(numpy.dtype(problem.dtype).name)
    bucket = head_dim_bucket(problem.head_dim, problem.head_dim_v)
    return CONFIGS[(family(major, minor), kind)][bucket], bucket


def _smem_limit(device_id):
    import cupy

    return cupy.cuda.Device(device_id).attributes["MaxSharedMemoryPerBlockOptin"]


def _sm_count(device_id):
    import cupy

    return cupy.cuda.Device(device_id).attributes["MultiProcessorCount"]


def gqa_splits(problem, n_key_tiles, sm_count):
    """How many CTAs share one key tile's GQA group: enough CTAs for two waves, at most one per head."""
    group = problem.group_size
    base = problem.batch * problem.heads_kv * n_key_tiles
    if group <= 1 or base == 0:
        return 1, max(group, 1)
    want = min(group, max(1, math.ceil(2 * sm_count / base)))
    per_split = math.ceil(group / want)
    return math.ceil(group / per_split), per_split


def flash_backward(dout, q, k, v, out, lse, dq, dk, dv, problem, deterministic):
    """Write dq, dk, dv (shaped like q, k, v, input dtype, any strides) on the GPU.

    dout and out are (B, Sq, Hq, Dv), lse (B, Hq, Sq) float32 from the forward (−inf on rows that
    see no key); every element of dq, dk and dv is written. ``deterministic`` selects the dQ pass
    without atomics (bitwise-identical results across runs). Runs on CuPy's current stream.
    """
    _launch(dout, q, k, v, out, lse, dq, dk, dv, problem, deterministic, None)


def _launch(dout, q, k, v, out, lse, dq, dk, dv, problem, deterministic, entry):
    """``flash_backward`` with an optional explicit ``Entry`` (for tuning)."""
    import cupy

    name = numpy.dtype(problem.dtype).name
    if name not in _DTYPE_CODES:
        raise BackendUnavailableError(f"the CUDA backward handles float16, bfloat16 and float32, not {name}")
    B, Sq, Sk = problem.batch, problem.seqlen_q, problem.seqlen_k
    Hq, Hkv, D, Dv = problem.heads_q, problem.heads_kv, problem.head_dim, problem.head_dim_v
    i32, i64, f32 = numpy.int32, numpy.int64, numpy.float32
    with cupy.cuda.Device(q.device.id):
        if B == 0:
            return
        chosen, bucket = choose_entry(problem, q.device.id)
        entry = entry or chosen
        elem_bytes = numpy.dtype(problem.dtype).itemsize
        sm_count = _sm_count(q.device.id)
        causal = i32(bool(problem.causal))
        offset = i64(problem.causal_offset if problem.causal else 0)
        scale_log2, scale = f32(problem.scale * _LOG2E), f32(problem.scale)
        vec_in = i32(all(vector_loadable(x) for x in (q, k, v, dout)))
        aux = aux_defines(name)

        # 1. D and L2 per query row.
        sq_pad = math.ceil(Sq / _ROW_PAD) * _ROW_PAD
        l2 = cupy.empty((B, Hq, sq_pad), dtype=numpy.float32)
        dsum = cupy.empty((B, Hq, sq_pad), dtype=numpy.float32)
        rows = B * Hq * sq_pad
        if rows:
            kernel = runtime.get_kernel(AUX_SOURCE, KERNEL_PREPROCESS, aux)
            runtime.launch(kernel, (math.ceil(rows / 8), 1, 1), (256, 1, 1), (
                out, dout, lse, l2, dsum, *element_strides(out), *element_strides(dout), *element_strides(lse),
                i32(Hq), i32(Sq), i32(sq_pad), i32(Dv), i64(rows)))

        # 2. dK, dV (and the atomic dQ).
        cfg = entry.dkdv
        n_key_tiles = math.ceil(Sk / cfg.block_own)
        splits, per_split = gqa_splits(problem, n_key_tiles, sm_count)
        # The atomic variant stages dS^T twice more; where that exceeds the device's shared memory,
        # the dQ kernel does the work instead (same results, bitwise reproducible).
        dq_atomic = not deterministic and (
            entry.dkdv.smem_bytes(bucket, elem_bytes, True, True) <= _smem_limit(q.device.id))
        # Padded to whole tiles and the bucket's columns, so the kernel adds whole vectors unchecked.
        dq_accum = cupy.zeros((B, Hq, sq_pad, bucket), dtype=numpy.float32) if dq_atomic else None
        if splits > 1:
            dk_out = cupy.empty((splits, B, Hkv, Sk, D), dtype=numpy.float32)
            dv_out = cupy.empty((splits, B, Hkv, Sk, Dv), dtype=numpy.float32)
            dk_strides = [i64(B * Hkv * Sk * D), i64(Hkv * Sk * D), i64(D), i64(Sk * D), i64(1)]
            dv_strides = [i64(B * Hkv * Sk * Dv), i64(Hkv * Sk * Dv), i64(Dv), i64(Sk * Dv), i64(1)]
        else:
            dk_out, dv_out = dk, dv
            dk_strides = [i64(0), *element_strides(dk)]
            dv_strides = [i64(0), *element_strides(dv)]
        grid = B * Hkv * splits * n_key_tiles
        if grid > _MAX_GRID_X:
            raise ValueError(f"batch * heads_kv * ceil(seqlen_k / {cfg.block_own}) = {grid} exceeds the CUDA grid limit")
        if grid:
            kernel = runtime.get_kernel(main_source(cfg), KERNEL_DKDV, main_defines(cfg, bucket, name, 0, dq_atomic))
            runtime.launch(kernel, (grid, 1, 1), (cfg.warps * 32, 1, 1), (
                q, k, v, dout, l2, dsum, dq_accum if dq_atomic else l2, dk_out, dv_out,
                *element_strides(q), *element_strides(k), *element_strides(v), *element_strides(dout),
                *dk_strides, *dv_strides,
                i32(Hq), i32(Hkv), i32(problem.group_size), i32(per_split), i32(splits), i32(Sq), i32(sq_pad),
                i32(Sk), i32(D), i32(Dv), causal, offset, scale_log2, scale, i32(n_key_tiles), vec_in,
                i32(splits > 1)), shared_mem=cfg.smem_bytes(bucket, elem_bytes, True, dq_atomic))
        if splits > 1:
            _convert(aux, dk_out, splits, Sk * D, D, dk, Hkv, Sk, D, 1.0, sm_count)
            _convert(aux, dv_out, splits, Sk * Dv, Dv, dv, Hkv, Sk, Dv, 1.0, sm_count)

        # 3. dQ.
        if dq_atomic:
            _convert(aux, dq_accum, 1, sq_pad * bucket, bucket, dq, Hq, Sq, D, problem.scale, sm_count)
        else:
            cfg = entry.dq
            n_q_tiles = math.ceil(Sq / cfg.block_own)
            grid = B * Hq * n_q_tiles
            if grid > _MAX_GRID_X:
                raise ValueError(f"batch * heads_q * ceil(seqlen_q / {cfg.block_own}) = {grid} exceeds the CUDA grid limit")
            if grid:
                kernel = runtime.get_kernel(SOURCE, KERNEL_DQ, main_defines(cfg, bucket, name, 1, False))
                runtime.launch(kernel, (grid, 1, 1), (cfg.warps * 32, 1, 1), (
                    q, k, v, dout, l2, dsum, dq,
                    *element_strides(q), *element_strides(k), *element_strides(v), *element_strides(dout),
                    *element_strides(dq),
                    i32(Hq), i32(problem.group_size), i32(Sq), i32(sq_pad), i32(Sk), i32(D), i32(Dv), causal, offset,
                    scale_log2, scale, i32(n_q_tiles), vec_in), shared_mem=cfg.smem_bytes(bucket, elem_bytes, False, False))


def _convert(aux, src, splits, src_sh, src_ss, dst, heads, seqlen, dim, scale, sm_count):
    """dst (B, S, H, dim), any strides = scale · Σ_split src[split]; src float32, each split
    (B, H, S, ≥dim) with ``src_sh`` elements per head and ``src_ss`` per row."""
    rows = dst.size // dim if dim else 0
    if rows == 0:
        return
    split_stride = src.size // splits
    kernel = runtime.get_kernel(AUX_SOURCE, KERNEL_CONVERT, aux)
    blocks = min(math.ceil(rows / 8), sm_count * 16)  # 8 warps of 256 threads, one row each
    i32, i64 = numpy.int32, numpy.int64
    runtime.launch(kernel, (blocks, 1, 1), (256, 1, 1), (
        src, i64(split_stride), i64(src_sh), i64(src_ss), i32(splits), dst, *element_strides(dst), i32(heads),
        i32(seqlen), i32(dim), numpy.float32(scale), i64(rows)))
