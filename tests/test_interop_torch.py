"""PyTorch CPU tensors through cuflash (NumPy backend), and autograd through ``cuflash.torch``.

Skipped without PyTorch. The gradients are checked against PyTorch's own float64 math attention.
"""

import sys

import numpy
import pytest

import cuflash

from .helpers import BFLOAT16, assert_close, magnitudes, naive_same_dtype
from .interop_helpers import math_attention, needs_new_options, pointer, recording, torch_host

torch = pytest.importorskip("torch")
import cuflash.torch  # noqa: E402  (needs torch, which the skip above guarantees)

DTYPES = [torch.float16, torch.float32, torch.float64] + ([torch.bfloat16] if BFLOAT16 is not None else [])


def _numpy_dtype(dtype):
    return BFLOAT16 if dtype == torch.bfloat16 else numpy.dtype(str(dtype).removeprefix("torch."))


def _tensors(seed, dtype, B=2, Sq=5, Sk=7, Hq=4, Hkv=2, D=8, Dv=6, requires_grad=False):
    g = torch.Generator().manual_seed(seed)
    shapes = [(B, Sq, Hq, D), (B, Sk, Hkv, D), (B, Sk, Hkv, Dv), (B, Sq, Hq, Dv)]
    q, k, v, dout = (torch.randn(s, generator=g, dtype=torch.float64).to(dtype) for s in shapes)
    for x in (q, k, v):
        x.requires_grad_(requires_grad)
    return q, k, v, dout


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cpu_tensors_in_tensors_out_without_copies(dtype):
    q, k, v, dout = _tensors(10, dtype)
    with recording("numpy") as calls:
        out, lse = cuflash.attention(q, k, v, causal=True, return_lse=True, backend="numpy")
        dq, dk, dv = cuflash.attention_backward(dout, q, k, v, out, lse, causal=True, backend="numpy")
    for x, like in ((out, dout), (dq, q), (dk, k), (dv, v)):
        assert isinstance(x, torch.Tensor) and x.dtype == dtype and x.device == like.device and x.shape == like.shape
    assert lse.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    forward, backward = calls["forward"][0], calls["backward"][0]
    # Inputs read in place (bfloat16 too: it arrives as a view, not a converted copy) ...
    assert [pointer(a) for a in forward.arrays] == [x.data_ptr() for x in (q, k, v)]
    assert forward.arrays[0].dtype == _numpy_dtype(dtype)
    # ... and outputs handed back in place.
    assert [pointer(a) for a in forward.results] == [out.data_ptr(), lse.data_ptr()]
    assert [pointer(a) for a in backward.results] == [x.data_ptr() for x in (dq, dk, dv)]
    host = [torch_host(x) for x in (q, k, v, dout)]
    ref_out, ref_lse = cuflash.reference.attention(*host[:3], causal=True)
    naive = naive_same_dtype(*host, causal=True)
    sizes = magnitudes(*host)
    assert_close("out", torch_host(out), ref_out, naive[0], host[0].dtype, magnitude=sizes["out"])
    ref_grads = cuflash.reference.attention_backward(host[3], *host[:3], causal=True)
    for name, x, ref, nv in zip(("dq", "dk", "dv"), (dq, dk, dv), ref_grads, naive[1:]):
        assert_close(name, torch_host(x), ref, nv, host[0].dtype, factor=3.0, magnitude=sizes[name])


def test_strided_bhsd_views_are_read_in_place():
    g = torch.Generator().manual_seed(11)
    q, k, v = (torch.randn(2, 3, 9, 8, generator=g).transpose(1, 2) for _ in range(3))  # BHSD storage
    assert not q.is_contiguous()
    with recording("numpy") as calls:
        out = cuflash.attention(q, k, v, causal=True, backend="numpy")
    arrays = calls["forward"][0].arrays
    assert [pointer(a) for a in arrays] == [x.data_ptr() for x in (q, k, v)]
    assert arrays[0].strides == tuple(s * q.element_size() for s in q.stride())
    expected = cuflash.attention(*(x.contiguous() for x in (q, k, v)), causal=True, backend="numpy")
    assert torch.equal(out, expected)


