"""Sliding window, softcap and ALiBi: cuflash beside torch's FlexAttention (compiled) and SDPA.

    python bench/bench_features.py [--d 128] [--ns 8192,16384,32768] [--flex-ns 8192] [--dtype bfloat16]
                                   [--json FILE]

Rows: causal sliding windows (left = 256, 1024, 4096), softcap 30 (causal and not), ALiBi (causal
and not), and plain causal for reference; forward and backward. TF/s count the visible area only:
4·D·(visible (query, key) pairs)·B·H for the forward, 2.5× that for the backward, so a window's
figure is comparable with full attention's. B·N = 16k tokens (at least one sequence), H·D = 2048.
FlexAttention runs as ``torch.compile(flex_attention)`` with a block mask (windows, causal) and a
score_mod (softcap, ALiBi); it is skipped with a note where torch or flex_attention is missing.
Times are medians of CUDA-event timings after a warm-up (bench_attention.median_ms).
"""

import argparse
import json
import math
import sys
from pathlib import Path

import cupy as cp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import cuflash  # noqa: E402
from cuflash._mask import MaskSpec  # noqa: E402
from bench_attention import NP_DTYPES, median_ms  # noqa: E402

try:
    import torch
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    # Every row compiles flex_attention anew (its own mask and score_mod); past Dynamo's default
    # limit of 8 compiled versions of one function it falls back to the unfused eager path.
    torch._dynamo.config.cache_size_limit = 256
    torch._dynamo.config.accumulated_cache_size_limit = 1024
except ImportError:  # the FlexAttention columns are left out
    torch = None


def visible_pairs(n, left, right):
    """Visible (query, key) pairs of an n x n band (MaskSpec's rule, summed in closed form per row)."""
    spec = MaskSpec(n, n, 0, left, right)
    i = np.arange(n, dtype=np.int64)
    lo = np.clip(i - (n if left is None else left), 0, n)
    hi = np.clip(i + (n if right is None else right) + 1, 0, n)
    pairs = int(np.maximum(hi - lo, 0).sum())
    assert n > 256 or pairs == int(spec.matrix().sum())
    return pairs


ROWS = [
    # (name, options for cuflash, window (left, right) for the pair count)
    ("causal", dict(causal=True), (None, 0)),
    ("window 256", dict(causal=True, window=(256, 0)), (256, 0)),
    ("window 1024", dict(causal=True, window=(1024, 0)), (1024, 0)),
    ("window 4096", dict(causal=True, window=(4096, 0)), (4096, 0)),
    ("softcap 30", dict(softcap=30.0), (None, None)),
    ("softcap 30 causal", dict(causal=True, softcap=30.0), (None, 0)),
    ("alibi", dict(alibi=True), (None, None)),
    ("alibi causal", dict(causal=True, alibi=True), (None, 0)),
]


