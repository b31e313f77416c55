"""Attention benchmark: cuflash beside PyTorch SDPA (flash, cuDNN, mem-efficient) and naive CuPy.

    python bench/bench_attention.py [--quick] [--out DIR] [--dtypes bfloat16,float16,float32]
                                    [--dims 64,128,256] [--ns 512,...,16384] [--modes fwd,bwd,fwdbwd]
    python bench/bench_attention.py --plot bench/results/forward_h200.json

Shapes follow the FlashAttention papers: B * N = 16k tokens, H * D = 2048, N = 512 .. 16k.
FLOPs: forward 4 * B * H * N^2 * D, halved when causal; backward 2.5x, forward+backward 3.5x.
Each row also carries the max error against float64 of cuflash and of the SDPA backend beside it:
of out on 256 query rows of two heads, and of dq, dk, dv on the whole of one head (a float64
reference of the whole problem would not fit).
Times are medians of CUDA-event timings after a warm-up. torch is optional: without it only
cuflash and naive CuPy run. Backward rows go through ``cuflash.attention_backward`` and are
skipped with a note while it raises NotImplementedError.

Writes ``bench_attention.json`` (every number) and, if matplotlib imports, ``bench_attention.png``
(TF/s against N) to --out, and prints a table last. Also measured: peak extra device memory of one
call against N, and the first-call latency of a fresh process with an empty kernel cache (cold)
and with the cache filled (warm).
"""

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import cupy as cp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import cuflash  # noqa: E402

try:
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel
except ImportError:  # the comparison columns are left out
    torch = None

try:
    import ml_dtypes

    BF16 = np.dtype(ml_dtypes.bfloat16)
except ImportError:
    BF16 = None

NP_DTYPES = {"float16": np.dtype(np.float16), "bfloat16": BF16, "float32": np.dtype(np.float32)}
TOKENS = 16384
HIDDEN = 2048
ERROR_ROWS = 256
ERROR_HEADS = 2


def flops(b, h, n, d, causal, mode):
    f = 4 * b * h * n * n * d / (2 if causal else 1)
    return f * {"fwd": 1.0, "bwd": 2.5, "fwdbwd": 3.5}[mode]


def median_ms(fn, warmup=3, iters=20, budget_s=3.0):
    """Median time of ``fn`` with CUDA events on the current stream (fewer iterations if slow)."""
    for _ in range(warmup):
        fn()
    cp.cuda.Device().synchronize()
    start, end = cp.cuda.Event(), cp.cuda.Event()
    times = []
    t0 = time.perf_counter()
    for _ in range(iters):
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(cp.cuda.get_elapsed_time(start, end))
        if time.perf_counter() - t0 > budget_s and len(times) >= 3:
            break
    return float(np.median(times))


def causal_mask(n, rows=None):
    """The (rows, n) causal mask of an n x n problem as a CuPy array, from MaskSpec (rows: all)."""
    from cuflash._mask import MaskSpec

    rows = np.arange(n)[:, None] if rows is None else rows
    return cp.asarray(MaskSpec(n, n, 0, None, 0).visible(rows, np.arange(n)[None, :]))


def reference_rows(q, k, v, causal):
    """float64 (out rows) for the first ERROR_ROWS queries of the first ERROR_HEADS heads of batch 0."""
    n = q.shape[1]
    rows = min(ERROR_ROWS, n)
    # Spread the sampled rows over the sequence so causal rows of every length are covered.
    idx = cp.linspace(0, n - 1, rows).astype(cp.int64)
    out = []
    for h in range(min(ERROR_HEADS, q.shape[2])):
        Q = q[0, idx, h].astype(cp.float64)
        K = k[0, :, h].astype(cp.float64)
        V = v[0, :, h].astype(cp.float64)
        S = (Q @ K.T) / math.sqrt(q.shape[3])
        if causal:
            S = cp.where(causal_mask(n, idx.get()[:, None]), S, -cp.inf)
        S -= S.max(axis=1, keepdims=True)
        P = cp.exp(S)
        P /= P.sum(axis=1, keepdims=True)
        out.append(P @ V)
    return idx, cp.stack(out, axis=1)  # (rows, heads, D)


