"""Ring attention (``cuflash.distributed``) and the log-sum-exp merge (``cuflash._combine``) on the CPU.

The merge on its own: splitting the keys and merging the parts' results gives attention over all
of them, empty parts contribute nothing whatever their out holds, NaN is never hidden. The ring:
the block-pair plans cover exactly the visible (query, key) pairs, once each, and trimmed; zigzag
shards balance causal work; and the loopback ring with P = 1..8 virtual ranks equals single-device
``cuflash.attention`` / ``attention_backward`` on the gathered sequence (out, lse, dq, dk, dv)
within float32 rounding, causal and not, both layouts, GQA, windows, softcap and uneven shards.
Backend outputs start as NaN (``poisoned``). Bad arguments give one error naming the operand,
before any communication. One test runs the torch.distributed adapter over Gloo in two processes,
one the README's example.
"""

import multiprocessing
import re
import threading
from pathlib import Path

import numpy
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import cuflash
from cuflash import distributed
from cuflash._combine import combine, merge

from .helpers import (BFLOAT16, assert_close, assert_ring_equals_single_device, magnitudes, make_inputs, mask_of,
                      naive_same_dtype, windows)

SEEDS = st.integers(0, 2**32 - 1)
LAYOUT = st.sampled_from(distributed.LAYOUTS)


# ---------------------------------------------------------------------------------------------
# The merge.
# ---------------------------------------------------------------------------------------------

def _attend(q, k, v):
    """(out, lse with out's row shape) of float64 attention; Sk = 0 gives out = 0, lse = −inf."""
    out, lse = cuflash.attention(q, k, v, return_lse=True, backend="numpy")
    return out, lse.transpose(0, 2, 1)


@given(seed=SEEDS, Sq=st.integers(1, 6), Sk=st.integers(0, 12), parts=st.integers(1, 4), data=st.data())
def test_merging_the_parts_of_a_key_split_gives_attention_over_all_keys(seed, Sq, Sk, parts, data):
    q, k, v, _ = make_inputs(numpy.random.default_rng(seed), 2, Sq, Sk, 2, 2, 4, 3, numpy.float64)
    cuts = sorted(data.draw(st.lists(st.integers(0, Sk), min_size=parts - 1, max_size=parts - 1)))
    bounds = [0] + cuts + [Sk]
    pieces = [_attend(q, k[:, a:b], v[:, a:b]) for a, b in zip(bounds, bounds[1:])]  # empty parts included
    out, lse = _attend(q, k, v)

    merged_out, merged_lse = pieces[0]
    for out_p, lse_p in pieces[1:]:
        merged_out, merged_lse = merge(merged_out, merged_lse, out_p, lse_p)
    combined_out, combined_lse = combine([p[0] for p in pieces], [p[1] for p in pieces])
    for got_out, got_lse in ((merged_out, merged_lse), (combined_out, combined_lse)):
        assert got_out.dtype == got_lse.dtype == numpy.float64
        numpy.testing.assert_allclose(got_out, out, rtol=0, atol=1e-13)
        assert numpy.array_equal(numpy.isneginf(got_lse), numpy.isneginf(lse))  # Sk = 0: every row empty
        numpy.testing.assert_allclose(got_lse[numpy.isfinite(lse)], lse[numpy.isfinite(lse)], rtol=1e-14, atol=1e-14)
        assert not numpy.isnan(got_out).any()