def test_tensors_that_require_grad_pass_through_the_plain_api():
    q, k, v, _ = _tensors(12, torch.float32, requires_grad=True)
    with recording("numpy") as calls:
        out = cuflash.attention(q, k, v, backend="numpy")
    assert [pointer(a) for a in calls["forward"][0].arrays] == [x.data_ptr() for x in (q, k, v)]
    assert not out.requires_grad  # the plain API is outside autograd; cuflash.torch is inside
    assert torch.equal(out, cuflash.attention(*(x.detach() for x in (q, k, v)), backend="numpy"))


def test_attention_vjp_on_tensors():
    q, k, v, dout = _tensors(13, torch.float64)
    out, vjp = cuflash.attention_vjp(q, k, v, causal=True, backend="numpy")
    grads = vjp(dout)
    ref = cuflash.reference.attention_backward(*(x.numpy() for x in (dout, q, k, v)), causal=True)
    assert isinstance(out, torch.Tensor)
    for x, r in zip(grads, ref):
        assert isinstance(x, torch.Tensor)
        numpy.testing.assert_allclose(x.numpy(), r, rtol=1e-10, atol=1e-12)


CASES = [
    # (Sq, Sk, Hq, Hkv, causal, causal_alignment)
    (5, 7, 4, 2, False, "bottom_right"),
    (5, 7, 4, 2, True, "bottom_right"),
    (7, 5, 2, 2, True, "bottom_right"),  # rows 0 and 1 see no key
    (7, 5, 3, 1, True, "top_left"),
    (6, 6, 4, 4, True, "top_left"),
    (1, 9, 2, 1, True, "bottom_right"),
]


