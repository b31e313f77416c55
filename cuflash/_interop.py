"""Arrays in, arrays out: callers' arrays become NumPy/CuPy arrays, results go back as the caller's type.

The rules (the README's "Using cuflash from NumPy, CuPy, PyTorch and JAX" states them for users):

- NumPy and CuPy arrays are used as they are. Any other object with ``__dlpack__`` and
  ``__dlpack_device__`` (PyTorch tensors, JAX arrays, ...) is imported without a copy: CPU memory
  as a NumPy array, CUDA memory as a CuPy array. PyTorch tensors that require grad are detached
  first (a view, no copy), since PyTorch refuses to export them.
- All operands of one call come from one framework on one device; anything else is a TypeError.
- Results go back without a copy, as the caller's type on the caller's device: ``torch.from_dlpack``
  for PyTorch, ``jax.dlpack.from_dlpack`` for JAX, the array-API namespace's ``from_dlpack`` for
  other producers that have one, and plain NumPy/CuPy arrays for producers that have none.
- Streams: for CUDA operands every step (import, kernels, output allocation, export) runs on one
  stream, PyTorch's current stream for torch tensors and CuPy's current stream otherwise. That
  stream is the one handed to ``__dlpack__``, so a producer orders its pending writes before our
  reads and a consumer orders our writes before its reads; allocating the outputs on it keeps
  CuPy's per-stream memory pool from handing their memory to other work while it is still in use.
- bfloat16: NumPy's DLPack importer knows no bfloat16 and NumPy cannot export ml_dtypes' bfloat16,
  so bfloat16 elements travel as uint16 and are viewed as ``ml_dtypes.bfloat16`` on arrival (and
  relabelled bfloat16 on the way back): exact and copy-free. CPU bfloat16 needs ml_dtypes.
- PyTorch float tensors take a shorter road than DLPack, because a call's host time is mostly
  these hand-overs: they are viewed in place from their pointer, shape and strides (``Tensor.numpy``
  on the CPU, a CuPy array over the same memory on the GPU), which is what DLPack would give, with
  no stream to wait for since the kernels run on PyTorch's current stream. Their results are torch
  tensors allocated before the call (``Origin.outputs``) that the backend writes into, and every
  CuPy allocation during a call for torch CUDA tensors (workspaces included) comes from PyTorch's
  caching allocator on that stream: memory PyTorch can reuse, and allocations that a CUDA graph
  capture records into its private pool.

Nothing here imports a framework: CuPy, PyTorch and JAX are only looked up in ``sys.modules``
(an operand of their type means they are imported already) or imported when an operand needs them.
"""

import contextlib
import ctypes
import math
import sys
from dataclasses import dataclass
from typing import Any, Callable, Optional

import numpy

# DLPack device types (dlpack.h, DLDeviceType).
_CPU, _CUDA = 1, 2
_DEVICE_NAMES = {
    1: "CPU", 2: "CUDA", 3: "CUDA host (pinned)", 4: "OpenCL", 7: "Vulkan", 8: "Metal", 9: "VPI",
    10: "ROCm", 11: "ROCm host", 12: "an extension device", 13: "CUDA managed", 14: "oneAPI",
    15: "WebGPU", 16: "Hexagon",
}
# DLPack type codes (dlpack.h, DLDataTypeCode).
_UINT, _BFLOAT = 1, 4

# XLA's CPU client (JAX) adopts host memory through DLPack only at 64-byte alignment and copies it
# otherwise; NumPy promises 16.
_HOST_ALIGNMENT = 64


class _DLDataType(ctypes.Structure):
    _fields_ = [("code", ctypes.c_uint8), ("bits", ctypes.c_uint8), ("lanes", ctypes.c_uint16)]


class _DLTensor(ctypes.Structure):
    _fields_ = [
        ("data", ctypes.c_void_p), ("device_type", ctypes.c_int32), ("device_id", ctypes.c_int32),
        ("ndim", ctypes.c_int32), ("dtype", _DLDataType), ("shape", ctypes.c_void_p),
        ("strides", ctypes.c_void_p), ("byte_offset", ctypes.c_uint64),
    ]


