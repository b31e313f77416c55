"""``cuflash.jax.ring_attention`` inside ``jax.shard_map`` over meshes of 1..8 CPU devices (NumPy backend).

The ring equals single-device ``cuflash.jax.attention`` on the gathered sequence (out, lse and the
gradients of a scalar loss with random cotangents) within the rounding of the dtype, and holds the
float64 reference to the same-dtype accuracy rule, for both layouts, causal and not, GQA, windows
and softcap. ``cuflash.jax.attention`` itself gets gradients inside shard_map, replicated operands
included. Bad arguments give one error when the call is traced. The devices come from
``tests/conftest.py``, which sets XLA_FLAGS before JAX starts. Skipped without JAX.
"""

import re
from pathlib import Path

import numpy
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import cuflash
from cuflash import distributed
from cuflash._combine import merge

from .helpers import (BFLOAT16, assert_close, assert_ring_equals_single_device, magnitudes, make_inputs,
                      naive_same_dtype, windows)

jax = pytest.importorskip("jax")
import cuflash.jax  # noqa: E402  (needs jax, which the skip above guarantees)
import jax.numpy as jnp  # noqa: E402
from jax.sharding import Mesh  # noqa: E402
from jax.sharding import PartitionSpec as Spec  # noqa: E402

SEEDS = st.integers(0, 2**32 - 1)
LAYOUT = st.sampled_from(distributed.LAYOUTS)
DEVICES = 8
SEQ = Spec(None, "seq")  # BSHD arrays sharded along the sequence
LSE = Spec(None, None, "seq")  # (B, H, S)


@pytest.fixture(scope="module")
def cpus():
    devices = jax.devices("cpu")
    if len(devices) < DEVICES:
        pytest.fail(f"JAX has {len(devices)} CPU devices; these tests need {DEVICES} (tests/conftest.py sets "
                    "--xla_force_host_platform_device_count=8 in XLA_FLAGS unless a count is set already)")
    return devices


def _mesh(cpus, world):
    return Mesh(numpy.array(cpus[:world]), ("seq",))


def _ring(mesh, layout, check_vma=True, **options):
    """(q, k, v) -> (out, lse) of the ring over ``mesh``, on global arrays in ring order, jitted."""

    def local(q, k, v):
        return cuflash.jax.ring_attention(q, k, v, axis_name="seq", layout=layout, return_lse=True, **options)

    return jax.jit(jax.shard_map(local, mesh=mesh, in_specs=SEQ, out_specs=(SEQ, LSE), check_vma=check_vma))


def _ring_results(mesh, layout, q, k, v, dout, check_vma=True, **options):
    """(out, lse, dq, dk, dv) of the ring on host arrays in global order, as host arrays in global order."""
    order = distributed.shard_order(q.shape[1], len(mesh.devices), layout)
    ring = _ring(mesh, layout, check_vma, **options)
    (out, lse), vjp = jax.vjp(ring, *(jnp.asarray(x[:, order]) for x in (q, k, v)))
    # A zero lse cotangent: lse carries no gradient, and the cotangent of out is dout.
    grads = vjp((jnp.asarray(dout[:, order]), jnp.zeros_like(lse)))
    back = numpy.argsort(order)
    return (numpy.asarray(out)[:, back], numpy.asarray(lse)[:, :, back]) + tuple(numpy.asarray(g)[:, back]
                                                                                 for g in grads)


def _single_device(q, k, v, dout, **options):
    """(out, lse, dq, dk, dv) of ``cuflash.jax.attention`` on one device (lse from ``cuflash.attention``)."""
    out, vjp = jax.vjp(lambda q, k, v: cuflash.jax.attention(q, k, v, **options), *map(jnp.asarray, (q, k, v)))
    grads = vjp(jnp.asarray(dout))
    _, lse = cuflash.attention(q, k, v, return_lse=True, backend="numpy", **options)
    return (numpy.asarray(out), lse) + tuple(numpy.asarray(g) for g in grads)


def _assert_accuracy_rule(ring, q, k, v, dout, factor=2.0, **options):
    """out and gradients against the float64 reference, by the same-dtype accuracy rule."""
    out, _, *grads = ring
    ref_out, _ = cuflash.reference.attention(q, k, v, **options)
    ref_grads = cuflash.reference.attention_backward(dout, q, k, v, **options)
    naive = naive_same_dtype(q, k, v, dout, **options)
    sizes = magnitudes(q, k, v, dout, options.get("scale"))
    for name, x, ref, nv in zip(("out", "dq", "dk", "dv"), [out] + grads, [ref_out] + list(ref_grads), naive):
        assert x.dtype == q.dtype
        assert_close(name, x, ref, nv, q.dtype, factor=factor if name == "out" else factor + 1, magnitude=sizes[name])


@given(seed=SEEDS, world=st.integers(1, DEVICES), layout=LAYOUT, causal=st.booleans(), B=st.integers(1, 2),
       Hkv=st.integers(1, 2), group=st.sampled_from([1, 3]), D=st.integers(1, 8), Dv=st.integers(1, 8),
       dtype=st.sampled_from([numpy.float32, numpy.float64]), softcap=st.sampled_from([None, 2.5]), data=st.data())