def reference_grads(q, k, v, do, causal):
    """float64 (dq, dk, dv) of batch 0, head 0, each (N, D): the whole N x N problem of one head."""
    Q, K, V, dO = (x[0, :, 0].astype(cp.float64) for x in (q, k, v, do))
    n, scale = q.shape[1], 1.0 / math.sqrt(q.shape[3])
    S = (Q @ K.T) * scale
    if causal:
        S = cp.where(causal_mask(n), S, -cp.inf)
    S -= S.max(axis=1, keepdims=True)
    P = cp.exp(S)
    P /= P.sum(axis=1, keepdims=True)
    dV = P.T @ dO
    dP = dO @ V.T
    dS = P * (dP - (P * dP).sum(axis=1, keepdims=True))
    del S, dP
    grads = (scale * (dS @ K), scale * (dS.T @ Q), dV)
    del P, dS
    cp.get_default_memory_pool().free_all_blocks()
    return grads


def grad_errors(grads, ref):
    """max |g - float64| of dq, dk, dv on batch 0, head 0 (grads as CuPy arrays, BSHD)."""
    return [float(cp.abs(g[0, :, 0].astype(cp.float64) - r).max()) for g, r in zip(grads, ref)]


def row_error(out, idx, ref):
    heads = ref.shape[1]
    return float(cp.abs(out[0, idx, :heads].astype(cp.float64) - ref).max())


def torch_view(x):
    """A zero-copy torch tensor of a CuPy array (bfloat16 goes through its 16-bit pattern)."""
    if x.dtype == BF16:
        return torch.from_dlpack(x.view(cp.uint16)).view(torch.bfloat16)
    return torch.from_dlpack(x)


def cupy_view(t):
    """A CuPy float32 copy of a torch tensor."""
    return cp.from_dlpack(t.float().contiguous())


def sdpa_call(name, tq, tk, tv, causal):
    backend = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
               "efficient": SDPBackend.EFFICIENT_ATTENTION}[name]

    def f():
        with sdpa_kernel([backend]):
            return F.scaled_dot_product_attention(tq, tk, tv, is_causal=causal)

    return f


def naive_cupy(q, k, v, causal):
    """softmax(Q K^T / sqrt(D)) V with CuPy matmuls (materializes S): the plain-framework baseline."""
    Q, K, V = (x.transpose(0, 2, 1, 3) for x in (q, k, v))
    S = (Q @ K.transpose(0, 1, 3, 2)).astype(cp.float32) * (1.0 / math.sqrt(q.shape[3]))
    if causal:
        S = cp.where(causal_mask(q.shape[1]), S, -cp.inf)
    S -= S.max(axis=-1, keepdims=True)
    P = cp.exp(S)
    P /= P.sum(axis=-1, keepdims=True)
    return (P.astype(q.dtype) @ V).transpose(0, 2, 1, 3)