@given(seed=SEEDS, rows=st.integers(1, 8), Dv=st.integers(1, 4), dtype=st.sampled_from([numpy.float32, numpy.float64]))
def test_merge_is_symmetric_and_accumulates_in_place_bitwise(seed, rows, Dv, dtype):
    rng = numpy.random.default_rng(seed)
    out_a, out_b = (rng.standard_normal((rows, Dv)).astype(dtype) for _ in range(2))
    lse_a, lse_b = (rng.uniform(-30, 30, rows).astype(dtype) for _ in range(2))
    lse_a[rng.random(rows) < 0.3] = -numpy.inf
    lse_b[rng.random(rows) < 0.3] = -numpy.inf
    ab, ba = merge(out_a, lse_a, out_b, lse_b), merge(out_b, lse_b, out_a, lse_a)
    assert ab[0].dtype == ab[1].dtype == dtype
    assert numpy.array_equal(ab[0], ba[0]) and numpy.array_equal(ab[1], ba[1])
    lse_view = numpy.empty((Dv + 1, rows), dtype=dtype).T[:, 0]  # a strided accumulator
    lse_view[...] = lse_a
    in_place = merge(out_a, lse_view, out_b, lse_b, out=out_a, lse=lse_view)
    assert in_place[0] is out_a and in_place[1] is lse_view
    assert numpy.array_equal(out_a, ab[0]) and numpy.array_equal(lse_view, ab[1])


def test_empty_parts_contribute_nothing_whatever_their_out_holds():
    nan = numpy.nan
    out_a = numpy.array([[nan, nan], [1.0, 2.0], [nan, 5.0]], dtype=numpy.float32)
    lse_a = numpy.array([-numpy.inf, 0.5, -numpy.inf], dtype=numpy.float32)
    out_b = numpy.array([[3.0, 4.0], [nan, nan], [numpy.inf, 1.0]], dtype=numpy.float32)
    lse_b = numpy.array([1.5, -numpy.inf, -numpy.inf], dtype=numpy.float32)
    with numpy.errstate(all="raise"):
        out, lse = merge(out_a, lse_a, out_b, lse_b)
    assert numpy.array_equal(out, [[3.0, 4.0], [1.0, 2.0], [0.0, 0.0]])  # exactly the other part's, or 0
    assert numpy.array_equal(lse, [1.5, 0.5, -numpy.inf])
    out, lse = combine(numpy.stack([out_a, out_b, out_b]), numpy.stack([lse_a, lse_b, lse_b]))
    assert numpy.array_equal(out[1:], [[1.0, 2.0], [0.0, 0.0]])
    assert numpy.array_equal(lse[1:], [0.5, -numpy.inf])
    out, lse = combine(numpy.zeros((0, 3, 2)), numpy.zeros((0, 3)))  # no parts at all
    assert numpy.array_equal(out, numpy.zeros((3, 2))) and numpy.array_equal(lse, numpy.full(3, -numpy.inf))


def test_nan_is_never_hidden():
    out_a = numpy.array([[numpy.nan, 1.0], [1.0, 1.0]])
    lse_a = numpy.array([-700.0, numpy.nan])  # row 0's weight underflows to 0, and 0 · NaN is still NaN
    out_b = numpy.ones((2, 2))
    lse_b = numpy.array([0.0, 0.0])
    out, lse = merge(out_a, lse_a, out_b, lse_b)
    assert numpy.isnan(out[0, 0]) and out[0, 1] == 1.0 and lse[0] == 0.0
    assert numpy.isnan(out[1]).all() and numpy.isnan(lse[1])
    out, lse = combine(numpy.stack([out_a, out_b]), numpy.stack([lse_a, lse_b]))
    assert numpy.isnan(out[0, 0]) and numpy.isnan(out[1]).all() and numpy.isnan(lse[1])


@pytest.mark.skipif(BFLOAT16 is None, reason="needs ml_dtypes")
def test_sixteen_bit_parts_merge_in_float32():
    out, lse = merge(numpy.ones((2, 3), BFLOAT16), numpy.zeros(2, numpy.float32), numpy.ones((2, 3), numpy.float16),
                     numpy.zeros(2, numpy.float32))
    assert out.dtype == lse.dtype == numpy.float32
    numpy.testing.assert_allclose(lse, numpy.log(2.0), rtol=1e-7)
    numpy.testing.assert_array_equal(out, 1.0)


