"""The host side of ``cuda_src/core/params.cuh``: its structs as NumPy structured dtypes.

A kernel takes one ``FwdParams`` or ``BwdParams`` by value; the launchers fill a zeroed NumPy
scalar of the matching dtype here and CuPy passes its bytes as the argument. ``layout_asserts``
turns these dtypes into compile-time checks of field order, field sizes and ``sizeof``, appended
to every compiled program (the compile gate included), so the two definitions cannot drift apart.
"""

import functools
from dataclasses import dataclass

import numpy

_PTR = numpy.uint64
_I64 = numpy.int64
_I32 = numpy.int32
_F32 = numpy.float32

STRIDES = numpy.dtype([("b", _I64), ("s", _I64), ("h", _I64), ("d", _I64)], align=True)

_F64 = numpy.float64


def _fwd_dtype(acc):
    """FwdParamsOf<Acc>: ``acc`` is the accumulator type (float32, float64 for float64 inputs), the
    type of the LSE the kernel writes and of the score constants."""
    return numpy.dtype([
        ("q", _PTR), ("k", _PTR), ("v", _PTR), ("out", _PTR), ("lse", _PTR), ("alibi_slopes", _PTR),
        ("q_st", STRIDES), ("k_st", STRIDES), ("v_st", STRIDES), ("o_st", STRIDES),
        ("lse_sb", _I64), ("lse_sh", _I64), ("lse_ss", _I64),
        ("alibi_sb", _I64),
        ("mask_offset", _I64), ("window_left", _I64), ("window_right", _I64),
        ("batch", _I32), ("heads_q", _I32), ("heads_kv", _I32), ("group", _I32),
        ("seqlen_q", _I32), ("seqlen_k", _I32), ("head_dim", _I32), ("head_dim_v", _I32),
        ("scale", acc), ("scale_log2", acc), ("softcap_in", acc), ("softcap_out", acc),
        ("num_m_blocks", _I32), ("vec_out", _I32),
        ("cu_seqlens_q", _PTR), ("cu_seqlens_k", _PTR), ("seqused_q", _PTR), ("seqused_k", _PTR),
        ("mask_bottom_right", _I32),
    ], align=True)


def _bwd_dtype(acc):
    """BwdParamsOf<Acc>; l2, dsum, dq_accum and the partial sums of dk/dv are ``acc`` arrays."""
    return numpy.dtype([
        ("fwd", _fwd_dtype(acc)),
        ("dout", _PTR), ("l2", _PTR), ("dsum", _PTR), ("dq_accum", _PTR), ("dq", _PTR), ("dk", _PTR), ("dv", _PTR),
        ("do_st", STRIDES), ("dq_st", STRIDES), ("dk_st", STRIDES), ("dv_st", STRIDES),
        ("dk_split", _I64), ("dv_split", _I64),
        ("seqlen_q_pad", _I32), ("heads_per_split", _I32), ("splits", _I32), ("n_tiles", _I32), ("vec_in", _I32),
        ("f32_out", _I32),
    ], align=True)


FWD, BWD = _fwd_dtype(_F32), _bwd_dtype(_F32)
FWD64, BWD64 = _fwd_dtype(_F64), _bwd_dtype(_F64)

_C_NAMES = {FWD: "cuflash::FwdParams", BWD: "cuflash::BwdParams", FWD64: "cuflash::FwdParamsOf<double>",
            BWD64: "cuflash::BwdParamsOf<double>"}

# An unbounded window side (params.cuh's kUnbounded).
UNBOUNDED = 1 << 62
_LOG2E = 1.4426950408889634


def _designated(dtype):
    """A designated initializer naming every field of ``dtype`` in order: C++ refuses one whose
    order differs from the struct's."""
    parts = [f".{name} = " + (_designated(sub) if sub.fields is not None else "{}")
             for name, (sub, *_) in dtype.fields.items()]
    return "{" + ", ".join(parts) + "}"


def _field_sizes(dtype, prefix=""):
    for name, (sub, *_) in dtype.fields.items():
        yield prefix + name, sub.itemsize


@functools.lru_cache(maxsize=1)
def layout_asserts():
    """C++ checks that params.cuh's structs have exactly the layout of FWD and BWD (and of their
    float64 forms FWD64, BWD64).

    NVRTC has no constant ``offsetof``, so the layout is pinned by what determines it: the same
    fields in the same order (a designated initializer in this order must compile; C++ refuses
    one out of order), each of the same size, and the same total size (both sides align fields
    naturally).
    """
    lines = ["// Layout of the parameter structs as cuflash/_cuda/params.py builds them."]
    for dtype, c_name in _C_NAMES.items():
        lines.append(f"static_assert(sizeof({c_name}{_designated(dtype)}) == {dtype.itemsize}, "
                     f'"{c_name}: field order or size differs from params.py");')
        for field, size in _field_sizes(dtype):
            lines.append(f'static_assert(sizeof({c_name}::{field}) == {size}, "{c_name}::{field}: size differs from params.py");')
    return "\n" + "\n".join(lines) + "\n"


