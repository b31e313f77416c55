"""The NumPy backend against the naive NumPy computation: time and peak memory vs N.

    python bench/bench_numpy.py            # N = 1k, 2k, 4k, 8k, 16k
    python bench/bench_numpy.py --quick    # N = 1k, 2k, 4k
    python bench/bench_numpy.py --long     # also the B=1, H=8, N=32k, D=64 forward
    python bench/bench_numpy.py --memory   # also peak memory of broadcast 16-bit inputs, large dk/dv, B·H >> 512

The naive computation materializes S = Q Kᵀ in float32 (B·H·N² elements) and is skipped where
that would pass ``--naive-limit-gb``. Peak memory is what tracemalloc sees NumPy allocate
beyond the inputs; times are the median of ``--repeat`` runs.
"""

import argparse
import json
import statistics
import time
import tracemalloc

import numpy

import cuflash


def naive_attention(q, k, v, scale):
    """softmax(scale · Q Kᵀ) V with the full S matrix, float32, BSHD in and out."""
    Q, K, V = (x.transpose(0, 2, 1, 3) for x in (q, k, v))
    S = (Q * scale) @ K.transpose(0, 1, 3, 2)
    S -= S.max(axis=-1, keepdims=True)
    numpy.exp(S, out=S)
    S /= S.sum(axis=-1, keepdims=True)
    return (S @ V).transpose(0, 2, 1, 3)


def measure(fn, repeat):
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    tracemalloc.start()
    fn()
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return statistics.median(times), peak


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--long", action="store_true")
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--naive-limit-gb", type=float, default=6.0)
    parser.add_argument("--memory", action="store_true", help="also the peak-memory cases (a few minutes)")
    parser.add_argument("--json", help="write the rows here")
    args = parser.parse_args()

    H, D = args.heads, args.head_dim
    sizes = [1024, 2048, 4096] if args.quick else [1024, 2048, 4096, 8192, 16384]
    rng = numpy.random.default_rng(0)
    rows = []
    print(f"B=1 H={H} D={D} float32, non-causal; median of {args.repeat}")
    print(f"{'N':>6} {'cuflash s':>10} {'naive s':>9} {'ratio':>6} {'cuflash MiB':>12} {'naive MiB':>10} {'max|diff|':>10}")
    for n in sizes:
        q, k, v = (rng.standard_normal((1, n, H, D)).astype(numpy.float32) for _ in range(3))
        scale = 1.0 / numpy.sqrt(D)
        t_ours, m_ours = measure(lambda: cuflash.attention(q, k, v, backend="numpy"), args.repeat)
        row = dict(n=n, heads=H, head_dim=D, cuflash_s=t_ours, cuflash_peak_bytes=m_ours)
        if H * n * n * 4 / 2**30 <= args.naive_limit_gb:
            t_naive, m_naive = measure(lambda: naive_attention(q, k, v, scale), args.repeat)
            diff = float(numpy.max(numpy.abs(cuflash.attention(q, k, v, backend="numpy") - naive_attention(q, k, v, scale))))
            row.update(naive_s=t_naive, naive_peak_bytes=m_naive, max_abs_diff=diff)
            print(f"{n:6d} {t_ours:10.3f} {t_naive:9.3f} {t_ours / t_naive:6.2f} {m_ours / 2**20:12.1f} "
                  f"{m_naive / 2**20:10.1f} {diff:10.2e}")
        else:
            print(f"{n:6d} {t_ours:10.3f} {'-':>9} {'-':>6} {m_ours / 2**20:12.1f} {'(too big)':>10} {'-':>10}")
        rows.append(row)
    if args.long:
        n = 32768
        q, k, v = (rng.standard_normal((1, n, 8, 64)).astype(numpy.float32) for _ in range(3))
        t, m = measure(lambda: cuflash.attention(q, k, v, backend="numpy"), 1)
        print(f"B=1 H=8 N={n} D=64: {t:.1f} s, peak {m / 2**20:.0f} MiB (S alone would be {8 * n * n * 4 / 2**30:.0f} GiB)")
        rows.append(dict(n=n, heads=8, head_dim=64, cuflash_s=t, cuflash_peak_bytes=m))
    if args.memory:
        rows.extend(memory_rows(rng))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


def memory_rows(rng):
    """Peak memory beyond the results in the cases that once copied whole inputs or kept whole
    accumulators: a broadcast float16 input (read in place, converted tile by tile), a backward
    whose dk + dv dominate (accumulated a key tile at a time), and B·Hq far beyond one tile (heads
    split into chunks)."""
    S = 1 << 16
    q16 = numpy.broadcast_to(rng.standard_normal((1, 1, 8, 64)).astype(numpy.float16), (1, S, 8, 64))
    kv16 = rng.standard_normal((1, 2048, 8, 64)).astype(numpy.float16)
    q32 = rng.standard_normal((1, 512, 8, 64)).astype(numpy.float32)
    k32 = rng.standard_normal((1, 1 << 17, 8, 64)).astype(numpy.float32)
    out32, lse32 = cuflash.attention(q32, k32, k32, return_lse=True, backend="numpy")
    dout32 = rng.standard_normal(out32.shape).astype(numpy.float32)
    half = [x.astype(numpy.float16) for x in (dout32, q32, k32, out32)]
    many = rng.standard_normal((16, 256, 256, 1)).astype(numpy.float32)
    cases = [
        ("fwd float16 broadcast q (1, 2^16, 8, 64) against 2048 keys",
         lambda: cuflash.attention(q16, kv16, kv16, backend="numpy")),
        ("bwd float32 Sq 512, Sk 2^17, H 8, D 64",
         lambda: cuflash.attention_backward(dout32, q32, k32, k32, out32, lse32, backend="numpy")),
        ("bwd float16 Sq 512, Sk 2^17, H 8, D 64",
         lambda: cuflash.attention_backward(half[0], half[1], half[2], half[2], half[3], lse32, backend="numpy")),
        ("fwd float32 B·H = 4096, S = 256, D = 1", lambda: cuflash.attention(many, many, many, backend="numpy")),
    ]
    rows = []
    print(f"{'case':<56} {'s':>7} {'results MiB':>12} {'peak MiB':>9} {'extra MiB':>10}")
    for name, call in cases:
        start = time.perf_counter()
        tracemalloc.start()
        results = call()
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        seconds = time.perf_counter() - start
        results = results if isinstance(results, tuple) else (results,)
        size = sum(r.nbytes for r in results)
        print(f"{name:<56} {seconds:7.1f} {size / 2**20:12.1f} {peak / 2**20:9.1f} {(peak - size) / 2**20:10.1f}")
        rows.append(dict(case=name, seconds=seconds, result_bytes=size, peak_bytes=peak))
    return rows


if __name__ == "__main__":
    main()
