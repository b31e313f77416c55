"""GPU arrays of PyTorch, CuPy and JAX through the CUDA kernels: zero-copy, streams, dtypes, gradients.

Skipped as a whole without a usable GPU; the PyTorch and JAX tests also skip when those packages
(or their CUDA builds) are missing. Zero-copy is checked on pointers: the kernels must receive the
caller's own memory, and the caller's result must be the memory the kernels wrote.
"""

import os

import numpy
import pytest

import cuflash

from ..helpers import BFLOAT16, assert_close, gpu_skip_reason, magnitudes, naive_same_dtype
from ..interop_helpers import math_attention, pointer, recording, torch_host

_SKIP = gpu_skip_reason()
pytestmark = pytest.mark.skipif(_SKIP is not None, reason=f"no usable GPU: {_SKIP}")

# A JAX with CUDA would otherwise reserve most of the GPU's memory at its start, starving CuPy and PyTorch.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

OPTIONS = dict(causal=True, causal_alignment="bottom_right")
SHAPE = dict(B=2, Sq=100, Sk=130, Hq=4, Hkv=2, D=64, Dv=64)


def _torch():
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("this PyTorch has no CUDA")
    return torch


def _torch_dtypes():
    names = ["float16", "float32"] + (["bfloat16"] if BFLOAT16 is not None else [])
    return [pytest.param(name, id=name) for name in names]


def _tensors(torch, seed, dtype, *, requires_grad=False, B=2, Sq=100, Sk=130, Hq=4, Hkv=2, D=64, Dv=64):
    g = torch.Generator(device="cuda").manual_seed(seed)
    shapes = [(B, Sq, Hq, D), (B, Sk, Hkv, D), (B, Sk, Hkv, Dv), (B, Sq, Hq, Dv)]
    q, k, v, dout = (torch.randn(s, generator=g, device="cuda", dtype=getattr(torch, dtype)) for s in shapes)
    for x in (q, k, v):
        x.requires_grad_(requires_grad)
    return q, k, v, dout


def _check(host, out, grads=None):
    """Values against the float64 reference under the same-dtype accuracy rule (host arrays in)."""
    dtype = host[0].dtype
    naive = naive_same_dtype(*host, **OPTIONS)
    sizes = magnitudes(*host)
    ref_out, _ = cuflash.reference.attention(*host[:3], **OPTIONS)
    assert_close("out", out, ref_out, naive[0], dtype, magnitude=sizes["out"])
    if grads is not None:
        ref = cuflash.reference.attention_backward(host[3], *host[:3], **OPTIONS)
        for name, x, r, nv in zip(("dq", "dk", "dv"), grads, ref, naive[1:]):
            assert_close(name, x, r, nv, dtype, factor=3.0, magnitude=sizes[name])


@pytest.mark.parametrize("dtype", _torch_dtypes())
def test_torch_cuda_tensors_in_and_out_without_copies(dtype):
    torch = _torch()
    q, k, v, dout = _tensors(torch, 40, dtype)
    with recording("cuda") as calls:
        out, lse = cuflash.attention(q, k, v, return_lse=True, **OPTIONS)
        grads = cuflash.attention_backward(dout, q, k, v, out, lse, **OPTIONS)
    for x, like in zip((out, *grads), (dout, q, k, v)):
        assert isinstance(x, torch.Tensor) and x.device == like.device and x.dtype == like.dtype
    assert lse.dtype == torch.float32 and lse.device == q.device
    forward, backward = calls["forward"][0], calls["backward"][0]
    assert [pointer(a) for a in forward.arrays] == [x.data_ptr() for x in (q, k, v)]
    assert forward.arrays[0].dtype.name == dtype  # bfloat16 arrives as bfloat16, not as its uint16 carrier
    assert [pointer(a) for a in forward.results] == [out.data_ptr(), lse.data_ptr()]
    assert [pointer(a) for a in backward.arrays] == [x.data_ptr() for x in (dout, q, k, v, out, lse)]
    assert [pointer(a) for a in backward.results] == [x.data_ptr() for x in grads]
    _check([torch_host(x) for x in (q, k, v, dout)], torch_host(out), [torch_host(g) for g in grads])


