"""Compile every kernel variant of both families' tables for the current GPU, on all cores.

    python bench/prewarm.py [--family sm90,sm80]

Fills CuPy's on-disk kernel cache, so that later processes (tests, benchmarks) start without
compiling. NVRTC releases the GIL, so threads compile in parallel. Prints the failures, if any.
"""

import argparse
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cuflash._cuda import runtime, variants  # noqa: E402


def compile_all(jobs):
    """Compile ``(source, kernel, defines)`` jobs for the current GPU on all cores; print and return
    the failures."""
    failures = []

    def one(job):
        try:
            runtime.get_kernel(*job)
        except Exception as exc:
            failures.append(f"{job[0]} {job[2]}: {str(exc)[:1500]}")

    t0 = time.time()
    with ThreadPoolExecutor(os.cpu_count() or 4) as pool:
        list(pool.map(one, jobs))
    print(f"compiled {len(jobs)} variants in {time.time() - t0:.1f} s, {len(failures)} failures", flush=True)
    for failure in failures[:5]:
        print(failure)
    return failures


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--family", default="sm90,sm80", type=lambda s: s.split(","))
    args = ap.parse_args()
    major, _ = runtime.compute_capability()
    jobs = [job for fam in args.family if fam != "sm90" or major == 9 for job in variants.instantiations(fam)]
    sys.exit(1 if compile_all(jobs) else 0)


if __name__ == "__main__":
    main()
