"""Ring attention benchmark: weak and strong scaling over NCCL, one process per GPU.

    python bench/bench_ring.py [--gpus 2,4] [--tokens-per-gpu 32768] [--strong-tokens 262144]
                               [--heads 16] [--dim 128] [--dtype bfloat16] [--cases zigzag-causal,full]
                               [--modes fwd,bwd,fwdbwd] [--warmup 2] [--iters 10] [--strong-iters 3]
                               [--no-weak] [--no-strong] [--out DIR] [--plan]

Weak scaling: every GPU holds --tokens-per-gpu tokens (B = 1, --heads heads of --dim), so P GPUs
attend over a sequence P times longer. Efficiency = (FLOP/s of the P-GPU ring on the whole
sequence) / (P × FLOP/s of one GPU running ``cuflash.attention`` on one GPU's tokens alone): the
convention of ring-flash-attention's scaling plots. Strong scaling: --strong-tokens in all, split
over P GPUs; time against P, with P = 1 the single-GPU call on the whole sequence (or, where that
is too slow, only as many iterations as --strong-iters).

Cases: "zigzag-causal" (causal mask, load-balanced zigzag shards), "full" (no mask, contiguous
shards) and "contiguous-causal" (causal on contiguous shards: the imbalance zigzag removes).
FLOPs count the visible score entries: forward 4·B·H·N²·d, halved when causal; backward 2.5×,
forward + backward 3.5× (``bench_attention.py``'s convention). Times are CUDA events on each rank's
stream after --warmup untimed runs and a barrier before every run; a run's time is its slowest
rank's, and rows report the median over runs. Prints a table last and writes ``bench_ring.json``
to --out. ``--plan`` prints the runs and their FLOPs without touching a GPU.

NCCL's NVLink multicast stays off (``NCCL_NVLS_ENABLE=0``, set here before any process starts NCCL).
"""

import argparse
import json
import multiprocessing
import os
import statistics
import sys
from pathlib import Path
from queue import Empty

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

CASES = {
    "zigzag-causal": dict(causal=True, layout="zigzag"),
    "full": dict(causal=False, layout="contiguous"),
    "contiguous-causal": dict(causal=True, layout="contiguous"),
}
MODES = ("fwd", "bwd", "fwdbwd")
MODE_FLOPS = {"fwd": 1.0, "bwd": 2.5, "fwdbwd": 3.5}


def _ints(text):
    return [int(x) for x in text.split(",") if x]


def _names(choices):
    def parse(text):
        names = [x for x in text.split(",") if x]
        unknown = [x for x in names if x not in choices]
        if unknown:
            raise argparse.ArgumentTypeError(f"unknown {', '.join(unknown)}; choose from {', '.join(choices)}")
        return names

    return parse


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gpus", type=_ints, default=[2, 4], help="world sizes to run (one process per GPU)")
    ap.add_argument("--tokens-per-gpu", type=int, default=32768, help="weak scaling: tokens on every GPU")
    ap.add_argument("--strong-tokens", type=int, default=262144, help="strong scaling: tokens in all")
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), default="bfloat16")
    ap.add_argument("--cases", type=_names(tuple(CASES)), default=["zigzag-causal", "full"])
    ap.add_argument("--modes", type=_names(MODES), default=list(MODES))
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--iters", type=int, default=10, help="timed runs per weak-scaling row")
    ap.add_argument("--strong-iters", type=int, default=3, help="timed runs per strong-scaling row")
    ap.add_argument("--no-weak", dest="weak", action="store_false")
    ap.add_argument("--no-strong", dest="strong", action="store_false")
    ap.add_argument("--out", type=Path, default=Path("."))
    ap.add_argument("--plan", action="store_true", help="print the runs and their FLOPs, run nothing")
    args = ap.parse_args(argv)
    if any(p < 1 for p in args.gpus):
        ap.error("--gpus takes world sizes of at least 1")
    return args


