"""Bad input gets one clear TypeError/ValueError naming the operand, before any work."""

import numpy
import pytest

import cuflash
from cuflash import _dispatch

F32 = numpy.float32


def _arr(shape, dtype=F32):
    return numpy.random.default_rng(0).standard_normal(shape).astype(dtype)


Q, K, V = _arr((2, 8, 4, 16)), _arr((2, 6, 2, 16)), _arr((2, 6, 2, 16))
SLOPES = _arr((4,))  # (Hq,) for Q


class _OtherFramework:
    """A DLPack producer that is not NumPy: an array from a second framework."""

    def __init__(self, array):
        self._array = array

    def __dlpack__(self, **kwargs):
        return self._array.__dlpack__(**kwargs)

    def __dlpack_device__(self):
        return self._array.__dlpack_device__()


# (description, q, k, v, options, exception, words the message must contain)
FORWARD_CASES = [
    ("q has 3 dims", _arr((8, 4, 16)), K, V, {}, ValueError, ["q", "4 dimensions"]),
    ("k has 5 dims", Q, _arr((2, 6, 2, 16, 1)), V, {}, ValueError, ["k", "4 dimensions"]),
    ("batch mismatch", Q, _arr((3, 6, 2, 16)), _arr((3, 6, 2, 16)), {}, ValueError, ["batch", "q has 2", "k has 3"]),
    ("k/v sequence mismatch", Q, K, _arr((2, 7, 2, 16)), {}, ValueError, ["sequence length", "k: 6", "v: 7"]),
    ("k/v heads mismatch", Q, K, _arr((2, 6, 1, 16)), {}, ValueError, ["heads", "k: 2", "v: 1"]),
    ("q/k head_dim mismatch", Q, _arr((2, 6, 2, 8)), V, {}, ValueError, ["head_dim", "q: 16", "k: 8"]),
    ("Hq not a multiple of Hkv", _arr((2, 8, 3, 16)), K, V, {}, ValueError, ["multiple", "3", "2"]),
    ("head_dim too large", _arr((1, 2, 1, 300)), _arr((1, 2, 1, 300)), _arr((1, 2, 1, 8)), {}, ValueError, ["head_dim", "300"]),
    ("head_dim zero", _arr((1, 2, 1, 0)), _arr((1, 2, 1, 0)), _arr((1, 2, 1, 8)), {}, ValueError, ["head_dim", "0"]),
    ("mixed dtypes", Q, K.astype(numpy.float16), V, {}, TypeError, ["dtype", "k: float16", "q: float32"]),
    ("int dtype", Q.astype(numpy.int32), K.astype(numpy.int32), V.astype(numpy.int32), {}, TypeError, ["q", "int32"]),
    ("complex dtype", Q, K, V.astype(numpy.complex64), {}, TypeError, ["v", "complex64"]),
    ("object dtype", Q.astype(object), K, V, {}, TypeError, ["q", "object"]),
    ("list input", Q.tolist(), K, V, {}, TypeError, ["q", "array", "list"]),
    ("None input", Q, None, V, {}, TypeError, ["k", "NoneType"]),
    ("scalar input", Q, K, 3.0, {}, TypeError, ["v", "float"]),
    ("nan scale", Q, K, V, {"scale": float("nan")}, ValueError, ["scale", "finite"]),
    ("inf scale", Q, K, V, {"scale": float("inf")}, ValueError, ["scale", "finite"]),
    ("string scale", Q, K, V, {"scale": "0.5"}, TypeError, ["scale", "str"]),
    ("bool scale", Q, K, V, {"scale": True}, TypeError, ["scale", "bool"]),
    ("unknown backend", Q, K, V, {"backend": "triton"}, ValueError, ["backend", "triton"]),
    ("unknown alignment", Q, K, V, {"causal": True, "causal_alignment": "center"}, ValueError, ["causal_alignment", "center"]),
    ("non-bool causal", Q, K, V, {"causal": "yes"}, TypeError, ["causal", "str"]),
    ("negative window left", Q, K, V, {"window": (-1, 2)}, ValueError, ["window left", "non-negative", "-1"]),
    ("negative window right", Q, K, V, {"window": (None, -3)}, ValueError, ["window right", "non-negative", "-3"]),
    # Both sides bad: both are reported, not only the first.
    ("both window sides negative", Q, K, V, {"window": (-1, -2)}, ValueError, ["window left", "-1", "window right", "-2"]),
    ("float window side", Q, K, V, {"window": (2.0, 1)}, TypeError, ["window left", "int", "float"]),
    ("string window side", Q, K, V, {"window": (4, "3")}, TypeError, ["window right", "int", "str"]),
    ("bool window side", Q, K, V, {"window": (True, 0)}, TypeError, ["window left", "bool"]),
    ("window of three", Q, K, V, {"window": (1, 2, 3)}, TypeError, ["window", "pair", "(1, 2, 3)"]),
    ("window of one", Q, K, V, {"window": (4,)}, TypeError, ["window", "pair", "(4,)"]),
    ("int window", Q, K, V, {"window": 4}, TypeError, ["window", "pair", "4"]),
    ("causal with a right window", Q, K, V, {"causal": True, "window": (4, 2)}, ValueError,
     ["causal=True", "right", "(4, 2)"]),
    ("infinite softcap", Q, K, V, {"softcap": float("inf")}, ValueError, ["softcap", "finite", "inf"]),
    ("nan softcap", Q, K, V, {"softcap": float("nan")}, ValueError, ["softcap", "finite", "nan"]),
    ("negative softcap", Q, K, V, {"softcap": -1.5}, ValueError, ["softcap", "positive", "-1.5"]),
    ("bool softcap", Q, K, V, {"softcap": True}, TypeError, ["softcap", "bool"]),
    ("string softcap", Q, K, V, {"softcap": "30"}, TypeError, ["softcap", "str"]),
    ("slopes of another head count", Q, K, V, {"alibi_slopes": _arr((5,))}, ValueError,
     ["alibi_slopes", "(4,)", "(2, 4)", "(5,)"]),
    ("slopes of another batch", Q, K, V, {"alibi_slopes": _arr((3, 4))}, ValueError,
     ["alibi_slopes", "(2, 4)", "(3, 4)"]),
    ("slopes with 3 dims", Q, K, V, {"alibi_slopes": _arr((2, 4, 1))}, ValueError, ["alibi_slopes", "(2, 4, 1)"]),
    ("float64 slopes", Q, K, V, {"alibi_slopes": _arr((4,), numpy.float64)}, TypeError,
     ["alibi_slopes", "float64", "float32"]),
    ("float16 slopes", Q, K, V, {"alibi_slopes": _arr((4,), numpy.float16)}, TypeError,
     ["alibi_slopes", "float16", "float32"]),
    ("slopes as a list", Q, K, V, {"alibi_slopes": [0.5] * 4}, TypeError, ["alibi_slopes", "array", "list"]),
    ("slopes from another framework", Q, K, V, {"alibi_slopes": _OtherFramework(SLOPES)}, TypeError,
     ["alibi_slopes", "one framework"]),
]


