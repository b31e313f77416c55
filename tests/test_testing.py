"""cuflash.testing itself: its assertions pass on correct results and fail, saying where and by how
much, on wrong ones; its strategies draw what their knobs say; it works without Hypothesis; and the
README's example runs.

A helper that cannot fail is a defect, so every assertion is also shown failing: on one element
pushed far off (drawn tensor, drawn element) and on the results of plausible bugs (a wrong scale,
the other causal alignment, a window one key short, the wrong key/value head, a lost softcap, the
wrong dout).
"""

import re
import subprocess
import sys
from pathlib import Path

import numpy
import pytest
from hypothesis import find, given
from hypothesis import strategies as st

import cuflash
from cuflash.testing import (BFLOAT16, DTYPES, LAYOUTS, assert_attention_close,
                             assert_attention_grads_close, assert_within_naive_error, attention_problems,
                             random_inputs)

README = Path(__file__).resolve().parent.parent / "README.md"
GPU_OK, GPU_WHY = cuflash.gpu_available()
BACKENDS = ["numpy", pytest.param("cuda", marks=pytest.mark.skipif(not GPU_OK, reason=f"no usable GPU: {GPU_WHY}"))]
GPU_DTYPES = [d for d in DTYPES if d != numpy.float64]
SMALL = dict(max_seqlen=40)


def _results(p, backend="numpy"):
    """(out, lse, dq, dk, dv) of a drawn problem from one backend."""
    out, lse = cuflash.attention(p.q, p.k, p.v, return_lse=True, backend=backend, **p.options)
    return (out, lse, *cuflash.attention_backward(p.dout, p.q, p.k, p.v, out, lse, backend=backend, **p.options))


def _assert_all(p, out, lse, dq, dk, dv):
    assert_attention_close(out, p.q, p.k, p.v, lse=lse, **p.options)
    assert_attention_grads_close(dq, dk, dv, p.q, p.k, p.v, p.dout, **p.options)


def _assert_stored_as(shape, strides, layout):
    """Element ``strides`` of a BSHD operand fit ``layout`` (sizes of 0 or 1 leave strides free)."""
    B, S, H, D = shape
    if B == 0 or S == 0:
        return
    if layout == "strided" and D > 1:
        assert strides[3] == 2
    if layout == "bhsd" and S > 1 and H > 1:
        assert strides[1] == D and strides[2] == S * D
    if layout == "contiguous" and S > 1 and H > 1:
        assert strides[1] == H * D and strides[2] == D


# -- correct results pass -----------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@given(data=st.data())
def test_correct_results_of_every_backend_pass(backend, data):
    p = data.draw(attention_problems(dtypes=GPU_DTYPES if backend == "cuda" else DTYPES, **SMALL))
    _assert_all(p, *_results(p, backend))


def _torch_array(x):
    """A NumPy array as a CPU tensor over the same memory (bfloat16 relabelled from ml_dtypes')."""
    import torch

    if BFLOAT16 is not None and x.dtype == BFLOAT16:
        return torch.from_numpy(x.view(numpy.uint16)).view(torch.bfloat16)
    return torch.from_numpy(x)


@given(data=st.data())
def test_problems_in_torch_tensors_keep_their_layouts_and_pass(data):
    torch = pytest.importorskip("torch")
    p = data.draw(attention_problems(xp=_torch_array, **SMALL))
    assert all(isinstance(x, torch.Tensor) for x in (p.q, p.k, p.v, p.dout))
    for x, layout in zip((p.q, p.k, p.v, p.dout), p.layouts):
        _assert_stored_as(x.shape, x.stride(), layout)
    out, lse, *grads = _results(p)
    assert isinstance(out, torch.Tensor) and isinstance(grads[0], torch.Tensor)
    _assert_all(p, out, lse, *grads)


