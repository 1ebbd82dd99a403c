#!/usr/bin/env bash
# The prepared GPU check (see benchmarks/README.md, "GPU check"). On a fresh GPU machine:
#   pip install -r requirements-gpu.txt && bash benchmarks/gpu_check.sh
# Options go to benchmarks/gpu_check.py (--dry-run, --out FILE, --parts parity,train,demo).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python}"
LIMIT_S="${GPU_CHECK_LIMIT_S:-480}"
# the parity part runs the test suite's parity files: pytest is a test dependency, not in
# requirements-gpu.txt; without it (and no way to install it) that part is reported as not run
if ! "$PYTHON" -c "import pytest" 2>/dev/null; then
    "$PYTHON" -m pip install --quiet "pytest>=7" \
        || echo "gpu_check: could not install pytest; the parity part will not run" >&2
fi
# the whole check stops after LIMIT_S seconds: SIGTERM first (the script writes what it has),
# SIGKILL 15 s later; the script itself starts no part within --margin_s of the limit
exec timeout --signal=TERM --kill-after=15 "$LIMIT_S" \
    "$PYTHON" benchmarks/gpu_check.py --deadline_s "$LIMIT_S" "$@"