def bench_row(dtype_name, d, n, causal, modes, with_naive):
    dtype = NP_DTYPES[dtype_name]
    h, b = HIDDEN // d, max(1, TOKENS // n)
    rng = cp.random.default_rng(n + d)
    q, k, v, do = (rng.standard_normal((b, n, h, d), dtype=np.float32).astype(dtype) for _ in range(4))
    row = dict(dtype=dtype_name, d=d, n=n, b=b, h=h, causal=causal)
    ref_idx, ref = reference_rows(q, k, v, causal)
    sdpa_names = (["efficient"] if dtype_name == "float32" else ["flash", "cudnn"]) if torch is not None else []
    tq = tk = tv = tdo = None
    if torch is not None:
        # SDPA takes (B, H, S, D); transposed views of the same BSHD memory.
        tq, tk, tv, tdo = (torch_view(x).transpose(1, 2) for x in (q, k, v, do))

    if "fwd" in modes:
        f = lambda: cuflash.attention(q, k, v, causal=causal)
        row["cuflash_fwd"] = flops(b, h, n, d, causal, "fwd") / median_ms(f) / 1e9
        row["cuflash_err"] = row_error(f(), ref_idx, ref)
        for name in sdpa_names:
            try:
                g = sdpa_call(name, tq, tk, tv, causal)
                row[f"{name}_fwd"] = flops(b, h, n, d, causal, "fwd") / median_ms(g) / 1e9
                row[f"{name}_err"] = row_error(cupy_view(g().transpose(1, 2)), ref_idx, ref)
            except Exception as exc:  # backend unavailable for this shape/dtype
                row[f"{name}_fwd"] = None
                row[f"{name}_note"] = str(exc).splitlines()[0][:80]
        if with_naive and dtype_name == "float16":
            need = b * h * n * n * (2 + 4 + 4 + 2)  # S in fp16, f32 copy, P, P in fp16
            if need < 0.4 * cp.cuda.Device().mem_info[0]:
                g = lambda: naive_cupy(q, k, v, causal)
                row["naive_fwd"] = flops(b, h, n, d, causal, "fwd") / median_ms(g, warmup=1, iters=3) / 1e9
                row["naive_err"] = row_error(g(), ref_idx, ref)
            cp.get_default_memory_pool().free_all_blocks()

    if "bwd" in modes or "fwdbwd" in modes:
        ref_grads = reference_grads(q, k, v, do, causal)
        try:
            out, lse = cuflash.attention(q, k, v, causal=causal, return_lse=True)
            bwd = lambda: cuflash.attention_backward(do, q, k, v, out, lse, causal=causal)
            row["cuflash_dq_err"], row["cuflash_dk_err"], row["cuflash_dv_err"] = grad_errors(bwd(), ref_grads)
            if "bwd" in modes:
                row["cuflash_bwd"] = flops(b, h, n, d, causal, "bwd") / median_ms(bwd) / 1e9
            if "fwdbwd" in modes:
                def both():
                    o, l = cuflash.attention(q, k, v, causal=causal, return_lse=True)
                    return cuflash.attention_backward(do, q, k, v, o, l, causal=causal)
                row["cuflash_fwdbwd"] = flops(b, h, n, d, causal, "fwdbwd") / median_ms(both) / 1e9
        except NotImplementedError as exc:
            row["cuflash_bwd_note"] = f"backward not available: {str(exc)[:60]}"
        for name in sdpa_names:
            try:
                gq, gk, gv = (x.detach().clone().requires_grad_(True) for x in (tq, tk, tv))
                with sdpa_kernel([{"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
                                   "efficient": SDPBackend.EFFICIENT_ATTENTION}[name]]):
                    o = F.scaled_dot_product_attention(gq, gk, gv, is_causal=causal)
                    g = lambda: torch.autograd.grad(o, (gq, gk, gv), tdo, retain_graph=True)
                    row[f"{name}_bwd"] = flops(b, h, n, d, causal, "bwd") / median_ms(g) / 1e9
                    sdpa_grads = [cupy_view(x.transpose(1, 2)) for x in g()]
                    errs = grad_errors(sdpa_grads, ref_grads)
                    row[f"{name}_dq_err"], row[f"{name}_dk_err"], row[f"{name}_dv_err"] = errs
                    if "fwdbwd" in modes:
                        def sdpa_both():
                            o2 = F.scaled_dot_product_attention(gq, gk, gv, is_causal=causal)
                            return torch.autograd.grad(o2, (gq, gk, gv), tdo)
                        row[f"{name}_fwdbwd"] = flops(b, h, n, d, causal, "fwdbwd") / median_ms(sdpa_both) / 1e9
                del gq, gk, gv, o
            except Exception as exc:
                row[f"{name}_bwd"] = None
                row[f"{name}_bwd_note"] = str(exc).splitlines()[0][:80]
        del ref_grads
    del q, k, v, do, tq, tk, tv, tdo
    cp.get_default_memory_pool().free_all_blocks()
    return row


def peak_memory(ns, d=128, dtype_name="bfloat16"):
    """Device memory of one causal call against N (B = 1, H = 2048 / d), from CuPy's pool.

    The pool keeps every block it has allocated, so its size after the calls bounds the peak of
    live bytes from above. ``fwd_extra_bytes``: the forward beyond its inputs (out + lse expected).
    ``fwdbwd_total_bytes``: everything held for forward + backward, inputs (q, k, v, dout)
    included, comparable with ``sdpa_flash_peak_bytes``, torch's peak for SDPA flash forward +
    backward of the same problem (q, k, v requiring grad, ``out.sum().backward()``).
    """
    rows = []
    dtype = NP_DTYPES[dtype_name]
    pool = cp.get_default_memory_pool()
    h = HIDDEN // d
    for n in ns:
        rng = cp.random.default_rng(n)
        q, k, v, do = (rng.standard_normal((1, n, h, d), dtype=np.float32).astype(dtype) for _ in range(4))
        cp.cuda.Device().synchronize()
        pool.free_all_blocks()
        inputs = pool.total_bytes()
        out, lse = cuflash.attention(q, k, v, causal=True, return_lse=True)
        cp.cuda.Device().synchronize()
        row = dict(n=n, h=h, d=d, fwd_extra_bytes=int(pool.total_bytes() - inputs),
                   out_lse_bytes=int(out.nbytes + lse.nbytes))
        grads = cuflash.attention_backward(do, q, k, v, out, lse, causal=True)
        cp.cuda.Device().synchronize()
        row["fwdbwd_total_bytes"] = int(pool.total_bytes())
        del q, k, v, do, out, lse, grads
        pool.free_all_blocks()
        if torch is not None:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            tdt = torch.bfloat16 if dtype_name == "bfloat16" else getattr(torch, dtype_name)
            tq, tk, tv = (torch.randn(1, h, n, d, device="cuda", dtype=tdt, requires_grad=True) for _ in range(3))
            with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
                F.scaled_dot_product_attention(tq, tk, tv, is_causal=True).sum().backward()
            torch.cuda.synchronize()
            row["sdpa_flash_peak_bytes"] = int(torch.cuda.max_memory_allocated())
            del tq, tk, tv
            torch.cuda.empty_cache()
        rows.append(row)
    return rows