def test_merge_refuses_shapes_that_disagree():
    with pytest.raises(ValueError, match="lse_b must have the shape of out_b"):
        merge(numpy.zeros((3, 2)), numpy.zeros(3), numpy.zeros((3, 2)), numpy.zeros(2))
    with pytest.raises(ValueError, match=r"out_b has shape \(4, 2\)"):
        merge(numpy.zeros((3, 2)), numpy.zeros(3), numpy.zeros((4, 2)), numpy.zeros(4))
    with pytest.raises(ValueError, match=r"out must have shape \(3, 2\)"):
        merge(numpy.zeros((3, 2)), numpy.zeros(3), numpy.zeros((3, 2)), numpy.zeros(3), out=numpy.zeros((2, 3)))


# ---------------------------------------------------------------------------------------------
# Layouts and block-pair plans.
# ---------------------------------------------------------------------------------------------

def _positions(seqlen, rank, world, layout):
    return numpy.concatenate([numpy.arange(a, b) for a, b in distributed.shard_segments(seqlen, rank, world, layout)])


@given(seqlen=st.integers(0, 60), world=st.integers(1, 8), layout=LAYOUT, axis=st.sampled_from([1, 2, -1]))
def test_shards_partition_the_sequence_and_unshard_inverts_shard(seqlen, world, layout, axis):
    positions = [_positions(seqlen, r, world, layout) for r in range(world)]
    assert numpy.array_equal(numpy.sort(numpy.concatenate(positions)), numpy.arange(seqlen))
    lengths = [len(p) for p in positions]
    if seqlen % world == 0:
        assert lengths == [seqlen // world] * world
    assert max(lengths) - min(lengths) <= (1 if layout == "contiguous" else 2)
    if layout == "zigzag" and seqlen % (2 * world) == 0 and seqlen:
        c = seqlen // (2 * world)
        for r in range(world):  # chunks r and 2P − 1 − r
            assert positions[r][0] == r * c and positions[r][c] == (2 * world - 1 - r) * c
    shape = [2, 3, 3]
    shape[axis] = seqlen
    x = numpy.arange(numpy.prod(shape)).reshape(shape)
    shards = [distributed.shard(x, r, world, layout=layout, axis=axis) for r in range(world)]
    for r, s in enumerate(shards):
        assert numpy.array_equal(s, numpy.take(x, positions[r], axis=axis))
    assert numpy.array_equal(distributed.unshard(shards, layout=layout, axis=axis), x)


@given(seqlen=st.integers(0, 60), world=st.integers(1, 8), layout=LAYOUT)
def test_shard_order_lists_the_ranks_tokens_in_rank_order(seqlen, world, layout):
    order = distributed.shard_order(seqlen, world, layout)
    assert numpy.array_equal(order, numpy.concatenate([_positions(seqlen, r, world, layout) for r in range(world)]))
    if seqlen % world == 0:  # an even split of the reordered sequence gives each rank its shard
        x = numpy.arange(2 * seqlen).reshape(1, seqlen, 2)
        for r, part in enumerate(numpy.split(x[:, order], world, axis=1)):
            assert numpy.array_equal(part, distributed.shard(x, r, world, layout=layout))
        assert numpy.array_equal(x[:, order][:, numpy.argsort(order)], x)


def _plan(seqlen, world, layout, rank, source, left, right):
    return distributed._plan(distributed.shard_segments(seqlen, rank, world, layout),
                             distributed.shard_segments(seqlen, source, world, layout), left, right)


def _call_mask(call):
    """(rows, cols, mask) of one call: its top-left-aligned window on the sub-block, as cuflash reads it."""
    options = call.mask_options()
    R, C = call.rows.stop - call.rows.start, call.cols.stop - call.cols.start
    return mask_of(R, C, causal=options["causal"], causal_alignment="top_left", window=options["window"]).matrix()


@given(seqlen=st.integers(0, 40), world=st.integers(1, 6), layout=LAYOUT, causal=st.booleans(), data=st.data())
def test_block_pair_plans_compute_each_visible_pair_once_and_nothing_else(seqlen, world, layout, causal, data):
    window = data.draw(windows(causal, st.one_of(st.none(), st.integers(0, 12))))
    left, right = (None, None) if window is None else window
    right = 0 if causal else right
    rank, source = data.draw(st.integers(0, world - 1)), data.draw(st.integers(0, world - 1))
    qpos, kpos = _positions(seqlen, rank, world, layout), _positions(seqlen, source, world, layout)
    seen = mask_of(seqlen, seqlen, causal=causal, window=window).matrix()[numpy.ix_(qpos, kpos)]
    covered = numpy.zeros(seen.shape, dtype=int)
    calls = _plan(seqlen, world, layout, rank, source, left, right)
    for call in calls:
        assert call.left is None or call.left >= 0
        assert call.right is None or call.right >= 0
        mask = _call_mask(call)
        assert mask.any(axis=1).all() and mask.any(axis=0).all(), "a call is not trimmed to what it sees"
        covered[call.rows, call.cols] += mask
    assert numpy.array_equal(covered, seen.astype(int))
    if window is None or layout == "contiguous" or (left is None and right in (0, None)):
        assert len(calls) <= 1, "one launch per step for contiguous shards and for zigzag without a window"


@given(chunk=st.integers(1, 6), world=st.integers(1, 8))
def test_zigzag_gives_every_rank_the_same_causal_work_at_every_step(chunk, world):
    seqlen = 2 * world * chunk

    def area(rank, step):
        calls = _plan(seqlen, world, "zigzag", rank, (rank - step) % world, None, 0)
        return sum(int(_call_mask(c).sum()) for c in calls), sum(_call_mask(c).size for c in calls)

    for step in range(world):
        assert len({area(rank, step) for rank in range(world)}) == 1
    if world > 1:  # steps after the first: one unmasked call of half the block
        assert area(0, 1) == (2 * chunk * chunk,) * 2


# ---------------------------------------------------------------------------------------------
# The loopback ring against single-device attention.
# ---------------------------------------------------------------------------------------------

def _run_ring(world, layout, q, k, v, dout, seqlen, **options):
    """(out, lse, dq, dk, dv) of the loopback ring, gathered into global arrays."""

    def rank(comm):
        def mine(x, axis=1):
            return distributed.shard(x, comm.rank, world, layout=layout, axis=axis)

        args = dict(comm=comm, layout=layout, seqlen=seqlen, **options)
        out, lse = distributed.ring_attention(mine(q), mine(k), mine(v), return_lse=True, **args)
        grads = distributed.ring_attention_backward(mine(dout), mine(q), mine(k), mine(v), out, lse, **args)
        return (out, lse) + tuple(grads)

    per_rank = distributed.LoopbackRing(world).run(rank)
    return tuple(distributed.unshard([r[i] for r in per_rank], layout=layout, axis=2 if i == 1 else 1)
                 for i in range(5))


def _single_device(q, k, v, dout, **options):
    out, lse = cuflash.attention(q, k, v, return_lse=True, backend="numpy", **options)
    return (out, lse) + tuple(cuflash.attention_backward(dout, q, k, v, out, lse, backend="numpy", **options))


@settings(max_examples=150, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seed=SEEDS, world=st.integers(1, 8), layout=LAYOUT, causal=st.booleans(), B=st.integers(1, 2),
       Hkv=st.integers(1, 2), group=st.sampled_from([1, 3]), D=st.integers(1, 8), Dv=st.integers(1, 8),
       dtype=st.sampled_from([numpy.float32, numpy.float64]), softcap=st.sampled_from([None, 2.5]), data=st.data())
def test_loopback_ring_equals_single_device_attention(seed, world, layout, causal, B, Hkv, group, D, Dv, dtype, softcap,
                                                      data, poisoned):
    seqlen = data.draw(st.integers(0, 40), label="seqlen")
    window = data.draw(windows(causal, st.one_of(st.none(), st.integers(0, 10))), label="window")
    q, k, v, dout = make_inputs(numpy.random.default_rng(seed), B, seqlen, seqlen, Hkv * group, Hkv, D, Dv, dtype)
    options = dict(causal=causal, window=window, softcap=softcap, scale=0.6 if seed % 2 else None)
    # seqlen=None says every rank holds the same number of tokens; uneven shards must say seqlen.
    given_seqlen = None if seqlen % world == 0 and seed % 3 else seqlen
    ring = _run_ring(world, layout, q, k, v, dout, given_seqlen, **options)
    assert_ring_equals_single_device(ring, _single_device(q, k, v, dout, **options), q, k, v, dout, options["scale"])


@pytest.mark.skipif(BFLOAT16 is None, reason="needs ml_dtypes")
@settings(max_examples=10)
@given(seed=SEEDS, world=st.integers(2, 5), layout=LAYOUT, causal=st.booleans(),
       dtype=st.sampled_from([numpy.float16] + ([BFLOAT16] if BFLOAT16 is not None else [])))
def test_sixteen_bit_ring_keeps_the_accuracy_rule(seed, world, layout, causal, dtype):
    """Partial outputs are rounded to the input dtype once per step before the float32 merge, so the
    ring stays within a small factor of the naive same-dtype error."""
    q, k, v, dout = make_inputs(numpy.random.default_rng(seed), 1, 48, 48, 4, 2, 16, 16, dtype)
    out, _, *grads = _run_ring(world, layout, q, k, v, dout, 48, causal=causal)
    ref_out, _ = cuflash.reference.attention(q, k, v, causal=causal)
    ref_grads = cuflash.reference.attention_backward(dout, q, k, v, causal=causal)
    naive = naive_same_dtype(q, k, v, dout, causal=causal)
    sizes = magnitudes(q, k, v, dout)
    for name, x, ref, nv in zip(("out", "dq", "dk", "dv"), [out] + grads, [ref_out] + list(ref_grads), naive):
        assert x.dtype == q.dtype
        assert_close(name, x, ref, nv, q.dtype, factor=3.0, magnitude=sizes[name])


def test_vjp_form_gives_the_forward_and_backward_results():
    q, k, v, dout = make_inputs(numpy.random.default_rng(7), 1, 24, 24, 4, 2, 8, 8, numpy.float64)
    world = 3

    def rank(comm):
        mine = [distributed.shard(x, comm.rank, world, layout="zigzag") for x in (q, k, v, dout)]
        options = dict(comm=comm, causal=True, layout="zigzag")
        out, vjp = distributed.ring_attention_vjp(*mine[:3], **options)
        out2, lse = distributed.ring_attention(*mine[:3], return_lse=True, **options)
        grads = distributed.ring_attention_backward(mine[3], *mine[:3], out2, lse, **options)
        return out, out2, vjp(mine[3]), grads

    for out, out2, via_vjp, grads in distributed.LoopbackRing(world).run(rank):
        assert numpy.array_equal(out, out2)
        for a, b in zip(via_vjp, grads):
            assert numpy.array_equal(a, b)


def test_torch_autograd_form_gives_the_ring_gradients():
    torch = pytest.importorskip("torch")
    q, k, v, dout = make_inputs(numpy.random.default_rng(8), 2, 30, 30, 4, 2, 8, 6, numpy.float64)
    world, options = 3, dict(causal=True, window=(7, 0), layout="zigzag")

    def rank(comm):
        mine = [torch.from_numpy(distributed.shard(x, comm.rank, world, layout="zigzag")) for x in (q, k, v, dout)]
        leaves = [x.clone().requires_grad_() for x in mine[:3]]
        out = distributed.torch_ring_attention(*leaves, comm=comm, **options)
        (out * mine[3]).sum().backward()
        return (out.detach().numpy(),) + tuple(x.grad.numpy() for x in leaves)

    per_rank = distributed.LoopbackRing(world).run(rank)
    out, dq, dk, dv = (distributed.unshard([r[i] for r in per_rank], layout="zigzag") for i in range(4))
    single = _single_device(q, k, v, dout, causal=True, window=(7, 0))
    for x, ref in zip((out, dq, dk, dv), single[:1] + single[2:]):
        numpy.testing.assert_allclose(x, ref, rtol=0, atol=1e-12)


# ---------------------------------------------------------------------------------------------
# Errors.
# ---------------------------------------------------------------------------------------------

class _NeverShifts:
    """A communicator whose transfers must never start: checks come before any communication."""

    rank, world_size, device = 0, 2, None

    def start_shift(self, send, recv):
        raise AssertionError("communication started before the arguments were checked")


class _GpuOnly(_NeverShifts):
    device = 0


def _shard_inputs(L=4, dtype=numpy.float32):
    return make_inputs(numpy.random.default_rng(0), 1, L, L, 2, 1, 4, 4, dtype)


@pytest.mark.parametrize("change, error, words", [
    (dict(comm=object()), TypeError, "comm must be a ring communicator"),
    (dict(comm=_GpuOnly()), TypeError, "comm (_GpuOnly) moves CUDA memory"),
    (dict(layout="striped"), ValueError, "layout must be one of"),
    (dict(seqlen=-1), ValueError, "seqlen must be non-negative"),
    (dict(seqlen=2.0), TypeError, "seqlen must be an int"),
    (dict(seqlen=9), ValueError, "q holds 4 tokens; rank 0's contiguous shard of seqlen=9 over 2 ranks holds 5"),
    (dict(window=(-1, 2)), ValueError, "window left size must be non-negative"),
    (dict(causal=True, window=(2, 2)), ValueError, "causal=True means a right window size of 0"),
    (dict(k_len=5), ValueError, "q and k must hold the same tokens"),
    (dict(v_dtype=numpy.float64), TypeError, "must share one dtype"),
])
def test_bad_arguments_raise_one_error_naming_the_operand(change, error, words):
    change = dict(change)
    q, k, v, dout = _shard_inputs()
    if "k_len" in change:
        k = make_inputs(numpy.random.default_rng(1), 1, 1, change.pop("k_len"), 2, 1, 4, 4, numpy.float32)[1]
    if "v_dtype" in change:
        v = v.astype(change.pop("v_dtype"))
    args = dict(comm=_NeverShifts(), layout="contiguous") | change
    with pytest.raises(error) as forward:
        distributed.ring_attention(q, k, v, **args)
    assert words in str(forward.value)
    out, lse = cuflash.attention(*_shard_inputs()[:3], return_lse=True)
    with pytest.raises(error) as backward:
        distributed.ring_attention_backward(dout, q, k, v, out, lse, **args)
    assert words in str(backward.value)


def test_every_problem_is_listed_in_one_error():
    q, k, v, _ = _shard_inputs()
    with pytest.raises(ValueError) as raised:
        distributed.ring_attention(q, k, v, comm=_NeverShifts(), layout="rows", window=(-2, None))
    assert "layout must be one of" in str(raised.value) and "window left size" in str(raised.value)


def test_backward_checks_out_and_lse_against_the_shard():
    q, k, v, dout = _shard_inputs()
    out, lse = cuflash.attention(q, k, v, return_lse=True)
    with pytest.raises(ValueError, match=r"lse must have shape \(B, Hq, Sq\)"):
        distributed.ring_attention_backward(dout, q, k, v, out, lse[:, :, :3], comm=_NeverShifts())


def test_layout_helpers_refuse_bad_arguments():
    x = numpy.zeros((1, 6, 2))
    with pytest.raises(ValueError, match="rank must be in 0..2"):
        distributed.shard(x, 3, 3)
    with pytest.raises(ValueError, match="axis 3 is out of range"):
        distributed.shard(x, 0, 3, axis=3)
    with pytest.raises(ValueError, match=r"shards\[1\] holds 3 tokens"):
        distributed.unshard([x[:, :2], x[:, :3]])
    with pytest.raises(TypeError, match="seqlen must be an int"):
        distributed.shard_segments(None, 0, 2)
    with pytest.raises(TypeError, match="x must be a NumPy or CuPy array, got list"):
        distributed.shard([[1, 2]], 0, 2)
    with pytest.raises(ValueError, match="layout must be one of"):
        distributed.unshard([x], layout="rows")
    with pytest.raises(ValueError, match="world_size must be at least 1, got 0"):
        distributed.shard_order(4, 0)
    with pytest.raises(ValueError, match="world_size must be an int of at least 1"):
        distributed.LoopbackRing(0)


def test_an_error_on_one_rank_stops_every_rank_and_the_ring_stays_usable():
    q, k, v, _ = make_inputs(numpy.random.default_rng(0), 1, 12, 12, 2, 2, 4, 4, numpy.float32)
    ring = distributed.LoopbackRing(3)

    def rank(comm):
        if comm.rank == 1:
            raise RuntimeError("rank 1 failed")
        mine = [distributed.shard(x, comm.rank, 3) for x in (q, k, v)]
        return distributed.ring_attention(*mine, comm=comm)

    finished = threading.Event()

    def attempt():
        with pytest.raises(RuntimeError, match="rank 1 failed"):
            ring.run(rank)
        finished.set()

    worker = threading.Thread(target=attempt)
    worker.start()
    worker.join(timeout=60)
    assert finished.is_set(), "the other ranks kept waiting for the failed one"
    outs = ring.run(lambda comm: distributed.ring_attention(*[distributed.shard(x, comm.rank, 3) for x in (q, k, v)],
                                                            comm=comm))
    numpy.testing.assert_allclose(distributed.unshard(outs), cuflash.attention(q, k, v), rtol=0, atol=1e-6)


def test_readme_example_runs():
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    section = readme.split("## Sequences across GPUs: ring attention", 1)[1].split("\n## ", 1)[0]
    example = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    namespace = {"print": lambda *args: None}
    exec(compile(example, "README.md", "exec"), namespace)
    q, k, v = (namespace[name] for name in "qkv")
    numpy.testing.assert_allclose(namespace["out"], cuflash.attention(q, k, v, causal=True), rtol=0, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# torch.distributed over Gloo, two processes.
# ---------------------------------------------------------------------------------------------

def _torch_rank(rank, world, init, queue):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        q, k, v, dout = make_inputs(numpy.random.default_rng(3), 2, 20, 20, 4, 2, 8, 8, numpy.float32)
        comm = distributed.TorchRing()
        mine = [distributed.shard(x, rank, world, layout="zigzag") for x in (q, k, v, dout)]
        out, lse = distributed.ring_attention(*mine[:3], comm=comm, causal=True, layout="zigzag", return_lse=True)
        grads = distributed.ring_attention_backward(mine[3], *mine[:3], out, lse, comm=comm, causal=True,
                                                    layout="zigzag")
        queue.put((rank, (out, lse) + tuple(grads)))
    finally:
        dist.destroy_process_group()


def test_torch_ring_over_gloo_equals_single_device_attention(tmp_path):
    pytest.importorskip("torch.distributed")
    world = 2
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    init = f"file://{tmp_path / 'rendezvous'}"
    processes = [context.Process(target=_torch_rank, args=(r, world, init, queue)) for r in range(world)]
    for p in processes:
        p.start()
    results = dict(queue.get(timeout=120) for _ in range(world))
    for p in processes:
        p.join(timeout=60)
        assert p.exitcode == 0
    gathered = [distributed.unshard([results[r][i] for r in range(world)], layout="zigzag", axis=2 if i == 1 else 1)
                for i in range(5)]
    q, k, v, dout = make_inputs(numpy.random.default_rng(3), 2, 20, 20, 4, 2, 8, 8, numpy.float32)
    assert_ring_equals_single_device(gathered, _single_device(q, k, v, dout, causal=True), q, k, v, dout)
