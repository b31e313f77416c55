"""Forward-kernel development run: correctness over awkward shapes, then timings of tile variants.

    python bench/dev_forward.py [--no-check] [--no-time] [--variants]

Checks each case against a float64 computation on the GPU with FlashAttention's rule (max error
<= 2x the error of a naive computation in the same dtype, plus a small floor), on NaN-prefilled
outputs. With CUFLASH_SM90_FORWARD=1 on compute capability 9.0 the checks run the sm_90a kernel
wherever it serves the case, as the library would.

Then times the table's tile (and, with --variants, the alternatives of VARIANTS) beside torch
SDPA's flash and cuDNN backends when torch is importable. Each tile goes to the launcher's
``tile`` override (``forward.flash_forward``), so every timing is of the mma.sync kernel
(fwd_sm80.cu); bench_fwd_sm90.py times the sm_90a kernel. An alternative whose kernel does not
build for this GPU (shared memory, registers) gets an "err" cell instead of a figure. Prints a
short table last.
"""

import argparse
import sys
import time
from pathlib import Path

import cupy as cp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cuflash._cuda import forward, runtime, variants  # noqa: E402
from cuflash._problem import check_forward  # noqa: E402
from bench_attention import NP_DTYPES as DTYPES, median_ms  # noqa: E402

C = variants.FwdTile
# (dtype kind, bucket) -> alternative configurations to time beside the table's choice.
VARIANTS = {
    ("16bit", 64): [C(128, 64, 4, 2), C(128, 128, 4, 2), C(128, 64, 4, 3), C(128, 128, 8, 2), C(64, 64, 4, 2)],
    ("16bit", 128): [C(128, 64, 4, 2), C(128, 32, 4, 2), C(128, 64, 8, 2), C(128, 64, 8, 2, 2), C(128, 128, 8, 2),
                     C(64, 64, 4, 2)],
    ("16bit", 256): [C(128, 64, 8, 2), C(64, 16, 4, 2), C(64, 32, 4, 3), C(128, 32, 8, 2)],
    ("float32", 128): [C(128, 32, 8, 2), C(128, 16, 8, 2, split_q=True), C(128, 32, 8, 2, max_regs=168, split_q=True),
                       C(64, 32, 4, 2, split_q=True)],
}


def reference(q, k, v, p, compute_dtype=np.float64, round_to=None):
    """Plain attention on the GPU in ``compute_dtype``; with ``round_to``, S, P and O are rounded to
    that dtype after each step (a naive computation in the input dtype)."""
    def rnd(x):
        return x.astype(round_to).astype(compute_dtype) if round_to is not None else x

    g = p.heads_q // p.heads_kv
    Q = q.astype(compute_dtype).transpose(0, 2, 1, 3)
    K = cp.repeat(k.astype(compute_dtype).transpose(0, 2, 1, 3), g, axis=1)
    V = cp.repeat(v.astype(compute_dtype).transpose(0, 2, 1, 3), g, axis=1)
    S = rnd(p.scale * (Q @ K.transpose(0, 1, 3, 2)))
    if not p.mask.is_full:
        S = cp.where(cp.asarray(p.mask.matrix()), S, -cp.inf)
    m = S.max(axis=-1, keepdims=True) if p.seqlen_k else cp.full(S.shape[:-1] + (1,), -cp.inf, compute_dtype)
    shift = cp.where(cp.isneginf(m), 0, m)
    E = cp.exp(S - shift)
    l = E.sum(axis=-1, keepdims=True)
    P = rnd(cp.where(l > 0, E / cp.where(l > 0, l, 1), 0))
    O = rnd(P @ V).transpose(0, 2, 1, 3)
    lse = cp.where(l[..., 0] > 0, shift[..., 0] + cp.log(cp.where(l[..., 0] > 0, l[..., 0], 1)), -cp.inf)
    return O, lse


def randn(shape, dtype, layout="bshd"):
    """Random normal data in ``dtype``; layout 'bhsd' returns a BSHD view of BHSD storage,
    'strided' a view with a stride of 2 along the head dim."""
    if layout == "bhsd":
        B, S, H, D = shape
        return cp.random.standard_normal((B, H, S, D), dtype=np.float32).astype(dtype).transpose(0, 2, 1, 3)
    if layout == "strided":
        base = cp.random.standard_normal(shape[:-1] + (2 * shape[-1],), dtype=np.float32).astype(dtype)
        return base[..., ::2]
    return cp.random.standard_normal(shape, dtype=np.float32).astype(dtype)


