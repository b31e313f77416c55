"""Backward-kernel development run: compile every instantiation in parallel, check a few shapes
against torch's float32 autograd, then time tile variants beside torch SDPA's flash backward.

    python bench/dev_backward.py [--no-time] [--variants] [--dims 64,128] [--ns 2048,8192]

Inputs follow the forward benchmark's shapes (B·N = 16k tokens, H·D = 2048). out and lse come
from torch's flash forward, so the timings cover the backward alone (preprocess, main kernels,
conversions). FLOPs: 2.5 × 4·B·H·N²·D, halved when causal. Alternatives go to the launcher's
``entry`` override (``backward.flash_backward``); one whose kernels do not build for this GPU
(the VARIANTS entries are Hopper tiles: warpgroup MMA, 227 KiB of shared memory) gets NaN cells
and a note. Prints a short table last.
"""

import argparse
import sys
from pathlib import Path

import cupy as cp

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cuflash._cuda import backward, runtime, variants  # noqa: E402
from cuflash._problem import check_forward  # noqa: E402
from bench_attention import median_ms  # noqa: E402
from prewarm import compile_all  # noqa: E402

R, E, K, W = variants.RowsTile, variants.BwdEntry, variants.KvTile, variants.WgTile
# (dtype kind, bucket) -> alternative entries to time beside the table's choice.
VARIANTS = {
    ("16bit", 64): [E(K(128, 128, 8, 4, 4, 4, kk_unroll=1), R(128, 64, 8)), E(W(64), R(128, 64, 8))],
    ("16bit", 128): [E(K(64, 128, 8, 4, 4, 2), R(128, 64, 8))],
    ("float32", 64): [E(R(32, 128, 8), R(64, 32, 8, 2))],
    ("float32", 128): [E(R(32, 64, 8, 2, split_stream=True), R(64, 32, 8, 2))],
}


def prewarm(family, alternatives):
    """Compile every instantiation of this family's tables, and the atomic dK/dV kernels of
    ``alternatives`` (VARIANTS or None), on all cores (NVRTC releases the GIL)."""
    jobs = list(variants.instantiations(family))
    for (kind, bucket), entries in (alternatives or {}).items():
        for entry in entries:
            for name in variants.dtypes_of(kind):
                jobs.append((variants.dkdv_source(entry.dkdv), variants.DKDV_KERNEL,
                             variants.dkdv_defines(entry.dkdv, bucket, name, True, 0)))
    return not compile_all(jobs)


def torch_inputs(torch, B, N, H, D, dtype, causal, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    q, k, v, do = (torch.randn(B, H, N, D, device="cuda", dtype=dtype, generator=g) for _ in range(4))
    if dtype == torch.float32:
        out, lse = torch.ops.aten._scaled_dot_product_efficient_attention(q, k, v, None, True, 0.0, causal)[:2]
        lse = lse[..., :N]  # padded to a multiple of 32 rows
    else:
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, causal, False)[:2]
    return q, k, v, do, out, lse


def problem_for(bshd, causal):
    """The checked problem of BSHD CuPy arrays (dout, q, k, v, out)."""
    return check_forward(*bshd[1:4], causal=causal, causal_alignment="bottom_right", scale=None, backend="cuda")


def profile():
    import torch

    B, N, H, D = 2, 8192, 16, 128
    q, k, v, do, out, lse = torch_inputs(torch, B, N, H, D, torch.bfloat16, False)
    bshd = [cp.from_dlpack(x.transpose(1, 2).detach()) for x in (do, q, k, v, out)]
    prob = problem_for(bshd, False)
    dq, dk, dv = (cp.empty(x.shape, dtype=x.dtype) for x in bshd[1:4])
    for deterministic in (False, True):
        backward.flash_backward(*bshd, cp.from_dlpack(lse), None, dq, dk, dv, prob, deterministic)
    cp.cuda.Device().synchronize()


