#!/usr/bin/env bash
# The whole GPU verification of the sm_90a forward (kernels/fwd_sm90.cu), in one command, on an
# H100/H200 (from the repository root):
#
#     bash bench/check_fwd_sm90.sh            # logs and JSON to $OUT (or ./out)
#
# 1. compiles every fwd_sm90.cu variant for this GPU (fills CuPy's kernel cache),
# 2. runs tests/gpu/test_fwd_sm90.py (with the development switch CUFLASH_SM90_FORWARD=1 set by
#    the tests themselves) and the existing forward tests with the switch on, so that every call
#    they make that the new kernel serves runs on it,
# 3. runs a small call (tails, causal, GQA, ALiBi + softcap + window, both head dims) under
#    compute-sanitizer memcheck and racecheck (synccheck too),
# 4. runs bench/bench_fwd_sm90.py (bf16/fp16, d = 64/128/256, N = 2k..16k, causal and not).
# Exits non-zero if a compile, a test or a sanitizer run fails.
. "$(dirname "$0")/check_lib.sh"

echo "== 1. compile the sm_90a forward variants"
$python - <<'PY' 2>&1 | tee "$out/sm90_prewarm.log" | tail -6 || status=1
import sys
sys.path.insert(0, "bench")
from prewarm import compile_all
from cuflash._cuda import runtime, variants
if runtime.compute_capability() != (9, 0):
    sys.exit(f"compute capability {runtime.compute_capability()}: the sm_90a forward needs 9.0")
sys.exit(1 if compile_all(variants.fwd_sm90_instantiations("sm90")) else 0)
PY

echo "== 2. tests"
timeout 1800 $python -m pytest -q -p no:cacheprovider --maxfail=25 tests/gpu/test_fwd_sm90.py 2>&1 \
    | tee "$out/sm90_tests.log" | tail -15 || status=1
CUFLASH_SM90_FORWARD=1 timeout 1800 $python -m pytest -q -p no:cacheprovider tests/gpu/test_forward.py \
    tests/gpu/test_features.py 2>&1 | tee "$out/sm90_forward_tests_switch_on.log" | tail -15 || status=1

echo "== 3. compute-sanitizer on a small call"
cat > "$out/sm90_sanitize.py" <<'PY'
import os
import cupy as cp
import numpy as np
import cuflash
from cuflash._cuda import forward, forward_sm90
os.environ[forward_sm90.ENV_FLAG] = "1"
cp.cuda.set_allocator(None)  # pool slack would hide out-of-bounds accesses
ran = []
original = forward.flash_forward_sm90
forward.flash_forward_sm90 = lambda *a: ran.append(original(*a)) or ran[-1]
rng = np.random.default_rng(0)
for d in (64, 128):
    q = cp.asarray(rng.standard_normal((2, 200, 4, d)), dtype=cp.float16)
    k = cp.asarray(rng.standard_normal((2, 333, 2, d)), dtype=cp.float16)
    v = cp.asarray(rng.standard_normal((2, 333, 2, d)), dtype=cp.float16)
    slopes = cp.asarray(rng.uniform(0.1, 1, 4), dtype=cp.float32)
    for opts in (dict(), dict(causal=True), dict(window=(100, 10), softcap=5.0, alibi_slopes=slopes)):
        cuflash.attention(q, k, v, return_lse=True, backend="cuda", **opts)
cp.cuda.Device().synchronize()
assert ran and all(ran), ran
print("sanitizer program done:", len(ran), "sm_90a launches")
PY
if command -v compute-sanitizer >/dev/null 2>&1; then
    for tool in memcheck racecheck synccheck; do
        echo "-- $tool"
        compute-sanitizer --tool $tool --error-exitcode 3 $python "$out/sm90_sanitize.py" 2>&1 \
            | tee "$out/sm90_$tool.log" | tail -6 || status=1
    done
else
    echo "compute-sanitizer not found: sanitizer runs skipped" | tee "$out/sm90_memcheck.log"
fi

echo "== 4. benchmark"
timeout 1500 $python bench/bench_fwd_sm90.py --json "$out/sm90_bench.json" 2>&1 | tee "$out/sm90_bench.log" | tail -60

echo "== sm_90a forward check: $([ $status -eq 0 ] && echo passed || echo FAILED)"
exit $status
