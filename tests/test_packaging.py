"""The package as users get it: the wheel carries the CUDA sources and ``py.typed``, and an installed
(non-editable) cuflash finds them and needs nothing but NumPy for its CPU path and for
``cuflash.testing``'s assertions; ``help(cuflash)`` names the modules to import on their own, and
the exceptions show as ``cuflash.X``."""

import os
import subprocess
import sys
import venv
from pathlib import Path

import pytest

import cuflash

ROOT = Path(__file__).resolve().parent.parent

CHECK = """
import numpy, cuflash
from cuflash._cuda import runtime
where = runtime.source_dir()
assert "site-packages" in str(where), where
names = sorted(str(p.relative_to(where)) for p in where.rglob("*.cu"))
assert "kernels/fwd_sm80.cu" in names, names
for name in names:
    assert "#include \\"" not in runtime.cuda_source(name), name  # local headers all expanded
q = numpy.random.default_rng(0).standard_normal((1, 9, 2, 8))
out, lse = cuflash.attention(q, q, q, causal=True, return_lse=True, backend="numpy")
ref, _ = cuflash.reference.attention(q, q, q, causal=True)
assert numpy.allclose(out, ref)
import importlib.resources
assert importlib.resources.files("cuflash").joinpath("py.typed").is_file()
# Only NumPy is installed here: cuflash.testing's assertions work, its strategies ask for Hypothesis.
import cuflash.testing
cuflash.testing.assert_attention_close(out, q, q, q, causal=True)
try:
    cuflash.testing.attention_problems()
    raise AssertionError("attention_problems ran without Hypothesis")
except ImportError as exc:
    assert "pip install hypothesis" in str(exc), exc
print("OK", where, names)
"""


@pytest.mark.skipif(not (ROOT / "pyproject.toml").exists(), reason="needs the source checkout")
def test_wheel_installs_into_a_fresh_venv_and_finds_the_cuda_sources(tmp_path):
    wheel_dir = tmp_path / "dist"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(wheel_dir), str(ROOT)],
                   check=True)
    (wheel,) = wheel_dir.glob("cuflash-*.whl")
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=True)
    python = env_dir / "bin" / "python"
    subprocess.run([str(python), "-m", "pip", "install", "-q", str(wheel)], check=True)
    # Run from an empty folder so the checkout cannot shadow the installed package.
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    result = subprocess.run([str(python), "-c", CHECK], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.startswith("OK")


def test_help_names_the_modules_imported_on_their_own():
    for module in ("cuflash.torch", "cuflash.jax", "cuflash.distributed", "cuflash.testing", "cuflash.reference"):
        assert module in cuflash.__doc__, module


@pytest.mark.parametrize("name", ["BackendUnavailableError", "KernelError", "KernelCompileError",
                                  "KernelLaunchError"])
def test_exceptions_show_as_cuflash_names(name):
    cls = getattr(cuflash, name)
    assert cls.__module__ == "cuflash" and repr(cls) == f"<class 'cuflash.{name}'>"