class _DLManagedTensorVersioned(ctypes.Structure):
    """DLPack ≥ 1.0 capsules ("dltensor_versioned"); older ones ("dltensor") start with the DLTensor."""

    _fields_ = [
        ("version_major", ctypes.c_uint32), ("version_minor", ctypes.c_uint32),
        ("manager_ctx", ctypes.c_void_p), ("deleter", ctypes.c_void_p), ("flags", ctypes.c_uint64),
        ("dl_tensor", _DLTensor),
    ]


_capsule_name = ctypes.pythonapi.PyCapsule_GetName
_capsule_name.restype = ctypes.c_char_p
_capsule_name.argtypes = [ctypes.py_object]
_capsule_pointer = ctypes.pythonapi.PyCapsule_GetPointer
_capsule_pointer.restype = ctypes.c_void_p
_capsule_pointer.argtypes = [ctypes.py_object, ctypes.c_char_p]
_TENSOR_OFFSETS = {b"dltensor": 0, b"dltensor_versioned": _DLManagedTensorVersioned.dl_tensor.offset}


def _dl_tensor(capsule):
    """The DLTensor inside a not yet consumed DLPack capsule (a view onto the producer's struct)."""
    name = _capsule_name(capsule)
    if name not in _TENSOR_OFFSETS:
        raise BufferError(f"__dlpack__ returned a capsule named {name!r}, not a DLPack tensor")
    return _DLTensor.from_address(_capsule_pointer(capsule, name) + _TENSOR_OFFSETS[name])


class _Relabelled:
    """A DLPack producer handing on another producer's 16-bit elements under another type code.

    Each ``__dlpack__`` call makes a fresh DLManagedTensor that belongs to the consumer once
    handed over, and its deleter never reads the dtype, so changing the type code before the
    consumer sees it touches nothing the producer relies on.
    """

    def __init__(self, producer, old_code, new_code):
        self._producer = producer
        self._old_code = old_code
        self._new_code = new_code
        self.relabelled = False

    def __dlpack_device__(self):
        return self._producer.__dlpack_device__()

    def __dlpack__(self, **kwargs):
        capsule = self._producer.__dlpack__(**kwargs)
        dtype = _dl_tensor(capsule).dtype
        if (dtype.code, dtype.bits, dtype.lanes) == (self._old_code, 16, 1):
            dtype.code = self._new_code
            self.relabelled = True
        return capsule


def _bfloat16():
    """ml_dtypes' bfloat16 (the dtype NumPy and CuPy hold bfloat16 in), or None without ml_dtypes."""
    try:
        import ml_dtypes
    except ImportError:
        return None
    return numpy.dtype(ml_dtypes.bfloat16)


def _cupy():
    import cupy

    return cupy


def host_empty(shape, dtype):
    """An uninitialized NumPy array whose data starts on a 64-byte boundary.

    Host outputs are allocated here so JAX can adopt them without a copy (see ``_HOST_ALIGNMENT``).
    """
    dtype = numpy.dtype(dtype)
    nbytes = math.prod(shape) * dtype.itemsize
    raw = numpy.empty(nbytes + _HOST_ALIGNMENT, dtype=numpy.uint8)
    start = -raw.ctypes.data % _HOST_ALIGNMENT
    return raw[start:start + nbytes].view(dtype).reshape(shape)


class _StreamHandle:
    """A raw ``cudaStream_t`` offered through the CUDA stream protocol, which CuPy's
    ``Stream.from_external`` takes (from the handle alone, whatever PyTorch version made it)."""

    def __init__(self, handle):
        self._handle = handle

    def __cuda_stream__(self):
        return (0, self._handle)


# CuPy Stream objects wrapping callers' stream handles, one per (device, handle): building one
# costs more than the rest of entering a call's context. A handle stays valid as a number after
# its stream is destroyed, and a wrapper of an external stream never destroys it, so a stale
# entry is harmless; the dict is emptied when it grows past a bound.
_EXTERNAL_STREAMS = {}
_MAX_CACHED = 256


