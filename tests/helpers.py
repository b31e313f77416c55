"""Test-suite machinery beyond ``cuflash.testing``: the mask as the tests ask ``MaskSpec``, GPU skips,
and the ring tests' comparison with single-device attention.

The accuracy rule (``assert_close``: error against the float64 reference at most a factor times
that of a naive computation in the input dtype, plus a floor), the random inputs and the
strategies are public in ``cuflash.testing``, so that users test the way cuflash does; the names
the test modules take from here are re-exported.
"""

import numpy

import cuflash
from cuflash._mask import MaskSpec
from cuflash.testing import BFLOAT16, DTYPES, alibi_bias, assert_lse_close, magnitudes, naive_same_dtype, windows
from cuflash.testing import assert_within_naive_error as assert_close
from cuflash.testing import random_inputs as make_inputs

__all__ = ["BFLOAT16", "DTYPES", "alibi_bias", "assert_close", "assert_lse_close", "gpu_skip_reason", "magnitudes",
           "make_inputs", "mask_of", "naive_same_dtype", "windows"]


def mask_of(Sq, Sk, *, causal=False, causal_alignment="bottom_right", window=None):
    """The ``MaskSpec`` that the public options ``causal``, ``causal_alignment``, ``window`` describe."""
    left, right = (None, None) if window is None else window
    return MaskSpec(Sq, Sk, Sk - Sq if causal_alignment == "bottom_right" else 0, left, 0 if causal else right)


def gpu_skip_reason():
    ok, reason = cuflash.gpu_available()
    return None if ok else reason


def assert_ring_equals_single_device(ring, single, q, k, v, dout, scale=None):
    """Ring attention's (out, lse, dq, dk, dv) equal single-device attention's within float32 rounding
    (1e-13 for float64) of each output's scale; lse's -inf entries (rows that see no key) exactly."""
    eps = 1e-13 if q.dtype == numpy.float64 else 4e-6
    sizes = magnitudes(q, k, v, dout, scale)
    for name, x, ref in zip(("out", "lse", "dq", "dk", "dv"), ring, single):
        assert x.shape == ref.shape and x.dtype == ref.dtype, name
        assert not numpy.isnan(x).any(), name
        if name == "lse":
            assert numpy.array_equal(numpy.isneginf(x), numpy.isneginf(ref))
            x, ref = x[numpy.isfinite(ref)], ref[numpy.isfinite(ref)]
            bound = eps * max(1.0, float(numpy.abs(ref).max(initial=0)))
        else:
            bound = eps * max(1.0, sizes[name])
        err = float(numpy.abs(x.astype(numpy.float64) - ref).max(initial=0))
        assert err <= bound, f"{name}: ring differs from single-device attention by {err:.3g} > {bound:.3g}"
