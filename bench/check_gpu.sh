#!/usr/bin/env bash
# The GPU verification of a change, in stages that each fit a 10-minute run (from the repository
# root; logs and JSON to $OUT, default ./out):
#
#     bash bench/check_gpu.sh compile     # every kernel variant of every family, for this GPU
#     bash bench/check_gpu.sh tests       # tests/gpu (all of it) and the CPU tests that touch the GPU path
#     bash bench/check_gpu.sh sanitize    # compute-sanitizer memcheck, racecheck and synccheck sweeps
#     bash bench/check_gpu.sh bench       # side by side with SDPA (flash, cuDNN) and FlexAttention
#     bash bench/check_gpu.sh new         # float32 accuracy over long sequences; the model training step
#     bash bench/check_gpu.sh float64 decode sm90fwd   # each new kernel family's own check script
#
# Stages run in the order given (several may be named at once); the kernel cache that `compile`
# fills is reused by the later ones. Exits non-zero when any stage fails.
. "$(dirname "$0")/check_lib.sh"

run() {  # run NAME TIMEOUT COMMAND...: log to $out/NAME.log, show its tail, remember a failure
    local name=$1 limit=$2
    shift 2
    echo "== $name"
    timeout "$limit" "$@" >"$out/$name.log" 2>&1
    local rc=$?
    grep -a -v -i "warn" "$out/$name.log" | tail -12
    [ $rc -eq 0 ] || { echo "!! $name failed (exit $rc)"; status=1; }
}

for stage in "$@"; do
    case $stage in
    compile)
        run prewarm 560 $python bench/prewarm.py --family sm90,sm80,sm75
        ;;
    tests)
        run gpu_tests 560 $python -m pytest -q -p no:cacheprovider -x tests/gpu
        run cpu_tests 300 $python -m pytest -q -p no:cacheprovider tests/test_ragged.py tests/test_edges.py \
            tests/test_decode_table.py tests/test_float64_table.py tests/test_variants.py
        ;;
    sanitize)
        if command -v compute-sanitizer >/dev/null; then
            run memcheck 400 compute-sanitizer --tool memcheck --error-exitcode 1 $python bench/sanitize_sweep.py
            run racecheck 300 compute-sanitizer --tool racecheck --error-exitcode 1 $python bench/sanitize_sweep.py --quick
            run synccheck 200 compute-sanitizer --tool synccheck --error-exitcode 1 $python bench/sanitize_sweep.py --quick
        else
            echo "!! compute-sanitizer not found"
            status=1
        fi
        ;;
    bench)
        run bench_attention 560 $python bench/bench_attention.py --dtypes bfloat16,float16 --dims 64,128,256 \
            --ns 2048,8192,16384 --no-extras --out "$out"
        run bench_features 300 $python bench/bench_features.py --ns 8192,16384 --flex-ns 8192 --json "$out/features.json"
        run bench_host 200 $python bench/bench_host.py --calls 1500 --json "$out/host.json"
        ;;
    new)
        run bench_accuracy 200 $python bench/bench_accuracy.py --json "$out/accuracy.json"
        run model_step 500 $python bench/bench_model_step.py --shapes 4x2048 --modes eager,graphs \
            --json "$out/model_step.json"
        ;;
    float64 | decode)
        bash bench/check_$stage.sh || status=1
        ;;
    sm90fwd)
        bash bench/check_fwd_sm90.sh || status=1
        ;;
    *)
        echo "unknown stage $stage (compile, tests, sanitize, bench, new, float64, decode, sm90fwd)"
        exit 2
        ;;
    esac
done
exit $status