def _external_stream(device_id, handle):
    key = (device_id, handle)
    stream = _EXTERNAL_STREAMS.get(key)
    if stream is None:
        if len(_EXTERNAL_STREAMS) >= _MAX_CACHED:
            _EXTERNAL_STREAMS.clear()
        stream = _EXTERNAL_STREAMS[key] = _cupy().cuda.Stream.from_external(_StreamHandle(handle))
    return stream


class _GpuContext:
    """The caller's device and stream (and allocator, for torch) made current for CuPy; restores
    the previous ones on exit. Built fresh for each ``with``, so nesting and threads are safe."""

    __slots__ = ("device_id", "stream", "allocator", "_previous_device", "_previous_stream", "_allocation")

    def __init__(self, device_id, stream, allocator):
        self.device_id = device_id
        self.stream = stream
        self.allocator = allocator

    def __enter__(self):
        cupy = _cupy()
        self._previous_device = cupy.cuda.runtime.getDevice()
        if self._previous_device != self.device_id:
            cupy.cuda.runtime.setDevice(self.device_id)
        self._previous_stream = None
        if self.stream is not None:
            self._previous_stream = cupy.cuda.get_current_stream()
            _external_stream(self.device_id, self.stream).use()
        if self.allocator is not None:
            # What cupy.cuda.using_allocator does, without its generator's cost.
            memory = cupy.cuda.memory
            self._allocation = memory._get_thread_local_allocator()
            memory._set_thread_local_allocator(self.allocator)
        return self

    def __exit__(self, *exc):
        cupy = _cupy()
        if self.allocator is not None:
            cupy.cuda.memory._set_thread_local_allocator(self._allocation)
        if self._previous_stream is not None:
            self._previous_stream.use()
        if self._previous_device != self.device_id:
            cupy.cuda.runtime.setDevice(self._previous_device)


@dataclass(frozen=True, eq=False)
class Origin:
    """Where the operands of one call come from, and how results get back there.

    ``kind`` is "numpy", "cupy", "torch", "jax" or the top-level module of another producer's type.
    ``to_caller`` is the caller's DLPack importer (None: results stay NumPy/CuPy arrays), and
    ``stream`` the handle of the stream to run on, PyTorch's current one for torch CUDA tensors
    (0 is the legacy default stream); None means CuPy's current stream.
    """

    kind: str
    device_type: int
    device_id: int
    to_caller: Optional[Callable[[Any], Any]] = None
    stream: Optional[int] = None

    @property
    def on_gpu(self):
        return self.device_type == _CUDA

    @property
    def place(self):
        return f"cuda:{self.device_id}" if self.on_gpu else "cpu"

    def context(self):
        """The caller's device and stream made current for CuPy (nothing to do for CPU operands).

        Imports, GPU work and exports for this caller all run inside it (see the module's notes).
        For torch CUDA tensors CuPy also allocates from PyTorch's caching allocator inside it.
        """
        if not self.on_gpu:
            return contextlib.nullcontext()
        allocator = _torch_allocator(self.device_id) if self.kind == "torch" else None
        return _GpuContext(self.device_id, self.stream, allocator)

    def outputs(self, specs):
        """Caller-owned memory for results, allocated before the call: for ``specs``, a sequence of
        (shape, NumPy dtype), the pair (caller's objects, NumPy/CuPy views of them) that
        ``_dispatch.outputs_into`` hands to the backend; None where results are exported afterwards.

        Torch tensors get torch tensors (from PyTorch's allocator, on its current stream: call it
        inside ``context()``); other callers' results go back through ``export``.
        """
        if self.kind != "torch":
            return None
        empty = sys.modules["torch"].empty
        device = _torch_device(self.device_type, self.device_id)
        tensors = [empty(shape, dtype=_torch_dtype(dtype), device=device) for shape, dtype in specs]
        return tensors, [_torch_view(t, dtype) for t, (_, dtype) in zip(tensors, specs)]


_NUMPY_ORIGIN = Origin("numpy", _CPU, 0)
_CUPY_ORIGINS = {}