_LATENCY_SNIPPET = """
import time, cupy as cp, numpy as np, cuflash
q = cp.random.standard_normal((1, 1024, 16, 128), dtype=np.float32).astype(np.float16)
cp.cuda.Device().synchronize()
t0 = time.perf_counter()
cuflash.attention(q, q, q, causal=True)
cp.cuda.Device().synchronize()
print(time.perf_counter() - t0)
"""


def first_call_latency():
    """Seconds of the first call in a fresh process: empty kernel cache, then the filled one."""
    with tempfile.TemporaryDirectory() as cache:
        env = dict(os.environ, CUPY_CACHE_DIR=cache, PYTHONPATH=str(Path(__file__).resolve().parent.parent))
        runs = []
        for _ in range(2):
            res = subprocess.run([sys.executable, "-c", _LATENCY_SNIPPET], env=env, capture_output=True, text=True)
            runs.append(float(res.stdout.strip().splitlines()[-1]) if res.returncode == 0 else None)
    return {"cold_s": runs[0], "warm_s": runs[1]}


COLORS = {"cuflash": "tab:blue", "flash": "tab:orange", "cudnn": "tab:green", "efficient": "tab:purple",
          "naive": "tab:red"}


def plot(rows, path):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    dtypes = sorted({r["dtype"] for r in rows})
    columns = sorted({(r["d"], r["causal"]) for r in rows})
    fig, axes = plt.subplots(len(dtypes), len(columns), figsize=(3.2 * len(columns), 2.8 * len(dtypes)),
                             squeeze=False)
    for i, dt in enumerate(dtypes):
        for j, (d, causal) in enumerate(columns):
            ax = axes[i][j]
            sel = sorted((r for r in rows if (r["dtype"], r["d"], r["causal"]) == (dt, d, causal)),
                         key=lambda r: r["n"])
            for key in ("cuflash_fwd", "flash_fwd", "cudnn_fwd", "efficient_fwd", "naive_fwd",
                        "cuflash_bwd", "flash_bwd", "cudnn_bwd", "efficient_bwd"):
                pts = [(r["n"], r[key]) for r in sel if r.get(key)]
                if pts:
                    ax.plot(*zip(*pts), marker="o" if key.endswith("_fwd") else "s", markersize=3,
                            linestyle="-" if key.endswith("_fwd") else "--", color=COLORS[key.split("_")[0]],
                            label=key.replace("_fwd", "").replace("_bwd", " bwd"))
            ax.set_xscale("log", base=2)
            ax.set_title(f"{dt} d={d} {'causal' if causal else 'full'}", fontsize=9)
            ax.set_xlabel("N", fontsize=8)
            ax.set_ylabel("TF/s", fontsize=8)
            ax.tick_params(labelsize=7)
            if sel:
                ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return True


