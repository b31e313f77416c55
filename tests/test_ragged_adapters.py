"""Ragged batches through the framework adapters: ``cuflash.torch`` and ``cuflash.jax`` give the
results and gradients of ``cuflash.attention_varlen`` / padded ``cuflash.attention`` bitwise,
eagerly and compiled."""

import numpy
import pytest
from hypothesis import given, settings, strategies as st

import cuflash

I32 = numpy.int32


@st.composite
def packed(draw):
    lengths_q = draw(st.lists(st.integers(0, 12), min_size=1, max_size=4))
    lengths_k = draw(st.lists(st.integers(0, 12), min_size=len(lengths_q), max_size=len(lengths_q)))
    rng = numpy.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    cu_q = numpy.concatenate([[0], numpy.cumsum(lengths_q)]).astype(I32)
    cu_k = numpy.concatenate([[0], numpy.cumsum(lengths_k)]).astype(I32)
    q = rng.standard_normal((int(cu_q[-1]), 4, 8)).astype(numpy.float32)
    k = rng.standard_normal((int(cu_k[-1]), 2, 8)).astype(numpy.float32)
    v = rng.standard_normal((int(cu_k[-1]), 2, 6)).astype(numpy.float32)
    dout = rng.standard_normal((int(cu_q[-1]), 4, 6)).astype(numpy.float32)
    options = dict(causal=draw(st.booleans()), window=draw(st.sampled_from([None, (3, None)])),
                   softcap=draw(st.sampled_from([None, 4.0])))
    return q, k, v, dout, cu_q, cu_k, options


@st.composite
def padded(draw):
    B = draw(st.integers(1, 3))
    Sq, Sk = draw(st.integers(1, 9)), draw(st.integers(1, 9))
    rng = numpy.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    seqlens_q = numpy.array([draw(st.integers(0, Sq)) for _ in range(B)], I32)
    seqlens_k = numpy.array([draw(st.integers(0, Sk)) for _ in range(B)], I32)
    q = rng.standard_normal((B, Sq, 4, 8)).astype(numpy.float32)
    k = rng.standard_normal((B, Sk, 2, 8)).astype(numpy.float32)
    v = rng.standard_normal((B, Sk, 2, 6)).astype(numpy.float32)
    dout = rng.standard_normal((B, Sq, 4, 6)).astype(numpy.float32)
    return q, k, v, dout, seqlens_q, seqlens_k, dict(causal=draw(st.booleans()))


def _expected_varlen(q, k, v, dout, cu_q, cu_k, options):
    out, lse = cuflash.attention_varlen(q, k, v, cu_q, cu_k, return_lse=True, **options)
    return out, cuflash.attention_varlen_backward(dout, q, k, v, out, lse, cu_q, cu_k, **options)


def _expected_padded(q, k, v, dout, seqlens_q, seqlens_k, options):
    lengths = dict(seqlens_q=seqlens_q, seqlens_k=seqlens_k)
    out, lse = cuflash.attention(q, k, v, return_lse=True, **lengths, **options)
    return out, cuflash.attention_backward(dout, q, k, v, out, lse, **lengths, **options)


def _assert_same(got_out, got_grads, want_out, want_grads):
    numpy.testing.assert_array_equal(numpy.asarray(got_out), want_out)
    for got, want in zip(got_grads, want_grads):
        numpy.testing.assert_array_equal(numpy.asarray(got), want)


# PyTorch.

@settings(max_examples=15)
@given(case=packed())
def test_torch_varlen_matches_cuflash_bitwise(case):
    torch = pytest.importorskip("torch")
    import cuflash.torch

    q, k, v, dout, cu_q, cu_k, options = case
    tq, tk, tv = (torch.tensor(x, requires_grad=True) for x in (q, k, v))
    out = cuflash.torch.attention_varlen(tq, tk, tv, torch.tensor(cu_q), torch.tensor(cu_k), **options)
    out.backward(torch.tensor(dout))
    want_out, want_grads = _expected_varlen(q, k, v, dout, cu_q, cu_k, options)
    _assert_same(out.detach(), [x.grad for x in (tq, tk, tv)], want_out, want_grads)