@given(data=st.data())
def test_problems_in_jax_arrays_pass(data):
    jnp = pytest.importorskip("jax.numpy")
    # JAX holds float64 only with jax_enable_x64; the others keep their dtype.
    p = data.draw(attention_problems(xp=jnp, dtypes=GPU_DTYPES, **SMALL))
    out, *rest = _results(p)
    assert type(out) is type(jnp.zeros(1))
    _assert_all(p, out, *rest)


# -- wrong results fail, naming the tensor and the element -----------------------------------------

INDEX_AXES = {"out": "b, s, h, d", "lse": "b, h, s", "dq": "b, s, h, d", "dk": "b, s, h, d", "dv": "b, s, h, d"}


@given(data=st.data())
def test_one_element_pushed_off_fails_with_its_index_value_and_bounds(data):
    p = data.draw(attention_problems(**SMALL).filter(lambda p: p.Sq + p.Sk))  # some tensor has an element
    results = dict(zip(("out", "lse", "dq", "dk", "dv"), _results(p)))
    name = data.draw(st.sampled_from([n for n, x in results.items() if x.size]))
    x = results[name].copy()
    index = tuple(data.draw(st.integers(0, n - 1)) for n in x.shape)
    values = x.astype(numpy.float64)
    if numpy.isneginf(values[index]):  # lse of a row that sees no key: any finite value is wrong
        x[index] = 0.0
    else:  # far beyond any rounding: the worst element wherever the rest lies within the rule
        x[index] = values[index] + 1.0 + 100.0 * numpy.max(numpy.abs(values[numpy.isfinite(values)]))
    results[name] = x
    with pytest.raises(AssertionError) as failure:
        _assert_all(p, *results.values())
    message = str(failure.value)
    assert message.startswith(f"{name}: ")
    assert f"({INDEX_AXES[name]}) = {index}" in message
    assert "got" in message and "reference" in message
    assert "allowed" in message or "NaN or ±inf" in message


def test_failure_message_spells_out_the_rule():
    rng = numpy.random.default_rng(1)
    q, k, v, _ = random_inputs(rng, 1, 17, 19, 4, 2, 8, 8, numpy.float16)
    out = cuflash.attention(q, k, v, backend="numpy")
    out[0, 5, 3, 2] += 0.25
    with pytest.raises(AssertionError) as failure:
        assert_attention_close(out, q, k, v)
    message = str(failure.value)
    assert re.match(r"out: 1 of 544 elements exceed the allowed error \S+; the worst at \(b, s, h, d\) = \(0, 5, 3, 2\):"
                    r" got \S+, reference \S+, error 0\.25 \(allowed = 2 × naive float16 error \S+ \+ floor 2e-06 × \S+\)",
                    message), message


def test_nan_fails_and_non_finite_references_must_be_matched():
    ref = numpy.array([[1.0, numpy.nan, -numpy.inf]])
    naive = ref + 1e-3
    assert_within_naive_error("x", numpy.array([[1.0005, numpy.nan, -numpy.inf]]), ref, naive, numpy.float32)
    with pytest.raises(AssertionError, match=r"x: 1 of 3 elements exceed .*; the worst at \(0, 0\): got nan, reference 1,"):
        assert_within_naive_error("x", numpy.array([[numpy.nan, numpy.nan, -numpy.inf]]), ref, naive, numpy.float32)
    with pytest.raises(AssertionError, match=r"x at \(0, 1\): got 0, reference nan; where the reference is NaN"):
        assert_within_naive_error("x", numpy.array([[1.0, 0.0, -numpy.inf]]), ref, naive, numpy.float32)
    with pytest.raises(AssertionError, match=r"x at \(0, 2\): got inf, reference -inf"):
        assert_within_naive_error("x", numpy.array([[1.0, numpy.nan, numpy.inf]]), ref, naive, numpy.float32)


