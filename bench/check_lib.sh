# Shared by the bench/check_*.sh scripts (sourced): strict pipelines, unbuffered Python, logs and
# JSON to $OUT (default ./out), the interpreter in $PYTHON, and `status` set to 1 by any failure.
set -uo pipefail
export PYTHONUNBUFFERED=1
out=${OUT:-out}
mkdir -p "$out"
python=${PYTHON:-python3}
status=0