@pytest.mark.parametrize("use_side_stream", [False, True], ids=["current_default", "side_stream"])
def test_kernels_run_on_torch_current_stream(use_side_stream):
    torch = _torch()
    q0, k0, v0, _ = _tensors(torch, 41, "float16")
    torch.cuda.synchronize()
    stream = torch.cuda.Stream() if use_side_stream else torch.cuda.current_stream()
    with torch.cuda.stream(stream):
        # Keep the stream busy for a while, then write the inputs on it: a kernel on any other
        # stream would read them before they are written.
        busy = torch.randn(4096, 4096, device="cuda")
        for _ in range(30):
            busy = busy @ busy
            busy = busy / busy.norm()
        delay = busy[0, 0] * 0
        q, k, v = (x + delay.to(x.dtype) for x in (q0, k0, v0))
        with recording("cuda") as calls:
            out = cuflash.attention(q, k, v, **OPTIONS)
        # Read the result on the same stream with no synchronization in between.
        result = out.float() * 1
    torch.cuda.synchronize()
    assert calls["forward"][0].stream == stream.cuda_stream
    _check([torch_host(x) for x in (q0, k0, v0, q0)], result.cpu().numpy().astype(numpy.float16))


@pytest.mark.parametrize("dtype", _torch_dtypes())
def test_autograd_on_cuda_matches_torch_float64_math_attention(dtype):
    torch = _torch()
    import cuflash.torch

    q, k, v, dout = _tensors(torch, 42, dtype, requires_grad=True)
    out = cuflash.torch.attention(q, k, v, **OPTIONS)
    (out.float() * dout.float()).sum().backward()
    assert out.device == q.device and out.dtype == q.dtype
    assert all(x.grad.dtype == q.dtype and x.grad.device == q.device for x in (q, k, v))

    leaves = [x.detach().double().requires_grad_() for x in (q, k, v)]
    expected = math_attention(*leaves, **OPTIONS)
    (expected * dout.double()).sum().backward()
    host = [torch_host(x) for x in (q, k, v, dout)]
    naive = naive_same_dtype(*host, **OPTIONS)
    sizes = magnitudes(*host)
    assert_close("out", torch_host(out), expected.detach().cpu().numpy(), naive[0], host[0].dtype,
                 magnitude=sizes["out"])
    for name, x, leaf, nv in zip(("dq", "dk", "dv"), (q, k, v), leaves, naive[1:]):
        assert_close(name, torch_host(x.grad), leaf.grad.cpu().numpy(), nv, host[0].dtype, factor=3.0,
                     magnitude=sizes[name])


def test_backward_of_a_sum_takes_a_broadcast_gradient_on_cuda():
    # out.sum() hands the backward a stride-0 expanded tensor of ones.
    torch = _torch()
    import cuflash.torch

    q, k, v, _ = _tensors(torch, 51, "float16", requires_grad=True)
    cuflash.torch.attention(q, k, v, **OPTIONS).sum().backward()
    host = [torch_host(x) for x in (q, k, v)]
    ones = numpy.ones((2, 100, 4, 64), numpy.float16)
    _check(host + [ones], torch_host(cuflash.attention(q, k, v, **OPTIONS)), [torch_host(x.grad) for x in (q, k, v)])


def test_deterministic_backward_through_the_adapter_is_bitwise_repeatable():
    torch = _torch()
    import cuflash.torch

    q, k, v, dout = _tensors(torch, 43, "float16", requires_grad=True)
    runs = []
    for _ in range(3):
        for x in (q, k, v):
            x.grad = None
        (cuflash.torch.attention(q, k, v, deterministic=True, **OPTIONS) * dout).sum().backward()
        runs.append([x.grad.clone() for x in (q, k, v)])
    for run in runs[1:]:
        assert all(torch.equal(a, b) for a, b in zip(run, runs[0]))


def test_strided_bhsd_tensors_are_read_in_place():
    torch = _torch()
    g = torch.Generator(device="cuda").manual_seed(44)
    dtype = torch.bfloat16 if BFLOAT16 is not None else torch.float16
    q, k, v = (torch.randn(2, 4, 100, 64, generator=g, device="cuda", dtype=dtype).transpose(1, 2)  # BHSD storage
               for _ in range(3))
    assert not q.is_contiguous()
    with recording("cuda") as calls:
        out = cuflash.attention(q, k, v, **OPTIONS)
    arrays = calls["forward"][0].arrays
    assert [pointer(a) for a in arrays] == [x.data_ptr() for x in (q, k, v)]
    assert arrays[0].strides == tuple(s * q.element_size() for s in q.stride())
    host = [torch_host(x) for x in (q, k, v)]
    _check(host + [host[0]], torch_host(out))