def test_wrong_dtype_and_shape_fail():
    rng = numpy.random.default_rng(2)
    q, k, v, dout = random_inputs(rng, 2, 9, 7, 2, 1, 8, 4, numpy.float16)
    out, lse = cuflash.attention(q, k, v, return_lse=True, backend="numpy")
    with pytest.raises(AssertionError, match=r"out: dtype float32, expected float16 \(the input dtype\)"):
        assert_attention_close(out.astype(numpy.float32), q, k, v)
    with pytest.raises(AssertionError, match=r"lse: dtype float16, expected float32"):
        assert_attention_close(out, q, k, v, lse=lse.astype(numpy.float16))
    with pytest.raises(AssertionError, match=r"out: shape \(2, 8, 2, 4\), expected \(2, 9, 2, 4\)"):
        assert_attention_close(out[:, :8], q, k, v)
    dq, dk, dv = cuflash.attention_backward(dout, q, k, v, out, lse, backend="numpy")
    with pytest.raises(AssertionError) as failure:  # every failing gradient is listed
        assert_attention_grads_close(dq, dv, dk, q, k, v, dout)
    assert re.search(r"^dk: shape .*\ndv: shape ", str(failure.value), re.M)


def _mutants():
    """(name, options, what the buggy implementation computes): plausible bugs, each a result that is
    close to right yet wrong. ``run`` maps (q, k, v, dout, options) to (out, dq, dk, dv)."""
    def run(q, k, v, dout, **options):
        out, lse = cuflash.attention(q, k, v, return_lse=True, backend="numpy", **options)
        return (out, *cuflash.attention_backward(dout, q, k, v, out, lse, backend="numpy", **options))

    def wrong_kv_head(q, k, v, dout, **options):  # query head h reads h % Hkv instead of h // group
        order = numpy.arange(q.shape[2]).reshape(-1, k.shape[2]).T.reshape(-1)
        out, dq, dk, dv = run(q[:, :, order], k, v, dout[:, :, order], **options)
        inverse = numpy.argsort(order)
        return out[:, :, inverse], dq[:, :, inverse], dk, dv

    def other_dout(q, k, v, dout, **options):
        return run(q, k, v, dout[:, ::-1].copy(), **options)

    base = dict(causal=True, window=(7, None), softcap=5.0, scale=0.3)
    return [
        ("scale 2% off", base, lambda *a, scale, **o: run(*a, scale=scale * 1.02, **o)),
        ("other causal alignment", base, lambda *a, **o: run(*a, **dict(o, causal_alignment="top_left"))),
        ("window one key short", base, lambda *a, window, **o: run(*a, window=(window[0] - 1, None), **o)),
        ("softcap ignored", base, lambda *a, softcap, **o: run(*a, **o)),
        ("wrong key/value head", base, wrong_kv_head),
        ("dout of other rows", base, other_dout),
    ]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name, options, buggy", _mutants(), ids=[m[0] for m in _mutants()])
def test_plausible_bugs_fail(name, options, buggy, dtype):
    rng = numpy.random.default_rng(3)
    q, k, v, dout = random_inputs(rng, 2, 45, 50, 4, 2, 24, 16, dtype)
    out, dq, dk, dv = buggy(q, k, v, dout, **options)
    with pytest.raises(AssertionError):
        assert_attention_close(out, q, k, v, **options)
        assert_attention_grads_close(dq, dk, dv, q, k, v, dout, **options)


# -- the strategies draw what their knobs say ---------------------------------------------------


@given(p=attention_problems(dtypes=["float32"], min_seqlen=3, max_seqlen=20, max_batch=3, max_heads_kv=2,
                            group_sizes=(2, 5), max_head_dim=40, features={"window", "alibi"},
                            layouts=("bhsd", "strided")))
