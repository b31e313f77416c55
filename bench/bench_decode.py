"""Decoding benchmark: cuflash's split-KV decode kernel beside SDPA (cuDNN, flash) and cuflash's dense kernel.

    python bench/bench_decode.py [--sq 1,4] [--batches 1,8,32,64] [--seqlens 4096,32768,131072]
                                 [--pages 16,64,256] [--json PATH] [--plan] [--quick]

Shapes of issue 15: bf16, Hq = 32, Hkv = 8, d = 128, q (B, Sq, 32, 128) against full caches
(B, Sk, 8, 128); every query sees every key (for Sq = 4 this is also what a bottom-right causal mask
leaves of a 4 x Sk tile, bar 6 keys). Per shape, in the same run:

- ``decode``: the decode launcher (``cuflash._cuda.decode.flash_decode``: decode kernel, and the
  merge when the heuristic splits), device time only;
- ``call``: the public ``cuflash.attention_with_kvcache`` (its host checks copy cache_seqlens, and
  for paged caches the block table, to the host every call);
- ``call-bound``: the same with ``max_seqlen_k`` (the lengths stay on the device: no copy, no
  synchronisation; what a CUDA-graph-captured decoding loop runs);
- ``paged-P``: the decode launcher on the same memory seen as pages of P keys with a shuffled block
  table (no copy: timing does not depend on which keys land where);
- ``dense``: ``cuflash.attention`` (the dense forward kernel, what decoding ran before);
- ``sdpa-cudnn``, ``sdpa-flash``: torch's scaled_dot_product_attention with one backend, on the
  same memory through DLPack (GQA through ``enable_gqa``; where a backend refuses it, K/V
  expanded to 32 heads, marked ``x``). torch is optional.

Times are medians of CUDA-event timings after a warm-up; caches smaller than 256 MB are rotated
among copies so that no timing reads from L2. GB/s counts the K and V bytes of the logical cache,
B * Sk * Hkv * d * 2 * 2, once. ``--plan`` prints the shapes and memory without touching a GPU.
Prints a table last; ``--json`` writes every number.
"""

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench_attention import median_ms  # noqa: E402

HQ, HKV, D = 32, 8, 128
ELEM = 2  # bf16
ROTATE_BYTES = 256 << 20  # caches below this are rotated among copies (L2 is 50-60 MB)


def bfloat16():
    import ml_dtypes

    return np.dtype(ml_dtypes.bfloat16)


def torch_view(torch, x):
    """A zero-copy torch tensor of a CuPy bf16 array (through its 16-bit pattern)."""
    import cupy as cp

    return torch.from_dlpack(x.view(cp.uint16)).view(torch.bfloat16)


def kv_bytes(batch, seqlen_k):
    return batch * seqlen_k * HKV * D * 2 * ELEM


def shapes(args):
    return [(sq, b, sk) for sq in args.sq for b in args.batches for sk in args.seqlens]


def copies(batch, seqlen_k):
    return max(1, math.ceil(ROTATE_BYTES / kv_bytes(batch, seqlen_k)))


def rotating(calls):
    """A function calling ``calls[0]``, ``calls[1]``, ... in turn."""
    state = {"i": 0}

    def fn():
        calls[state["i"] % len(calls)]()
        state["i"] += 1

    return fn


def run_shape(sq, batch, seqlen_k, pages, torch_mods):
    import cupy as cp

    import cuflash
    from cuflash import _ragged
    from cuflash._cuda import decode, runtime, variants

    rng = cp.random.default_rng(batch * 1000 + seqlen_k + sq)
    dtype = bfloat16()

    def randn(shape):
        """Normal bf16 values, drawn one batch element at a time (a float32 draw of a whole 128k
        cache would need twice its memory again)."""
        x = cp.empty(shape, dtype=dtype)
        for b in range(shape[0]):
            x[b] = rng.standard_normal(shape[1:], dtype=cp.float32).astype(dtype)
        return x

    n = copies(batch, seqlen_k)
    q = randn((batch, sq, HQ, D))
    caches = [(randn((batch, seqlen_k, HKV, D)), randn((batch, seqlen_k, HKV, D))) for _ in range(n)]
    lengths = cp.full((batch,), seqlen_k, dtype=cp.int32)
    row = {"sq": sq, "batch": batch, "seqlen_k": seqlen_k, "kv_bytes": kv_bytes(batch, seqlen_k), "copies": n}

    def launcher(k, v, table=None, page=None):
        kk = k if table is None else k.reshape(-1, page, HKV, D)
        vv = v if table is None else v.reshape(-1, page, HKV, D)
        base, plan = _ragged.check_kvcache(q, kk, vv, lengths, None, None, table, alibi_slopes=None, what="bench",
                                           writable=lambda x: True, causal=False, causal_alignment="bottom_right",
                                           window=None, softcap=None, scale=None, backend="cuda")
        out = cp.empty(base.out_shape, dtype=dtype)
        lse = cp.empty(base.lse_shape, dtype=cp.float32)
        row.setdefault("splits", decode.choose_splits(base, seqlen_k, variants.family(*runtime.compute_capability()),
                                                      decode.sm_count(q.device.id)))
        return lambda: decode.flash_decode(q, kk, vv, lengths, table, None, out, lse, base,
                                           max_seqlen_k=seqlen_k), out

    results = {}
    decode_calls = [launcher(k, v) for k, v in caches]
    results["decode"] = median_ms(rotating([c for c, _ in decode_calls]))
    reference_out = decode_calls[0][1]
    results["call"] = median_ms(rotating([
        (lambda k=k, v=v: cuflash.attention_with_kvcache(q, k, v, lengths, backend="cuda")) for k, v in caches]))
    results["call-bound"] = median_ms(rotating([
        (lambda k=k, v=v: cuflash.attention_with_kvcache(q, k, v, lengths, max_seqlen_k=seqlen_k, backend="cuda"))
        for k, v in caches]))
    for page in pages:
        if seqlen_k % page:
            continue
        n_pages = batch * seqlen_k // page
        table = cp.asarray(np.random.default_rng(page).permutation(n_pages).reshape(batch, -1).astype(np.int32))
        results[f"paged-{page}"] = median_ms(rotating([launcher(k, v, table, page)[0] for k, v in caches]))
    results["dense"] = median_ms(rotating([
        (lambda k=k, v=v: cuflash.attention(q, k, v, backend="cuda")) for k, v in caches]))
    if torch_mods is not None:
        results.update(sdpa_times(torch_mods, q, caches, reference_out, row))
    row["ms"] = results
    row["tb_s"] = {name: row["kv_bytes"] / (ms * 1e-3) / 1e12 for name, ms in results.items()}
    del caches
    cp.get_default_memory_pool().free_all_blocks()
    return row