def test_ring_equals_single_device_attention(cpus, seed, world, layout, causal, B, Hkv, group, D, Dv, dtype, softcap,
                                             data):
    length = data.draw(st.integers(0, 5), label="tokens per device")
    window = data.draw(windows(causal, st.one_of(st.none(), st.integers(0, 10))), label="window")
    seqlen = world * length
    q, k, v, dout = make_inputs(numpy.random.default_rng(seed), B, seqlen, seqlen, Hkv * group, Hkv, D, Dv, dtype)
    options = dict(causal=causal, window=window, softcap=softcap, scale=0.6 if seed % 2 else None)
    # JAX holds float64 only with x64 on; inside the context, for this example alone.
    with jax.enable_x64(dtype == numpy.float64):
        ring = _ring_results(_mesh(cpus, world), layout, q, k, v, dout, **options)
        single = _single_device(q, k, v, dout, **options)
    assert_ring_equals_single_device(ring, single, q, k, v, dout, options["scale"])
    _assert_accuracy_rule(ring, q, k, v, dout, **options)


@pytest.mark.skipif(BFLOAT16 is None, reason="needs ml_dtypes")
@settings(max_examples=6)
@given(seed=SEEDS, world=st.integers(2, DEVICES), layout=LAYOUT, causal=st.booleans(),
       dtype=st.sampled_from([numpy.float16] + ([BFLOAT16] if BFLOAT16 is not None else [])))
def test_sixteen_bit_ring_keeps_the_accuracy_rule(cpus, seed, world, layout, causal, dtype):
    """Partial outputs are rounded to the input dtype once per step before the float32 merge."""
    q, k, v, dout = make_inputs(numpy.random.default_rng(seed), 1, 6 * world, 6 * world, 4, 2, 16, 16, dtype)
    ring = _ring_results(_mesh(cpus, world), layout, q, k, v, dout, causal=causal)
    assert ring[1].dtype == numpy.float32
    _assert_accuracy_rule(ring, q, k, v, dout, factor=3.0, causal=causal)


def test_the_merge_follows_the_host_merge_with_empty_parts_and_nan():
    rng = numpy.random.default_rng(4)
    out_a, out_b = (rng.standard_normal((2, 6, 3, 4)).astype(numpy.float32) for _ in range(2))
    lse_a, lse_b = (rng.uniform(-20, 20, (2, 3, 6)).astype(numpy.float32) for _ in range(2))
    lse_a[0, :, :2] = lse_b[0, :, 1:3] = -numpy.inf  # row 1 empty in both parts
    out_a[0, :2] = out_b[0, 1:3] = numpy.nan  # whatever an empty part's out holds, it adds nothing
    lse_b[1, 0, 5] = numpy.nan  # never hidden
    got = cuflash.jax._merge(*map(jnp.asarray, (out_a, lse_a, out_b, lse_b)))
    expected = merge(out_a, lse_a.transpose(0, 2, 1), out_b, lse_b.transpose(0, 2, 1))
    numpy.testing.assert_allclose(got[0], expected[0], rtol=2e-6, atol=0)
    numpy.testing.assert_allclose(got[1], expected[1].transpose(0, 2, 1), rtol=2e-6, atol=0)
    assert numpy.isnan(got[0][1, 5, 0]).all() and not numpy.isnan(got[0][0]).any()


def test_ring_without_vma_checks_gives_the_same_results(cpus):
    q, k, v, dout = make_inputs(numpy.random.default_rng(5), 2, 24, 24, 4, 2, 8, 8, numpy.float32)
    options = dict(causal=True, window=(9, 0))
    checked = _ring_results(_mesh(cpus, 4), "zigzag", q, k, v, dout, **options)
    unchecked = _ring_results(_mesh(cpus, 4), "zigzag", q, k, v, dout, check_vma=False, **options)
    for a, b in zip(checked, unchecked):
        assert numpy.array_equal(a, b)


def test_lse_carries_no_gradient_and_out_alone_by_default(cpus):
    q, k, v, _ = (jnp.asarray(x) for x in make_inputs(numpy.random.default_rng(6), 1, 8, 8, 2, 2, 4, 4,
                                                       numpy.float32))
    mesh = _mesh(cpus, 2)

    def lse_sum(q):
        return _ring(mesh, "contiguous")(q, k, v)[1].sum()

    assert not numpy.asarray(jax.jit(jax.grad(lse_sum))(q)).any()
    out = jax.jit(jax.shard_map(lambda q, k, v: cuflash.jax.ring_attention(q, k, v, axis_name="seq"), mesh=mesh,
                                in_specs=SEQ, out_specs=SEQ))(q, k, v)
    numpy.testing.assert_allclose(out, cuflash.jax.attention(q, k, v), rtol=0, atol=1e-6)