def test_knobs_bound_what_is_drawn(p):
    assert p.dtype == numpy.float32 and all(x.dtype == numpy.float32 for x in (p.q, p.k, p.v, p.dout))
    assert 1 <= p.B <= 3 and 3 <= p.Sq <= 20 and 3 <= p.Sk <= 20 and 1 <= p.D <= 40 and 1 <= p.Dv <= 40
    assert 1 <= p.Hkv <= 2 and p.Hq // p.Hkv in (2, 5) and p.Hq % p.Hkv == 0
    assert p.q.shape == (p.B, p.Sq, p.Hq, p.D) and p.k.shape == (p.B, p.Sk, p.Hkv, p.D)
    assert p.v.shape == (p.B, p.Sk, p.Hkv, p.Dv) and p.dout.shape == (p.B, p.Sq, p.Hq, p.Dv)
    assert set(p.options) == {"window", "alibi_slopes"} and set(p.layouts) <= {"bhsd", "strided"}
    for x, layout in zip((p.q, p.k, p.v, p.dout), p.layouts):
        _assert_stored_as(x.shape, [n // x.itemsize for n in x.strides], layout)
        assert numpy.count_nonzero(x) == x.size  # random data, never zeros


@pytest.mark.parametrize("what, condition", [
    ("no keys", lambda p: p.Sk == 0 and p.Sq > 0),
    ("a length one past a tile edge", lambda p: p.Sq == 17 or p.Sk == 65),
    ("grouped-query heads and Dv != D", lambda p: p.Hq > p.Hkv > 1 and p.Dv != p.D),
    ("an awkward head dim", lambda p: p.D in (59, 111)),
    ("causal top-left with a window", lambda p: p.options["causal"] and p.options["causal_alignment"] == "top_left"
     and p.options["window"] is not None and p.options["window"][0] is not None),
    ("softcap with ALiBi per batch and head", lambda p: p.options["softcap"] and p.options["alibi_slopes"] is not None
     and p.options["alibi_slopes"].ndim == 2),
    ("every layout in one problem", lambda p: set(p.layouts) == set(LAYOUTS)),
    ("each dtype", lambda p: p.dtype == DTYPES[-2]),
])
def test_the_default_strategy_reaches(what, condition):
    find(attention_problems(**SMALL), condition)


@pytest.mark.parametrize("knobs, error", [
    (dict(features={"causal", "dropout"}), r"features: unknown \['dropout'\]"),
    (dict(layouts=("fortran",)), "layouts: choose one or more of"),
    (dict(dtypes=["int8"]), "dtypes: int8 is not one cuflash computes in"),
    (dict(min_seqlen=5, max_seqlen=4), "min_seqlen <= max_seqlen"),
    (dict(max_seqlen=10, lengths=[11]), r"lengths: need values in 0..10"),
])
def test_bad_knobs_are_refused(knobs, error):
    with pytest.raises(ValueError, match=error):
        attention_problems(**knobs)


def test_problems_repr_shows_shapes_and_options_not_data():
    text = repr(find(attention_problems(**SMALL), lambda p: p.options["alibi_slopes"] is not None and p.Sq > 2))
    assert text.startswith("AttentionProblem(B=") and "<slopes (" in text and "seed=" in text and "array(" not in text


# -- without Hypothesis, and the README's example ---------------------------------------------------

WITHOUT_HYPOTHESIS = """
import sys
sys.modules["hypothesis"] = None  # as if it were not installed
import numpy, cuflash, cuflash.testing as t
q, k, v, _ = t.random_inputs(numpy.random.default_rng(0), 1, 5, 6, 2, 1, 8, 8, numpy.float32)
t.assert_attention_close(cuflash.attention(q, k, v), q, k, v)
try:
    t.attention_problems()
except ImportError as exc:
    print(exc)
"""


def test_assertions_work_without_hypothesis_and_strategies_say_what_is_missing():
    result = subprocess.run([sys.executable, "-c", WITHOUT_HYPOTHESIS], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "need the hypothesis package: pip install hypothesis" in result.stdout


def _readme_example():
    text = README.read_text()
    section = text.split("## Testing your own attention with cuflash.testing", 1)[1].split("\n## ", 1)[0]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_readme_example_runs():
    namespace = {}
    exec(compile(_readme_example(), str(README), "exec"), namespace)
    tests = [f for name, f in namespace.items() if name.startswith("test_")]
    assert tests
    for test in tests:
        test()