def bench_case(torch, dtype_name, D, N, causal, alternatives):
    """One row: accuracy and TF/s of the table's entry, of the alternatives, of the deterministic
    path and of SDPA for one shape. The operands are locals, freed when the row is done."""
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    tdtype = getattr(torch, dtype_name)
    B, H = max(1, 16384 // N), 2048 // D
    q, k, v, do, out, lse = torch_inputs(torch, B, N, H, D, tdtype, causal)
    bshd = [cp.from_dlpack(x.transpose(1, 2).detach()) for x in (do, q, k, v, out)]
    prob = problem_for(bshd, causal)
    c_lse = cp.from_dlpack(lse)
    dq, dk, dv = (cp.empty(x.shape, dtype=x.dtype) for x in bshd[1:4])
    flops = 2.5 * 4 * B * H * N * N * D / (2 if causal else 1)
    bucket = variants.head_dim_bucket(D, D)
    entries = [("table", None)]
    if alternatives:
        entries += [(f"v{i}", e) for i, e in enumerate(alternatives.get((variants.kind(dtype_name), bucket), []))]
    row = {"case": f"{dtype_name} d={D} N={N} {'causal' if causal else 'full'}"}
    # Accuracy of every entry and of SDPA vs torch float32 autograd on the same inputs (one call each).
    qf, kf, vf = (x.float().requires_grad_() for x in (q, k, v))
    tref = torch.autograd.grad(F.scaled_dot_product_attention(qf, kf, vf, is_causal=causal), (qf, kf, vf), do.float())
    gref = [cp.from_dlpack(g.transpose(1, 2).contiguous()) for g in tref]

    def run(entry, deterministic=False):
        backward.flash_backward(*bshd, c_lse, None, dq, dk, dv, prob, deterministic, entry)

    for label, entry in entries:
        for x in (dq, dk, dv):
            x.fill(float("nan"))
        try:
            run(entry)
            errs = [float(cp.max(cp.abs(mine.astype(cp.float32) - r))) for mine, r in zip((dq, dk, dv), gref)]
            row[label + "_err"] = max(errs)
            row[label + "_errs"] = [f"{e:.3g}" for e in errs]  # dq, dk, dv
            row[label] = flops / median_ms(lambda: run(entry)) / 1e9
        except Exception as exc:
            row[label + "_err"] = row[label] = float("nan")
            row[label + "_note"] = str(exc).splitlines()[0][:100]
    row["determ"] = flops / median_ms(lambda: run(None, True)) / 1e9
    qs, ks, vs = (x.detach().requires_grad_() for x in (q, k, v))
    backend = SDPBackend.FLASH_ATTENTION if dtype_name != "float32" else SDPBackend.EFFICIENT_ATTENTION
    with sdpa_kernel([backend]):
        o = F.scaled_dot_product_attention(qs, ks, vs, is_causal=causal)
    row["sdpa"] = flops / median_ms(lambda: torch.autograd.grad(o, (qs, ks, vs), do, retain_graph=True)) / 1e9
    sref = torch.autograd.grad(o, (qs, ks, vs), do, retain_graph=True)
    row["sdpa_err"] = max(float((a.float() - b).abs().max()) for a, b in zip(sref, tref))
    return row


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--no-time", action="store_true")
    ap.add_argument("--variants", action="store_true")
    ap.add_argument("--dims", default="64,128")
    ap.add_argument("--ns", default="2048,8192")
    ap.add_argument("--dtypes", default="bfloat16")
    ap.add_argument("--profile", action="store_true",
                    help="two backward calls, atomic and deterministic (bf16, d=128, N=8k), for ncu")
    ap.add_argument("--json", help="also write the rows to this JSON file")
    args = ap.parse_args()
    if args.profile:
        profile()
        return

    import torch

    major, minor = runtime.compute_capability()
    print(cp.cuda.runtime.getDeviceProperties(0)["name"].decode(), f"sm_{major}{minor}", flush=True)
    alternatives = VARIANTS if args.variants else None
    prewarm(variants.family(major, minor), alternatives)
    if args.no_time:
        return
    table = []
    for dtype_name in args.dtypes.split(","):
        for D in map(int, args.dims.split(",")):
            for N in map(int, args.ns.split(",")):
                for causal in (False, True):
                    row = bench_case(torch, dtype_name, D, N, causal, alternatives)
                    torch.cuda.empty_cache()
                    cp.get_default_memory_pool().free_all_blocks()
                    print(row, flush=True)
                    table.append(row)
    if args.json:
        import json

        meta = {"device": cp.cuda.runtime.getDeviceProperties(0)["name"].decode(),
                "units": "TF/s, FLOPs 2.5 x 4 B H N^2 D (halved when causal); err: max abs vs float32 torch"}
        Path(args.json).write_text(json.dumps({"meta": meta, "rows": table}, indent=1))
    if args.variants:
        for (kind, bucket), entries in VARIANTS.items():
            for i, e in enumerate(entries):
                print(f"v{i} at d={bucket}: dK/dV {e.dkdv}")
    keys = []
    for row in table:
        keys += [k for k, value in row.items() if isinstance(value, float) and k not in keys]
    print("\nTF/s (backward only; err = max |d - fp32 torch| over dq, dk, dv)")
    print(f"{'case':34s}" + "".join(f"{k:>14s}" for k in keys))
    for row in table:
        print(f"{row['case']:34s}" + "".join(
            f"{row.get(k, float('nan')):14.3g}" if k.endswith("err") else f"{row.get(k, float('nan')):14.1f}" for k in keys))


if __name__ == "__main__":
    main()