@pytest.mark.parametrize("Sq, Sk, Hq, Hkv, causal, causal_alignment", CASES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_autograd_matches_torch_float64_math_attention(dtype, Sq, Sk, Hq, Hkv, causal, causal_alignment):
    q, k, v, dout = _tensors(14 + Sq + 10 * Sk, dtype, Sq=Sq, Sk=Sk, Hq=Hq, Hkv=Hkv, requires_grad=True)
    scale = 0.7 if causal_alignment == "top_left" else None
    out = cuflash.torch.attention(q, k, v, causal=causal, causal_alignment=causal_alignment, scale=scale)
    assert out.requires_grad and out.dtype == dtype
    (out * dout).sum().backward()
    grads = [x.grad for x in (q, k, v)]

    leaves = [x.detach().double().requires_grad_() for x in (q, k, v)]
    expected = math_attention(*leaves, causal=causal, causal_alignment=causal_alignment, scale=scale)
    (expected * dout.double()).sum().backward()
    rtol, atol = (1e-10, 1e-12) if dtype == torch.float64 else (1e-4, 1e-5)
    torch.testing.assert_close(out.double(), expected.detach(), rtol=rtol, atol=atol)
    for name, got, leaf in zip(("dq", "dk", "dv"), grads, leaves):
        assert got.dtype == dtype, name
        torch.testing.assert_close(got.double(), leaf.grad, rtol=rtol, atol=atol, msg=lambda m: f"{name}: {m}")


@pytest.mark.skipif(BFLOAT16 is None, reason="bfloat16 on the CPU needs ml_dtypes")
def test_bfloat16_autograd_stays_bfloat16():
    q, k, v, dout = _tensors(15, torch.bfloat16, requires_grad=True)
    out = cuflash.torch.attention(q, k, v, causal=True)
    (out * dout).sum().backward()
    assert out.dtype == torch.bfloat16 and all(x.grad.dtype == torch.bfloat16 for x in (q, k, v))
    host = [torch_host(x) for x in (q, k, v, dout)]
    naive = naive_same_dtype(*host, causal=True)
    sizes = magnitudes(*host)
    ref_out, _ = cuflash.reference.attention(*host[:3], causal=True)
    assert_close("out", torch_host(out), ref_out, naive[0], BFLOAT16, magnitude=sizes["out"])
    ref = cuflash.reference.attention_backward(host[3], *host[:3], causal=True)
    for name, x, r, nv in zip(("dq", "dk", "dv"), (q, k, v), ref, naive[1:]):
        assert_close(name, torch_host(x.grad), r, nv, BFLOAT16, factor=3.0, magnitude=sizes[name])


def test_backward_of_a_sum_takes_a_broadcast_gradient():
    # out.sum() hands the backward a stride-0 expanded tensor of ones.
    q, k, v, _ = _tensors(16, torch.float64, requires_grad=True)
    cuflash.torch.attention(q, k, v, causal=True).sum().backward()
    ones = numpy.ones((2, 5, 4, 6))
    ref = cuflash.reference.attention_backward(ones, *(x.detach().numpy() for x in (q, k, v)), causal=True)
    for x, r in zip((q, k, v), ref):
        numpy.testing.assert_allclose(x.grad.numpy(), r, rtol=1e-10, atol=1e-12)


def test_only_the_inputs_that_need_it_get_gradients():
    q, k, v, dout = _tensors(17, torch.float64)
    k.requires_grad_(True)
    (cuflash.torch.attention(q, k, v) * dout).sum().backward()
    assert q.grad is None and v.grad is None and k.grad is not None


def test_mixed_torch_and_numpy_are_refused():
    q, k, v, _ = _tensors(18, torch.float32)
    with pytest.raises(TypeError, match=r"one framework on one device, got q: torch on cpu, k: numpy on cpu"):
        cuflash.attention(q, k.numpy(), v)


def test_adapter_refuses_non_tensors_and_bad_options_before_running():
    q, k, v, _ = _tensors(19, torch.float32)
    with recording("numpy") as calls:
        with pytest.raises(TypeError, match=r"k must be a torch.Tensor, got numpy.ndarray"):
            cuflash.torch.attention(q, k.numpy(), v)
        with pytest.raises(TypeError, match=r"deterministic must be a bool"):
            cuflash.torch.attention(q, k, v, deterministic="yes")
        with pytest.raises(ValueError, match=r"causal_alignment must be one of"):
            cuflash.torch.attention(q, k, v, causal=True, causal_alignment="top")
    assert calls["forward"] == []


@pytest.mark.skipif(BFLOAT16 is None, reason="needs ml_dtypes to show the difference")
def test_cpu_bfloat16_without_ml_dtypes_says_what_to_install(monkeypatch):
    q, k, v, _ = _tensors(20, torch.bfloat16)
    monkeypatch.setitem(sys.modules, "ml_dtypes", None)  # as if it were not installed
    with pytest.raises(TypeError, match=r"q is bfloat16.*ml_dtypes") as info:
        cuflash.attention(q, k, v, backend="numpy")
    assert "k is bfloat16" in str(info.value) and "v is bfloat16" in str(info.value)


# --- The registered operators and torch.compile --------------------------------------------------

FORWARD_OP = "cuflash::attention_forward"
# Operator arguments after the tensors: causal, causal_alignment, window_left, window_right, softcap,
# scale, deterministic, backend (see cuflash/torch.py).
OP_OPTIONS = (True, "bottom_right", None, 0, 0.0, None, False, "numpy")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_operators_pass_torch_library_opcheck(dtype):
    # Schema, fake tensors, autograd registration and AOT dispatch, checked by PyTorch itself.
    q, k, v, dout = _tensors(21, dtype)
    torch.library.opcheck(torch.ops.cuflash.attention_forward.default, (q, k, v, None, *OP_OPTIONS))
    out, lse = torch.ops.cuflash.attention_forward(q, k, v, None, *OP_OPTIONS)
    torch.library.opcheck(torch.ops.cuflash.attention_backward.default, (dout, q, k, v, out, lse, None, *OP_OPTIONS))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_fake_tensors_get_the_shapes_dtypes_and_strides_of_real_outputs(dtype):
    from torch._subclasses.fake_tensor import FakeTensorMode

    # BHSD storage viewed as BSHD: the outputs are contiguous all the same.
    q, k, v, dout = (x.transpose(1, 2).contiguous().transpose(1, 2) for x in _tensors(22, dtype))
    real_out, real_lse = torch.ops.cuflash.attention_forward(q, k, v, None, *OP_OPTIONS)
    real_grads = torch.ops.cuflash.attention_backward(dout, q, k, v, real_out, real_lse, None, *OP_OPTIONS)
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        fq, fk, fv, fdout = (mode.from_tensor(x) for x in (q, k, v, dout))
        out, lse = torch.ops.cuflash.attention_forward(fq, fk, fv, None, *OP_OPTIONS)
        grads = torch.ops.cuflash.attention_backward(fdout, fq, fk, fv, out, lse, None, *OP_OPTIONS)
    for fake, real in zip((out, lse, *grads), (real_out, real_lse, *real_grads)):
        assert (fake.shape, fake.dtype, fake.stride()) == (real.shape, real.dtype, real.stride())
    assert out.shape == (2, 5, 4, 6) and lse.shape == (2, 4, 5)
    assert lse.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert [g.shape for g in grads] == [q.shape, k.shape, v.shape]


def test_fake_tensors_are_checked_like_real_ones():
    from torch._subclasses.fake_tensor import FakeTensorMode

    q, k, v, _ = _tensors(23, torch.float32)
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        fq, fk, fv = (mode.from_tensor(x) for x in (q, k[..., :4], v))
        with pytest.raises(ValueError, match=r"(?s)cuflash.torch.attention.*q and k must have the same head_dim"):
            torch.ops.cuflash.attention_forward(fq, fk, fv, None, *OP_OPTIONS)


def test_the_operator_and_the_eager_road_agree_bitwise():
    q, k, v, dout = _tensors(24, torch.float32, requires_grad=True)
    out = cuflash.torch.attention(q, k, v, causal=True)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    # The operator with its registered autograd formula, as torch.compile would call it.
    op_out, _ = torch.ops.cuflash.attention_forward(q, k, v, None, *OP_OPTIONS)
    op_grads = torch.autograd.grad(op_out, (q, k, v), dout)
    assert torch.equal(out, op_out)
    assert all(torch.equal(a, b) for a, b in zip(grads, op_grads))


def _compiled_and_eager(fn, inputs, backend="inductor"):
    """fn's outputs and the gradients of their sum-with-weights, eagerly and under
    torch.compile(fullgraph=True), which fails on any graph break."""
    torch._dynamo.reset()
    results = []
    for run in (fn, torch.compile(fn, fullgraph=True, backend=backend)):
        leaves = [x.detach().clone().requires_grad_() for x in inputs]
        out = run(*leaves)
        weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(25), dtype=out.dtype)
        grads = torch.autograd.grad((out * weights).sum(), leaves)
        results.append((out.detach(), grads))
    return results