def fmt(x, spec):
    return "-" if x is None else format(x, spec)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="bf16 and fp32, d=64/128, N=2k/8k, forward only")
    ap.add_argument("--out", default=os.environ.get("OUT", "bench/results"))
    ap.add_argument("--dtypes", default="bfloat16,float16,float32")
    ap.add_argument("--dims", default="64,128,256")
    ap.add_argument("--ns", default="512,1024,2048,4096,8192,16384")
    ap.add_argument("--modes", default="fwd,bwd,fwdbwd")
    ap.add_argument("--no-naive", action="store_true")
    ap.add_argument("--no-extras", action="store_true", help="skip the memory and latency measurements")
    ap.add_argument("--memory-ns", default="4096,16384,65536,131072", help="N of the memory rows (bf16, d=128, H=16)")
    ap.add_argument("--plot", metavar="JSON", help="only redraw the PNG of a results file, beside it")
    args = ap.parse_args()
    if args.plot:
        path = Path(args.plot)
        ok = plot(json.loads(path.read_text())["rows"], path.with_suffix(".png"))
        print(f"wrote {path.with_suffix('.png')}" if ok else "matplotlib is not importable")
        return
    if args.quick:
        args.dtypes, args.dims, args.ns, args.modes = "bfloat16,float32", "64,128", "2048,8192", "fwd"
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    props = cp.cuda.runtime.getDeviceProperties(cp.cuda.Device().id)
    device = props["name"].decode() if isinstance(props["name"], bytes) else props["name"]
    meta = dict(device=device, cupy=cp.__version__, torch=None if torch is None else torch.__version__,
                argv=sys.argv[1:], time=time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()))
    print(meta, flush=True)

    rows = []
    modes = args.modes.split(",")
    for dt in args.dtypes.split(","):
        for d in map(int, args.dims.split(",")):
            if dt == "float32" and d == 256 and args.quick:
                continue
            for n in map(int, args.ns.split(",")):
                for causal in (False, True):
                    row = bench_row(dt, d, n, causal, modes, not args.no_naive)
                    rows.append(row)
                    print(json.dumps(row), flush=True)
    extras = {}
    if not args.no_extras:
        extras["peak_memory"] = peak_memory([int(n) for n in args.memory_ns.split(",")])
        extras["first_call_latency"] = first_call_latency()
    result = dict(meta=meta, rows=rows, **extras)
    (out_dir / "bench_attention.json").write_text(json.dumps(result, indent=1))
    plotted = plot(rows, out_dir / "bench_attention.png")

    print(f"\n{device}; TF/s (FLOPs 4BHN^2D, /2 causal; bwd x2.5); err = max |out - float64| on sampled rows")
    print(f"{'dtype':8} {'d':>3} {'N':>6} {'c':1} | {'cuflash':>7} {'flash':>6} {'cudnn':>6} {'effic':>6} "
          f"{'naive':>6} | {'ratio':>5} | {'err cufl':>8} {'err sdpa':>8} | {'bwd':>5} {'sdpa':>5} {'ratio':>5} "
          f"{'f+b':>5} {'sdpa':>5} | {'dgrad err':>9} {'sdpa':>8}")
    for r in rows:
        base = r.get("flash_fwd") or r.get("efficient_fwd")
        ratio = r["cuflash_fwd"] / base if base and r.get("cuflash_fwd") else None
        sdpa_err = r.get("flash_err", r.get("efficient_err"))
        sdpa = "efficient" if r["dtype"] == "float32" else "flash"
        bwd_base = r.get(f"{sdpa}_bwd")
        bwd_ratio = r["cuflash_bwd"] / bwd_base if bwd_base and r.get("cuflash_bwd") else None

        def grad_err(name):
            errs = [r.get(f"{name}_{g}_err") for g in ("dq", "dk", "dv")]
            return max(errs) if all(e is not None for e in errs) else None

        print(f"{r['dtype']:8} {r['d']:3} {r['n']:6} {'C' if r['causal'] else 'F'} | "
              f"{fmt(r.get('cuflash_fwd'), '7.1f')} {fmt(r.get('flash_fwd'), '6.1f')} {fmt(r.get('cudnn_fwd'), '6.1f')} "
              f"{fmt(r.get('efficient_fwd'), '6.1f')} {fmt(r.get('naive_fwd'), '6.1f')} | {fmt(ratio, '5.2f')} | "
              f"{fmt(r.get('cuflash_err'), '8.1e')} {fmt(sdpa_err, '8.1e')} | "
              f"{fmt(r.get('cuflash_bwd'), '5.0f')} {fmt(bwd_base, '5.0f')} {fmt(bwd_ratio, '5.2f')} "
              f"{fmt(r.get('cuflash_fwdbwd'), '5.0f')} {fmt(r.get(f'{sdpa}_fwdbwd'), '5.0f')} | "
              f"{fmt(grad_err('cuflash'), '9.1e')} {fmt(grad_err(sdpa), '8.1e')}")
    notes = {r.get("cuflash_bwd_note") for r in rows if r.get("cuflash_bwd_note")}
    for note in notes:
        print("note:", note)
    if extras:
        print("device memory of one causal call, bf16 d=128 H=16 B=1 (GiB): forward beyond inputs (out + lse), "
              "forward + backward in all, SDPA flash forward + backward peak")
        for m in extras["peak_memory"]:
            sdpa = m.get("sdpa_flash_peak_bytes")
            print(f"  N={m['n']:6} fwd extra={m['fwd_extra_bytes'] / 2**30:6.3f} (out+lse {m['out_lse_bytes'] / 2**30:6.3f})"
                  f"  fwd+bwd={m['fwdbwd_total_bytes'] / 2**30:6.2f}  sdpa flash={fmt(sdpa and sdpa / 2**30, '6.2f')}")
        print("first-call latency (s):", extras["first_call_latency"])
    print(f"wrote {out_dir / 'bench_attention.json'}" + (f" and {out_dir / 'bench_attention.png'}" if plotted else ""))


if __name__ == "__main__":
    main()
