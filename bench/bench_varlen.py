"""Ragged training batches: packed varlen and padded batches beside the dense kernel and FlexAttention.

    python bench/bench_varlen.py [--dims 64,128] [--tokens 16384] [--lengths 128,8192] [--seed 0]
                                 [--no-flex] [--json PATH]

One ragged batch of documents, lengths drawn log-uniformly from ``--lengths`` until ``--tokens``
tokens (the last one cut to fit), bf16, H·D = 2048, causal within each document and full. Per
(d, mask), forward and backward, in the same run:

- ``varlen``: ``cuflash.attention_varlen`` on the packed (total, H, D) batch;
- ``padded``: ``cuflash.attention`` on (B, max length, H, D) with ``seqlens_q = seqlens_k`` (the
  padded rows and keys are never computed, so its TF/s on real FLOPs should equal varlen's);
- ``dense``: ``cuflash.attention`` on one sequence of the same token count (what the kernels do on
  unragged work of equal size; the varlen target is ≥ 0.9× of its TF/s);
- ``flex``: ``torch.compile(flex_attention)`` on the packed batch with a document block mask
  (optional: skipped with a note where torch or FlexAttention is missing, or with ``--no-flex``).

TF/s count the real FLOPs of each case: 4·D·H·(visible (query, key) pairs) forward, 2.5× that
backward; for ragged batches the pairs of each document, for ``dense`` those of its one sequence.
Times are medians of CUDA-event timings after a warm-up (bench_attention.median_ms).
"""

import argparse
import json
import sys
from pathlib import Path

import cupy as cp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import cuflash  # noqa: E402
from bench_attention import NP_DTYPES, median_ms  # noqa: E402

try:
    import torch
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    torch._dynamo.config.cache_size_limit = 64
except ImportError:
    torch = None


def draw_lengths(tokens, low, high, seed):
    """Document lengths, log-uniform in [low, high], summing to exactly ``tokens``."""
    rng = np.random.default_rng(seed)
    lengths = []
    while sum(lengths) < tokens:
        lengths.append(int(np.exp(rng.uniform(np.log(low), np.log(high)))))
    lengths[-1] -= sum(lengths) - tokens
    return [n for n in lengths if n > 0]


def pairs(n, causal):
    return n * (n + 1) // 2 if causal else n * n


def torch_view(x):
    """A zero-copy torch tensor of a CuPy array (bf16 through its 16-bit pattern)."""
    if x.dtype == NP_DTYPES["bfloat16"]:
        return torch.from_dlpack(x.view(cp.uint16)).view(torch.bfloat16)
    return torch.from_dlpack(x)


def flex_times(q, k, v, do, doc, causal):
    """Forward and backward ms of compiled FlexAttention with a document mask on the packed batch."""
    tq, tk, tv, tdo = (torch_view(x).unsqueeze(0).transpose(1, 2) for x in (q, k, v, do))
    doc_t = torch.as_tensor(doc, device="cuda")
    n = q.shape[0]

    def mask_mod(b, h, q_idx, kv_idx):
        keep = doc_t[q_idx] == doc_t[kv_idx]
        return keep & (kv_idx <= q_idx) if causal else keep

    block_mask = create_block_mask(mask_mod, None, None, n, n, device="cuda")
    compiled = torch.compile(flex_attention)
    fwd = median_ms(lambda: compiled(tq, tk, tv, block_mask=block_mask))
    tqg, tkg, tvg = (x.detach().requires_grad_() for x in (tq, tk, tv))
    # The compiled backward runs once per forward: time both and subtract the forward.
    both = median_ms(lambda: torch.autograd.grad(compiled(tqg, tkg, tvg, block_mask=block_mask),
                                                 (tqg, tkg, tvg), tdo))
    return fwd, both - fwd


