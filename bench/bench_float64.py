"""float64 on the GPU: cuflash's FP64 tensor-core kernels beside a naive CuPy float64 computation.

    python bench/bench_float64.py [--ns 1024,2048,4096,8192,16384] [--dims 32,64,128] [--heads 8]
                                  [--modes fwd,bwd] [--json FILE]

One batch of ``--heads`` heads, N queries and N keys, causal and not. FLOPs: forward
4 * H * N^2 * D, halved when causal; backward 2.5x the forward. The naive computation is what a
float64 user writes without cuflash: S = scale * Q K^T and P = softmax(S) materialized (cuBLAS DGEMM
through CuPy's matmul), O = P V; its backward dV = P^T dO, dP = dO V^T, dS = P o (dP - rowsum(dO o O)),
dQ = scale * dS K, dK = scale * dS^T Q. It needs O(N^2) memory; where that does not fit the column
says so. Times are medians of CUDA-event timings after a warm-up, both columns in the same run.
Targets (issue 17): >= 3x the naive TF/s, and >= 25 TF/s forward at d = 64..128, N >= 4k.
"""

import argparse
import json
import math
import sys
from pathlib import Path

import cupy as cp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import cuflash  # noqa: E402
from bench_attention import median_ms  # noqa: E402


def flops(h, n, d, causal, mode):
    f = 4.0 * h * n * n * d * (0.5 if causal else 1.0)
    return f * (2.5 if mode == "bwd" else 1.0)


def naive_forward(q, k, v, causal, scale):
    """(out, P) in BHSD, float64."""
    Q, K, V = (x.transpose(0, 2, 1, 3) for x in (q, k, v))
    S = scale * (Q @ K.transpose(0, 1, 3, 2))
    if causal:
        n = S.shape[-1]
        S = cp.where(cp.tri(n, dtype=bool), S, -cp.inf)
    S -= S.max(axis=-1, keepdims=True)
    P = cp.exp(S)
    P /= P.sum(axis=-1, keepdims=True)
    return P @ V, P


def naive_backward(q, k, v, dout, causal, scale):
    Q, K, V, dO = (x.transpose(0, 2, 1, 3) for x in (q, k, v, dout))
    O, P = naive_forward(q, k, v, causal, scale)
    dV = P.transpose(0, 1, 3, 2) @ dO
    dS = P * (dO @ V.transpose(0, 1, 3, 2) - (dO * O).sum(axis=-1, keepdims=True))
    return scale * (dS @ K), scale * (dS.transpose(0, 1, 3, 2) @ Q), dV


def run(n, d, heads, causal, mode):
    rng = np.random.default_rng(0)
    q, k, v, dout = (cp.asarray(rng.standard_normal((1, n, heads, d))) for _ in range(4))
    scale = 1.0 / math.sqrt(d)
    row = dict(n=n, d=d, heads=heads, causal=causal, mode=mode)
    if mode == "fwd":
        ours = lambda: cuflash.attention(q, k, v, causal=causal, backend="cuda")  # noqa: E731
        naive = lambda: naive_forward(q, k, v, causal, scale)  # noqa: E731
    else:
        out, lse = cuflash.attention(q, k, v, causal=causal, return_lse=True, backend="cuda")
        ours = lambda: cuflash.attention_backward(dout, q, k, v, out, lse, causal=causal, backend="cuda")  # noqa: E731
        naive = lambda: naive_backward(q, k, v, dout, causal, scale)  # noqa: E731
    f = flops(heads, n, d, causal, mode)
    row["cuflash_ms"] = median_ms(ours)
    row["cuflash_tflops"] = f / row["cuflash_ms"] / 1e9
    try:
        row["naive_ms"] = median_ms(naive)
        row["naive_tflops"] = f / row["naive_ms"] / 1e9
        row["speedup"] = row["naive_ms"] / row["cuflash_ms"]
    except cp.cuda.memory.OutOfMemoryError:
        row["naive_ms"] = row["naive_tflops"] = row["speedup"] = None
    cp.get_default_memory_pool().free_all_blocks()
    return row


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ints = lambda s: [int(x) for x in s.split(",")]  # noqa: E731
    ap.add_argument("--ns", type=ints, default=[1024, 2048, 4096, 8192, 16384])
    ap.add_argument("--dims", type=ints, default=[32, 64, 128])
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--modes", default="fwd,bwd")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    device = cp.cuda.runtime.getDeviceProperties(cp.cuda.Device().id)["name"]
    device = device.decode() if isinstance(device, bytes) else device
    rows = []
    print(f"{device}: float64, 1 x {args.heads} heads, N queries = N keys")
    print(f"{'mode':4} {'causal':6} {'d':>4} {'N':>6} {'cuflash ms':>11} {'TF/s':>6} {'naive ms':>10} {'TF/s':>6} {'x':>6}")
    for mode in args.modes.split(","):
        for causal in (False, True):
            for d in args.dims:
                for n in args.ns:
                    r = run(n, d, args.heads, causal, mode)
                    rows.append(r)
                    naive = ("n/a (memory)", "", "") if r["naive_ms"] is None else (
                        f"{r['naive_ms']:.3f}", f"{r['naive_tflops']:.2f}", f"{r['speedup']:.2f}")
                    print(f"{mode:4} {str(causal):6} {d:>4} {n:>6} {r['cuflash_ms']:>11.3f} {r['cuflash_tflops']:>6.2f} "
                          f"{naive[0]:>10} {naive[1]:>6} {naive[2]:>6}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"device": device, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