@settings(max_examples=15)
@given(case=padded())
def test_torch_padded_matches_cuflash_bitwise(case):
    torch = pytest.importorskip("torch")
    import cuflash.torch

    q, k, v, dout, seqlens_q, seqlens_k, options = case
    tq, tk, tv = (torch.tensor(x, requires_grad=True) for x in (q, k, v))
    out = cuflash.torch.attention(tq, tk, tv, seqlens_q=torch.tensor(seqlens_q), seqlens_k=torch.tensor(seqlens_k),
                                  **options)
    out.backward(torch.tensor(dout))
    want_out, want_grads = _expected_padded(q, k, v, dout, seqlens_q, seqlens_k, options)
    _assert_same(out.detach(), [x.grad for x in (tq, tk, tv)], want_out, want_grads)


def test_torch_compile_traces_ragged_calls():
    torch = pytest.importorskip("torch")
    import cuflash.torch

    rng = numpy.random.default_rng(0)
    cu = torch.tensor([0, 3, 3, 8], dtype=torch.int32)
    q, k, v = (torch.tensor(rng.standard_normal((8, 2, 4)).astype(numpy.float32), requires_grad=True)
               for _ in range(3))

    def loss(q, k, v):
        return cuflash.torch.attention_varlen(q, k, v, cu, cu, causal=True).square().sum()

    loss(q, k, v).backward()
    eager = [x.grad.clone() for x in (q, k, v)]
    for x in (q, k, v):
        x.grad = None
    torch.compile(loss, fullgraph=True)(q, k, v).backward()
    for x, want in zip((q, k, v), eager):
        assert torch.equal(x.grad, want)


def test_torch_ragged_operands_must_be_tensors():
    torch = pytest.importorskip("torch")
    import cuflash.torch

    q = torch.zeros(4, 2, 8)
    with pytest.raises(TypeError, match="cu_seqlens_q must be a torch.Tensor"):
        cuflash.torch.attention_varlen(q, q, q, numpy.array([0, 4], I32), torch.tensor([0, 4], dtype=torch.int32))


# JAX.

@settings(max_examples=10)
@given(case=packed())
def test_jax_varlen_matches_cuflash_bitwise_under_jit(case):
    jax = pytest.importorskip("jax")
    import cuflash.jax

    q, k, v, dout, cu_q, cu_k, options = case

    def loss(q, k, v):
        out = cuflash.jax.attention_varlen(q, k, v, jax.numpy.asarray(cu_q), jax.numpy.asarray(cu_k), **options)
        return (out * dout).sum(), out

    (_, out), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(q, k, v)
    want_out, want_grads = _expected_varlen(q, k, v, dout, cu_q, cu_k, options)
    _assert_same(out, grads, want_out, want_grads)


@settings(max_examples=10)
@given(case=padded())
def test_jax_padded_matches_cuflash_bitwise_under_jit(case):
    jax = pytest.importorskip("jax")
    import cuflash.jax

    q, k, v, dout, seqlens_q, seqlens_k, options = case
    lengths = dict(seqlens_q=jax.numpy.asarray(seqlens_q), seqlens_k=jax.numpy.asarray(seqlens_k))

    def loss(q, k, v):
        out = cuflash.jax.attention(q, k, v, **lengths, **options)
        return (out * dout).sum(), out

    (_, out), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(q, k, v)
    want_out, want_grads = _expected_padded(q, k, v, dout, seqlens_q, seqlens_k, options)
    _assert_same(out, grads, want_out, want_grads)


def test_jax_vmap_runs_ragged_calls_one_by_one():
    jax = pytest.importorskip("jax")
    import cuflash.jax

    rng = numpy.random.default_rng(1)
    q = rng.standard_normal((3, 2, 5, 2, 8)).astype(numpy.float32)
    k = rng.standard_normal((2, 6, 2, 8)).astype(numpy.float32)
    seqlens = numpy.array([5, 2], I32)
    lengths = dict(seqlens_q=jax.numpy.asarray(seqlens), seqlens_k=jax.numpy.asarray(seqlens))
    mapped = jax.vmap(lambda q: cuflash.jax.attention(q, jax.numpy.asarray(k), jax.numpy.asarray(k), **lengths))(q)
    for n in range(3):
        want = cuflash.attention(q[n], k, k, seqlens_q=seqlens, seqlens_k=seqlens)
        numpy.testing.assert_array_equal(numpy.asarray(mapped[n]), want)


def test_jax_lengths_must_be_int32_vectors():
    jax = pytest.importorskip("jax")
    import cuflash.jax

    q = jax.numpy.zeros((1, 4, 2, 8))
    with pytest.raises(TypeError, match="seqlens_q must be int32 with one axis"):
        cuflash.jax.attention(q, q, q, seqlens_q=jax.numpy.asarray([4.0]))
