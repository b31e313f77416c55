#!/usr/bin/env bash
# One device session's measurements, in the order they are worth having: the kernel variants
# compiled, the launch path checked, then the feature rows beside FlexAttention and the standard
# rows beside the previous version (.old, made with `git archive <commit> cuflash cuda_src`).
# Writes logs and JSON to $OUT (or ./out).
set -uo pipefail
export PYTHONUNBUFFERED=1
out=${OUT:-out}
mkdir -p "$out"
python3 bench/prewarm.py --family sm90 2>&1 | tail -3
timeout 120 python3 -m pytest -q -x -p no:cacheprovider tests/gpu/test_forward.py tests/gpu/test_backward.py \
    tests/gpu/test_mask.py -k "not table_entry" 2>&1 | tail -3
timeout 240 python3 bench/bench_features.py --ns 8192,16384,32768 --flex-ns 8192 --json "$out/features.json" 2>&1 \
    | grep -v -i warn | tee "$out/features.log" | tail -26
if [ -d .old ]; then
    python3 - <<'PY'
import sys
from concurrent.futures import ThreadPoolExecutor
sys.path.insert(0, ".old")
from cuflash._cuda import backward, forward, runtime
jobs = [(forward.SOURCE,) + job for job in forward.instantiations("sm90")] + list(backward.instantiations("sm90"))
jobs = [job for job in jobs if job[2].get("DTYPE") != 3]
with ThreadPoolExecutor(16) as pool:
    list(pool.map(lambda job: runtime.get_kernel(*job), jobs))
print(f"old version: {len(jobs)} variants compiled")
PY
    timeout 200 python3 bench/bench_versions.py --old .old --rounds 2 --dtypes bfloat16,float16 --dims 64,128,256 \
        --ns 2048,8192 --json "$out/versions16.json" 2>&1 | tail -26
fi