def _cupy_origin(device_id):
    origin = _CUPY_ORIGINS.get(device_id)
    if origin is None:
        origin = _CUPY_ORIGINS[device_id] = Origin("cupy", _CUDA, device_id)
    return origin


_TORCH_DEVICES = {}


def _torch_device(device_type, device_id):
    device = _TORCH_DEVICES.get((device_type, device_id))
    if device is None:
        torch = sys.modules["torch"]
        device = torch.device("cuda", device_id) if device_type == _CUDA else torch.device("cpu")
        _TORCH_DEVICES[(device_type, device_id)] = device
    return device


_TORCH_NAMES = ("float16", "bfloat16", "float32", "float64")


_TORCH_DTYPES = {}


def _torch_dtype(dtype):
    """The torch dtype of a NumPy float dtype (``ml_dtypes.bfloat16`` included)."""
    found = _TORCH_DTYPES.get(dtype)
    if found is None:
        found = _TORCH_DTYPES[dtype] = getattr(sys.modules["torch"], numpy.dtype(dtype).name)
    return found


def _torch_view(tensor, dtype):
    """A float tensor as a NumPy (CPU) or CuPy (CUDA) array of ``dtype`` over the same memory, with
    its strides. bfloat16 passes as int16, which NumPy can view, and is relabelled on arrival."""
    if tensor.is_cuda:
        key = (tensor.data_ptr(), tensor.shape, tensor.stride(), dtype)
        view = _CUDA_VIEWS.get(key)
        if view is None:
            itemsize = tensor.element_size()
            view = _cache_view(key, _cupy_view(key[0], tuple(key[1]), tuple(s * itemsize for s in key[2]), dtype,
                                               tensor.get_device()))
        return view
    if tensor.requires_grad:  # Tensor.numpy refuses tensors that require grad; a detached view is the same memory
        tensor = tensor.detach()
    torch = sys.modules["torch"]
    if tensor.dtype == torch.bfloat16:
        return tensor.view(torch.int16).numpy().view(dtype)
    return tensor.numpy()


# CuPy arrays over callers' GPU memory, keyed by address, layout and dtype (torch tensors) or
# address, shape and dtype (XLA's row-major buffers). Building one costs several microseconds, a
# lookup about one. The arrays own nothing: one is used only while the caller passes memory with
# exactly that address and layout, which keeps it alive for the call, so an entry whose memory
# was freed since is never read. Emptied past a bound.
_CUDA_VIEWS = {}


def _cache_view(key, view):
    if len(_CUDA_VIEWS) >= 4 * _MAX_CACHED:
        _CUDA_VIEWS.clear()
    _CUDA_VIEWS[key] = view
    return view


def _cupy_view(pointer, shape, strides, dtype, device_id):
    """A CuPy array over memory it does not own (see ``_CUDA_VIEWS``); strides in bytes."""
    cupy = _cupy()
    itemsize = numpy.dtype(dtype).itemsize
    # The span the strides reach, which is what CuPy's bookkeeping of the memory needs.
    extent = itemsize + sum((n - 1) * s for n, s in zip(shape, strides)) if all(shape) else 0
    memory = cupy.cuda.UnownedMemory(pointer, extent, None, device_id)
    return cupy.ndarray(shape, dtype, cupy.cuda.MemoryPointer(memory, 0), strides=strides)


_TORCH_ALLOCATORS = {}


def _torch_allocator(device_id):
    """A CuPy allocator (``size -> MemoryPointer``) drawing from PyTorch's caching allocator on
    PyTorch's current stream of ``device_id``; each block lives as long as CuPy holds its pointer."""
    allocate = _TORCH_ALLOCATORS.get(device_id)
    if allocate is None:
        torch, cupy = sys.modules["torch"], _cupy()
        device = torch.device("cuda", device_id)
        uint8 = torch.uint8

        def allocate(nbytes):
            block = torch.empty(nbytes, dtype=uint8, device=device)
            return cupy.cuda.MemoryPointer(cupy.cuda.UnownedMemory(block.data_ptr(), nbytes, block, device_id), 0)

        _TORCH_ALLOCATORS[device_id] = allocate
    return allocate