def test_float64_cuda_tensors_run_on_the_numpy_backend_and_come_back_to_the_gpu():
    torch = _torch()
    q, k, v, _ = _tensors(torch, 45, "float64", Sq=9, Sk=11, D=8, Dv=8)
    out = cuflash.attention(q, k, v, **OPTIONS)
    assert out.device == q.device and out.dtype == torch.float64
    ref, _ = cuflash.reference.attention(*(x.cpu().numpy() for x in (q, k, v)), **OPTIONS)
    numpy.testing.assert_allclose(out.cpu().numpy(), ref, rtol=1e-12, atol=1e-12)


def test_cpu_tensors_on_the_cuda_backend_come_back_on_the_cpu():
    torch = _torch()
    q, k, v, _ = (x.cpu() for x in _tensors(torch, 46, "float32"))
    out = cuflash.attention(q, k, v, backend="cuda", **OPTIONS)
    assert out.device.type == "cpu" and out.dtype == torch.float32
    _check([x.numpy() for x in (q, k, v, q)], out.numpy())


def test_tensors_on_two_devices_are_refused():
    torch = _torch()
    q, k, v, _ = _tensors(torch, 47, "float32")
    with pytest.raises(TypeError, match=r"k: torch on cpu"):
        cuflash.attention(q, k.cpu(), v)


def test_cupy_arrays_stay_cupy_and_run_on_cupy_current_stream():
    import cupy

    rng = numpy.random.default_rng(48)
    host = [rng.standard_normal(s).astype(numpy.float16)
            for s in [(2, 100, 4, 64), (2, 130, 2, 64), (2, 130, 2, 64), (2, 100, 4, 64)]]
    stream = cupy.cuda.Stream(non_blocking=True)
    with stream:
        q, k, v, dout = (cupy.asarray(x) for x in host)
        with recording("cuda") as calls:
            out, lse = cuflash.attention(q, k, v, return_lse=True, **OPTIONS)
            grads = cuflash.attention_backward(dout, q, k, v, out, lse, **OPTIONS)
        stream.synchronize()
    assert all(type(x) is cupy.ndarray for x in (out, lse, *grads))
    assert calls["forward"][0].stream == stream.ptr and calls["backward"][0].stream == stream.ptr
    assert [pointer(a) for a in calls["forward"][0].arrays] == [pointer(x) for x in (q, k, v)]
    assert pointer(calls["forward"][0].results[0]) == pointer(out)
    _check(host, out.get(), [g.get() for g in grads])


def _jax_gpu():
    jax = pytest.importorskip("jax")
    gpus = [d for d in jax.devices() if d.platform == "gpu"]
    if not gpus:
        pytest.skip("this JAX has no GPU")
    return jax, gpus[0]


@pytest.mark.parametrize("dtype", [pytest.param(numpy.float16, id="float16"), pytest.param(BFLOAT16, id="bfloat16")])
def test_jax_gpu_arrays_in_and_out_without_copies(dtype):
    if dtype is None:
        pytest.skip("bfloat16 needs ml_dtypes")
    jax, gpu = _jax_gpu()
    rng = numpy.random.default_rng(49)
    host = [rng.standard_normal(s).astype(dtype)
            for s in [(2, 100, 4, 64), (2, 130, 2, 64), (2, 130, 2, 64), (2, 100, 4, 64)]]
    q, k, v, dout = (jax.device_put(x, gpu) for x in host)
    with recording("cuda") as calls:
        out, lse = cuflash.attention(q, k, v, return_lse=True, **OPTIONS)
        grads = cuflash.attention_backward(dout, q, k, v, out, lse, **OPTIONS)
    for x in (out, lse, *grads):
        assert isinstance(x, jax.Array) and x.devices() == {gpu}
    assert out.dtype == dtype and all(g.dtype == dtype for g in grads)
    assert [pointer(a) for a in calls["forward"][0].arrays] == [x.unsafe_buffer_pointer() for x in (q, k, v)]
    assert [pointer(a) for a in calls["forward"][0].results] == [out.unsafe_buffer_pointer(),
                                                                 lse.unsafe_buffer_pointer()]
    assert [pointer(a) for a in calls["backward"][0].results] == [g.unsafe_buffer_pointer() for g in grads]
    _check(host, numpy.asarray(out), [numpy.asarray(g) for g in grads])


