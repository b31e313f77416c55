"""Test-suite machinery beyond ``cuflash.testing``: the mask as the tests ask ``MaskSpec``, GPU skips.

The accuracy rule (``assert_close``: error against the float64 reference at most a factor times
that of a naive computation in the input dtype, plus a floor), the random inputs and the
strategies are public in ``cuflash.testing``, so that users test the way cuflash does; the names
the test modules take from here are re-exported.
"""

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
