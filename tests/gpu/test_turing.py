"""The Turing (sm75) family's kernels, run on whatever GPU this is by forcing the family.

Skipped as a whole without a usable GPU. ``variants.family`` is patched to answer "sm75", so the
launchers take the sm75 tables and ``runtime.get_kernel`` compiles every kernel with TURING=1: the
sm_75 code of core/ptx.cuh (two m16n8k8 products per k16 step, plain loads and stores in place of
cp.async, scalar dQ atomics) is what runs, as on a T4, timing aside. Each table entry (forward and
decode at every bucket, on both load paths; the backward up to 224, both dQ modes; score
modifiers; the ragged variants with tiles of their own) is held to the float64 reference by the
same-dtype rule of cuflash.testing, on random inputs with every output NaN-filled first (the
``poisoned`` fixture). The calls Turing has no kernel for (bfloat16, float32, float64, the backward
past d = 224) must be refused with backend="cuda" and computed on the NumPy backend with "auto".
"""

import numpy
import pytest

import cuflash
from cuflash import _api, reference
from cuflash._cuda import runtime, variants
from cuflash._errors import BackendUnavailableError
from cuflash.testing import assert_attention_close, assert_attention_grads_close, assert_lse_close

from ..helpers import BFLOAT16, gpu_skip_reason, make_inputs

_SKIP = gpu_skip_reason()
pytestmark = pytest.mark.skipif(_SKIP is not None, reason=f"no usable GPU: {_SKIP}")

if _SKIP is None:
    import cupy

F16 = numpy.dtype(numpy.float16)
I32 = numpy.int32
FWD_BUCKETS = sorted(variants.FWD_TILES[("sm75", "16bit")])
BWD_BUCKETS = sorted(variants.BWD_TILES[("sm75", "16bit")])
DECODE_BUCKETS = sorted(variants.DECODE_TILES[("sm75", "16bit")])


@pytest.fixture
def turing(monkeypatch):
    """The sm75 family on this GPU, with fresh API plans; afterwards, every kernel compiled while it
    was forced carries TURING=1."""
    before = set(runtime._modules)
    monkeypatch.setattr(variants, "family", lambda major, minor: "sm75")
    monkeypatch.setattr(_api, "_PLANS", {})
    yield
    compiled = set(runtime._modules) - before
    assert all(("TURING", 1) in key[3] for key in compiled), [key[1:3] for key in compiled]


def _head_dims(bucket):
    """The bucket's top (rows of whole 16-byte chunks: the vector path) and three below it (the
    element-wise path), both in the bucket."""
    return [bucket, bucket - 3]


def test_forced_family_compiles_the_turing_code(turing):
    rng = numpy.random.default_rng(0)
    q, k, v, _ = (cupy.asarray(x) for x in make_inputs(rng, 1, 70, 70, 2, 2, 64, 64, F16))
    cuflash.attention(q, k, v, backend="cuda")
    tile, bucket = variants.fwd_tile("sm75", "float16", 64, 64)
    defines = {**variants.fwd_defines(tile, bucket, "float16", True, 0), "TURING": 1}
    key = (q.device.id, variants.FWD_SOURCE, variants.FWD_KERNEL, tuple(sorted(defines.items())))
    assert key in runtime._modules


@pytest.mark.parametrize("bucket", FWD_BUCKETS)
def test_every_forward_entry_matches_reference(bucket, turing, poisoned):
    """Full and tail tiles, GQA, causal and not, both load paths."""
    for D in _head_dims(bucket):
        rng = numpy.random.default_rng(bucket + D)
        q, k, v, _ = make_inputs(rng, 1, 300, 257, 4, 2, D, D, F16)
        for causal in (False, True):
            out, lse = cuflash.attention(q, k, v, causal=causal, return_lse=True, backend="cuda")
            assert_attention_close(out, q, k, v, lse=lse, causal=causal)


def _backward_args(D, Dv, seed, Sq=300, Sk=257, **options):
    rng = numpy.random.default_rng(seed)
    q, k, v, dout = make_inputs(rng, 1, Sq, Sk, 4, 2, D, Dv, F16)
    out, lse = cuflash.attention(q, k, v, return_lse=True, backend="numpy", **options)
    return dout, q, k, v, out, lse


@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic_dq", "dq_kernel"])
@pytest.mark.parametrize("bucket", BWD_BUCKETS)
def test_every_backward_entry_matches_reference(bucket, deterministic, turing, poisoned):
    """dK/dV (with the atomic dQ, or the dQ kernel), preprocess and convert; out and lse from the
    NumPy backend, so the backward is judged alone."""
    for D in _head_dims(bucket):
        args = _backward_args(D, D, bucket + D, causal=True)
        grads = cuflash.attention_backward(*args, causal=True, deterministic=deterministic, backend="cuda")
        dout, q, k, v, _, _ = args
        assert_attention_grads_close(*grads, q, k, v, dout, factor=3.0, causal=True)