def test_jax_gpu_gradients_through_the_adapter():
    jax, gpu = _jax_gpu()
    import cuflash.jax
    import jax.numpy as jnp

    rng = numpy.random.default_rng(50)
    host = [rng.standard_normal(s).astype(numpy.float32)
            for s in [(2, 100, 4, 64), (2, 130, 2, 64), (2, 130, 2, 64), (2, 100, 4, 64)]]
    q, k, v, dout = (jax.device_put(x, gpu) for x in host)

    def loss(q, k, v):
        out = cuflash.jax.attention(q, k, v, **OPTIONS)
        return (out * dout).sum(), out

    (_, out), grads = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(q, k, v)
    assert all(g.devices() == {gpu} and g.dtype == jnp.float32 for g in grads)
    _check(host, numpy.asarray(out), [numpy.asarray(g) for g in grads])


# --- Compiled programs: torch.compile, CUDA graphs, jax.jit/vmap ---------------------------------


def test_torch_compile_on_cuda_matches_eager_bitwise():
    torch = _torch()
    import cuflash.torch

    q, k, v, dout = _tensors(torch, 52, "bfloat16" if BFLOAT16 is not None else "float16")

    def attend(q, k, v):
        return cuflash.torch.attention(q, k, v, deterministic=True, **OPTIONS)

    torch._dynamo.reset()
    results = []
    for run in (attend, torch.compile(attend, fullgraph=True)):
        leaves = [x.detach().clone().requires_grad_() for x in (q, k, v)]
        out = run(*leaves)
        results.append((out.detach(), torch.autograd.grad(out, leaves, dout)))
    (eager_out, eager_grads), (compiled_out, compiled_grads) = results
    assert torch.equal(compiled_out, eager_out)
    assert all(torch.equal(a, b) for a, b in zip(compiled_grads, eager_grads))


def _fresh_values(torch, tensors, seed):
    g = torch.Generator(device="cuda").manual_seed(seed)
    for x in tensors:
        x.copy_(torch.randn(x.shape, generator=g, device="cuda", dtype=x.dtype))


def test_torch_cuda_graph_capture_and_replay_of_forward_and_backward():
    torch = _torch()
    import cuflash.torch

    q, k, v, dout = _tensors(torch, 53, "float16", requires_grad=True)

    def step():
        out = cuflash.torch.attention(q, k, v, deterministic=True, **OPTIONS)
        return (out, *torch.autograd.grad(out, (q, k, v), dout))

    # Warm-up on a side stream (compiles the kernels; PyTorch's recipe for capture), then capture.
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step()
    for seed in (54, 55):
        with torch.no_grad():
            _fresh_values(torch, (q, k, v, dout), seed)
        graph.replay()
        expected = step()
        torch.cuda.synchronize()
        assert all(torch.equal(a, b) for a, b in zip(captured, expected))


def test_torch_compile_with_cuda_graphs_matches_eager():
    torch = _torch()
    import cuflash.torch

    q, k, v, _ = _tensors(torch, 56, "float16")

    def attend(q, k, v):
        return cuflash.torch.attention(q, k, v, **OPTIONS) * 2

    torch._dynamo.reset()
    compiled = torch.compile(attend, fullgraph=True, mode="reduce-overhead")
    for seed in (57, 58, 59):  # the first calls record, later ones replay the CUDA graph
        _fresh_values(torch, (q, k, v), seed)
        got = compiled(q, k, v).clone()
        assert torch.equal(got, attend(q, k, v))


