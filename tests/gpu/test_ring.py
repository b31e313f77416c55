"""Ring attention on GPUs: the CuPy loopback ring on one GPU, and NCCL across GPUs, one process each.

The loopback ring (P virtual ranks in threads, CuPy arrays, copies ordered by CUDA events) must
equal single-GPU ``cuflash.attention`` / ``attention_backward`` on the gathered sequence within
float32 rounding for float32, and keep the same-dtype accuracy rule for 16-bit inputs (each step's
partial output is rounded once to the input dtype). The NCCL ring, with 2 and 4 processes, must
give exactly the loopback ring's results with ``deterministic=True``: same calls, same merges,
only the transport differs. Skipped cleanly without a GPU; the NCCL tests also need enough GPUs
and CuPy's NCCL.
"""

import multiprocessing

import numpy
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import cuflash
from cuflash import distributed

from ..helpers import BFLOAT16, assert_close, gpu_skip_reason, magnitudes, make_inputs, naive_same_dtype, windows

_SKIP = gpu_skip_reason()
pytestmark = pytest.mark.skipif(_SKIP is not None, reason=f"no usable GPU: {_SKIP}")

GPU_DTYPES = [numpy.dtype(numpy.float16), numpy.dtype(numpy.float32)] + ([BFLOAT16] if BFLOAT16 is not None else [])


def _ring_on(comm, world, layout, seqlen, arrays, options, deterministic=True):
    """One rank's (out, lse, dq, dk, dv) as NumPy arrays; ``arrays`` are the global (q, k, v, dout)."""
    import cupy

    q, k, v, dout = (cupy.asarray(distributed.shard(x, comm.rank, world, layout=layout)) for x in arrays)
    args = dict(comm=comm, layout=layout, seqlen=seqlen, **options)
    out, lse = distributed.ring_attention(q, k, v, return_lse=True, **args)
    grads = distributed.ring_attention_backward(dout, q, k, v, out, lse, deterministic=deterministic, **args)
    assert all(isinstance(x, cupy.ndarray) for x in (out, lse) + tuple(grads))
    return tuple(x.get() for x in (out, lse) + tuple(grads))


def _gathered(per_rank, layout):
    return [distributed.unshard([r[i] for r in per_rank], layout=layout, axis=2 if i == 1 else 1) for i in range(5)]


def _loopback(world, layout, seqlen, arrays, options, streams=False):
    import cupy

    def rank(comm):
        if not streams:
            return _ring_on(comm, world, layout, seqlen, arrays, options)
        stream = cupy.cuda.Stream(non_blocking=True)  # ranks on their own streams: only events order them
        with stream:
            result = _ring_on(comm, world, layout, seqlen, arrays, options)
        stream.synchronize()
        return result

    return _gathered(distributed.LoopbackRing(world).run(rank), layout)


def _check_against_single_gpu(ring, arrays, options):
    """float32: equal to single-GPU attention within float32 rounding; 16-bit: the accuracy rule."""
    import cupy

    q, k, v, dout = arrays
    sizes = magnitudes(q, k, v, dout, options.get("scale"))
    if q.dtype == numpy.float32:
        q_d, k_d, v_d, dout_d = (cupy.asarray(x) for x in (q, k, v, dout))
        out, lse = cuflash.attention(q_d, k_d, v_d, return_lse=True, **options)
        single = [out, lse, *cuflash.attention_backward(dout_d, q_d, k_d, v_d, out, lse, **options)]
        for name, x, ref in zip(("out", "lse", "dq", "dk", "dv"), ring, single):
            ref = ref.get()
            finite = numpy.isfinite(ref)
            assert numpy.array_equal(numpy.isfinite(x), finite), name
            bound = 2e-5 * max(1.0, sizes.get(name, float(numpy.abs(ref[finite]).max(initial=0))))
            err = float(numpy.abs(x[finite].astype(numpy.float64) - ref[finite]).max(initial=0))
            assert err <= bound, f"{name}: ring differs from single-GPU attention by {err:.3g} > {bound:.3g}"
        return
    mask = {key: options[key] for key in ("causal", "window") if key in options}
    ref_out, _ = cuflash.reference.attention(q, k, v, **mask)
    ref_grads = cuflash.reference.attention_backward(dout, q, k, v, **mask)
    naive = naive_same_dtype(q, k, v, dout, **mask)
    out, _, *grads = ring
    for name, x, ref, nv in zip(("out", "dq", "dk", "dv"), [out] + grads, [ref_out] + list(ref_grads), naive):
        assert x.dtype == q.dtype
        assert_close(name, x, ref, nv, q.dtype, factor=3.0, magnitude=sizes[name])


@settings(max_examples=25, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seed=st.integers(0, 2**32 - 1), world=st.integers(1, 4), layout=st.sampled_from(distributed.LAYOUTS),
       causal=st.booleans(), Hkv=st.integers(1, 2), group=st.sampled_from([1, 4]),
       D=st.sampled_from([32, 64, 128, 59]), dtype=st.sampled_from(GPU_DTYPES), data=st.data())
