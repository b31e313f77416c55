"""Every kernel instantiation the launchers can choose compiles through NVRTC, without spills.

Needs no GPU: NVRTC compiles for any architecture on a CPU-only machine. Register spills are
errors (``--warn-on-spills --warning-as-error``), so a configuration that would run slowly on
local memory fails here, before any GPU run.
"""

import os
from concurrent.futures import ThreadPoolExecutor

import pytest

from cuflash._cuda import backward, forward, runtime

PTXAS_STRICT = ("-Xptxas=--warn-on-spills", "-Xptxas=--warning-as-error")


def _nvrtc_loadable():
    try:
        from cupy_backends.cuda.libs import nvrtc

        nvrtc.getVersion()
    except Exception as exc:  # ImportError, or the shared library missing
        return False, f"NVRTC cannot be loaded: {type(exc).__name__}: {exc}"
    return True, ""


_LOADABLE, _WHY = _nvrtc_loadable()
pytestmark = pytest.mark.skipif(not _LOADABLE, reason=_WHY)


def _forward_cases():
    """(source, kernel, defines, arch): each family's instantiations for the architectures it runs on."""
    return [(forward.SOURCE, name, defines, arch)
            for family, archs in forward.FAMILY_ARCHS.items()
            for name, defines in forward.instantiations(family) for arch in archs]


def _backward_cases():
    """(source, kernel, defines, arch): each family's backward instantiations for its architectures."""
    return [(source, name, defines, arch)
            for family, archs in backward.FAMILY_ARCHS.items()
            for source, name, defines in backward.instantiations(family) for arch in archs]


def _compile(case):
    source, name, defines, arch = case
    try:
        runtime.compile_cubin(source, name, defines, arch, PTXAS_STRICT)
    except Exception as exc:  # the report names the variant; the exception carries NVRTC's log
        return f"{source}:{name} {defines} for {arch}: {exc}"
    return None


@pytest.mark.parametrize("cases", [_forward_cases, _backward_cases], ids=["forward", "backward"])
def test_every_instantiation_compiles_without_spills(cases):
    cases = cases()
    assert cases, "the launcher lists no instantiation"
    # NVRTC programs are independent, and compiling releases the GIL: one thread per core.
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        failures = [f for f in pool.map(_compile, cases) if f]
    # The first few logs say what is wrong; the rest usually repeat it.
    assert not failures, f"{len(failures)} of {len(cases)} compiles failed; the first:\n" + "\n\n".join(failures[:3])


def test_forward_configs_fit_shared_memory():
    limits = {"sm80": forward._SM80_SMEM_LIMIT, "sm90": forward._SM90_SMEM_LIMIT}
    for (family, kind), table in forward.CONFIGS.items():
        elem_bytes = 4 if kind == "float32" else 2
        for bucket, config in table.items():
            assert config.smem_bytes(bucket, elem_bytes) <= limits[family], (family, kind, bucket, config)


def test_backward_configs_fit_shared_memory():
    """The atomic dK/dV variant may exceed the sm80 family's limit (the launcher then takes the dQ
    kernel), but on sm90 every variant fits."""
    limits = {"sm80": forward._SM80_SMEM_LIMIT, "sm90": forward._SM90_SMEM_LIMIT}
    for (family, kind), table in backward.CONFIGS.items():
        elem = 4 if kind == "float32" else 2
        for bucket, entry in table.items():
            where = (family, kind, bucket)
            assert entry.dkdv.smem_bytes(bucket, elem, True, False) <= limits[family], where
            assert entry.dq.smem_bytes(bucket, elem, False, False) <= limits[family], where
            if family == "sm90":
                assert entry.dkdv.smem_bytes(bucket, elem, True, True) <= limits[family], where