def flex_call(name, opts, tq, tk, tv, slopes_t):
    """A compiled FlexAttention forward for one row, or None."""
    n = tq.shape[2]
    left, right = opts["window"] if "window" in opts else (None, 0 if opts.get("causal") else None)

    def mask_mod(b, h, q_idx, kv_idx):
        keep = q_idx >= 0
        if right is not None:
            keep = keep & (kv_idx <= q_idx + right)
        if left is not None:
            keep = keep & (kv_idx >= q_idx - left)
        return keep

    block_mask = None
    if left is not None or right is not None:
        block_mask = create_block_mask(mask_mod, None, None, n, n, device="cuda")
    score_mod = None
    if opts.get("softcap"):
        cap = opts["softcap"]

        def score_mod(score, b, h, q_idx, kv_idx):
            return cap * torch.tanh(score / cap)
    elif opts.get("alibi"):
        def score_mod(score, b, h, q_idx, kv_idx):
            return score - slopes_t[h] * (q_idx - kv_idx).abs()
    compiled = torch.compile(flex_attention)
    return lambda: compiled(tq, tk, tv, score_mod=score_mod, block_mask=block_mask)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--d", type=int, default=128)
    ap.add_argument("--ns", default="8192,16384,32768", type=lambda s: [int(x) for x in s.split(",")])
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--rows", default=",".join(r[0] for r in ROWS), type=lambda s: s.split(","))
    ap.add_argument("--flex-ns", default=None, type=lambda s: [int(x) for x in s.split(",")],
                    help="sequence lengths at which FlexAttention runs too (each row compiles it; default: all)")
    ap.add_argument("--json")
    args = ap.parse_args()
    d, dtype = args.d, NP_DTYPES[args.dtype]
    h = 2048 // d
    table = []
    for n in args.ns:
        b = max(1, 16384 // n)
        rng = cp.random.default_rng(n)
        q, k, v, do = (rng.standard_normal((b, n, h, d), dtype=np.float32).astype(dtype) for _ in range(4))
        slopes = cp.asarray(2.0 ** (-8.0 * (np.arange(h) + 1) / h), dtype=np.float32)
        tq = tk = tv = tdo = slopes_t = None
        if torch is not None:
            def view(x):
                if x.dtype == NP_DTYPES["bfloat16"]:
                    return torch.from_dlpack(x.view(cp.uint16)).view(torch.bfloat16).transpose(1, 2)
                return torch.from_dlpack(x).transpose(1, 2)
            tq, tk, tv, tdo = (view(x) for x in (q, k, v, do))
            slopes_t = torch.from_dlpack(slopes)
        for name, opts, (left, right) in ROWS:
            if name not in args.rows:
                continue
            options = {key: val for key, val in opts.items() if key != "alibi"}
            if opts.get("alibi"):
                options["alibi_slopes"] = slopes
            fl = 4 * d * visible_pairs(n, left, right) * b * h
            row = dict(name=name, n=n, d=d, dtype=args.dtype)
            out, lse = cuflash.attention(q, k, v, return_lse=True, **options)
            row["cuflash_fwd"] = fl / median_ms(lambda: cuflash.attention(q, k, v, **options)) / 1e9
            row["cuflash_bwd"] = 2.5 * fl / median_ms(
                lambda: cuflash.attention_backward(do, q, k, v, out, lse, **options)) / 1e9
            if torch is not None and (args.flex_ns is None or n in args.flex_ns):
                try:
                    f = flex_call(name, opts, tq, tk, tv, slopes_t)
                    row["flex_fwd"] = fl / median_ms(f) / 1e9
                    tqg, tkg, tvg = (x.detach().requires_grad_() for x in (tq, tk, tv))
                    g = flex_call(name, opts, tqg, tkg, tvg, slopes_t)
                    # The compiled backward donates its buffers, so it runs once per forward: time
                    # forward + backward and subtract the forward.
                    both = median_ms(lambda: torch.autograd.grad(g(), (tqg, tkg, tvg), tdo))
                    row["flex_bwd"] = 2.5 * fl / (both - fl / row["flex_fwd"] / 1e9) / 1e9
                except Exception as exc:  # FlexAttention missing or failing for this row
                    row["flex_note"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:100]}"
            for mode in ("fwd", "bwd"):
                if row.get(f"flex_{mode}"):
                    row[f"ratio_{mode}"] = row[f"cuflash_{mode}"] / row[f"flex_{mode}"]
            print(row, flush=True)
            table.append(row)
        del q, k, v, do, out, lse
        cp.get_default_memory_pool().free_all_blocks()
        if torch is not None:
            torch.cuda.empty_cache()
    if args.json:
        device = cp.cuda.runtime.getDeviceProperties(0)["name"].decode()
        Path(args.json).write_text(json.dumps({"device": device, "rows": table}, indent=1))
    print(f"\nTF/s on visible FLOPs, d={d} {args.dtype}; ratio = cuflash / FlexAttention")
    print(f"{'row':20}{'N':>7}{'fwd':>8}{'flex':>8}{'ratio':>7}{'bwd':>8}{'flex':>8}{'ratio':>7}")
    for r in table:
        cells = [r.get(k) for k in ("cuflash_fwd", "flex_fwd", "ratio_fwd", "cuflash_bwd", "flex_bwd", "ratio_bwd")]
        text = "".join(f"{c:8.1f}" if i % 3 != 2 and c is not None else (f"{c:7.2f}" if c is not None else f"{'-':>8}")
                       for i, c in enumerate(cells))
        print(f"{r['name']:20}{r['n']:7}{text}  {r.get('flex_note', '')}")


if __name__ == "__main__":
    main()
