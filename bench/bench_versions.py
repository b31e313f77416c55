"""Two versions of cuflash side by side: forward and backward TF/s of the standard rows.

    python bench/bench_versions.py --old DIR [--rounds 2] [--dtypes ...] [--dims ...] [--ns ...]

DIR holds another version's ``cuflash`` package (with its CUDA sources), e.g. made with
``git archive <commit> cuflash cuda_src | tar -x -C DIR``. Each version runs in its own process
(both are named ``cuflash``), alternating ``--rounds`` times so drift of the GPU's clocks shows up
in both; each row's figure is the median over rounds. Calls go through the public API on CuPy
arrays. Shapes as in bench_attention.py: B·N = 16k tokens, H·D = 2048. Prints new / old per row.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent


def worker(args):
    import cupy as cp
    import numpy as np

    sys.path.insert(0, str(HERE))
    import cuflash
    from bench_attention import NP_DTYPES, flops, median_ms

    rows = []
    for dtype_name in args.dtypes:
        for d in args.dims:
            for n in args.ns:
                for causal in (False, True):
                    h, b = 2048 // d, max(1, 16384 // n)
                    rng = cp.random.default_rng(n + d)
                    q, k, v, do = (rng.standard_normal((b, n, h, d), dtype=np.float32).astype(NP_DTYPES[dtype_name])
                                   for _ in range(4))
                    out, lse = cuflash.attention(q, k, v, causal=causal, return_lse=True)
                    fwd = median_ms(lambda: cuflash.attention(q, k, v, causal=causal))
                    bwd = median_ms(lambda: cuflash.attention_backward(do, q, k, v, out, lse, causal=causal))
                    rows.append(dict(dtype=dtype_name, d=d, n=n, causal=causal,
                                     fwd=flops(b, h, n, d, causal, "fwd") / fwd / 1e9,
                                     bwd=flops(b, h, n, d, causal, "bwd") / bwd / 1e9))
                    del q, k, v, do, out, lse
                    cp.get_default_memory_pool().free_all_blocks()
    Path(args.out).write_text(json.dumps(rows))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--old", required=True, help="folder holding the other version's cuflash package")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--dtypes", default="bfloat16,float16,float32", type=lambda s: s.split(","))
    ap.add_argument("--dims", default="64,128,256", type=lambda s: [int(x) for x in s.split(",")])
    ap.add_argument("--ns", default="2048,8192,16384", type=lambda s: [int(x) for x in s.split(",")])
    ap.add_argument("--json", help="write every figure here")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args)
        return
    versions = {"old": str(Path(args.old).resolve()), "new": str(HERE.parent)}
    results = {name: [] for name in versions}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for name, root in versions.items():
                out = Path(tmp) / f"{name}{r}.json"
                env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
                subprocess.run([sys.executable, __file__, "--worker", "--old", root, "--out", str(out),
                                "--dtypes", ",".join(args.dtypes), "--dims", ",".join(map(str, args.dims)),
                                "--ns", ",".join(map(str, args.ns))], env=env, check=True, cwd=tmp)
                results[name].append(json.loads(out.read_text()))
                print(f"round {r} {name} done", flush=True)
    import statistics

    table = []
    for i, row in enumerate(results["new"][0]):
        entry = {key: row[key] for key in ("dtype", "d", "n", "causal")}
        for mode in ("fwd", "bwd"):
            for name in versions:
                entry[f"{name}_{mode}"] = statistics.median(rnd[i][mode] for rnd in results[name])
            entry[f"ratio_{mode}"] = entry[f"new_{mode}"] / entry[f"old_{mode}"]
        table.append(entry)
    if args.json:
        Path(args.json).write_text(json.dumps(table, indent=1))
    print("\nTF/s, median over rounds; ratio = new / old")
    print(f"{'dtype':9}{'d':>4}{'N':>7} {'':2}{'old fwd':>9}{'new fwd':>9}{'ratio':>7}{'old bwd':>9}{'new bwd':>9}{'ratio':>7}")
    for e in table:
        print(f"{e['dtype']:9}{e['d']:4}{e['n']:7} {'C' if e['causal'] else 'F':2}{e['old_fwd']:9.1f}{e['new_fwd']:9.1f}"
              f"{e['ratio_fwd']:7.3f}{e['old_bwd']:9.1f}{e['new_bwd']:9.1f}{e['ratio_bwd']:7.3f}")


if __name__ == "__main__":
    main()