@pytest.mark.parametrize("case", FORWARD_CASES, ids=[c[0] for c in FORWARD_CASES])
def test_bad_forward_input_is_refused_with_a_clear_message(case, monkeypatch):
    _, q, k, v, options, exception, words = case

    def no_allocation(*args, **kwargs):
        raise AssertionError("an output was allocated before the input was checked")

    monkeypatch.setattr(_dispatch, "_empty", no_allocation)
    with pytest.raises(exception) as info:
        cuflash.attention(q, k, v, **options)
    message = str(info.value)
    for word in words:
        assert word in message, f"{word!r} not in: {message}"


def test_unknown_keyword_is_refused():
    with pytest.raises(TypeError, match="mask"):
        cuflash.attention(Q, K, V, mask=None)


def test_every_problem_is_reported_at_once():
    with pytest.raises(ValueError) as info:
        cuflash.attention(Q, _arr((3, 6, 2, 8)), _arr((3, 7, 1, 16)), scale=float("nan"), backend="gpu",
                          window=(-1, None), softcap=-2.0, alibi_slopes=_arr((7,)))
    message = str(info.value)
    for word in ("scale", "backend", "batch", "sequence length", "heads", "head_dim", "window", "softcap",
                 "alibi_slopes"):
        assert word in message, f"{word!r} not in: {message}"


def test_the_reference_refuses_what_attention_refuses():
    with pytest.raises(ValueError, match="cuflash.reference.attention(.|\n)*window left"):
        cuflash.reference.attention(Q, K, V, window=(-2, 0))
    with pytest.raises(TypeError, match="alibi_slopes has dtype float64"):
        cuflash.reference.attention_backward(Q, Q, K, V, alibi_slopes=_arr((4,), numpy.float64))