def flops(tokens, heads, dim, causal, mode):
    """FLOPs of attention over the whole sequence of ``tokens`` (B = 1)."""
    return 4 * heads * tokens * tokens * dim / (2 if causal else 1) * MODE_FLOPS[mode]


def jobs(args):
    """(kind, world size, tokens in all, case, iterations) of every run, baselines first."""
    runs = []
    if args.weak:
        runs += [("weak", 1, args.tokens_per_gpu, case, args.iters) for case in args.cases]
        runs += [("weak", p, p * args.tokens_per_gpu, case, args.iters) for p in args.gpus if p > 1
                 for case in args.cases]
    if args.strong:
        runs += [("strong", p, args.strong_tokens, case, args.strong_iters) for p in sorted({1, *args.gpus})
                 for case in args.cases]
    return runs


# ---------------------------------------------------------------------------------------------
# One process per GPU.
# ---------------------------------------------------------------------------------------------

def _calls(comm, rank, world, tokens, case, index, args):
    """{mode: a function running it} on this rank's random shard of a ``tokens``-token sequence."""
    import cupy as cp
    import numpy as np

    import cuflash
    from cuflash import distributed

    options = CASES[case]
    local = sum(b - a for a, b in distributed.shard_segments(tokens, rank, world, options["layout"]))
    rng = cp.random.default_rng(1000 * index + rank)
    q, k, v, dout = (rng.standard_normal((1, local, args.heads, args.dim), dtype=np.float32).astype(_dtype(args.dtype))
                     for _ in range(4))
    if world == 1:  # the single-GPU call itself, not a ring of one
        causal = dict(causal=options["causal"])
        out, lse = cuflash.attention(q, k, v, return_lse=True, **causal)
        return {
            "fwd": lambda: cuflash.attention(q, k, v, **causal),
            "bwd": lambda: cuflash.attention_backward(dout, q, k, v, out, lse, **causal),
            "fwdbwd": lambda: cuflash.attention_backward(dout, q, k, v,
                                                         *cuflash.attention(q, k, v, return_lse=True, **causal),
                                                         **causal),
        }
    ring = dict(comm=comm, causal=options["causal"], layout=options["layout"], seqlen=tokens)
    out, lse = distributed.ring_attention(q, k, v, return_lse=True, **ring)
    return {
        "fwd": lambda: distributed.ring_attention(q, k, v, **ring),
        "bwd": lambda: distributed.ring_attention_backward(dout, q, k, v, out, lse, **ring),
        "fwdbwd": lambda: distributed.ring_attention_backward(
            dout, q, k, v, *distributed.ring_attention(q, k, v, return_lse=True, **ring), **ring),
    }


def _worker(rank, world, unique_id, args, runs, queue):
    """Time every run of this world size on GPU ``rank``; put (rank, {run index: {mode: [ms]}})."""
    import cupy as cp
    import numpy as np

    from cuflash import distributed

    try:
        cp.cuda.Device(rank).use()
        comm = distributed.NcclRing.create(rank, world, unique_id, device=rank) if world > 1 else None
        token = cp.zeros(1, dtype=np.float32)

        def barrier():
            """Every rank here, with no GPU work of the last run still queued, before any starts timing."""
            stream = cp.cuda.get_current_stream()
            stream.synchronize()
            if comm is not None:
                from cupy.cuda import nccl

                comm.communicator.allReduce(token.data.ptr, token.data.ptr, 1, nccl.NCCL_FLOAT32, nccl.NCCL_SUM,
                                            stream.ptr)
                stream.synchronize()

        timings = {}
        for index, (kind, p, tokens, case, iters) in runs:
            calls = _calls(comm, rank, world, tokens, case, index, args)
            timings[index] = {}
            for mode in args.modes:
                for _ in range(args.warmup):
                    calls[mode]()
                times = []
                start, end = cp.cuda.Event(), cp.cuda.Event()
                for _ in range(iters):
                    barrier()
                    start.record()
                    calls[mode]()
                    end.record()
                    end.synchronize()
                    times.append(cp.cuda.get_elapsed_time(start, end))
                timings[index][mode] = times
            calls = None  # this run's arrays go back to the pool before the next run allocates
            cp.get_default_memory_pool().free_all_blocks()
        queue.put((rank, timings))
    except BaseException as exc:
        queue.put((rank, exc))
        raise