def test_torch_compile_fullgraph_matches_eager():
    # GQA, bottom-right causal with Sq < Sk, a scale, and BHSD storage read through transposed views.
    g = torch.Generator().manual_seed(26)
    q = torch.randn(2, 4, 5, 8, generator=g).transpose(1, 2)
    k, v = (torch.randn(2, 2, 7, 8, generator=g).transpose(1, 2) for _ in range(2))

    def block(q, k, v):
        # Work before and after the attention, so the compiled graph is more than the operator.
        out = cuflash.torch.attention(torch.tanh(q) * 2, k, v, causal=True, scale=0.5)
        return out.relu() + out

    (eager_out, eager_grads), (compiled_out, compiled_grads) = _compiled_and_eager(block, (q, k, v))
    torch.testing.assert_close(compiled_out, eager_out, rtol=1e-6, atol=1e-6)
    for name, a, b in zip(("dq", "dk", "dv"), compiled_grads, eager_grads):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6, msg=lambda m: f"{name}: {m}")


@pytest.mark.skipif(BFLOAT16 is None, reason="bfloat16 on the CPU needs ml_dtypes")
def test_torch_compile_keeps_bfloat16_and_matches_eager_bitwise():
    q, k, v, _ = _tensors(27, torch.bfloat16)

    def attend(q, k, v):
        return cuflash.torch.attention(q, k, v, causal=True, causal_alignment="top_left")

    (eager_out, eager_grads), (compiled_out, compiled_grads) = _compiled_and_eager(attend, (q, k, v), "aot_eager")
    assert compiled_out.dtype == torch.bfloat16 and torch.equal(compiled_out, eager_out)
    assert all(a.dtype == torch.bfloat16 and torch.equal(a, b) for a, b in zip(compiled_grads, eager_grads))


