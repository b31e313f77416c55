"""Finding, compiling and launching the CUDA kernels of ``cuda_src/``.

Everything here imports CuPy lazily, so ``import cuflash`` works on machines without it.

Compilation goes through ``cupy.RawModule`` (NVRTC). A kernel variant is the source file with a
block of ``#define`` lines prepended: the configuration table lives in Python and the kernel
checks it with ``static_assert``. Local ``#include "x.cuh"`` lines are expanded here, so the
source text CuPy hashes for its on-disk cache covers every header (its cache key does not see
files pulled in through ``-I``). The kernels include no CUDA headers, so NVRTC is all they need.
"""

import functools
import re
from pathlib import Path

from .._errors import KernelCompileError, KernelLaunchError
from . import variants

_INCLUDE = re.compile(r'^\s*#\s*include\s+"([^"]+)"\s*$', re.MULTILINE)

# CuPy refuses more than 48 KiB of dynamic shared memory unless the kernel's limit is raised.
_DEFAULT_SMEM_LIMIT = 48 * 1024


def source_dir():
    """The folder holding the CUDA sources: inside the installed package, or the checkout's."""
    packaged = Path(__file__).resolve().parent.parent / "cuda_src"
    if packaged.is_dir():
        return packaged
    checkout = Path(__file__).resolve().parent.parent.parent / "cuda_src"
    if checkout.is_dir():
        return checkout
    raise FileNotFoundError(
        f"cuflash's CUDA sources were not found at {packaged} nor {checkout}; the installation is incomplete"
    )


@functools.lru_cache(maxsize=None)
def cuda_source(filename):
    """Text of ``cuda_src/<filename>`` with local includes (relative to the including file)
    expanded once each."""
    seen = set()

    def expand(path):
        path = path.resolve()
        if path in seen:
            return ""
        seen.add(path)
        text = path.read_text()
        return _INCLUDE.sub(lambda m: expand(path.parent / m.group(1)), text)

    return expand(source_dir() / filename)


def _defines_block(defines):
    return "".join(f"#define {key} {value}\n" for key, value in sorted(defines.items()))


def program_text(filename, defines):
    """The text NVRTC compiles for one variant: its defines, the source with its headers, and the
    checks that the parameter structs have the layout the launchers build (params.py)."""
    from .params import layout_asserts

    return _defines_block(defines) + cuda_source(filename) + layout_asserts()


def _driver_loadable():
    """Whether the NVIDIA driver's CUDA library can be loaded at all."""
    import ctypes

    for name in ("libcuda.so.1", "libcuda.so", "nvcuda.dll"):
        try:
            ctypes.CDLL(name)
            return True
        except OSError:
            continue
    return False


@functools.lru_cache(maxsize=1)
def gpu_available() -> tuple[bool, str]:
    """``(True, description)`` when CuPy can run kernels here, else ``(False, reason)``. Never raises."""
    try:
        import cupy
    except Exception as exc:  # ImportError, or a broken CUDA installation failing at import
        return False, f"CuPy is not importable ({type(exc).__name__}: {exc}); install cuflash[cu12] or cuflash[cu13]"
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as exc:
        if not _driver_loadable():
            # The CUDA runtime reports a missing driver as an insufficient one; say what it is.
            return False, "no NVIDIA driver found (libcuda could not be loaded): this machine has no usable NVIDIA GPU"
        return False, f"no usable CUDA device ({type(exc).__name__}: {exc})"
    if count == 0:
        return False, "no CUDA device is visible"
    try:
        props = cupy.cuda.runtime.getDeviceProperties(cupy.cuda.runtime.getDevice())
        major, minor = props["major"], props["minor"]
        name = props["name"].decode() if isinstance(props["name"], bytes) else props["name"]
    except Exception as exc:
        return False, f"the CUDA device cannot be queried ({type(exc).__name__}: {exc})"
    if (major, minor) < (7, 5):
        return False, f"{name} has compute capability {major}.{minor}; cuflash's kernels need 7.5 or newer"
    try:
        from cupy_backends.cuda.libs import nvrtc

        nvrtc.getVersion()
    except Exception as exc:
        return False, f"NVRTC cannot be loaded ({type(exc).__name__}: {exc}); install cuflash[cu12] or cuflash[cu13]"
    return True, f"{name} (compute capability {major}.{minor}), {count} device(s)"


def compute_capability(device_id=None):
    """``(major, minor)`` of a device (the current one by default), looked up once per device."""
    import cupy

    device = cupy.cuda.Device(device_id)
    cc = _compute_capabilities.get(device.id)
    if cc is None:
        cc = _compute_capabilities[device.id] = divmod(int(device.compute_capability), 10)
    return cc


_compute_capabilities = {}


def arch_options(major, minor):
    """NVRTC options for a compute capability: sm_90a on Hopper so wgmma/setmaxnreg paths compile,
    sm_75 on Turing (the sm75 family's architecture, as the compile gate builds it)."""
    if (major, minor) == (9, 0):
        return ("-arch=sm_90a",)
    if (major, minor) == (7, 5):
        return ("-arch=sm_75",)
    return ()


_modules = {}


