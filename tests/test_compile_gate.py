"""Every kernel instantiation the launchers can choose compiles through NVRTC, without spills.

Needs no GPU: NVRTC compiles for any architecture on a CPU-only machine. Register spills are
errors (``--warn-on-spills --warning-as-error``), so a configuration that would run slowly on
local memory fails here, before any GPU run.
"""

import os
from concurrent.futures import ThreadPoolExecutor

import pytest

from cuflash._cuda import forward, runtime

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


def _cases(module):
    """(source, kernel, defines, arch): each family's instantiations for the architectures it runs on."""
    return [(module.SOURCE, name, defines, arch)
            for family, archs in module.FAMILY_ARCHS.items()
            for name, defines in module.instantiations(family) for arch in archs]


def _compile(case):
    source, name, defines, arch = case
    try:
        runtime.compile_cubin(source, name, defines, arch, PTXAS_STRICT)
    except Exception as exc:  # the report names the variant; the exception carries NVRTC's log
        return f"{source}:{name} {defines} for {arch}: {exc}"
    return None


@pytest.mark.parametrize("module", [forward], ids=lambda m: m.__name__.rsplit(".", 1)[-1])
def test_every_instantiation_compiles_without_spills(module):
    cases = _cases(module)
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
