"""benchmarks/gpu_check.sh --dry-run: the prepared GPU check runs its whole code path on the
CPU at tiny sizes, so that it still works when a GPU machine is available."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_gpu_check_dry_run_writes_a_complete_report(tmp_path):
    out = tmp_path / "report.json"
    env = dict(os.environ, PYTHON=sys.executable, OMP_NUM_THREADS="1")
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--dry-run",
                           "--out", str(out)], cwd=tmp_path, env=env, capture_output=True,
                          text=True)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    report = json.loads(out.read_text())
    assert report["mode"] == "dry-run" and report["ok"] is True
    assert report["parity"]["ok"] and "passed" in report["parity"]["summary"]
    rows = report["training"]
    assert {r["model"] for r in rows} == {"mae_vit_base_patch16", "cae_base_patch16_224_8k_vocab",
                                         "bootmae_base", "vit_base_patch16"}
    for row in rows:
        assert "error" not in row, row
        assert row["img_per_s"] > 0 and row["peak_memory_mb"] > 0 and row["skipped_fraction"] == 0
        assert row["train_gflop_per_step"] > 0 and 0 < row["mfu"] < 5
    assert report["matmul_peak_tflops"]["float32"] > 0
    demo = report["demo"]
    assert demo["returncode"] == 0 and len(demo["epoch_losses"]) == 2
