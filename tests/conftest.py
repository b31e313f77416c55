"""Hypothesis profiles and fixtures shared by every test module.

Profiles: "ci" (the default: derandomized, no deadline, sized to finish in a few minutes on two
cores) and "thorough" (many more examples, random seeds) for local runs:
``HYPOTHESIS_PROFILE=thorough python -m pytest``.

JAX's CPU platform gets 8 devices, for the meshes of ``tests/test_ring_jax.py`` (unless XLA_FLAGS
already sets a count). XLA reads the flag when JAX starts its CPU backend, in the first test that
uses JAX: after this file is loaded, whichever modules the run collects.
"""

import os

import numpy
import pytest
from hypothesis import HealthCheck, settings

from cuflash import _dispatch

if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()

settings.register_profile(
    "ci", derandomize=True, deadline=None, max_examples=40,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile(
    "thorough", deadline=None, max_examples=500,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture
def poisoned(monkeypatch):
    """Every output allocation of every backend starts as NaN, so unwritten elements fail."""
    original = _dispatch._empty

    def nan_filled(xp, shape, dtype):
        x = original(xp, shape, dtype)
        x.fill(numpy.nan)
        return x

    monkeypatch.setattr(_dispatch, "_empty", nan_filled)