@pytest.mark.parametrize("mods", [1, 2, 3], ids=["softcap", "alibi", "both"])
@pytest.mark.parametrize("bucket", FWD_BUCKETS)
def test_score_modifiers_and_windows(bucket, mods, turing, poisoned):
    """Every SCORE_MODS variant with a window, forward at every bucket, backward where Turing has one."""
    options = dict(causal=True, window=(90, None), softcap=20.0 if mods & 1 else None)
    rng = numpy.random.default_rng(bucket * 4 + mods)
    q, k, v, dout = make_inputs(rng, 1, 200, 157, 4, 2, bucket, bucket, F16)
    if mods & 2:
        options["alibi_slopes"] = rng.uniform(0.01, 0.5, 4).astype(numpy.float32)
    out, lse = cuflash.attention(q, k, v, return_lse=True, backend="cuda", **options)
    assert_attention_close(out, q, k, v, lse=lse, **options)
    if bucket in BWD_BUCKETS:
        for deterministic in (False, True):
            grads = cuflash.attention_backward(dout, q, k, v, out, lse, deterministic=deterministic, backend="cuda",
                                               **options)
            assert_attention_grads_close(*grads, q, k, v, dout, factor=3.0, **options)


@pytest.mark.parametrize("bucket", DECODE_BUCKETS)
def test_every_decode_entry_matches_reference(bucket, turing, poisoned):
    """KV-cache decoding (append, split-KV decode and the merge) at every bucket: a long and a
    short sequence, GQA, two new tokens appended, both load paths."""
    for D in _head_dims(bucket):
        rng = numpy.random.default_rng(bucket * 3 + D)
        capacity, lengths = 900, numpy.array([700, 33], I32)
        q = rng.standard_normal((2, 2, 8, D)).astype(F16)
        k_cache, v_cache = (rng.standard_normal((2, capacity, 2, D)).astype(F16) for _ in range(2))
        k_new, v_new = (rng.standard_normal((2, 2, 2, D)).astype(F16) for _ in range(2))
        kc, vc = cupy.asarray(k_cache), cupy.asarray(v_cache)
        out, lse = cuflash.attention_with_kvcache(cupy.asarray(q), kc, vc, cupy.asarray(lengths),
                                                  k_new=cupy.asarray(k_new), v_new=cupy.asarray(v_new), causal=True,
                                                  return_lse=True, backend="cuda")
        _, ref_lse = reference.attention_with_kvcache(q, k_cache, v_cache, lengths, k_new=k_new, v_new=v_new,
                                                      causal=True)
        assert_lse_close(lse, ref_lse, F16)
        for b, n in enumerate(lengths):
            keys = numpy.concatenate([k_cache[b:b + 1, :n], k_new[b:b + 1]], axis=1)
            values = numpy.concatenate([v_cache[b:b + 1, :n], v_new[b:b + 1]], axis=1)
            assert_attention_close(out.get()[b:b + 1], q[b:b + 1], keys, values, causal=True)
            assert (kc.get()[b, n:n + 2] == k_new[b]).all() and (vc.get()[b, n:n + 2] == v_new[b]).all()


def _unserved_dtypes():
    return [numpy.dtype(numpy.float32), numpy.dtype(numpy.float64)] + ([BFLOAT16] if BFLOAT16 is not None else [])


@pytest.mark.parametrize("dtype", _unserved_dtypes(), ids=str)
def test_other_dtypes_are_refused_or_run_on_the_numpy_backend(dtype, turing):
    """GPU operands (host ones for bfloat16, which CuPy cannot hold): backend="cuda" refuses,
    "auto" gives the NumPy backend's results, in the caller's array type."""
    rng = numpy.random.default_rng(4)
    host = make_inputs(rng, 1, 50, 40, 2, 1, 32, 32, dtype)
    on_gpu = dtype != BFLOAT16
    q, k, v, dout = (cupy.asarray(x) if on_gpu else x for x in host)
    with pytest.raises(BackendUnavailableError, match=rf"7\.5 \(Turing\).*not {dtype.name}"):
        cuflash.attention(q, k, v, backend="cuda")
    out, lse = cuflash.attention(q, k, v, causal=True, return_lse=True)
    assert isinstance(out, cupy.ndarray if on_gpu else numpy.ndarray) and out.dtype == dtype
    expected_out, expected_lse = cuflash.attention(*host[:3], causal=True, return_lse=True, backend="numpy")
    numpy.testing.assert_array_equal(cupy.asnumpy(out), expected_out)
    numpy.testing.assert_array_equal(cupy.asnumpy(lse), expected_lse)
    grads = cuflash.attention_backward(dout, q, k, v, out, lse, causal=True)
    expected = cuflash.attention_backward(host[3], *host[:3], expected_out, expected_lse, causal=True, backend="numpy")
    for got, want in zip(grads, expected):
        numpy.testing.assert_array_equal(cupy.asnumpy(got), want)