def test_plain_attention_inside_shard_map_has_gradients(cpus):
    # Queries sharded along the batch (data parallelism), keys and values replicated: the
    # gradients of k and v are the sums over the devices, as for any replicated operand.
    q, k, v, dout = make_inputs(numpy.random.default_rng(7), 4, 6, 5, 4, 2, 8, 8, numpy.float32)
    mesh = Mesh(numpy.array(cpus[:4]), ("batch",))

    def loss(q, k, v):
        attend = jax.shard_map(lambda q, k, v: cuflash.jax.attention(q, k[:1], v[:1], causal=True), mesh=mesh,
                               in_specs=(Spec("batch"), Spec(), Spec()), out_specs=Spec("batch"))
        return (attend(q, k, v) * jnp.asarray(dout)).sum()

    grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(*map(jnp.asarray, (q, k, v)))
    k1, v1 = numpy.broadcast_to(k[:1], k.shape), numpy.broadcast_to(v[:1], v.shape)
    out, lse = cuflash.attention(q, k1, v1, causal=True, return_lse=True)
    dq, dk, dv = cuflash.attention_backward(dout, q, k1, v1, out, lse, causal=True)
    numpy.testing.assert_allclose(grads[0], dq, rtol=0, atol=1e-6)
    for grad, expected in ((grads[1], dk), (grads[2], dv)):
        numpy.testing.assert_allclose(grad[0], expected.sum(axis=0), rtol=0, atol=1e-5)
        assert not numpy.asarray(grad[1:]).any()


# ---------------------------------------------------------------------------------------------
# Errors, raised when the call is traced.
# ---------------------------------------------------------------------------------------------

def _traced(mesh, q, k, v, **args):
    attend = jax.shard_map(lambda q, k, v: cuflash.jax.ring_attention(q, k, v, **args), mesh=mesh, in_specs=SEQ,
                           out_specs=SEQ)
    return jax.jit(attend).lower(q, k, v)


@pytest.mark.parametrize("change, error, words", [
    (dict(axis_name="tokens"), ValueError, "axis_name='tokens' is not an axis of an enclosing jax.shard_map"),
    (dict(axis_name=("seq",)), TypeError, "axis_name must name one mesh axis"),
    (dict(layout="striped"), ValueError, "layout must be one of ('contiguous', 'zigzag')"),
    (dict(k_len=8), ValueError, "q and k must hold the same tokens (this device's shard of the sequence), got q: 2, "
                                "k: 4 tokens"),
    (dict(causal=True, window=(2, 2)), ValueError, "causal=True means a right window size of 0"),
    (dict(return_lse="yes"), TypeError, "return_lse must be a bool"),
    (dict(v_dtype=jnp.float16), TypeError, "must share one dtype"),
    (dict(v_heads=3), ValueError, "k and v must have the same number of heads"),
])
def test_bad_arguments_raise_one_error_naming_the_problem(cpus, change, error, words):
    change = dict(change)
    q = k = v = jnp.zeros((1, 4, 2, 4), jnp.float32)
    if "k_len" in change:
        k = v = jnp.zeros((1, change.pop("k_len"), 2, 4), jnp.float32)
    if "v_dtype" in change:
        v = v.astype(change.pop("v_dtype"))
    if "v_heads" in change:
        v = jnp.zeros((1, 4, change.pop("v_heads"), 4), jnp.float32)
    with pytest.raises(error) as raised:
        _traced(_mesh(cpus, 2), q, k, v, **(dict(axis_name="seq") | change))
    assert "cuflash.jax.ring_attention" in str(raised.value) and words in str(raised.value)


def test_every_problem_is_listed_in_one_error(cpus):
    q = jnp.zeros((1, 4, 2, 4), jnp.float32)
    with pytest.raises(ValueError) as raised:
        _traced(_mesh(cpus, 2), q, q, q, axis_name="tokens", layout="rows", window=(-1, None))
    for words in ("axis_name='tokens'", "layout must be one of", "window left size must be non-negative"):
        assert words in str(raised.value)


def test_outside_shard_map_and_with_non_jax_operands():
    q = jnp.zeros((1, 4, 2, 4), jnp.float32)
    with pytest.raises(ValueError, match="ring_attention runs inside shard_map"):
        cuflash.jax.ring_attention(q, q, q, axis_name="seq")
    with pytest.raises(TypeError, match="k must be a jax.Array, got numpy.ndarray"):
        cuflash.jax.ring_attention(q, numpy.zeros((1, 4, 2, 4), numpy.float32), q, axis_name="seq")


def test_readme_example_runs(cpus):
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    section = readme.split("### JAX: `cuflash.jax.ring_attention` inside `jax.shard_map`", 1)[1].split("\n## ", 1)[0]
    example = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    namespace = {"print": lambda *args: None}
    exec(compile(example, "README.md", "exec"), namespace)
    q, k, v, dq = (numpy.asarray(namespace[name]) for name in ("q", "k", "v", "dq"))
    out, lse = cuflash.attention(q, k, v, causal=True, return_lse=True)
    expected = cuflash.attention_backward(numpy.ones_like(out), q, k, v, out, lse, causal=True)[0]
    numpy.testing.assert_allclose(namespace["out"], out, rtol=0, atol=1e-5)
    numpy.testing.assert_allclose(dq, expected, rtol=0, atol=1e-5)
