"""``python -m cuflash``: run attention here, check it against the float64 reference, print a table.

Uses the CUDA kernels when a usable GPU is present and the NumPy backend otherwise.
"""

import argparse
import time

import numpy

import cuflash

_DTYPES = {"float16": numpy.float16, "float32": numpy.float32, "float64": numpy.float64}
try:
    import ml_dtypes

    _DTYPES["bfloat16"] = ml_dtypes.bfloat16
except ImportError:
    pass


def _max_err(x, ref):
    x = numpy.asarray(x if isinstance(x, numpy.ndarray) else x.get(), dtype=numpy.float64)
    return float(numpy.max(numpy.abs(x - ref))) if x.size else 0.0


def _gpu_refusal(name, head_dim):
    """Why this GPU's kernels do not run both passes of ``name`` at ``head_dim``, or None."""
    from cuflash._cuda import runtime, variants

    return variants.unserved(variants.family(*runtime.compute_capability()), name, head_dim, head_dim, backward=True)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m cuflash", description=__doc__)
    parser.add_argument("--backend", default="auto", choices=("auto", "numpy", "cuda"))
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--head-dim", type=int, default=64)
    args = parser.parse_args(argv)

    ok, reason = cuflash.gpu_available()
    print(f"cuflash {cuflash.__version__}; GPU: {reason}")
    rng = numpy.random.default_rng(0)
    N, H, D = args.seqlen, args.heads, args.head_dim
    # float64 always runs on the NumPy backend; the GPU kernels take 16- and 32-bit floats.
    dtypes = ["float16", "bfloat16", "float32"] if ok and args.backend != "numpy" else ["float32", "float64"]
    header = f"{'dtype':>9} {'causal':>6} {'backend':>7} {'fwd ms':>8} {'bwd ms':>8} {'max|O err|':>11} {'max|dQ err|':>11}"
    print(f"B=1 Sq=Sk={N} H={H} D={D}\n{header}")
    for name in (d for d in dtypes if d in _DTYPES):
        dtype = _DTYPES[name]
        # A dtype or head dim this GPU has no kernel for (Turing: float16 only, backward up to d = 224)
        # runs on the NumPy backend, or is skipped where the GPU was asked for.
        why = _gpu_refusal(name, D) if ok and args.backend != "numpy" else None
        backend = args.backend if args.backend != "auto" else ("cuda" if ok and why is None else "numpy")
        if backend == "cuda" and why is not None:
            print(f"{name:>9} skipped: {why}")
            continue
        q, k, v, dout = (rng.standard_normal((1, N, H, D)).astype(dtype) for _ in range(4))
        for causal in (False, True):
            if backend == "cuda":
                import cupy

                q_, k_, v_, dout_ = (cupy.asarray(x) for x in (q, k, v, dout))
            else:
                q_, k_, v_, dout_ = q, k, v, dout
            # One untimed call first: it compiles the GPU kernel (or warms the CPU caches).
            out, lse = cuflash.attention(q_, k_, v_, causal=causal, return_lse=True, backend=backend)
            cuflash.attention_backward(dout_, q_, k_, v_, out, lse, causal=causal, backend=backend)
            if backend == "cuda":
                cupy.cuda.Device().synchronize()
            start = time.perf_counter()
            out, lse = cuflash.attention(q_, k_, v_, causal=causal, return_lse=True, backend=backend)
            if backend == "cuda":
                cupy.cuda.Device().synchronize()
            fwd = time.perf_counter() - start
            start = time.perf_counter()
            dq, _, _ = cuflash.attention_backward(dout_, q_, k_, v_, out, lse, causal=causal, backend=backend)
            if backend == "cuda":
                cupy.cuda.Device().synchronize()
            bwd = time.perf_counter() - start
            ref_out, _ = cuflash.reference.attention(q, k, v, causal=causal)
            ref_dq, _, _ = cuflash.reference.attention_backward(dout, q, k, v, causal=causal)
            print(f"{name:>9} {str(causal):>6} {backend:>7} {1e3 * fwd:8.2f} {1e3 * bwd:8.2f} "
                  f"{_max_err(out, ref_out):11.2e} {_max_err(dq, ref_dq):11.2e}")


if __name__ == "__main__":
    main()
