"""Tensor maps for TMA copies: the driver's ``cuTensorMapEncodeTiled``, called through ctypes.

A tensor map is 128 opaque bytes that describe a tensor in global memory (base address, sizes,
byte strides) and the box one copy moves into shared memory (its size, its swizzle). The kernels
take them inside their ``__grid_constant__`` parameter struct (``params.FWD_SM90``). CuPy does not
wrap the encoder, but it is an ordinary host function of ``libcuda.so.1``, the driver CuPy runs on:
it needs no context and no device work, and costs a few microseconds; maps are cached per
(pointer, shape, strides, box) anyway, so a repeated call encodes nothing.

A BSHD tensor x (B, S, H, D) is mapped as rank 4, innermost first: (D, S, H, B) with byte strides
(S, H, B)-strides of x, so one map serves every (batch, head) and rows of one head keep their
S-stride. Its boxes are 64 elements (128 bytes) of the head dim by ``box_rows`` rows of one (batch,
head), stored with the 128-byte swizzle that ``core/wgmma.cuh``'s Swizzle128 tiles use. Elements
outside the tensor (rows past S, columns past D) land as zeros.

TMA's rules (CUDA driver API, "Tensor Map Object Management"): the base 16-byte aligned, every
stride but the innermost a multiple of 16 bytes below 2^40, the innermost stride one element, every
size in 1..2^32. ``layout_reason`` says which rule an array breaks; the launcher then runs the
``mma.sync`` kernel instead.
"""

import ctypes
import functools

import numpy

from .._errors import KernelLaunchError

MAP_BYTES = 128
_MAP_ALIGN = 64
BOX_COLS = 64  # 16-bit elements per 128-byte swizzled row

# Enumerators of cuda.h. The elements are copied as bits, so 16-bit data of either format is UINT16;
# OOB_FILL_NONE fills out-of-bounds elements with zeros.
_DATA_TYPE_UINT16 = 1
_INTERLEAVE_NONE = 0
_SWIZZLE_128B = 3
_L2_PROMOTION_128B = 2
_OOB_FILL_NONE = 0

_MAX_STRIDE = 1 << 40
_MAX_SIZE = 1 << 32


def layout_reason(x):
    """Why a tensor map cannot describe the 16-bit CuPy array ``x`` (B, S, H, D), or "" if it can."""
    if x.itemsize != 2:
        return f"elements of {x.itemsize} bytes (the maps are built for 16-bit elements)"
    if x.data.ptr % 16:
        return "its base address is not 16-byte aligned"
    if x.shape[-1] > 1 and x.strides[-1] != x.itemsize:
        return f"a head-dim stride of {x.strides[-1] // x.itemsize} elements (TMA needs 1)"
    if any(size > _MAX_SIZE for size in x.shape):
        return "a dimension longer than 2^32"
    for axis, name in ((1, "sequence"), (2, "head"), (0, "batch")):
        stride = x.strides[axis]
        if x.shape[axis] > 1 and (stride < 0 or stride % 16 or stride >= _MAX_STRIDE):
            return f"its {name} stride of {stride} bytes is not a multiple of 16 in [0, 2^40)"
    return ""


@functools.lru_cache(maxsize=1)
def _encoder():
    lib = ctypes.CDLL("libcuda.so.1")
    fn = lib.cuTensorMapEncodeTiled
    u32p, u64p = ctypes.POINTER(ctypes.c_uint32), ctypes.POINTER(ctypes.c_uint64)
    fn.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_uint32, ctypes.c_void_p, u64p, u64p, u32p, u32p,
                   ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int]
    fn.restype = ctypes.c_int
    return fn


@functools.lru_cache(maxsize=1024)
def _encode(ptr, shape, strides, box_rows):
    B, S, H, D = shape
    dims = (D, S, H, B)
    # Byte strides of S, H, B. A dimension of size 1 is never stepped along, but the driver checks
    # its stride all the same: it gets the extent of everything inside it, rounded up to 16 bytes.
    raw = (strides[1], strides[2], strides[0])
    byte_strides, extent = [], D * 2
    for size, stride in zip(dims[1:], raw):
        if size == 1:
            stride = -(-extent // 16) * 16
        byte_strides.append(stride)
        extent = max(extent, stride * size)
    box = (BOX_COLS, box_rows, 1, 1)
    storage = numpy.zeros(MAP_BYTES + _MAP_ALIGN, numpy.uint8)
    start = -storage.ctypes.data % _MAP_ALIGN
    result = _encoder()(
        storage.ctypes.data + start, _DATA_TYPE_UINT16, 4, ctypes.c_void_p(ptr),
        (ctypes.c_uint64 * 4)(*dims), (ctypes.c_uint64 * 3)(*byte_strides), (ctypes.c_uint32 * 4)(*box),
        (ctypes.c_uint32 * 4)(1, 1, 1, 1), _INTERLEAVE_NONE, _SWIZZLE_128B, _L2_PROMOTION_128B, _OOB_FILL_NONE)
    if result != 0:
        raise KernelLaunchError("cuTensorMapEncodeTiled", f"error {result} encoding a map of shape {shape}, byte "
                                                          f"strides {strides}, box rows {box_rows}")
    return storage[start:start + MAP_BYTES].copy()


def bshd(x, box_rows):
    """The tensor map of the 16-bit CuPy array ``x`` (B, S, H, D) with boxes of 64 head-dim columns
    by ``box_rows`` rows, as 128 bytes (a NumPy uint8 array, not to be modified). ``x`` must pass
    ``layout_reason``."""
    return _encode(x.data.ptr, tuple(x.shape), tuple(x.strides), box_rows)