def test_torch_compile_reports_bad_shapes_while_compiling():
    q, k, v, _ = _tensors(28, torch.float32)
    torch._dynamo.reset()
    compiled = torch.compile(lambda q, k, v: cuflash.torch.attention(q, k, v), fullgraph=True, backend="aot_eager")
    with recording("numpy") as calls:
        with pytest.raises(Exception, match=r"k and v must have the same sequence length, got k: 7, v: 6"):
            compiled(q, k, v[:, :6])
    assert calls["forward"] == []


@needs_new_options
def test_new_options_through_the_adapter_and_under_compile():
    q, k, v, dout = _tensors(29, torch.float32)
    slopes = torch.rand(4, generator=torch.Generator().manual_seed(29), dtype=torch.float32)
    options = dict(causal=True, window=(3, 0), softcap=4.0)

    def attend(q, k, v):
        return cuflash.torch.attention(q, k, v, alibi_slopes=slopes, **options)

    out, lse = cuflash.attention(q, k, v, alibi_slopes=slopes, return_lse=True, backend="numpy", **options)
    grads = cuflash.attention_backward(dout, q, k, v, out, lse, alibi_slopes=slopes, backend="numpy", **options)
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    adapter_out = attend(*leaves)
    adapter_grads = torch.autograd.grad(adapter_out, leaves, dout)
    assert torch.equal(adapter_out, out) and all(torch.equal(a, b) for a, b in zip(adapter_grads, grads))
    (eager_out, eager_grads), (compiled_out, compiled_grads) = _compiled_and_eager(attend, (q, k, v), "aot_eager")
    assert torch.equal(compiled_out, eager_out) and all(torch.equal(a, b) for a, b in zip(compiled_grads, eager_grads))


def test_adapter_refuses_bad_new_options_naming_them():
    q, k, v, _ = _tensors(30, torch.float32)
    with pytest.raises(ValueError, match=r"causal=True means a right window size of 0"):
        cuflash.torch.attention(q, k, v, causal=True, window=(2, 3))
    with pytest.raises(TypeError, match=r"alibi_slopes must be a torch.Tensor, got numpy.ndarray"):
        cuflash.torch.attention(q, k, v, alibi_slopes=numpy.ones(4, numpy.float32))
    with pytest.raises(ValueError, match=r"softcap must be positive"):
        cuflash.torch.attention(q, k, v, softcap=-1.0)


def test_adapter_option_cache_still_refuses_values_equal_to_valid_ones():
    # 1 == True: the adapter remembers valid option sets, keyed by type as well as value.
    q, k, v, _ = _tensors(31, torch.float32)
    cuflash.torch.attention(q, k, v, causal=True)
    with pytest.raises(TypeError, match=r"causal must be a bool, got int"):
        cuflash.torch.attention(q, k, v, causal=1)
    with pytest.raises(TypeError, match=r"deterministic must be a bool, got int"):
        cuflash.torch.attention(q, k, v, causal=True, deterministic=0)


def test_torch_compile_with_dynamic_shapes_traces_one_graph_for_all_lengths():
    # The fake functions run the checks on symbolic sizes; no recompilation per sequence length.
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    compiled = torch.compile(lambda q, k, v: cuflash.torch.attention(q, k, v, causal=True), fullgraph=True,
                             dynamic=True, backend="aot_eager")
    for Sq, Sk in ((5, 7), (9, 11), (13, 6)):
        q, k, v, dout = _tensors(32 + Sq, torch.float32, Sq=Sq, Sk=Sk, requires_grad=True)
        out = compiled(q, k, v)
        grads = torch.autograd.grad(out, (q, k, v), dout)
        expected = cuflash.torch.attention(q, k, v, causal=True)
        assert torch.equal(out, expected)
        assert all(torch.equal(a, b) for a, b in zip(grads, torch.autograd.grad(expected, (q, k, v), dout)))
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1