def sdpa_times(torch_mods, q, caches, reference_out, row):
    """SDPA's cuDNN and flash backends on the same memory (B, H, S, D views of the BSHD arrays):
    with ``enable_gqa``, or where a backend refuses that, on K/V expanded to Hq heads beforehand
    (the name then ends in x; only the attention call is timed)."""
    torch, F, SDPBackend, sdpa_kernel = torch_mods
    tq = torch_view(torch, q).transpose(1, 2)
    kvs = [(torch_view(torch, k).transpose(1, 2), torch_view(torch, v).transpose(1, 2)) for k, v in caches]
    ours = np.asarray(torch_view(torch, reference_out).float().cpu())
    times = {}
    for name, backend in (("sdpa-cudnn", SDPBackend.CUDNN_ATTENTION), ("sdpa-flash", SDPBackend.FLASH_ATTENTION)):
        for expand in (False, True):
            label = name + ("x" if expand else "")
            try:
                with sdpa_kernel([backend]):
                    if expand:
                        args = [tuple(x.repeat_interleave(HQ // HKV, dim=1) for x in kv) for kv in kvs]
                        options = {}
                    else:
                        args, options = kvs, {"enable_gqa": True}
                    out = F.scaled_dot_product_attention(tq, *args[0], **options)
                    ms = median_ms(rotating([(lambda kv=kv: F.scaled_dot_product_attention(tq, *kv, **options))
                                             for kv in args]))
            except Exception as exc:  # a backend that refuses this shape: say so in the row
                row.setdefault("refused", {})[label] = str(exc).splitlines()[0][:120] if str(exc) else type(exc).__name__
                continue
            finally:
                torch.cuda.empty_cache()
            times[label] = ms
            theirs = np.asarray(out.transpose(1, 2).float().cpu())
            row.setdefault("max_abs_diff", {})[label] = float(np.abs(theirs - ours).max())
            break
    return times


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ints = lambda s: [int(x) for x in s.split(",")]  # noqa: E731
    ap.add_argument("--sq", type=ints, default=[1, 4])
    ap.add_argument("--batches", type=ints, default=[1, 8, 32, 64])
    ap.add_argument("--seqlens", type=ints, default=[4096, 32768, 131072])
    ap.add_argument("--pages", type=ints, default=[16, 64, 256])
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--plan", action="store_true", help="print the shapes and their memory, run nothing")
    ap.add_argument("--quick", action="store_true", help="Sq = 1, B in {1, 32}, Sk in {4k, 32k}")
    args = ap.parse_args()
    if args.quick:
        args.sq, args.batches, args.seqlens = [1], [1, 32], [4096, 32768]
    if args.plan:
        for sq, b, sk in shapes(args):
            print(f"Sq={sq} B={b:3d} Sk={sk:7d}: K+V {kv_bytes(b, sk) / 1e9:7.3f} GB x {copies(b, sk)} cop"
                  f"{'y' if copies(b, sk) == 1 else 'ies'}; at 4.8 TB/s {kv_bytes(b, sk) / 4.8e12 * 1e6:8.1f} us")
        return

    try:
        import torch
        import torch.nn.functional as F
        from torch.nn.attention import SDPBackend, sdpa_kernel

        torch_mods = (torch, F, SDPBackend, sdpa_kernel) if torch.cuda.is_available() else None
    except ImportError:
        torch_mods = None
    rows = []
    for sq, b, sk in shapes(args):
        try:
            rows.append(run_shape(sq, b, sk, args.pages, torch_mods))
        except Exception as exc:  # out of memory on a smaller GPU: keep the other rows
            rows.append({"sq": sq, "batch": b, "seqlen_k": sk, "error": f"{type(exc).__name__}: {exc}"[:200]})
        print(json.dumps(rows[-1]), flush=True)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(rows, indent=1))
    names = sorted({name for r in rows for name in r.get("ms", {})}, key=lambda n: (n != "decode", n))
    print("\nK+V TB/s (time in us)" + "".join(f" | {n:>16}" for n in names) + " | splits | vs cudnn")
    for r in rows:
        head = f"Sq={r['sq']} B={r['batch']:3d} Sk={r['seqlen_k']:7d}"
        if "error" in r:
            print(f"{head}  {r['error']}")
            continue
        cells = "".join(f" | {r['tb_s'][n]:5.2f} ({r['ms'][n] * 1e3:7.1f})" if n in r["ms"] else " | " + " " * 16
                        for n in names)
        cudnn = r["ms"].get("sdpa-cudnn") or r["ms"].get("sdpa-cudnnx")
        ratio = f"{cudnn / r['ms']['decode']:.2f}x" if cudnn else "-"
        print(f"{head}{cells} | {r.get('splits', '-'):>6} | {ratio}")


if __name__ == "__main__":
    main()