def test_backward_past_224_is_refused_or_runs_on_the_numpy_backend(turing, poisoned):
    args = _backward_args(256, 256, 5, Sq=40, Sk=50)
    dev = [cupy.asarray(x) for x in args]
    out, lse = cuflash.attention(*dev[1:4], return_lse=True, backend="cuda")  # the forward runs on the GPU
    assert_attention_close(out.get(), *args[1:4], lse=lse.get())
    with pytest.raises(BackendUnavailableError, match="head dims up to 224, not 256"):
        cuflash.attention_backward(*dev, backend="cuda")
    grads = cuflash.attention_backward(*dev)
    for got, want in zip(grads, cuflash.attention_backward(*args, backend="numpy")):
        numpy.testing.assert_array_equal(got.get(), want)


def test_bfloat16_caches_are_refused_or_decoded_on_the_numpy_backend(turing):
    """A GPU cache in bfloat16 (a torch CUDA tensor: CuPy has no bfloat16)."""
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("torch cannot reach the GPU")
    gen = torch.Generator(device="cuda").manual_seed(6)

    def randn(*shape):
        return torch.randn(*shape, generator=gen, device="cuda").to(torch.bfloat16)

    q, k_cache, v_cache = randn(1, 1, 4, 64), randn(1, 100, 2, 64), randn(1, 100, 2, 64)
    lengths = torch.tensor([60], dtype=torch.int32, device="cuda")
    with pytest.raises(BackendUnavailableError, match=r"7\.5 \(Turing\).*not bfloat16"):
        cuflash.attention_with_kvcache(q, k_cache, v_cache, lengths, backend="cuda")
    out = cuflash.attention_with_kvcache(q, k_cache, v_cache, lengths)
    expected = cuflash.attention_with_kvcache(*(x.cpu() for x in (q, k_cache, v_cache, lengths)), backend="numpy")
    assert out.is_cuda and torch.equal(out.cpu(), expected)


@pytest.mark.parametrize("mods", [0, 2, 3], ids=["plain", "alibi", "softcap_alibi"])
@pytest.mark.parametrize("bucket", [64, 128, 224])
def test_packed_batches(bucket, mods, turing, poisoned):
    """The ragged (SEQ_MODE 1) variants, the 224 ones with ALiBi on tiles of their own: each
    sequence of a packed batch against the reference, forward and both dQ modes. Last in this file:
    sequences starting at rows that are not a multiple of 4 put the packed backward's L2 and D
    workspace rows off 16-byte alignment (the ragged layout of every family, backward.py), which
    has stopped this test with a misaligned address, an error that poisons the process's later
    GPU calls."""
    rng = numpy.random.default_rng(bucket + mods)
    lengths_q, lengths_k = [3, 0, 130, 65], [70, 5, 129, 1]
    cu_q, cu_k = (numpy.concatenate([[0], numpy.cumsum(n)]).astype(I32) for n in (lengths_q, lengths_k))
    q = rng.standard_normal((cu_q[-1], 4, bucket)).astype(F16)
    k, v = (rng.standard_normal((cu_k[-1], 2, bucket)).astype(F16) for _ in range(2))
    dout = rng.standard_normal(q.shape).astype(F16)
    slopes = rng.uniform(0.01, 0.5, 4).astype(numpy.float32) if mods & 2 else None
    options = dict(causal=True, softcap=20.0 if mods & 1 else None)
    dev = [cupy.asarray(x) for x in (q, k, v, dout, cu_q, cu_k)]
    gslopes = None if slopes is None else cupy.asarray(slopes)
    out, lse = cuflash.attention_varlen(*dev[:3], dev[4], dev[5], return_lse=True, alibi_slopes=gslopes,
                                        backend="cuda", **options)
    for deterministic in (False, True):
        grads = cuflash.attention_varlen_backward(dev[3], *dev[:3], out, lse, dev[4], dev[5], alibi_slopes=gslopes,
                                                  deterministic=deterministic, backend="cuda", **options)
        dq, dk, dv = (g.get() for g in grads)
        for b in range(len(lengths_q)):
            rq, rk = slice(cu_q[b], cu_q[b + 1]), slice(cu_k[b], cu_k[b + 1])
            qb, kb, vb, dob = q[None, rq], k[None, rk], v[None, rk], dout[None, rq]
            seq = dict(options, alibi_slopes=slopes)
            assert_attention_close(out.get()[None, rq], qb, kb, vb, lse=lse.get()[None, :, rq], **seq)
            assert_attention_grads_close(dq[None, rq], dk[None, rk], dv[None, rk], qb, kb, vb, dob, factor=3.0,
                                         **seq)