def run_case(d, causal, lengths, dtype, with_flex):
    h = 2048 // d
    total, batch, longest = sum(lengths), len(lengths), max(lengths)
    rng = cp.random.default_rng(d + causal)
    q, k, v, do = (rng.standard_normal((total, h, d), dtype=np.float32).astype(dtype) for _ in range(4))
    cu = cp.asarray(np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32))
    seqlens = cp.asarray(np.asarray(lengths, dtype=np.int32))
    real = 4 * d * h * sum(pairs(n, causal) for n in lengths)
    row = dict(d=d, causal=causal, tokens=total, documents=batch, longest=longest)

    out, lse = cuflash.attention_varlen(q, k, v, cu, cu, max_seqlen_q=longest, max_seqlen_k=longest,
                                        causal=causal, return_lse=True)
    row["varlen_fwd"] = real / median_ms(lambda: cuflash.attention_varlen(
        q, k, v, cu, cu, max_seqlen_q=longest, max_seqlen_k=longest, causal=causal)) / 1e9
    row["varlen_bwd"] = 2.5 * real / median_ms(lambda: cuflash.attention_varlen_backward(
        do, q, k, v, out, lse, cu, cu, max_seqlen_q=longest, max_seqlen_k=longest, causal=causal)) / 1e9

    # The same documents padded to (B, longest): row b holds document b at its start.
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    index = np.full((batch, longest), total, dtype=np.int64)  # padding gathers a random extra row
    for b, (s, n) in enumerate(zip(starts, lengths)):
        index[b, :n] = np.arange(s, s + n)
    index = cp.asarray(index)
    extra = rng.standard_normal((1, h, d), dtype=np.float32).astype(dtype)
    qp, kp, vp, dop = (cp.concatenate([x, extra])[index] for x in (q, k, v, do))
    outp, lsep = cuflash.attention(qp, kp, vp, causal=causal, seqlens_q=seqlens, seqlens_k=seqlens, return_lse=True)
    row["padded_fwd"] = real / median_ms(lambda: cuflash.attention(
        qp, kp, vp, causal=causal, seqlens_q=seqlens, seqlens_k=seqlens)) / 1e9
    row["padded_bwd"] = 2.5 * real / median_ms(lambda: cuflash.attention_backward(
        dop, qp, kp, vp, outp, lsep, causal=causal, seqlens_q=seqlens, seqlens_k=seqlens)) / 1e9

    qd, kd, vd, dod = (x[None] for x in (q, k, v, do))
    dense = 4 * d * h * pairs(total, causal)
    outd, lsed = cuflash.attention(qd, kd, vd, causal=causal, return_lse=True)
    row["dense_fwd"] = dense / median_ms(lambda: cuflash.attention(qd, kd, vd, causal=causal)) / 1e9
    row["dense_bwd"] = 2.5 * dense / median_ms(lambda: cuflash.attention_backward(
        dod, qd, kd, vd, outd, lsed, causal=causal)) / 1e9

    if with_flex:
        try:
            doc = np.repeat(np.arange(batch, dtype=np.int32), lengths)
            fwd_ms, bwd_ms = flex_times(q, k, v, do, doc, causal)
            row["flex_fwd"] = real / fwd_ms / 1e9
            row["flex_bwd"] = 2.5 * real / bwd_ms / 1e9
        except Exception as exc:  # FlexAttention failing for this shape
            row["flex_note"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:100]}"
    for mode in ("fwd", "bwd"):
        row[f"varlen_vs_dense_{mode}"] = row[f"varlen_{mode}"] / row[f"dense_{mode}"]
        row[f"padded_vs_varlen_{mode}"] = row[f"padded_{mode}"] / row[f"varlen_{mode}"]
        if row.get(f"flex_{mode}"):
            row[f"varlen_vs_flex_{mode}"] = row[f"varlen_{mode}"] / row[f"flex_{mode}"]
    cp.get_default_memory_pool().free_all_blocks()
    return row


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dims", default="64,128", type=lambda s: [int(x) for x in s.split(",")])
    ap.add_argument("--tokens", type=int, default=16384)
    ap.add_argument("--lengths", default="128,8192", type=lambda s: [int(x) for x in s.split(",")])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--no-flex", action="store_true")
    ap.add_argument("--json")
    args = ap.parse_args()
    lengths = draw_lengths(args.tokens, *args.lengths, args.seed)
    print(f"{len(lengths)} documents, {sum(lengths)} tokens, longest {max(lengths)}: {lengths}", flush=True)
    with_flex = torch is not None and not args.no_flex
    table = []
    for d in args.dims:
        for causal in (True, False):
            row = run_case(d, causal, lengths, NP_DTYPES[args.dtype], with_flex)
            print(row, flush=True)
            table.append(row)
    if args.json:
        device = cp.cuda.runtime.getDeviceProperties(0)["name"].decode()
        Path(args.json).write_text(json.dumps({"device": device, "lengths": lengths, "rows": table}, indent=1))
    print(f"\nTF/s on real FLOPs, {args.dtype}; targets: varlen/dense >= 0.9, padded/varlen within 10 %")
    cols = ("varlen", "padded", "dense", "flex")
    print(f"{'d':>4}{'mask':>8}{'pass':>5}" + "".join(f"{c:>9}" for c in cols)
          + f"{'v/dense':>9}{'p/v':>7}{'v/flex':>8}")
    for r in table:
        for mode in ("fwd", "bwd"):
            cells = "".join(f"{r[f'{c}_{mode}']:9.1f}" if r.get(f"{c}_{mode}") else f"{'-':>9}" for c in cols)
            vf = r.get(f"varlen_vs_flex_{mode}")
            vf = f"{vf:8.2f}" if vf else f"{'-':>8}"
            print(f"{r['d']:4}{'causal' if r['causal'] else 'full':>8}{mode:>5}{cells}"
                  f"{r[f'varlen_vs_dense_{mode}']:9.2f}{r[f'padded_vs_varlen_{mode}']:7.2f}{vf}"
                  f"  {r.get('flex_note', '')}")


if __name__ == "__main__":
    main()