def test_cupy_loopback_ring_equals_single_gpu_attention(seed, world, layout, causal, Hkv, group, D, dtype, data,
                                                        poisoned):
    seqlen = data.draw(st.integers(1, 300), label="seqlen")
    window = data.draw(windows(causal, st.one_of(st.none(), st.integers(0, 80))), label="window")
    arrays = make_inputs(numpy.random.default_rng(seed), 2, seqlen, seqlen, Hkv * group, Hkv, D, D, dtype)
    options = dict(causal=causal, window=window)
    ring = _loopback(world, layout, seqlen, arrays, options)
    _check_against_single_gpu(ring, arrays, options)


@pytest.mark.parametrize("dtype", GPU_DTYPES, ids=lambda d: d.name)
def test_loopback_ranks_on_their_own_streams(dtype):
    """Each rank computes on a non-blocking stream; the loopback copies are ordered only by events."""
    arrays = make_inputs(numpy.random.default_rng(5), 1, 1024, 1024, 8, 2, 128, 128, dtype)
    options = dict(causal=True)
    on_streams = _loopback(4, "zigzag", 1024, arrays, options, streams=True)
    on_default = _loopback(4, "zigzag", 1024, arrays, options)
    for x, y in zip(on_streams, on_default):
        assert numpy.array_equal(x.view(numpy.uint8), y.view(numpy.uint8))
    _check_against_single_gpu(on_default, arrays, options)


# ---------------------------------------------------------------------------------------------
# NCCL: one process per GPU.
# ---------------------------------------------------------------------------------------------

def _device_count():
    import cupy

    try:
        return cupy.cuda.runtime.getDeviceCount()
    except cupy.cuda.runtime.CUDARuntimeError:
        return 0


def _nccl_refusal(world):
    try:
        from cupy.cuda import nccl
    except ImportError as exc:
        return f"CuPy's NCCL does not import: {exc}"
    if not nccl.available:
        return "CuPy cannot load NCCL (pip install nvidia-nccl-cu13, or -cu12 for CUDA 12)"
    count = _device_count()
    return None if count >= world else f"needs {world} GPUs, {count} visible"


# (layout, causal, window, dtype name, seqlen): the load-balanced causal case, full attention, a
# causal sliding window across zigzag chunks, and uneven shards.
CASES = [
    ("zigzag", True, None, "bfloat16", 4096),
    ("contiguous", False, None, "float32", 2048),
    ("zigzag", True, (300, 0), "float16", 4096),
    ("contiguous", True, (None, 0), "float16", 3001),
]


def _case_arrays(case, seed=11):
    layout, causal, window, dtype, seqlen = case
    dtype = BFLOAT16 if dtype == "bfloat16" else numpy.dtype(dtype)
    return make_inputs(numpy.random.default_rng(seed), 2, seqlen, seqlen, 8, 2, 128, 128, dtype)


def _nccl_rank(rank, world, unique_id, cases, queue):
    import cupy

    try:
        cupy.cuda.Device(rank).use()
        comm = distributed.NcclRing.create(rank, world, unique_id, device=rank)
        results = []
        for case in cases:
            layout, causal, window, _, seqlen = case
            options = dict(causal=causal, window=window)
            results.append(_ring_on(comm, world, layout, seqlen, _case_arrays(case), options))
        queue.put((rank, results))
    except BaseException as exc:
        queue.put((rank, exc))
        raise


@pytest.mark.parametrize("world", [2, 4])
def test_nccl_ring_equals_the_loopback_ring_and_single_gpu_attention(world):
    refusal = _nccl_refusal(world)
    if refusal is not None:
        pytest.skip(refusal)
    cases = [c for c in CASES if c[3] != "bfloat16" or BFLOAT16 is not None]
    unique_id = distributed.NcclRing.unique_id()
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    processes = [context.Process(target=_nccl_rank, args=(r, world, unique_id, cases, queue)) for r in range(world)]
    for p in processes:
        p.start()
    try:
        per_rank = dict(queue.get(timeout=600) for _ in range(world))
    finally:
        for p in processes:
            p.join(timeout=60)
            if p.is_alive():
                p.kill()
    for rank, result in per_rank.items():
        assert not isinstance(result, BaseException), f"rank {rank} failed: {result!r}"
    assert all(p.exitcode == 0 for p in processes)
    for i, case in enumerate(cases):
        layout, causal, window, _, seqlen = case
        nccl = _gathered([per_rank[r][i] for r in range(world)], layout)
        arrays, options = _case_arrays(case), dict(causal=causal, window=window)
        loopback = _loopback(world, layout, seqlen, arrays, options)
        for name, x, y in zip(("out", "lse", "dq", "dk", "dv"), nccl, loopback):
            assert numpy.array_equal(x.view(numpy.uint8), y.view(numpy.uint8)), f"{case}: {name} differs from loopback"
        _check_against_single_gpu(nccl, arrays, options)