def _describe(x):
    return f"{type(x).__module__}.{type(x).__qualname__}"


def _instance_of(x, module, attribute):
    """``isinstance(x, module.attribute)`` for a module that is already imported, else False."""
    loaded = sys.modules.get(module)
    return loaded is not None and isinstance(x, getattr(loaded, attribute))


def _origin_of(x):
    """The Origin of one operand, or None if it is not an array cuflash can take.

    Raises what ``__dlpack_device__`` raises for objects that claim DLPack but cannot say where
    they live.
    """
    if isinstance(x, numpy.ndarray):
        return _NUMPY_ORIGIN
    if _instance_of(x, "torch", "Tensor"):
        return _torch_origin(x)
    if _instance_of(x, "cupy", "ndarray"):
        return _cupy_origin(x.device.id)
    if not (hasattr(x, "__dlpack__") and hasattr(x, "__dlpack_device__")):
        return None
    device_type, device_id = (int(n) for n in x.__dlpack_device__())
    if _instance_of(x, "jax", "Array"):
        return Origin("jax", device_type, device_id, sys.modules["jax"].dlpack.from_dlpack)
    namespace = x.__array_namespace__() if hasattr(x, "__array_namespace__") else None
    return Origin(type(x).__module__.split(".")[0], device_type, device_id, getattr(namespace, "from_dlpack", None))


# The Origins of torch operands, one per (device, current stream): the same for every call from
# one place, so none is built per call.
_TORCH_ORIGINS = {}


def _torch_stream(device_id):
    """PyTorch's current stream on a device, as a raw handle; the private accessor (the one
    torch.compile's generated code uses) costs a tenth of ``torch.cuda.current_stream``."""
    torch = sys.modules["torch"]
    raw = getattr(torch._C, "_cuda_getCurrentRawStream", None)
    return raw(device_id) if raw is not None else torch.cuda.current_stream(device_id).cuda_stream


def _torch_origin(x):
    if x.is_cuda:
        device_id = x.get_device()
        key = (_CUDA, device_id, _torch_stream(device_id))
    elif x.is_cpu:
        key = (_CPU, 0, None)
    else:  # other devices are described (and refused) from what DLPack says
        device_type, device_id = (int(n) for n in x.__dlpack_device__())
        key = (device_type, device_id, None)
    origin = _TORCH_ORIGINS.get(key)
    if origin is None:
        if len(_TORCH_ORIGINS) >= _MAX_CACHED:
            _TORCH_ORIGINS.clear()
        origin = _TORCH_ORIGINS[key] = Origin("torch", *key[:2], sys.modules["torch"].from_dlpack, key[2])
    return origin


_NUMPY_DTYPES = {}


def _torch_float(x):
    """The NumPy dtype of a float16/bfloat16/float32/float64 tensor; None for other dtypes, and for
    bfloat16 without ml_dtypes (both go the DLPack way, which reports them)."""
    dtype = x.dtype
    found = _NUMPY_DTYPES.get(dtype)
    if found is None:
        name = str(dtype).removeprefix("torch.")
        if name == "bfloat16":
            # Looked up on every call: whether ml_dtypes is importable is not cached.
            return _bfloat16()
        found = _NUMPY_DTYPES[dtype] = numpy.dtype(name) if name in _TORCH_NAMES else False
    return None if found is False else found


def _torch_operand(x):
    """A torch float tensor on the CPU or a CUDA device viewed in place without DLPack (no stream
    to wait for: cuflash runs on PyTorch's current stream); None where DLPack must do it."""
    if not (x.is_cuda or x.is_cpu):
        return None
    dtype = _torch_float(x)
    if dtype is None:
        return None
    try:
        return _torch_view(x, dtype)
    except (RuntimeError, TypeError, ValueError):
        return None  # e.g. a tensor with its negative bit set: DLPack resolves or reports it


