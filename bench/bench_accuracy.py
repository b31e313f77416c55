"""float32 accuracy over long key sequences: error against float64 vs Sk, beside naive float32.

    python bench/bench_accuracy.py                       # GPU when usable, else the NumPy backend
    python bench/bench_accuracy.py --backend numpy --sk 1024,65536
    python bench/bench_accuracy.py --json out/accuracy.json

Sq queries (default 64, "inducing points") attend over Sk keys (1k .. 256k) at D = 64. For each Sk
the table gives the max |error| of out against a float64 computation, the same for a naive float32
softmax(Q Kᵀ) V (one matrix product per step, in the backend's array module), SDPA's float32
math (and on the GPU its memory-efficient kernel) where torch is present, and the ratio cuflash /
naive, which FlashAttention's rule bounds by 2. The float64 ground truth is computed in chunks of
keys with an exact log-sum-exp merge, so Sk = 256k fits in memory.

Two more columns separate the error's sources. ``lse``: max |error| of the log-sum-exp against
float64 (cuflash's and naive float32's), which sees the scores' error and the row sums' but not
the P V product. ``v=1``: max |out - 1| with every value 1 (cuflash's and naive's), where the
scores' error cancels (out = sum P / sum P) and only the long accumulations of O and l remain.
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


def _naive_lse(xp, q, k, scale):
    S = (q * numpy.float32(scale)) @ k.T
    m = S.max(axis=1)
    return m + xp.log(xp.exp(S - m[:, None]).sum(axis=1))


def _float64_lse(q, k, scale, chunk=16384):
    Q = q.astype(numpy.float64) * scale
    parts = [numpy.logaddexp.reduce(Q @ k[j0:j0 + chunk].astype(numpy.float64).T, axis=1)
             for j0 in range(0, k.shape[0], chunk)]
    return numpy.logaddexp.reduce(numpy.stack(parts), axis=0)


def _sdpa(q, k, v, scale, device, backend_name):
    """SDPA's out with one backend, or None where torch or that backend is missing or refuses."""
    try:
        import torch
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:
        return None
    try:
        with torch.no_grad(), sdpa_kernel(getattr(SDPBackend, backend_name)):
            t = [torch.from_numpy(x)[None, None].to(device) for x in (q, k, v)]
            out = torch.nn.functional.scaled_dot_product_attention(*t, scale=scale)
    except RuntimeError:  # no kernel of that backend for these inputs
        return None
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
    print(f"{'Sk':>8} {'cuflash':>10} {'naive f32':>10} {'SDPA math':>10} {'SDPA eff':>10} {'ratio':>6}"
          f" {'lse ours':>10} {'lse naive':>10} {'v=1 ours':>10} {'v=1 naive':>10}")
    for Sk in (int(n) for n in args.sk.split(",")):
        q = rng.standard_normal((args.sq, D)).astype(numpy.float32)
        k = rng.standard_normal((Sk, D)).astype(numpy.float32)
        v = rng.standard_normal((Sk, D)).astype(numpy.float32)
        exact = _float64_attention(q, k, v, scale)
        arrays = [xp.asarray(x) for x in (q, k, v)]
        backend = "cuda" if on_gpu else "numpy"

        def host(x):
            return numpy.asarray(x.get() if on_gpu else x)

        def error(x, want):
            return float(numpy.abs(host(x) - want).max())

        out, lse = cuflash.attention(*(a[None, :, None] for a in arrays), return_lse=True, backend=backend)
        ours = error(out[0, :, 0], exact)
        naive = error(_naive(xp, *arrays, scale), exact)
        exact_lse = _float64_lse(q, k, scale)
        lse_ours, lse_naive = error(lse[0, 0], exact_lse), error(_naive_lse(xp, arrays[0], arrays[1], scale), exact_lse)
        ones = xp.ones_like(arrays[2])
        v1_ours = error(cuflash.attention(arrays[0][None, :, None], arrays[1][None, :, None], ones[None, :, None],
                                          backend=backend)[0, :, 0], 1.0)
        v1_naive = error(_naive(xp, arrays[0], arrays[1], ones, scale), 1.0)
        device = "cuda" if on_gpu else "cpu"
        sdpa = {name: _sdpa(q, k, v, scale, device, name) for name in ("MATH", "EFFICIENT_ATTENTION")}
        sdpa = {name: None if x is None else float(numpy.abs(x - exact).max()) for name, x in sdpa.items()}
        rows.append(dict(Sk=Sk, cuflash=ours, naive=naive, sdpa_math=sdpa["MATH"],
                         sdpa_efficient=sdpa["EFFICIENT_ATTENTION"], ratio=ours / naive, lse_cuflash=lse_ours,
                         lse_naive=lse_naive, v1_cuflash=v1_ours, v1_naive=v1_naive))
        cells = [ours, naive, sdpa["MATH"], sdpa["EFFICIENT_ATTENTION"]]
        print(f"{Sk:>8} " + " ".join("-".rjust(10) if c is None else f"{c:>10.3g}" for c in cells)
              + f" {ours / naive:>6.2f} {lse_ours:>10.3g} {lse_naive:>10.3g} {v1_ours:>10.3g} {v1_naive:>10.3g}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(sq=args.sq, head_dim=D, gpu=on_gpu, rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
