"""Smoke test of benchmarks/learning.py: the --quick run (1 epoch of a few batches per stage)
finishes and prints a table row per method with numbers in [0, 100]. Not a quality check."""
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_quick_learning_benchmark_prints_a_row_per_method(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"))
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "learning.py"), "--quick",
                             "--output_dir", str(tmp_path)], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    rows = [line for line in result.stdout.splitlines() if line.startswith("| ") and "---" not in line]
    header, body = rows[0], rows[1:]
    assert "linear probe top-1" in header and "random init" in header
    labels = [row.split("|")[1].strip() for row in body]
    assert len(body) == 3
    assert labels[0].startswith("CAE (demo tokenizer: fixed random weights")
    assert labels[1:] == ["MAE", "BootMAE"]
    for row in body:
        cells = [c.strip() for c in row.split("|")[1:-1]]
        for top1 in cells[3:7]:
            assert 0.0 <= float(top1) <= 100.0
        assert re.fullmatch(r"[0-9.]+ -> [0-9.]+", cells[2])