class Template:
    """A parameter struct built once, whose pointer fields are filled per call.

    Filling a NumPy record field by field costs about 10 µs per struct; copying these bytes and
    writing the pointers as one uint64 slice costs about 2.
    """

    def __init__(self, record, pointer_fields):
        self._bytes = numpy.frombuffer(record.tobytes(), dtype=numpy.uint8).copy()
        self._dtype = record.dtype
        self._slots = [_offset(record.dtype, field) // 8 for field in pointer_fields]

    def __call__(self, *pointers):
        buf = self._bytes.copy()
        buf.view(numpy.uint64)[self._slots] = pointers
        return buf.view(self._dtype)[0]


def _offset(dtype, path):
    offset = 0
    for name in path.split("."):
        dtype, field_offset = dtype.fields[name][:2]
        offset += field_offset
    return offset


FWD_POINTERS = ("q", "k", "v", "out", "lse", "alibi_slopes")
BWD_POINTERS = tuple(f"fwd.{name}" for name in FWD_POINTERS) + ("dout", "l2", "dsum", "dq_accum", "dq", "dk", "dv")


def pointer(x):
    """The device address of a CuPy array (0 for None)."""
    return 0 if x is None else x.data.ptr


def strides(x):
    """The element strides of a CuPy BSHD array as a STRIDES record value."""
    return tuple(s // x.itemsize for s in x.strides)


def window_side(size):
    """A window side as the kernels take it: beyond UNBOUNDED a bound bounds nothing."""
    return UNBOUNDED if size is None else min(size, UNBOUNDED)


def accum_dtype_of(problem):
    """The parameter records' accumulator type: float64 for float64 problems, else float32."""
    return numpy.dtype(_F64 if problem.dtype == _F64 else _F32)


@dataclass(frozen=True)
class Ragged:
    """A ragged batch as the kernels take it (``cuda_src/attn/seqlen.cuh``, SEQ_MODE 1): ``batch``
    sequences of at most ``max_seqlen_q`` queries and ``max_seqlen_k`` keys (the grid's sizes),
    packed (``cu_seqlens_q/k`` on the device; operands seen as one batch element, whose batch
    strides the kernels do not use) or padded (BSHD, with ``seqused_q/k`` where given), the mask of
    each sequence aligned bottom-right (offset Sk_b − Sq_b) or top-left. The device arrays
    themselves are pointers filled per call (RAGGED_POINTERS, in that order)."""

    batch: int
    max_seqlen_q: int
    max_seqlen_k: int
    packed: bool
    bottom_right: bool


RAGGED_POINTERS = ("cu_seqlens_q", "cu_seqlens_k", "seqused_q", "seqused_k")


def _unbatched(st):
    """Strides of a packed operand seen as one batch element: the batch stride is never used."""
    return (0,) + tuple(st)[1:]


def forward(problem, q, k, v, out, lse, slopes, num_m_blocks, vec_out, ragged=None):
    """The FwdParams of ``problem`` over these CuPy arrays (lse (B, Hq, Sq) in the accumulator type;
    slopes contiguous float32 or None), as the NumPy scalar CuPy passes by value: FwdParamsOf<double>
    (FWD64) for float64 problems, whose score constants keep double precision. With ``ragged``
    (a ``Ragged``; packed operands as (1, total, H, .) and lse as (1, Hq, total)), the grid's batch
    and lengths are its, and the mask's alignment is per sequence."""
    p = numpy.zeros((), FWD64 if accum_dtype_of(problem) == _F64 else FWD)
    p["q"], p["k"], p["v"], p["out"], p["lse"] = (pointer(x) for x in (q, k, v, out, lse))
    p["alibi_slopes"] = pointer(slopes)
    p["q_st"], p["k_st"], p["v_st"], p["o_st"] = (strides(x) for x in (q, k, v, out))
    p["lse_sb"], p["lse_sh"], p["lse_ss"] = strides(lse)
    p["alibi_sb"] = problem.heads_q if problem.alibi == "batch_head" else 0
    p["mask_offset"] = problem.mask_offset
    p["window_left"] = window_side(problem.window_left)
    p["window_right"] = window_side(problem.window_right)
    p["batch"], p["heads_q"], p["heads_kv"], p["group"] = (problem.batch, problem.heads_q, problem.heads_kv,
                                                          problem.group_size)
    p["seqlen_q"], p["seqlen_k"] = problem.seqlen_q, problem.seqlen_k
    p["head_dim"], p["head_dim_v"] = problem.head_dim, problem.head_dim_v
    p["scale"] = problem.scale
    p["scale_log2"] = problem.scale * _LOG2E
    if problem.softcap > 0:
        p["softcap_in"] = problem.scale / problem.softcap
        p["softcap_out"] = problem.softcap * _LOG2E
    p["num_m_blocks"] = num_m_blocks
    p["vec_out"] = int(vec_out)
    if ragged is not None:
        p["batch"], p["seqlen_q"], p["seqlen_k"] = ragged.batch, ragged.max_seqlen_q, ragged.max_seqlen_k
        p["mask_offset"] = 0
        p["mask_bottom_right"] = int(ragged.bottom_right)
        if ragged.packed:
            for field in ("q_st", "k_st", "v_st", "o_st"):
                p[field] = _unbatched(p[field][()].tolist())
            p["lse_sb"] = 0
    return p[()]


def backward(fwd, dout, l2, dsum, dq_accum, dq, dk, dv, dk_strides, dv_strides, dk_split, dv_split, seqlen_q_pad,
             heads_per_split, splits, n_tiles, vec_in, f32_out, packed=False):
    """The BwdParams around a forward's FwdParams ``fwd`` (strides of dk/dv given, as they may be
    partial sums in the accumulator type); BWD64 around an FWD64 record. ``packed``: dout and dq are
    packed operands seen as one batch element (``Ragged``)."""
    p = numpy.zeros((), BWD64 if fwd.dtype == FWD64 else BWD)
    p["fwd"] = fwd
    p["dout"], p["l2"], p["dsum"], p["dq_accum"], p["dq"], p["dk"], p["dv"] = (
        pointer(x) for x in (dout, l2, dsum, dq_accum, dq, dk, dv))
    p["do_st"], p["dq_st"] = strides(dout), strides(dq)
    if packed:
        p["do_st"], p["dq_st"] = _unbatched(strides(dout)), _unbatched(strides(dq))
    p["dk_st"], p["dv_st"] = dk_strides, dv_strides
    p["dk_split"], p["dv_split"] = dk_split, dv_split
    p["seqlen_q_pad"], p["heads_per_split"], p["splits"], p["n_tiles"] = seqlen_q_pad, heads_per_split, splits, n_tiles
    p["vec_in"], p["f32_out"] = int(vec_in), int(f32_out)
    return p[()]


# Decoding against a key/value cache: DecodeParams, CombineParams and AppendParams of params.cuh.

DECODE = numpy.dtype([
    ("fwd", FWD),
    ("cache_seqlens", _PTR), ("block_table", _PTR), ("o_partial", _PTR), ("lse_partial", _PTR),
    ("table_stride", _I64), ("num_pages", _I64),
    ("seqlen_new", _I32), ("page_size", _I32), ("splits", _I32), ("row_tiles", _I32), ("capacity", _I32),
], align=True)

COMBINE = numpy.dtype([
    ("o_partial", _PTR), ("lse_partial", _PTR), ("out", _PTR), ("lse", _PTR),
    ("o_st", STRIDES),
    ("lse_sb", _I64), ("lse_sh", _I64), ("lse_ss", _I64),
    ("rows", _I64),
    ("seqlen_q", _I32), ("heads", _I32), ("head_dim_v", _I32), ("splits", _I32),
], align=True)

APPEND = numpy.dtype([
    ("k_new", _PTR), ("v_new", _PTR), ("k_cache", _PTR), ("v_cache", _PTR), ("cache_seqlens", _PTR),
    ("block_table", _PTR),
    ("kn_st", STRIDES), ("vn_st", STRIDES), ("kc_st", STRIDES), ("vc_st", STRIDES),
    ("table_stride", _I64), ("num_pages", _I64),
    ("batch", _I32), ("seqlen_new", _I32), ("heads_kv", _I32), ("head_dim", _I32), ("head_dim_v", _I32),
    ("page_size", _I32), ("capacity", _I32),
], align=True)

_C_NAMES.update({DECODE: "cuflash::DecodeParams", COMBINE: "cuflash::CombineParams",
                 APPEND: "cuflash::AppendParams"})

DECODE_POINTERS = tuple(f"fwd.{name}" for name in FWD_POINTERS) + ("cache_seqlens", "block_table", "o_partial",
                                                                   "lse_partial")
COMBINE_POINTERS = ("o_partial", "lse_partial", "out", "lse")
APPEND_POINTERS = ("k_new", "v_new", "k_cache", "v_cache", "cache_seqlens", "block_table")


def _cache_extent(p, k_cache, block_table):
    """The fields saying where a cache ends: a dense cache (block_table None) holds k_cache.shape[1]
    keys per sequence; a paged one block_table.shape[1] pages of k_cache.shape[1] keys each, among
    k_cache.shape[0] pages. The kernels clamp lengths and page indices to them, so that lengths
    and tables left unchecked on the device cannot move a read or write outside the cache."""
    if block_table is None:
        p["capacity"], p["num_pages"], p["page_size"], p["table_stride"] = k_cache.shape[1], 0, 0, 0
    else:
        # No pages: nothing to read, whatever the lengths say. The bound keeps tile arithmetic in
        # int (forward.MAX_SEQLEN, which the launchers check the real lengths against).
        pages = k_cache.shape[0]
        p["capacity"] = min(block_table.shape[1] * k_cache.shape[1], 2**31 - 1024) if pages else 0
        p["num_pages"], p["page_size"] = pages, k_cache.shape[1]
        p["table_stride"] = block_table.strides[0] // block_table.itemsize


def decode(problem, q, k_cache, v_cache, block_table, out, lse, seqlen_new, splits, row_tiles, vec_out):
    """The DecodeParams of a cache call (``problem`` the dense problem of q against one sequence of
    the cache, as ``_ragged.check_kvcache`` returns it); pointers are filled per call."""
    p = numpy.zeros((), DECODE)
    p["fwd"] = forward(problem, q, k_cache, v_cache, out, lse, None, 0, vec_out)
    _cache_extent(p, k_cache, block_table)
    p["seqlen_new"], p["splits"], p["row_tiles"] = seqlen_new, splits, row_tiles
    return p[()]


def combine(out, lse, batch, seqlen_q, heads, head_dim_v, splits):
    """The CombineParams merging ``splits`` partial results into out (B, Sq, H, Dv) and lse (B, H, Sq)."""
    p = numpy.zeros((), COMBINE)
    p["o_st"] = strides(out)
    p["lse_sb"], p["lse_sh"], p["lse_ss"] = strides(lse)
    p["rows"] = batch * seqlen_q * heads
    p["seqlen_q"], p["heads"], p["head_dim_v"], p["splits"] = seqlen_q, heads, head_dim_v, splits
    return p[()]


def append(k_new, v_new, k_cache, v_cache, cache_seqlens, block_table):
    """The AppendParams writing k_new, v_new (B, S_new, Hkv, .) into the caches (block_table None
    for a dense cache; both index vectors C-contiguous)."""
    p = numpy.zeros((), APPEND)
    for field, x in zip(APPEND_POINTERS, (k_new, v_new, k_cache, v_cache, cache_seqlens, block_table)):
        p[field] = pointer(x)
    p["kn_st"], p["vn_st"], p["kc_st"], p["vc_st"] = (strides(x) for x in (k_new, v_new, k_cache, v_cache))
    _cache_extent(p, k_cache, block_table)
    p["batch"], p["seqlen_new"], p["heads_kv"] = k_new.shape[0], k_new.shape[1], k_new.shape[2]
    p["head_dim"], p["head_dim_v"] = k_new.shape[3], v_new.shape[3]
    return p[()]


# The sm_90a forward (kernels/fwd_sm90.cu): FwdSm90Params of params.cuh, the FwdParams and the
# tensor maps of q, k and v (128 opaque bytes each from cuTensorMapEncodeTiled, 64-byte aligned as
# the driver requires; the C++ struct's alignas(64) puts them at the same offsets).

TENSOR_MAP_BYTES = 128
_TENSOR_MAP_ALIGN = 64
_MAPS_AT = -(-FWD.itemsize // _TENSOR_MAP_ALIGN) * _TENSOR_MAP_ALIGN
FWD_SM90_MAPS = ("q_map", "k_map", "v_map")
FWD_SM90 = numpy.dtype({
    "names": ["fwd", *FWD_SM90_MAPS],
    "formats": [FWD] + [(numpy.uint8, TENSOR_MAP_BYTES)] * len(FWD_SM90_MAPS),
    "offsets": [0] + [_MAPS_AT + i * TENSOR_MAP_BYTES for i in range(len(FWD_SM90_MAPS))],
    "itemsize": _MAPS_AT + len(FWD_SM90_MAPS) * TENSOR_MAP_BYTES,
})
_C_NAMES[FWD_SM90] = "cuflash::FwdSm90Params"
FWD_SM90_POINTERS = tuple(f"fwd.{name}" for name in FWD_POINTERS)


def forward_sm90(fwd):
    """The FwdSm90Params around a forward's FwdParams record; the maps are filled per call."""
    p = numpy.zeros((), FWD_SM90)
    p["fwd"] = fwd
    return p[()]


def map_offsets():
    """Byte offsets of the q, k and v tensor maps in a FWD_SM90 record."""
    return tuple(FWD_SM90.fields[name][1] for name in FWD_SM90_MAPS)
