"""Arrays in, arrays out: turning callers' arrays into NumPy/CuPy arrays and results back.

NumPy arrays stay NumPy arrays and CuPy arrays stay CuPy arrays. Any other object that speaks
DLPack (``__dlpack__`` / ``__dlpack_device__``) is imported without a copy: CPU memory as NumPy,
CUDA memory as CuPy. Results go back the same way, to the caller's framework and device.
"""

import sys
from dataclasses import dataclass

import numpy

_CPU, _CUDA = 1, 2


@dataclass(frozen=True)
class Origin:
    """Where the operands of one call came from: ``kind`` is "numpy", "cupy" or a DLPack framework."""

    kind: str
    device_type: int
    device_id: int
    framework: object = None

    @property
    def on_gpu(self):
        return self.device_type == _CUDA


def _cupy():
    import cupy

    return cupy


def _describe(x):
    return f"{type(x).__module__}.{type(x).__qualname__}"


def _origin_of(x):
    """The Origin of one operand, or None if it is not an array cuflash can take."""
    if isinstance(x, numpy.ndarray):
        return Origin("numpy", _CPU, 0)
    cupy = sys.modules.get("cupy")
    if cupy is not None and isinstance(x, cupy.ndarray):
        return Origin("cupy", _CUDA, x.device.id)
    if hasattr(x, "__dlpack__") and hasattr(x, "__dlpack_device__"):
        device_type, device_id = x.__dlpack_device__()
        framework = sys.modules.get(type(x).__module__.split(".")[0])
        return Origin(type(x).__module__.split(".")[0], int(device_type), int(device_id), framework)
    return None


def _import(x, origin):
    if origin.kind in ("numpy", "cupy"):
        return x
    if origin.device_type == _CPU:
        return numpy.from_dlpack(x)
    if origin.device_type == _CUDA:
        return _cupy().from_dlpack(x)
    raise AssertionError("unreachable: device checked in import_operands")


def import_operands(what, **operands):
    """Return the operands as NumPy/CuPy arrays (in the given order) and their common Origin.

    Raises one TypeError naming every operand that is not an array on a CPU or CUDA device, or
    that comes from a different framework or device than the others.
    """
    problems, origins = [], {}
    for name, x in operands.items():
        origin = _origin_of(x)
        if origin is None:
            problems.append(f"{name} must be an array (NumPy, CuPy or any DLPack producer), got {_describe(x)}")
        elif origin.device_type not in (_CPU, _CUDA):
            problems.append(f"{name} lives on DLPack device type {origin.device_type}; only CPU and CUDA memory are supported")
        else:
            origins[name] = origin
    places = {(o.kind, o.device_type, o.device_id) for o in origins.values()}
    if len(places) > 1:
        listed = ", ".join(f"{n}: {o.kind} on {'cuda:%d' % o.device_id if o.on_gpu else 'cpu'}" for n, o in origins.items())
        problems.append(f"all operands must come from one framework on one device, got {listed}")
    if problems:
        raise TypeError(f"invalid arguments to {what}:\n  - " + "\n  - ".join(problems))
    origin = next(iter(origins.values()))
    return [_import(x, origin) for x in operands.values()], origin


def export(result, origin):
    """Hand a NumPy/CuPy result back as the caller's array type, on the caller's device."""
    if origin.kind == "numpy":
        return result if isinstance(result, numpy.ndarray) else result.get()
    if origin.kind == "cupy":
        return result if not isinstance(result, numpy.ndarray) else _cupy().asarray(result)
    if origin.framework is not None and hasattr(origin.framework, "from_dlpack"):
        return origin.framework.from_dlpack(result)
    return result


def as_host_arrays(**operands):
    """The operands as NumPy arrays (copied from the GPU where needed), for the reference."""
    arrays, origin = import_operands("cuflash.reference", **operands)
    return [x if isinstance(x, numpy.ndarray) else x.get() for x in arrays]
