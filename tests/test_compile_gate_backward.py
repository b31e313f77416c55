"""Every backward kernel instantiation the launcher can choose compiles through NVRTC, without spills.

Needs no GPU (NVRTC compiles for any architecture on a CPU-only machine). Register spills are
errors, so a configuration that would run on local memory fails here, before any GPU run.
"""

import os
from concurrent.futures import ThreadPoolExecutor

import pytest

from cuflash._cuda import backward, runtime

ARCHS = ("sm_80", "sm_90a")
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


def _compile(case):
    source, name, defines, arch = case
    try:
        runtime.compile_cubin(source, name, defines, arch, PTXAS_STRICT)
    except Exception as exc:  # the report names the variant; the exception carries NVRTC's log
        return f"{source}:{name} {defines} for {arch}: {exc}"
    return None


def test_every_backward_instantiation_compiles_without_spills():
    cases = [(source, name, defines, arch) for source, name, defines in backward.instantiations() for arch in ARCHS]
    assert cases, "the launcher lists no instantiation"
    # NVRTC programs are independent, and compiling releases the GIL: one thread per core.
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        failures = [f for f in pool.map(_compile, cases) if f]
    assert not failures, f"{len(failures)} of {len(cases)} compiles failed:\n" + "\n\n".join(failures)


def test_table_fits_shared_memory():
    """sm90 entries within 227 KiB per CTA, sm80-family entries within the 99 KiB of sm_86/sm_89.

    The atomic dK/dV variant may exceed the smaller limit (the launcher then uses the dQ kernel),
    but on sm90 every variant fits.
    """
    limits = {"sm90": 227 * 1024, "sm80": 99 * 1024}
    for (family, kind), table in backward.CONFIGS.items():
        elem = 4 if kind == "float32" else 2
        for bucket, entry in table.items():
            where = (family, kind, bucket)
            assert entry.dkdv.smem_bytes(bucket, elem, True, False) <= limits[family], where
            assert entry.dq.smem_bytes(bucket, elem, False, False) <= limits[family], where
            if family == "sm90":
                assert entry.dkdv.smem_bytes(bucket, elem, True, True) <= limits[family], where
