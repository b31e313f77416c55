"""Every kernel instantiation the launchers can choose compiles through NVRTC, without spills.

Needs no GPU: NVRTC compiles for any architecture on a CPU-only machine. Register spills are
errors (``--warn-on-spills --warning-as-error``), so a configuration that would run slowly on
local memory fails here, before any GPU run. NVRTC comes with CuPy's CUDA extras
(``pip install ".[cu13,test]"``, the CI install); with the CPU-only test install
(``pip install ".[test]"``) the compiling tests skip, saying so, and the table checks still run.
One case per kind and family: ``python -m pytest tests/test_compile_gate.py -k sm75`` builds the
Turing family alone (every variant for sm_75, which also shows that none needs sm_80).
"""

import os
from concurrent.futures import ThreadPoolExecutor

import pytest

from cuflash._cuda import params, runtime, variants

PTXAS_STRICT = ("-Xptxas=--warn-on-spills", "-Xptxas=--warning-as-error")


def _nvrtc_missing():
    """Why NVRTC cannot compile here, or None when it can."""
    install = 'the compile gate needs CuPy and NVRTC: pip install ".[cu13,test]" (or cu12)'
    try:
        from cupy_backends.cuda.libs import nvrtc
    except ImportError as exc:
        return f"CuPy is not installed ({exc}); {install}"
    try:
        nvrtc.getVersion()
    except Exception as exc:  # the shared library missing or broken
        return f"NVRTC cannot be loaded ({type(exc).__name__}: {exc}); {install}"
    return None


_NVRTC_MISSING = _nvrtc_missing()
needs_nvrtc = pytest.mark.skipif(_NVRTC_MISSING is not None, reason=_NVRTC_MISSING or "")


def _cases(kind, family):
    """(source, kernel, defines, arch): a family's instantiations of one kind ("fwd", "bwd",
    "decode") for the architectures the family runs on."""
    return [(source, name, defines, arch)
            for source, name, defines in variants.instantiations(family) if _kind_of(name) == kind
            for arch in variants.FAMILY_ARCHS[family]]


def _kind_of(kernel_name):
    """The forward kernels, the backward's (with their auxiliary kernels), and the decoding ones
    (split-KV decode, its merge, the cache append)."""
    if kernel_name.startswith("flash_fwd"):
        return "fwd"
    return "bwd" if kernel_name.startswith("flash_bwd") else "decode"


def _compile(case):
    source, name, defines, arch = case
    try:
        runtime.compile_cubin(source, name, defines, arch, PTXAS_STRICT)
    except Exception as exc:  # the report names the variant; the exception carries NVRTC's log
        return f"{source}:{name} {defines} for {arch}: {exc}"
    return None


@needs_nvrtc
@pytest.mark.parametrize("family", list(variants.FAMILY_ARCHS))
@pytest.mark.parametrize("kind", ["fwd", "bwd", "decode"], ids=["forward", "backward", "decode"])
def test_every_instantiation_compiles_without_spills(kind, family):
    cases = _cases(kind, family)
    assert cases, "the launcher lists no instantiation"
    # NVRTC programs are independent, and compiling releases the GIL: one thread per core.
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        failures = [f for f in pool.map(_compile, cases) if f]
    # The first few logs say what is wrong; the rest usually repeat it.
    assert not failures, f"{len(failures)} of {len(cases)} compiles failed; the first:\n" + "\n\n".join(failures[:3])


def test_forward_tiles_fit_shared_memory():
    for (family, kind), table in variants.FWD_TILES.items():
        elem_bytes = 4 if kind == "float32" else 2
        for bucket, tile in table.items():
            assert tile.smem_bytes(bucket, elem_bytes) <= variants.SMEM_LIMITS[family], (family, kind, bucket, tile)
    for key, tile in variants.FWD_SPILL_TILES.items():
        family, kind, bucket = key[:3]
        assert tile.smem_bytes(bucket, 4 if kind == "float32" else 2) <= variants.SMEM_LIMITS[family], key


def test_backward_tiles_fit_shared_memory():
    """The atomic dK/dV variant may exceed the sm80 family's limit (the launcher then takes the dQ
    kernel), but on sm90 every variant fits."""
    for (family, kind), table in variants.BWD_TILES.items():
        elem = 4 if kind == "float32" else 2
        limit = variants.SMEM_LIMITS[family]
        for bucket, entry in table.items():
            where = (family, kind, bucket)
            assert entry.dkdv.smem_bytes(bucket, elem, True, False) <= limit, where
            assert entry.dq.smem_bytes(bucket, elem, False, False) <= limit, where
            if family == "sm90":
                assert entry.dkdv.smem_bytes(bucket, elem, True, True) <= limit, where


@needs_nvrtc
def test_parameter_layout_checks_fail_on_a_mismatch():
    """The layout checks appended to every program really compare params.cuh with params.py: a
    struct whose fields are reordered does not compile."""
    source = runtime.cuda_source("core/params.cuh")
    swapped = source.replace("const void* q;  ", "const void* k_;").replace("const void* k;  ", "const void* q;  ")
    swapped = swapped.replace("const void* k_;", "const void* k;  ")
    assert swapped != source
    from cupy_backends.cuda.libs import nvrtc

    def compiles(text):
        program = nvrtc.createProgram(text + params.layout_asserts(), "layout.cu", [], [])
        try:
            nvrtc.compileProgram(program, ["--std=c++20", "-arch=sm_80"])
            return True
        except nvrtc.NVRTCError:
            return False
        finally:
            nvrtc.destroyProgram(program)

    assert compiles(source)
    assert not compiles(swapped)
