#!/usr/bin/env bash
# The whole GPU verification of float64 on the GPU, in one command (from the repository root):
#
#     bash bench/check_float64.sh            # logs and JSON to $OUT (or ./out)
#
# 1. compiles every float64 variant of this GPU's family (fills CuPy's kernel cache),
# 2. runs tests/gpu/test_float64.py (accuracy against the float64 reference and naive CuPy float64,
#    every table entry, determinism, rows that see no key) and the CPU-side table tests,
# 3. runs a small forward + backward (both dQ modes, GQA, ALiBi, softcap, strided) under
#    compute-sanitizer memcheck, where it is installed,
# 4. runs bench/bench_float64.py (N = 1k..16k, d = 32..128, causal and not, fwd and bwd, beside
#    naive CuPy float64).
# Exits non-zero if a compile, a test or the memory check fails (pipefail: a pipeline fails when
# its first command does).
. "$(dirname "$0")/check_lib.sh"

echo "== 1. compile the float64 variants"
$python - <<'PY' 2>&1 | tee "$out/f64_prewarm.log" | tail -6 || status=1
import sys
sys.path.insert(0, "bench")
from prewarm import compile_all
from cuflash._cuda import runtime, variants
family = variants.family(*runtime.compute_capability())
jobs = [job for job in variants.instantiations(family) if job[2].get("DTYPE") == 4]
sys.exit(1 if compile_all(jobs) else 0)
PY

echo "== 2. tests"
timeout 1800 $python -m pytest -q -p no:cacheprovider tests/gpu/test_float64.py tests/test_float64_table.py 2>&1 \
    | tee "$out/f64_tests.log" | tail -15 || status=1

echo "== 3. compute-sanitizer memcheck of a small forward + backward"
cat > "$out/f64_memcheck.py" <<'PY'
import cupy as cp
import numpy as np
import cuflash
rng = np.random.default_rng(0)
for layout in ("contiguous", "strided"):
    q, k, v, do = (rng.standard_normal(s) for s in ((2, 77, 4, 72), (2, 131, 2, 72), (2, 131, 2, 40), (2, 77, 4, 40)))
    q, k, v, do = (cp.asarray(x) if layout == "contiguous" else cp.asarray(np.repeat(x, 2, axis=-1))[..., ::2]
                   for x in (q, k, v, do))
    opts = dict(causal=True, window=(50, 0), softcap=4.0, alibi_slopes=cp.asarray(rng.uniform(0.1, 1, 4), dtype=cp.float32))
    out, lse = cuflash.attention(q, k, v, return_lse=True, backend="cuda", **opts)
    for deterministic in (False, True):
        cuflash.attention_backward(do, q, k, v, out, lse, backend="cuda", deterministic=deterministic, **opts)
cp.cuda.Device().synchronize()
print("memcheck program done")
PY
if command -v compute-sanitizer >/dev/null 2>&1; then
    compute-sanitizer --tool memcheck --error-exitcode 3 $python "$out/f64_memcheck.py" 2>&1 \
        | tee "$out/f64_memcheck.log" | tail -6 || status=1
else
    echo "compute-sanitizer not found: memory check skipped" | tee "$out/f64_memcheck.log"
fi

echo "== 4. benchmark"
timeout 1500 $python bench/bench_float64.py --json "$out/f64_bench.json" 2>&1 | tee "$out/f64_bench.log"

echo "== float64 check: $([ $status -eq 0 ] && echo passed || echo FAILED)"
exit $status