@pytest.mark.parametrize("spelling", [
    dict(window=[3, numpy.int64(0)], softcap=numpy.float32(2.5)),
    dict(window=(numpy.int32(3), 0), softcap=2.5),
    dict(causal=True, window=(3, None), softcap=2.5),
    dict(causal=True, window=(3, 0), softcap=2.5),
], ids=["list and numpy ints", "numpy int32", "causal, right None", "causal, right 0"])
def test_equivalent_option_spellings_are_accepted_and_agree(spelling):
    expected = cuflash.attention(Q, K, V, window=(3, 0), softcap=2.5, backend="numpy")
    numpy.testing.assert_array_equal(cuflash.attention(Q, K, V, backend="numpy", **spelling), expected)


@pytest.mark.parametrize("off", [None, 0, 0.0])
def test_softcap_none_or_zero_is_off(off):
    numpy.testing.assert_array_equal(cuflash.attention(Q, K, V, softcap=off, backend="numpy"),
                                     cuflash.attention(Q, K, V, backend="numpy"))


def _forward(q=Q, k=K, v=V):
    out, lse = cuflash.attention(q, k, v, return_lse=True, backend="numpy")
    return out, lse


BACKWARD_CASES = [
    ("dout shape", lambda o, l: dict(dout=_arr((2, 8, 4, 8)), out=o, lse=l), ValueError, ["dout", "(2, 8, 4, 16)"]),
    ("out dtype", lambda o, l: dict(dout=o, out=o.astype(numpy.float16), lse=l), TypeError, ["out", "float16"]),
    ("lse shape", lambda o, l: dict(dout=o, out=o, lse=l[:, :, :3]), ValueError, ["lse", "(2, 4, 8)"]),
    ("lse dtype", lambda o, l: dict(dout=o, out=o, lse=l.astype(numpy.float64)), TypeError, ["lse", "float64", "float32"]),
    ("lse not an array", lambda o, l: dict(dout=o, out=o, lse=l.tolist()), TypeError, ["lse", "list"]),
    ("deterministic not bool", lambda o, l: dict(dout=o, out=o, lse=l, deterministic="yes"), TypeError, ["deterministic"]),
    ("negative window", lambda o, l: dict(dout=o, out=o, lse=l, window=(None, -1)), ValueError,
     ["window right", "-1"]),
    ("nan softcap", lambda o, l: dict(dout=o, out=o, lse=l, softcap=float("nan")), ValueError,
     ["softcap", "nan"]),
    ("slopes shape", lambda o, l: dict(dout=o, out=o, lse=l, alibi_slopes=_arr((2, 3))), ValueError,
     ["alibi_slopes", "(2, 3)"]),
]


@pytest.mark.parametrize("case", BACKWARD_CASES, ids=[c[0] for c in BACKWARD_CASES])
def test_bad_backward_input_is_refused_with_a_clear_message(case, monkeypatch):
    _, make, exception, words = case
    out, lse = _forward()

    def no_allocation(*args, **kwargs):
        raise AssertionError("an output was allocated before the input was checked")

    monkeypatch.setattr(_dispatch, "_empty", no_allocation)
    kwargs = make(out, lse)
    with pytest.raises(exception) as info:
        cuflash.attention_backward(kwargs.pop("dout"), Q, K, V, kwargs.pop("out"), kwargs.pop("lse"), **kwargs)
    for word in words:
        assert word in str(info.value), f"{word!r} not in: {info.value}"


def test_gpu_probe_never_raises_and_explains_itself():
    ok, reason = cuflash.gpu_available()
    assert isinstance(ok, bool) and isinstance(reason, str) and reason


@pytest.mark.skipif(cuflash.gpu_available()[0], reason="checks the refusal on machines without a usable GPU")
def test_forcing_cuda_without_a_gpu_says_why():
    with pytest.raises(cuflash.BackendUnavailableError, match="backend='cuda'"):
        cuflash.attention(Q, K, V, backend="cuda")


@pytest.mark.skipif(cuflash.gpu_available()[0], reason="checks the fallback on machines without a usable GPU")
def test_auto_falls_back_to_numpy_without_a_gpu():
    out = cuflash.attention(Q, K, V)
    numpy.testing.assert_array_equal(out, cuflash.attention(Q, K, V, backend="numpy"))