def run_case(B, Sq, Sk, Hq, Hkv, D, Dv, dtype_name, causal, align="bottom_right", layout="bshd", config=None):
    dtype = DTYPES[dtype_name]
    q = randn((B, Sq, Hq, D), dtype, layout)
    k = randn((B, Sk, Hkv, D), dtype, layout)
    v = randn((B, Sk, Hkv, Dv), dtype, layout)
    p = check_forward(q, k, v, causal=causal, causal_alignment=align, scale=None, backend="cuda")
    out = cp.full((B, Sq, Hq, Dv), np.nan, dtype)
    lse = cp.full((B, Hq, Sq), np.nan, np.float32)
    forward.flash_forward(q, k, v, None, out, lse, p, config)
    out2 = cp.full_like(out, np.nan)
    lse2 = cp.full_like(lse, np.nan)
    forward.flash_forward(q, k, v, None, out2, lse2, p, config)
    cp.cuda.Device().synchronize()
    O, L = reference(q, k, v, p)
    # The naive computation: float32 arithmetic, rounded to the input dtype after each step for 16-bit.
    On, _ = reference(q, k, v, p, np.float32, None if dtype_name == "float32" else dtype)
    o = out.astype(np.float64)
    err = float(cp.abs(o - O).max()) if o.size else 0.0
    err_naive = float(cp.abs(On.astype(np.float64) - O).max()) if o.size else 0.0
    finite = cp.isfinite(L)
    lerr = float(cp.abs(lse.astype(np.float64)[finite] - L[finite]).max()) if int(finite.sum()) else 0.0
    lse_inf_ok = bool(cp.all(cp.isneginf(lse[~finite]))) and bool(cp.all(out.astype(np.float32)[
        cp.broadcast_to(~finite.transpose(0, 2, 1)[..., None], out.shape)] == 0))
    nan = bool(cp.isnan(out.astype(np.float32)).any()) or bool(cp.isnan(lse).any())
    same = bool(cp.array_equal(out.view(np.uint8) if out.flags.c_contiguous else out.astype(np.float32),
                               out2.view(np.uint8) if out.flags.c_contiguous else out2.astype(np.float32))) and \
        bool(cp.array_equal(lse, lse2))
    floor = 1e-6 if dtype_name == "float32" else 1e-4
    ok = (not nan) and err <= 2 * err_naive + floor and lerr <= 1e-3 and lse_inf_ok and same
    return ok, err, err_naive, lerr, nan, same


CASES = [
    # B, Sq, Sk, Hq, Hkv, D, Dv, causal, align, layout
    (2, 1, 1, 2, 2, 64, 64, False, "bottom_right", "bshd"),
    (2, 1, 1, 2, 2, 64, 64, True, "bottom_right", "bshd"),
    (1, 17, 17, 3, 3, 40, 40, True, "bottom_right", "bshd"),
    (1, 113, 113, 4, 2, 59, 59, False, "bottom_right", "bshd"),
    (1, 113, 200, 4, 2, 59, 59, True, "top_left", "bshd"),
    (2, 1023, 1025, 4, 1, 111, 111, True, "bottom_right", "bshd"),
    (1, 1025, 1023, 2, 2, 200, 200, True, "bottom_right", "bhsd"),
    (1, 1025, 1023, 2, 2, 200, 200, False, "bottom_right", "bshd"),
    (1, 257, 300, 2, 2, 256, 256, False, "bottom_right", "bshd"),
    (1, 300, 257, 2, 2, 256, 256, True, "top_left", "bshd"),
    (2, 200, 64, 2, 1, 64, 64, True, "bottom_right", "bshd"),  # rows 0..135 fully masked
    (2, 70, 0, 2, 1, 64, 64, False, "bottom_right", "bshd"),   # Sk = 0: every row fully masked
    (1, 129, 130, 4, 4, 64, 128, True, "bottom_right", "bshd"),
    (1, 129, 130, 4, 4, 128, 32, False, "bottom_right", "bshd"),
    (1, 77, 95, 2, 2, 1, 3, True, "bottom_right", "bshd"),
    (1, 500, 500, 2, 2, 96, 96, True, "bottom_right", "strided"),
    (1, 300, 301, 3, 1, 160, 160, False, "bottom_right", "bhsd"),
    (1, 300, 301, 2, 2, 224, 192, True, "bottom_right", "bshd"),
    (2, 2048, 2048, 4, 4, 128, 128, True, "bottom_right", "bshd"),
    (2, 2048, 2048, 4, 4, 64, 64, False, "bottom_right", "bshd"),
    (1, 32, 32, 66000, 66000, 32, 32, True, "bottom_right", "bshd"),  # B*H > 65535
]


def check(dtypes):
    failures = 0
    for dt in dtypes:
        for (B, Sq, Sk, Hq, Hkv, D, Dv, causal, align, layout) in CASES:
            if dt == "float32" and Hq > 1000:
                continue
            t0 = time.perf_counter()
            ok, err, errn, lerr, nan, same = run_case(B, Sq, Sk, Hq, Hkv, D, Dv, dt, causal, align, layout)
            failures += not ok
            print(f"{'ok  ' if ok else 'FAIL'} {dt:8} B{B} Sq{Sq} Sk{Sk} H{Hq}/{Hkv} D{D}/{Dv} "
                  f"{'causal-' + align[:3] if causal else 'full':10} {layout:7} err {err:.2e} naive {errn:.2e} "
                  f"lse {lerr:.1e} nan={nan} det={same} ({time.perf_counter() - t0:.1f}s)", flush=True)
    return failures


