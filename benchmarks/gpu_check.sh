#!/usr/bin/env bash
# The prepared GPU check (see benchmarks/README.md, "GPU check"). On a fresh GPU machine:
#   pip install -r requirements-gpu.txt && bash benchmarks/gpu_check.sh
# Options go to benchmarks/gpu_check.py (--dry-run, --out FILE, --parts parity,train,demo).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python}"
# the whole check stops after 8 minutes; the script itself stops starting parts after 7.5
exec timeout 480 "$PYTHON" benchmarks/gpu_check.py "$@"