def _dtype(name):
    import numpy as np

    if name == "bfloat16":
        import ml_dtypes

        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


def _collect(queue, processes):
    """{rank: result} from every process; raises if one dies without reporting (a crash)."""
    results = {}
    while len(results) < len(processes):
        try:
            rank, result = queue.get(timeout=10)
        except Empty:
            dead = [rank for rank, p in enumerate(processes) if p.exitcode not in (None, 0) and rank not in results]
            if dead:
                raise RuntimeError(f"ranks {dead} exited without reporting")
            continue
        results[rank] = result
    return results


def _run_world(world, args, runs):
    """{run index: {mode: [slowest rank's ms per run]}} for the runs of one world size."""
    unique_id = None
    if world > 1:
        from cuflash.distributed import NcclRing

        unique_id = NcclRing.unique_id()
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    processes = [context.Process(target=_worker, args=(rank, world, unique_id, args, runs, queue))
                 for rank in range(world)]
    for p in processes:
        p.start()
    try:
        per_rank = _collect(queue, processes)
    finally:
        for p in processes:
            p.join()
    failed = {rank: r for rank, r in per_rank.items() if isinstance(r, BaseException)}
    if failed:
        raise RuntimeError(f"world size {world}: ranks failed: {failed}")
    return {index: {mode: [max(per_rank[r][index][mode][i] for r in range(world))
                           for i in range(len(per_rank[0][index][mode]))]
                    for mode in per_rank[0][index]}
            for index, _ in runs}


def main(argv=None):
    args = parse_args(argv)
    runs = list(enumerate(jobs(args)))
    if args.plan:
        for index, (kind, p, tokens, case, iters) in runs:
            tf = {m: flops(tokens, args.heads, args.dim, CASES[case]["causal"], m) / 1e12 for m in args.modes}
            print(f"{index:3d} {kind:6s} P={p} tokens={tokens} ({tokens // p} per GPU) {case:18s} iters={iters} "
                  + " ".join(f"{m}={t:.1f} TFLOP" for m, t in tf.items()))
        return
    os.environ["NCCL_NVLS_ENABLE"] = "0"
    ms = {}
    for world in sorted({p for _, (_, p, _, _, _) in runs}):
        ms.update(_run_world(world, args, [(i, run) for i, run in runs if run[1] == world]))
    rows = []
    baseline = {}
    for index, (kind, p, tokens, case, iters) in runs:
        for mode in args.modes:
            median = statistics.median(ms[index][mode])
            tflops = flops(tokens, args.heads, args.dim, CASES[case]["causal"], mode) / median / 1e9
            row = dict(kind=kind, gpus=p, tokens=tokens, tokens_per_gpu=tokens // p, case=case, mode=mode,
                       heads=args.heads, dim=args.dim, dtype=args.dtype, ms=median, ms_runs=ms[index][mode],
                       tflops=tflops)
            if kind == "weak":
                if p == 1:
                    baseline[case, mode] = tflops
                else:
                    row["efficiency"] = tflops / (p * baseline[case, mode])
            rows.append(row)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench_ring.json").write_text(json.dumps(rows, indent=1))
    print(f"{'kind':6s} {'P':>2s} {'tokens':>7s} {'case':18s} {'mode':6s} {'ms':>9s} {'TF/s':>7s} {'eff':>6s}")
    for r in rows:
        eff = f"{r['efficiency']:.1%}" if "efficiency" in r else ""
        print(f"{r['kind']:6s} {r['gpus']:2d} {r['tokens']:7d} {r['case']:18s} {r['mode']:6s} {r['ms']:9.2f} "
              f"{r['tflops']:7.1f} {eff:>6s}")


if __name__ == "__main__":
    main()
