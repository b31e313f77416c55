#!/usr/bin/env bash
# The whole GPU verification of KV-cache decoding, in one command (from the repository root):
#
#     bash bench/check_decode.sh            # logs and JSON to $OUT (or ./out)
#
# 1. compiles every decode, merge and append variant of this GPU's family (fills CuPy's kernel
#    cache, so the tests do not time out compiling),
# 2. runs tests/gpu/test_decode.py (reference, NumPy backend, paged vs dense bitwise, forced split
#    counts, appends, fully masked rows, the merge kernel) and the CPU-side table tests,
# 3. runs a small paged, split, GQA call with appends, ALiBi, softcap and a window under
#    compute-sanitizer memcheck and racecheck (CuPy's memory pool off, so out-of-bounds accesses
#    are not hidden by pool slack), where compute-sanitizer is installed,
# 4. runs bench/bench_decode.py (bf16, Hq 32, Hkv 8, d 128, Sq 1 and 4, B 1..64, Sk 4k..128k,
#    beside SDPA cuDNN/flash and the dense kernel; pages of 16, 64, 256).
# Exits non-zero if a compile, a test or a sanitizer check fails (pipefail: a pipeline fails when
# its first command does).
. "$(dirname "$0")/check_lib.sh"

echo "== 1. compile the decode variants"
$python - <<'PY' 2>&1 | tee "$out/decode_prewarm.log" | tail -6 || status=1
import sys
sys.path.insert(0, "bench")
from prewarm import compile_all
from cuflash._cuda import runtime, variants
family = variants.family(*runtime.compute_capability())
sys.exit(1 if compile_all(variants.decode_instantiations(family)) else 0)
PY

echo "== 2. tests"
timeout 2400 $python -m pytest -q -p no:cacheprovider tests/gpu/test_decode.py tests/test_decode_table.py 2>&1 \
    | tee "$out/decode_tests.log" | tail -15 || status=1

echo "== 3. compute-sanitizer memcheck and racecheck of a small paged split-KV call"
cat > "$out/decode_sanitize.py" <<'PY'
import cupy as cp
import numpy as np
import cuflash
from cuflash import _ragged
from cuflash._cuda import decode

cp.cuda.set_allocator(None)
rng = np.random.default_rng(0)
dtype = np.float16
B, Sq, Hkv, group, D, page = 3, 2, 2, 4, 72, 16
lengths = np.array([0, 37, 95], np.int32)
q = cp.asarray(rng.standard_normal((B, Sq, Hkv * group, D)).astype(dtype))
k_pages = cp.asarray(rng.standard_normal((21, page, Hkv, D)).astype(dtype))
v_pages = cp.asarray(rng.standard_normal((21, page, Hkv, D)).astype(dtype))
table = cp.asarray(rng.permutation(21)[:3 * 7].reshape(3, 7).astype(np.int32))
k_new = cp.asarray(rng.standard_normal((B, 2, Hkv, D)).astype(dtype))
v_new = cp.asarray(rng.standard_normal((B, 2, Hkv, D)).astype(dtype))
slopes = cp.asarray(rng.uniform(0.01, 0.3, Hkv * group).astype(np.float32))
options = dict(causal=True, window=(40, 0), softcap=20.0)
# The public call: append, decode (the heuristic's splits) and merge.
cuflash.attention_with_kvcache(q, k_pages, v_pages, cp.asarray(lengths), k_new=k_new, v_new=v_new, block_table=table,
                               alibi_slopes=slopes, backend="cuda", **options)
# The launcher with forced splits (more splits than some sequences have tiles), paged and dense.
base, plan = _ragged.check_kvcache(q, k_pages, v_pages, cp.asarray(lengths), None, None, table, alibi_slopes=slopes,
                                   what="sanitize", writable=lambda x: True, causal_alignment="bottom_right",
                                   scale=None, backend="cuda", **options)
for splits in (1, 3, 8):
    out = cp.empty(base.out_shape, dtype=dtype)
    lse = cp.empty(base.lse_shape, dtype=np.float32)
    decode.flash_decode(q, k_pages, v_pages, cp.asarray(lengths), table, slopes, out, lse, base,
                        max_seqlen_k=int(lengths.max()), splits=splits)
# Lengths and pages outside the cache, left unchecked on the device (max_seqlen_k): clamped reads,
# skipped appends, no access outside the cache.
bad_lengths = cp.asarray(np.array([10**6, -3, 50], np.int32))
bad_table = table.copy()
bad_table[0] = cp.asarray(np.array([-1, 10**6, 2**31 - 1, 0, 1, 2, 3], np.int32))
cuflash.attention_with_kvcache(q, k_pages, v_pages, bad_lengths, k_new=k_new, v_new=v_new, block_table=bad_table,
                               max_seqlen_k=7 * page, backend="cuda", **options)
dense_k, dense_v = (x[table].reshape(B, 7 * page, Hkv, D) for x in (k_pages, v_pages))
cuflash.attention_with_kvcache(q[..., :64], cp.ascontiguousarray(dense_k[..., :64]), dense_v[..., ::2],
                               cp.asarray(lengths), backend="cuda", causal=True)
cp.cuda.Device().synchronize()
print("sanitizer program done")
PY
if command -v compute-sanitizer >/dev/null 2>&1; then
    for tool in memcheck racecheck; do
        echo "-- $tool"
        timeout 900 compute-sanitizer --tool $tool --error-exitcode 3 $python "$out/decode_sanitize.py" 2>&1 \
            | tee "$out/decode_$tool.log" | tail -6 || status=1
    done
else
    echo "compute-sanitizer not found: sanitizer checks skipped" | tee "$out/decode_memcheck.log"
fi

echo "== 4. benchmark"
timeout 3000 $python bench/bench_decode.py --json "$out/decode_bench.json" 2>&1 | tee "$out/decode_bench.log" \
    | grep -v '^{' || status=1

echo "== decode check: $([ $status -eq 0 ] && echo passed || echo FAILED)"
exit $status