def test_cupy_graph_capture_and_replay_of_forward_and_backward():
    import cupy

    rng = numpy.random.default_rng(60)
    shapes = [(2, 100, 4, 64), (2, 130, 2, 64), (2, 130, 2, 64), (2, 100, 4, 64)]
    q, k, v, dout = (cupy.asarray(rng.standard_normal(s).astype(numpy.float16)) for s in shapes)

    def step():
        out, lse = cuflash.attention(q, k, v, return_lse=True, **OPTIONS)
        return (out, *cuflash.attention_backward(dout, q, k, v, out, lse, deterministic=True, **OPTIONS))

    stream = cupy.cuda.Stream(non_blocking=True)
    with stream:
        step()  # compiles the kernels, which a capture cannot contain
        stream.begin_capture()
        captured = step()
        graph = stream.end_capture()
        for _ in range(2):
            for x in (q, k, v, dout):
                x[...] = cupy.asarray(rng.standard_normal(x.shape).astype(numpy.float16))
            graph.launch()
            expected = step()
            stream.synchronize()
            assert all(bool((a == b).all()) for a, b in zip(captured, expected))


def _jax_inputs(jax, gpu, seed, dtype, shapes=((2, 100, 4, 64), (2, 130, 2, 64), (2, 130, 2, 64), (2, 100, 4, 64))):
    rng = numpy.random.default_rng(seed)
    host = [rng.standard_normal(s).astype(dtype) for s in shapes]
    return host, [jax.device_put(x, gpu) for x in host]


@pytest.mark.parametrize("dtype", [pytest.param(numpy.float16, id="float16"), pytest.param(BFLOAT16, id="bfloat16")])
def test_jax_jit_on_gpu_matches_eager_bitwise_and_the_reference(dtype):
    if dtype is None:
        pytest.skip("bfloat16 needs ml_dtypes")
    jax, gpu = _jax_gpu()
    import cuflash.jax
    import jax.numpy as jnp

    host, (q, k, v, dout) = _jax_inputs(jax, gpu, 61, dtype)

    def loss(q, k, v):
        out = cuflash.jax.attention(q, k, v, deterministic=True, **OPTIONS)
        return (out.astype(jnp.float32) * dout.astype(jnp.float32)).sum(), out

    grad = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)
    with recording("cuda") as calls:
        (_, jit_out), jit_grads = jax.jit(grad)(q, k, v)
    (_, out), grads = grad(q, k, v)
    assert numpy.array_equal(numpy.asarray(jit_out), numpy.asarray(out))
    assert all(numpy.array_equal(numpy.asarray(a), numpy.asarray(b)) for a, b in zip(jit_grads, grads))
    # The kernels read XLA's buffers in place: the jitted function's arguments are q, k, v.
    assert [pointer(a) for a in calls["forward"][0].arrays] == [x.unsafe_buffer_pointer() for x in (q, k, v)]
    assert all(g.devices() == {gpu} and g.dtype == dtype for g in jit_grads)
    _check(host, numpy.asarray(jit_out), [numpy.asarray(g) for g in jit_grads])


def test_jax_on_gpu_matches_jax_nn_dot_product_attention_under_jit_vmap_and_grad():
    jax, gpu = _jax_gpu()
    import cuflash.jax
    import jax.numpy as jnp

    shapes = ((3, 2, 128, 4, 64), (3, 2, 128, 2, 64), (3, 2, 128, 2, 64))
    host, (q, k, v) = _jax_inputs(jax, gpu, 62, numpy.float32, shapes)

    def ours(q, k, v):
        return cuflash.jax.attention(q, k, v, causal=True)

    def xla(q, k, v):
        return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="xla")

    def grads(fn):
        return jax.jit(jax.vmap(jax.grad(lambda q, k, v: (fn(q, k, v) ** 2).sum(), argnums=(0, 1, 2))))

    out = jax.jit(jax.vmap(ours))(q, k, v)
    # XLA's float32 products default to TF32 on the GPU; cuflash's float32 kernels are accurate.
    with jax.default_matmul_precision("highest"):
        expected = jax.jit(jax.vmap(xla))(q, k, v)
        expected_grads = grads(xla)(q, k, v)
    numpy.testing.assert_allclose(numpy.asarray(out), numpy.asarray(expected), rtol=1e-4, atol=1e-4)
    for a, b in zip(grads(ours)(q, k, v), expected_grads):
        numpy.testing.assert_allclose(numpy.asarray(a), numpy.asarray(b), rtol=1e-3, atol=1e-3)
    # And each mapped slice against the float64 reference.
    for i in range(3):
        ref, _ = cuflash.reference.attention(*(x[i] for x in host), causal=True)
        numpy.testing.assert_allclose(numpy.asarray(out[i]), ref, rtol=1e-4, atol=1e-4)