def _import(name, x, origin):
    """One operand as a NumPy (CPU) or CuPy (CUDA) array over the caller's memory.

    Returns ``(array, problem)``: exactly one of them is None.
    """
    if origin.kind in ("numpy", "cupy"):
        return x, None
    if origin.kind == "torch" and x.requires_grad:
        x = x.detach()
    producer = _Relabelled(x, _BFLOAT, _UINT)
    try:
        array = numpy.from_dlpack(producer) if origin.device_type == _CPU else _cupy().from_dlpack(producer)
    except (BufferError, TypeError, ValueError, RuntimeError) as exc:
        return None, f"{name} ({_describe(x)}) could not be imported through DLPack: {type(exc).__name__}: {exc}"
    if not producer.relabelled:
        return array, None
    bfloat16 = _bfloat16()
    if bfloat16 is None:
        return None, (f"{name} is bfloat16, which NumPy and CuPy hold through the ml_dtypes package; "
                      "install it (pip install ml_dtypes, or cuflash[bfloat16])")
    return array.view(bfloat16), None


def buffer_array(buffer):
    """A buffer XLA hands to a ``buffer_callback`` as a NumPy (CPU) or CuPy (CUDA) array over its
    memory. XLA's buffers are dense and row-major; bfloat16 stays bfloat16 (``ml_dtypes``)."""
    device_type, device_id = (int(n) for n in buffer.__dlpack_device__())
    if device_type == _CPU:
        return numpy.asarray(buffer)
    cupy = _cupy()
    dtype = numpy.dtype(buffer.dtype)
    shape = tuple(buffer.shape)
    try:
        pointer = buffer.__cuda_array_interface__["data"][0]
    except (AttributeError, BufferError, KeyError, TypeError, ValueError):
        # No array interface for this dtype: DLPack, with bfloat16 carried as uint16.
        return cupy.from_dlpack(_Relabelled(buffer, _BFLOAT, _UINT)).view(dtype)
    key = (pointer, shape, dtype)
    view = _CUDA_VIEWS.get(key)
    if view is None:
        view = _cache_view(key, _cupy_view(pointer, shape, _row_major_strides(shape, dtype.itemsize), dtype,
                                           device_id))
    return view


def _row_major_strides(shape, itemsize):
    strides, step = [], itemsize
    for n in reversed(shape):
        strides.append(step)
        step *= n
    return tuple(reversed(strides))


def _ndarray_subclass_refusal(name, x):
    """Why an ndarray subclass is refused, or None for one read as the plain array it holds.

    Subclasses such as ``numpy.memmap`` are plain data and are read in place (results are plain
    ndarrays). A masked array's mask, and ``numpy.matrix``'s 2-D-only algebra, would be silently
    dropped by doing so, so those are refused with what to pass instead.
    """
    if isinstance(x, numpy.ma.MaskedArray):
        return (f"{name} is a numpy.ma.MaskedArray; attention has no notion of masked entries "
                f"(pass {name}.filled(value), or numpy.asarray({name}) to ignore the mask)")
    if isinstance(x, numpy.matrix):
        return f"{name} is a numpy.matrix, which is 2-D only; pass a 4-D numpy.ndarray (BSHD)"
    return None


def _layout_refusal(name, x):
    """Why a CUDA array cannot be read element by element, or None. CuPy (and a DLPack producer's
    byte offset) can place an array at an address, or give it strides, that are not whole elements:
    the kernels would fault on the misaligned element, or read the wrong ones."""
    size = x.itemsize
    if x.data.ptr % size:
        return (f"{name} starts at byte address {x.data.ptr}, which is not a multiple of its {size}-byte "
                f"elements; pass a copy ({name}.copy())")
    if any(n > 1 and s % size for n, s in zip(x.shape, x.strides)):
        return (f"{name} has byte strides {x.strides}, which are not whole {size}-byte elements; "
                f"pass a copy ({name}.copy())")
    return None


def _raise(what, problems):
    raise TypeError(f"invalid arguments to {what}:\n  - " + "\n  - ".join(problems))