def get_kernel(filename, kernel_name, defines):
    """The compiled ``kernel_name`` of ``cuda_src/<filename>`` for the current device, compiled once per process.

    The device's architecture family adds its defines (``variants.family_defines``): the sm75
    family's select the sm_75 code paths, on a Turing GPU or wherever that family is chosen."""
    import cupy

    device_id = cupy.cuda.Device().id
    defines = {**defines, **variants.family_defines(variants.family(*compute_capability(device_id)))}
    key = (device_id, filename, kernel_name, tuple(sorted(defines.items())))
    kernel = _modules.get(key)
    if kernel is not None:
        return kernel
    code = program_text(filename, defines)
    options = ("--std=c++20",) + arch_options(*compute_capability(device_id))
    try:
        module = cupy.RawModule(code=code, options=options)
        kernel = module.get_function(kernel_name)
    except cupy.cuda.compiler.CompileException as exc:
        raise KernelCompileError(kernel_name, "NVRTC compilation failed", exc.get_message()) from None
    except cupy.cuda.driver.CUDADriverError as exc:
        raise KernelCompileError(kernel_name, f"loading the compiled module failed: {exc}") from None
    _modules[key] = kernel
    return kernel


def vector_loadable(x):
    """Whether the kernels may move ``x`` in 16-byte vectors: the data and every row (each stride of
    a dimension longer than 1) 16-byte aligned, and a unit stride along the last dimension."""
    if x.size == 0:
        return True
    if x.data.ptr % 16:
        return False
    for size, stride in zip(x.shape[:-1], x.strides[:-1]):
        if size > 1 and stride % 16:
            return False
    return x.shape[-1] == 1 or x.strides[-1] == x.itemsize


def vector_rows(*arrays):
    """Whether rows of these arrays' shapes can move in 16-byte vectors (every last dimension a
    whole number of 16-byte chunks). The kernels' load path is chosen by this, never by the
    layout, so that one shape always runs the same kernel and gives the same bits."""
    return all(x.shape[-1] * x.itemsize % 16 == 0 for x in arrays)


def vector_copies(*arrays):
    """For each array, whether it must be copied to a contiguous one before a kernel that loads it
    in 16-byte vectors can read it (a strided last dimension, a misaligned view): the copy gives
    the vector path, and so the same bits, as any other layout of the shape."""
    vec = vector_rows(*arrays)
    return tuple(vec and not vector_loadable(x) for x in arrays)


def with_copies(arrays, copies):
    """``arrays`` with the ones ``copies`` marks replaced by fresh contiguous copies (on the current
    stream). Always a new allocation: a misaligned view can be C-contiguous already, and
    ``ascontiguousarray`` would hand it back unchanged."""
    return [x.copy(order="C") if copy else x for x, copy in zip(arrays, copies)]


def element_strides(x):
    """The strides of a CuPy array in elements (CuPy gives bytes), as the kernels' int64 arguments."""
    import numpy

    return [numpy.int64(s // x.itemsize) for s in x.strides]


def layout_key(x):
    """What a launch plan depends on in an array besides its pointer: strides and 16-byte alignment."""
    return x.strides, x.data.ptr % 16 == 0


class Launch:
    """One kernel launch with fixed grid, block and shared memory, whose parameter struct is a
    ``params.Template`` filled with the call's pointers. Raises the kernel's shared-memory limit
    once, when made."""

    def __init__(self, kernel, grid, block, shared_mem, template):
        import cupy

        self.kernel, self.grid, self.block, self.shared_mem, self.template = kernel, grid, block, shared_mem, template
        try:
            if shared_mem > _DEFAULT_SMEM_LIMIT and kernel.max_dynamic_shared_size_bytes < shared_mem:
                kernel.max_dynamic_shared_size_bytes = shared_mem
        except cupy.cuda.driver.CUDADriverError as exc:
            raise KernelLaunchError(kernel.name, f"setting shared_mem={shared_mem} failed: {exc}") from None

    def launch(self, *pointers):
        """Launch on CuPy's current stream with these pointers."""
        import cupy

        try:
            self.kernel(self.grid, self.block, (self.template(*pointers),), shared_mem=self.shared_mem)
        except cupy.cuda.driver.CUDADriverError as exc:
            raise KernelLaunchError(self.kernel.name, f"launch with grid={self.grid} block={self.block} "
                                                      f"shared_mem={self.shared_mem} failed: {exc}") from None


def launch(kernel, grid, block, args, shared_mem=0):
    """Launch on CuPy's current stream; driver errors become ``KernelLaunchError`` naming the kernel."""
    import cupy

    try:
        if shared_mem > _DEFAULT_SMEM_LIMIT and kernel.max_dynamic_shared_size_bytes < shared_mem:
            kernel.max_dynamic_shared_size_bytes = shared_mem
        kernel(tuple(grid), tuple(block), tuple(args), shared_mem=shared_mem)
    except cupy.cuda.driver.CUDADriverError as exc:
        raise KernelLaunchError(
            kernel.name, f"launch with grid={tuple(grid)} block={tuple(block)} shared_mem={shared_mem} failed: {exc}"
        ) from None


def compile_cubin(filename, kernel_name, defines, arch, extra_options=()):
    """Compile one variant to a cubin for ``arch`` (e.g. ``"sm_90a"``) through NVRTC, needing no GPU.

    Uses the options CuPy would (``-ftz=true`` included), so what passes here is what runs.
    Raises ``KernelCompileError`` with NVRTC's log on failure.
    """
    from cupy_backends.cuda.libs import nvrtc

    code = program_text(filename, defines)
    options = ["--std=c++20", f"-arch={arch}", "-ftz=true", *extra_options]
    program = nvrtc.createProgram(code, filename, [], [])
    try:
        try:
            nvrtc.compileProgram(program, options)
        except nvrtc.NVRTCError:
            raise KernelCompileError(kernel_name, f"NVRTC compilation for {arch} failed", nvrtc.getProgramLog(program)) from None
        return nvrtc.getCUBIN(program)
    finally:
        nvrtc.destroyProgram(program)