def tile_label(tile):
    """A column name that tells apart every field of a forward tile."""
    return (f"cuflash {tile.block_m}x{tile.block_n}w{tile.warps}s{tile.stages}b{tile.min_blocks}r{tile.max_regs}"
            + ("q" if tile.split_q else ""))


def sdpa_ms(torch, F, sdpa_kernel, backend, tq, tk, tv, causal):
    """Median time of one SDPA call on the given backend, with torch's CUDA events."""
    with sdpa_kernel([backend]):
        F.scaled_dot_product_attention(tq, tk, tv, is_causal=causal)
        ts = []
        for _ in range(20):
            e0 = torch.cuda.Event(enable_timing=True)
            e1 = torch.cuda.Event(enable_timing=True)
            e0.record()
            F.scaled_dot_product_attention(tq, tk, tv, is_causal=causal)
            e1.record()
            e1.synchronize()
            ts.append(e0.elapsed_time(e1))
    return float(np.median(ts))


def bench_shape(dt, d, n, causal, alternatives):
    """One row: TF/s of the table's tile, of the alternatives and of SDPA for one shape. The
    operands are locals, freed when the row is done."""
    try:
        import torch
        import torch.nn.functional as F
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:
        torch = None
    h, b = 2048 // d, max(1, 16384 // n)
    dtype = DTYPES[dt]
    q, k, v = (randn((b, n, h, d), dtype) for _ in range(3))
    p = check_forward(q, k, v, causal=causal, causal_alignment="bottom_right", scale=None, backend="cuda")
    out = cp.empty((b, n, h, d), dtype)
    lse = cp.empty((b, h, n), np.float32)
    flops = 4 * b * h * n * n * d / (2 if causal else 1)
    kind = "float32" if dt == "float32" else "16bit"
    chosen, bucket, _ = forward.choose_tile(p)
    extra = alternatives.get((kind, bucket), []) if alternatives else []
    row = {"dtype": dt, "d": d, "n": n, "causal": causal}
    for tile in [chosen] + [t for t in extra if t != chosen]:
        try:
            ms = median_ms(lambda: forward.flash_forward(q, k, v, None, out, lse, p, tile))
            row[tile_label(tile)] = flops / ms / 1e9
        except Exception as exc:
            row[tile_label(tile)] = f"err {str(exc)[:60]}"
    if torch is not None:
        tdt = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[dt]
        tq, tk, tv = (torch.randn(b, h, n, d, device="cuda", dtype=tdt) for _ in range(3))
        backends = {"float32": [("efficient", SDPBackend.EFFICIENT_ATTENTION)]}.get(
            dt, [("flash", SDPBackend.FLASH_ATTENTION), ("cudnn", SDPBackend.CUDNN_ATTENTION)])
        for name, backend in backends:
            try:
                row[f"sdpa-{name}"] = flops / sdpa_ms(torch, F, sdpa_kernel, backend, tq, tk, tv, causal) / 1e9
            except Exception as exc:
                row[f"sdpa-{name}"] = f"err {str(exc)[:40]}"
    return row


def bench(alternatives, dtypes=("bfloat16",), dims=(64, 128), ns=(2048, 8192)):
    """Rows of ``bench_shape`` over the shapes (B * N = 16k tokens, H * D = 2048); ``alternatives``:
    VARIANTS, or None for the table's tiles alone."""
    rows = []
    for dt in dtypes:
        for d in dims:
            for n in ns:
                for causal in (False, True):
                    row = bench_shape(dt, d, n, causal, alternatives)
                    rows.append(row)
                    print(row, flush=True)
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--no-check", action="store_true", help="skip the correctness cases")
    ap.add_argument("--no-time", action="store_true", help="skip the timings")
    ap.add_argument("--variants", action="store_true", help="also time the alternative tiles of VARIANTS")
    ap.add_argument("--dtypes", default="float16,bfloat16,float32", help="dtypes of the correctness cases")
    ap.add_argument("--dims", default="64,128", help="head dims timed at N = 2k and 8k")
    ap.add_argument("--long-dims", default="256", help="head dims timed at N = 8k only")
    args = ap.parse_args()
    print(runtime.gpu_available()[1], flush=True)
    failures = 0 if args.no_check else check(args.dtypes.split(","))
    rows = []
    if not args.no_time:
        alternatives = VARIANTS if args.variants else None
        dims = [int(x) for x in args.dims.split(",") if x]
        long_dims = [int(x) for x in args.long_dims.split(",") if x]
        rows = bench(alternatives, dims=dims) if dims else []
        rows += bench(alternatives, dims=long_dims, ns=(8192,)) if long_dims else []
        rows += bench(alternatives, dtypes=("float32",), dims=(128,), ns=(8192,))
    print(f"\ncorrectness failures: {failures}")
    for r in rows:
        cells = " ".join(f"{k}={v:.0f}" if isinstance(v, float) else f"{k}={v}" for k, v in r.items()
                         if k not in ("dtype", "d", "n", "causal"))
        print(f"{r['dtype'][:4]} d{r['d']} n{r['n']} {'C' if r['causal'] else 'F'}: {cells}")


if __name__ == "__main__":
    main()
