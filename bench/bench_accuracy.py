"""float32 accuracy over long key sequences: error against float64 vs Sk, beside naive float32.

    python bench/bench_accuracy.py                       # GPU when usable, else the NumPy backend
    python bench/bench_accuracy.py --backend numpy --sk 1024,65536
    python bench/bench_accuracy.py --json out/accuracy.json

Sq queries (default 64, "inducing points") attend over Sk keys (1k .. 256k) at D = 64. For each Sk
the table gives the max |error| of out against a float64 computation, the same for a naive float32
softmax(Q Kᵀ) V (one matrix product per step, in the backend's array module), SDPA's float32
math where torch is present, and the ratio cuflash / naive, which FlashAttention's rule bounds by
2. The float64 ground truth is computed in chunks of keys with an exact log-sum-exp merge, so Sk
= 256k fits in memory.
"""

import argparse
import json
import math

import numpy

import cuflash


def _float64_attention(q, k, v, scale, chunk=16384):
    """softmax(scale · Q Kᵀ) V in float64 over key chunks, merged by the log-sum-exp rule."""
    Q = q.astype(numpy.float64) * scale
    m = numpy.full(Q.shape[0], -numpy.inf)
    l = numpy.zeros(Q.shape[0])
    O = numpy.zeros((Q.shape[0], v.shape[1]))
    for j0 in range(0, k.shape[0], chunk):
        S = Q @ k[j0:j0 + chunk].astype(numpy.float64).T
        m_new = numpy.maximum(m, S.max(axis=1))
        P = numpy.exp(S - m_new[:, None])
        alpha = numpy.exp(m - m_new)
        l = alpha * l + P.sum(axis=1)
        O = alpha[:, None] * O + P @ v[j0:j0 + chunk].astype(numpy.float64)
        m = m_new
    return O / l[:, None]


def _naive(xp, q, k, v, scale):
    S = (q * numpy.float32(scale)) @ k.T
    P = xp.exp(S - S.max(axis=1, keepdims=True))
    return (P / P.sum(axis=1, keepdims=True)) @ v


def _sdpa(q, k, v, scale, device):
    try:
        import torch
    except ImportError:
        return None
    with torch.no_grad():
        t = [torch.from_numpy(x)[None, None].to(device) for x in (q, k, v)]
        from torch.nn.attention import SDPBackend, sdpa_kernel

        with sdpa_kernel(SDPBackend.MATH):
            out = torch.nn.functional.scaled_dot_product_attention(*t, scale=scale)
    return out[0, 0].cpu().numpy()


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backend", choices=("auto", "cuda", "numpy"), default="auto")
    parser.add_argument("--sk", default="1024,4096,16384,65536,262144")
    parser.add_argument("--sq", type=int, default=64)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json")
    args = parser.parse_args()

    gpu, _ = cuflash.gpu_available()
    on_gpu = args.backend == "cuda" or (args.backend == "auto" and gpu)
    if on_gpu:
        import cupy as xp
    else:
        xp = numpy
    D = args.head_dim
    scale = 1 / math.sqrt(D)
    rng = numpy.random.default_rng(args.seed)
    rows = []
    print(f"float32, Sq = {args.sq}, D = {D}, {'GPU' if on_gpu else 'NumPy backend'}")
    print(f"{'Sk':>8} {'cuflash':>10} {'naive f32':>10} {'SDPA math':>10} {'ratio':>6}")
    for Sk in (int(n) for n in args.sk.split(",")):
        q = rng.standard_normal((args.sq, D)).astype(numpy.float32)
        k = rng.standard_normal((Sk, D)).astype(numpy.float32)
        v = rng.standard_normal((Sk, D)).astype(numpy.float32)
        exact = _float64_attention(q, k, v, scale)
        arrays = [xp.asarray(x) for x in (q, k, v)]
        out = cuflash.attention(*(a[None, :, None] for a in arrays), backend="cuda" if on_gpu else "numpy")
        ours = float(numpy.abs(numpy.asarray(out.get() if on_gpu else out)[0, :, 0] - exact).max())
        naive_out = _naive(xp, *arrays, scale)
        naive = float(numpy.abs((naive_out.get() if on_gpu else naive_out) - exact).max())
        sdpa_out = _sdpa(q, k, v, scale, "cuda" if on_gpu else "cpu")
        sdpa = None if sdpa_out is None else float(numpy.abs(sdpa_out - exact).max())
        rows.append(dict(Sk=Sk, cuflash=ours, naive=naive, sdpa_math=sdpa, ratio=ours / naive))
        print(f"{Sk:>8} {ours:>10.3g} {naive:>10.3g} {'-' if sdpa is None else f'{sdpa:.3g}':>10} {ours / naive:>6.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(sq=args.sq, head_dim=D, gpu=on_gpu, rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
