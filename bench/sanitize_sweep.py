"""Small calls through every GPU kernel family, for compute-sanitizer (memcheck, racecheck, synccheck).

    compute-sanitizer --tool memcheck --error-exitcode 1 python bench/sanitize_sweep.py
    compute-sanitizer --tool racecheck --error-exitcode 1 python bench/sanitize_sweep.py --quick

Each case is a forward and a backward (both dQ modes) at a small, awkward size: tails in both
sequence lengths, GQA, Sq > Sk with the bottom-right causal mask (fully masked rows), a window,
softcap and ALiBi, strided views, every dtype the kernels take, and the sm80- and sm75-family
tables forced on a newer GPU (a case a family does not serve is reported and skipped); then a packed (varlen) and a padded ragged batch with empty and one-token sequences.
CuPy's memory pool is switched off, so that an access past an operand meets unallocated memory.
The script itself only checks that every result is finite where it must be; the sanitizer reports
out-of-bounds accesses, races and barrier misuse.
"""

import argparse
import sys
from pathlib import Path

import numpy

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import cuflash  # noqa: E402
from cuflash._cuda import variants  # noqa: E402

CASES = [
    # (B, Sq, Sk, Hq, Hkv, D, Dv, options)
    (1, 77, 45, 4, 2, 64, 64, dict(causal=True)),
    (2, 33, 130, 2, 1, 128, 128, dict(causal=True, window=(20, 0))),
    (1, 65, 65, 4, 4, 96, 96, dict(softcap=20.0)),
    (1, 40, 90, 2, 2, 256, 256, dict(causal=True)),
    (1, 50, 70, 2, 1, 59, 40, dict(window=(7, 9))),
    (1, 64, 200, 4, 2, 64, 64, dict(causal=True, alibi=True)),
]
QUICK = CASES[:2]
# Ragged batches: per-sequence (query, key) lengths; empty sequences, one token, Sq > Sk and tails.
RAGGED = [(0, 5), (1, 1), (37, 20), (130, 141), (3, 0)]


def _run(cupy, dtype, case, family, bhsd):
    B, Sq, Sk, Hq, Hkv, D, Dv, options = case
    options = dict(options)
    rng = numpy.random.default_rng(Sq * 1000 + Sk)

    def array(shape):
        x = cupy.asarray(rng.standard_normal(shape).astype(numpy.float32)).astype(dtype)
        return cupy.ascontiguousarray(x.transpose(0, 2, 1, 3)).transpose(0, 2, 1, 3) if bhsd else x

    if options.pop("alibi", False):
        options["alibi_slopes"] = cupy.asarray(rng.uniform(0.01, 0.5, Hq).astype(numpy.float32))
    q, k, v, dout = array((B, Sq, Hq, D)), array((B, Sk, Hkv, D)), array((B, Sk, Hkv, Dv)), array((B, Sq, Hq, Dv))
    out, lse = cuflash.attention(q, k, v, return_lse=True, backend="cuda", **options)
    for deterministic in (False, True):
        grads = cuflash.attention_backward(dout, q, k, v, out, lse, deterministic=deterministic, backend="cuda",
                                           **options)
        for name, g in zip(("dq", "dk", "dv"), grads):
            if not bool(cupy.isfinite(g).all()):
                raise SystemExit(f"{family} {dtype} {case[:7]} {options}: {name} is not finite")
    cupy.cuda.Device().synchronize()


def _run_ragged(cupy, dtype, family):
    """A causal GQA varlen call and the same lengths as a padded batch, forward and backward."""
    rng = numpy.random.default_rng(7)
    Hq, Hkv, D = 4, 2, 72
    lq, lk = (numpy.array(x, dtype=numpy.int32) for x in zip(*RAGGED))

    def array(shape):
        return cupy.asarray(rng.standard_normal(shape).astype(numpy.float32)).astype(dtype)

    cu_q, cu_k = (cupy.asarray(numpy.concatenate([[0], numpy.cumsum(x)]).astype(numpy.int32)) for x in (lq, lk))
    total_q, total_k = int(lq.sum()), int(lk.sum())
    q, k, v, dout = array((total_q, Hq, D)), array((total_k, Hkv, D)), array((total_k, Hkv, D)), array((total_q, Hq, D))
    options = dict(causal=True, softcap=15.0)
    out, lse = cuflash.attention_varlen(q, k, v, cu_q, cu_k, return_lse=True, backend="cuda", **options)
    grads = cuflash.attention_varlen_backward(dout, q, k, v, out, lse, cu_q, cu_k, backend="cuda", **options)
    B, Sq, Sk = len(RAGGED), int(lq.max()), int(lk.max())
    q, k, v, dout = array((B, Sq, Hq, D)), array((B, Sk, Hkv, D)), array((B, Sk, Hkv, D)), array((B, Sq, Hq, D))
    seqlens = dict(seqlens_q=cupy.asarray(lq), seqlens_k=cupy.asarray(lk))
    out, lse = cuflash.attention(q, k, v, return_lse=True, backend="cuda", **seqlens, **options)
    grads += cuflash.attention_backward(dout, q, k, v, out, lse, backend="cuda", deterministic=True, **seqlens,
                                        **options)
    for g in grads:
        if not bool(cupy.isfinite(g).all()):
            raise SystemExit(f"{family} {dtype} ragged: a gradient is not finite")
    cupy.cuda.Device().synchronize()


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="two cases, 16-bit only (racecheck is slow)")
    parser.add_argument("--families", default="sm90,sm80,sm75")
    args = parser.parse_args()
    import cupy

    cupy.cuda.set_allocator(None)
    dtypes = ["float16"] if args.quick else ["float16", "bfloat16", "float32", "float64"]
    native = variants.family
    for family in args.families.split(","):
        variants.family = lambda major, minor, family=family: family  # the tables of this family
        if family == "sm90" and cupy.cuda.Device().compute_capability != "90":
            continue
        for dtype in dtypes:
            if dtype not in variants.family_dtypes(family):
                continue
            if dtype == "bfloat16":
                from cuflash._interop import _bfloat16

                if _bfloat16() is None:
                    continue
                dtype = _bfloat16()
            for case in (QUICK if args.quick else CASES):
                for bhsd in (False, True):
                    try:
                        _run(cupy, dtype, case, family, bhsd)
                    except cuflash.BackendUnavailableError as exc:  # e.g. the sm75 backward past d = 224
                        print(f"{family} {dtype} {case[:7]}: not served here ({exc})", flush=True)
            _run_ragged(cupy, dtype, family)
        print(f"{family}: every case ran", flush=True)
    variants.family = native


if __name__ == "__main__":
    main()