def import_operands(what, **operands):
    """The operands as NumPy/CuPy arrays over the caller's memory (in the given order), and their Origin.

    Raises one TypeError listing every operand that is not an array in CPU or CUDA memory, every
    operand that comes from another framework or device than the rest, and every operand that
    cannot be imported. Only views are made before that: nothing is allocated or launched.
    """
    problems, origins = [], {}
    for name, x in operands.items():
        if isinstance(x, numpy.ndarray) and type(x) is not numpy.ndarray:
            refusal = _ndarray_subclass_refusal(name, x)
            if refusal is not None:
                problems.append(refusal)
                continue
            operands[name] = x = x.view(numpy.ndarray)
        try:
            origin = _origin_of(x)
        except (BufferError, RuntimeError, TypeError, ValueError) as exc:
            problems.append(f"{name} ({_describe(x)}) cannot say where it lives: {type(exc).__name__}: {exc}")
            continue
        if origin is None:
            problems.append(f"{name} must be an array (NumPy, CuPy or any DLPack producer such as PyTorch "
                            f"or JAX), got {_describe(x)}")
        elif origin.device_type not in (_CPU, _CUDA):
            device = _DEVICE_NAMES.get(origin.device_type, f"DLPack device type {origin.device_type}")
            problems.append(f"{name} lives in {device} memory (device {origin.device_id}); "
                            "cuflash takes CPU and CUDA memory only")
        else:
            origins[name] = origin
    first = next(iter(origins.values()), None)
    # Operands of one framework, device and stream share one cached Origin; compare places otherwise.
    if any(o is not first for o in origins.values()) and len({(o.kind, o.place) for o in origins.values()}) > 1:
        listed = ", ".join(f"{n}: {o.kind} on {o.place}" for n, o in origins.items())
        problems.append(f"all operands must come from one framework on one device, got {listed}; "
                        "convert them to one framework and device first")
    if problems:
        _raise(what, problems)
    origin = next(iter(origins.values()))
    if origin.kind in ("numpy", "cupy"):  # already arrays cuflash computes on
        if origin.kind == "cupy":
            problems = [p for p in (_layout_refusal(n, x) for n, x in operands.items()) if p is not None]
            if problems:
                _raise(what, problems)
        return list(operands.values()), origin
    arrays = [_torch_operand(x) for x in operands.values()] if origin.kind == "torch" else [None] * len(operands)
    if any(a is None for a in arrays):
        with origin.context():
            for i, (name, x) in enumerate(operands.items()):
                if arrays[i] is None:
                    arrays[i], problem = _import(name, x, origin)
                    if problem is not None:
                        problems.append(problem)
    # PyTorch's storage offsets and strides count elements, so only other producers can hand over
    # such layouts; the check stays off torch's per-call path.
    if not problems and origin.device_type == _CUDA and origin.kind != "torch":
        problems = [p for p in (_layout_refusal(n, a) for n, a in zip(operands, arrays)) if p is not None]
    if problems:
        _raise(what, problems)
    return arrays, origin


def export(result, origin):
    """Hand a NumPy/CuPy result back as the caller's array type, on the caller's device.

    Results already on the caller's device are shared, not copied; results of the other backend
    (the NumPy backend on CUDA operands, the CUDA backend on CPU operands) are copied across.
    """
    if origin.to_caller is None and type(result) is (_cupy().ndarray if origin.on_gpu else numpy.ndarray):
        return result  # a NumPy/CuPy caller, and the result is where its operands were
    with origin.context():
        if origin.on_gpu:
            cupy = _cupy()
            if not isinstance(result, cupy.ndarray):
                result = cupy.asarray(result)
        elif not isinstance(result, numpy.ndarray):
            result = result.get()
        if origin.to_caller is None:
            return result
        if result.dtype.name == "bfloat16":
            return origin.to_caller(_Relabelled(result.view(numpy.uint16), _UINT, _BFLOAT))
        return origin.to_caller(result)


def as_host_arrays(**operands):
    """The operands as NumPy arrays (copied from the GPU where needed), for the reference."""
    arrays, origin = import_operands("cuflash.reference", **operands)
    with origin.context():
        return [x if isinstance(x, numpy.ndarray) else x.get() for x in arrays]
