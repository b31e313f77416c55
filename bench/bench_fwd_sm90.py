"""Forward speed of the sm_90a kernel (kernels/fwd_sm90.cu) beside the mma.sync kernel and SDPA.

    python bench/bench_fwd_sm90.py [--quick] [--json PATH] [--dtypes bfloat16,float16] [--dims 64,128,256]
                                   [--ns 2048,4096,8192,16384]

Shapes follow the FlashAttention papers: B * N = 16k tokens, H * D = 2048; causal and not. FLOPs
4 * B * H * N^2 * D, halved when causal. Columns (TF/s, medians of CUDA-event timings after a
warm-up, bench_attention.median_ms): cuflash with CUFLASH_SM90_FORWARD=1 ("sm90"; rows the kernel
does not serve, d = 256, run the mma.sync kernel and say so), cuflash without it ("sm80"), and
torch SDPA's cuDNN and FlashAttention-2 backends where torch imports. "max |diff|" is the largest
difference between the two cuflash outputs (both obey the accuracy rule; a large value means one
of them is wrong). Needs a GPU of compute capability 9.0 for the sm90 column.
"""

import argparse
import json
import os
import sys
from pathlib import Path

import cupy as cp

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import cuflash  # noqa: E402
from bench_attention import NP_DTYPES, flops, median_ms  # noqa: E402
from cuflash._cuda import forward_sm90  # noqa: E402

try:
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel
except ImportError:  # the SDPA columns are left out
    torch = None

TOKENS = 16384
HIDDEN = 2048


def torch_bhsd(x):
    """A zero-copy torch (B, H, S, D) view of a CuPy BSHD array (bfloat16 through its bit pattern)."""
    t = torch.from_dlpack(x.view(cp.uint16)).view(torch.bfloat16) if x.dtype == NP_DTYPES["bfloat16"] \
        else torch.from_dlpack(x)
    return t.transpose(1, 2)


def sdpa(backend, q, k, v, causal):
    tq, tk, tv = (torch_bhsd(x) for x in (q, k, v))
    which = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION}[backend]

    def call():
        with sdpa_kernel([which]):
            return F.scaled_dot_product_attention(tq, tk, tv, is_causal=causal)

    return call


def cuflash_call(q, k, v, causal, sm90):
    def call():
        if sm90:
            os.environ[forward_sm90.ENV_FLAG] = "1"
        else:
            os.environ.pop(forward_sm90.ENV_FLAG, None)
        return cuflash.attention(q, k, v, causal=causal, backend="cuda")

    return call


def row(dtype_name, d, n, causal):
    b, h = TOKENS // n, HIDDEN // d
    rng = cp.random.default_rng(n + d)
    q, k, v = (rng.standard_normal((b, n, h, d), dtype=cp.float32).astype(NP_DTYPES[dtype_name]) for _ in range(3))
    problem = forward_sm90_problem(q, k, v, causal)
    os.environ[forward_sm90.ENV_FLAG] = "1"
    served, reason = forward_sm90.route(problem, q, k, v)
    out_new = cuflash_call(q, k, v, causal, True)()
    out_old = cuflash_call(q, k, v, causal, False)()
    diff = float(cp.abs(out_new.astype(cp.float32) - out_old.astype(cp.float32)).max())
    f = flops(b, h, n, d, causal, "fwd")
    result = {"dtype": dtype_name, "d": d, "n": n, "b": b, "h": h, "causal": causal, "sm90_served": served,
              "sm90_reason": reason, "max_abs_diff": diff}
    calls = {"sm90": cuflash_call(q, k, v, causal, True), "sm80": cuflash_call(q, k, v, causal, False)}
    if torch is not None:
        calls.update(cudnn=sdpa("cudnn", q, k, v, causal), flash=sdpa("flash", q, k, v, causal))
    for name, call in calls.items():
        try:
            ms = median_ms(call)
            result[f"{name}_ms"], result[f"{name}_tflops"] = ms, f / ms / 1e9
        except Exception as exc:  # an SDPA backend refusing a shape is a missing column, not a failure
            result[f"{name}_error"] = f"{type(exc).__name__}: {str(exc)[:200]}"
    os.environ.pop(forward_sm90.ENV_FLAG, None)
    return result


def forward_sm90_problem(q, k, v, causal):
    from cuflash._problem import check_forward

    return check_forward(q, k, v, causal=causal, causal_alignment="bottom_right", scale=None, backend="cuda")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="d = 128, N = 2k and 8k only")
    ap.add_argument("--json", default=None)
    ap.add_argument("--dtypes", default="bfloat16,float16", type=lambda s: s.split(","))
    ap.add_argument("--dims", default="64,128,256", type=lambda s: [int(x) for x in s.split(",")])
    ap.add_argument("--ns", default="2048,4096,8192,16384", type=lambda s: [int(x) for x in s.split(",")])
    args = ap.parse_args()
    dims, ns = ([128], [2048, 8192]) if args.quick else (args.dims, args.ns)
    rows = []
    for dtype_name in args.dtypes:
        for d in dims:
            for n in ns:
                for causal in (False, True):
                    rows.append(row(dtype_name, d, n, causal))
                    print(json.dumps(rows[-1]), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"device": cp.cuda.runtime.getDeviceProperties(0)["name"].decode(),
                                               "rows": rows}, indent=1))
    cols = ["sm90", "sm80", "cudnn", "flash"]
    print(f"\n{'dtype':9} {'d':>4} {'N':>6} {'causal':>6} " + " ".join(f"{c:>7}" for c in cols)
          + f" {'sm90/cuDNN':>10} {'max|diff|':>10}  (TF/s)")
    for r in rows:
        vals = [r.get(f"{c}_tflops") for c in cols]
        ratio = r["sm90_tflops"] / r["cudnn_tflops"] if r.get("sm90_tflops") and r.get("cudnn_tflops") else None
        note = "" if r["sm90_served"] else f"  sm90 not served: {r['sm90_reason']}"
        print(f"{r['dtype']:9} {r['d']:>4} {r['n']:>6} {str(r['causal']):>6} "
              + " ".join(f"{v:7.1f}" if v else f"{'-':>7}" for v in vals)
              + (f" {ratio:10.2f}" if ratio else f" {'-':>10}") + f" {r['max_abs_diff']:10.2e}" + note)


if __name__ == "__main__":
    main()
