"""benchmarks/gpu_check.sh --dry-run: the prepared GPU check runs its whole code path on the
CPU at tiny sizes, so that it still works when a GPU machine is available."""
import importlib.util
import json
import os
import signal
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
                                         "bootmae_base", "vit_base_patch16",
                                         "upernet_cae_base_patch16_224"}
    segment = [r for r in rows if r["phase"] == "segment"]
    assert len(segment) == 1 and segment[0]["input_size"] == 128 and segment[0]["amp"] == "fp32"
    if importlib.util.find_spec("paddleseg") is None:  # the core environment: a clean skip
        assert set(segment[0]) >= {"skipped"} and "error" not in segment[0]
        assert segment[0]["skipped"].startswith("paddleseg not installed")
        assert "requirements-downstream.txt" in segment[0]["skipped"]
        rows = [r for r in rows if r is not segment[0]]
    else:  # the downstream environment: the UperNet step measured like the other rows
        assert "skipped" not in segment[0]
        assert segment[0]["train_gflop_per_step"] > rows[0]["train_gflop_per_step"]
    for row in rows:
        assert "error" not in row, row
        assert row["img_per_s"] > 0 and row["peak_memory_mb"] > 0 and row["skipped_fraction"] == 0
        assert row["train_gflop_per_step"] > 0 and 0 < row["mfu"] < 5
        assert set(row["attention"]) == {"sdpa", "sdpa_bias", "explicit"}
        assert row["adamw"] in ("multi-tensor", "per-tensor", "cpu-kernel", "fused")
    assert report["finished"] is True and report["datasheet_peak_tflops"] is None  # a CPU
    assert report["matmul_peak_tflops"]["float32"] > 0
    demo = report["demo"]
    assert demo["returncode"] == 0 and len(demo["epoch_losses"]) == 2


def _run_check(cwd, *args, timeout=1800):
    env = dict(os.environ, PYTHON=sys.executable, OMP_NUM_THREADS="1")
    return subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--dry-run", *args],
                          cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def test_dry_run_writes_its_report_outside_the_current_folder(tmp_path):
    proc = _run_check(tmp_path, "--parts", "")
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    assert list(tmp_path.iterdir()) == []  # nothing left in the folder it was started from
    path = proc.stdout.strip().splitlines()[-1].rsplit("report: ", 1)[1]
    report = json.loads(Path(path).read_text())
    assert report["finished"] is True and report["mode"] == "dry-run"
    assert report["matmul_peak_tflops"]["float32"] > 0


def test_a_check_stopped_by_its_time_limit_keeps_the_parts_it_finished(tmp_path):
    # SIGTERM (what the hard limit of gpu_check.sh sends) while the demo part runs: the report
    # written before it (peaks, training rows) stays, marked as stopped
    out = tmp_path / "report.json"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--dry-run",
                             "--parts", "demo", "--out", str(out)], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        while proc.poll() is None:  # until the peaks are in the report
            if out.exists() and "matmul_peak_tflops" in out.read_text():
                break
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=1800)  # hang guard
    finally:
        if proc.poll() is None:
            proc.kill()
    report = json.loads(out.read_text())
    assert proc.returncode == 124 and report["stopped"].startswith("signal")
    assert report["finished"] is False and report["matmul_peak_tflops"]["float32"] > 0


def test_mfu_denominators_of_known_cards():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import gpu_check

    assert gpu_check.datasheet_peak_tflops("NVIDIA H100 80GB HBM3") == 989.0
    assert gpu_check.datasheet_peak_tflops("NVIDIA H100 PCIe") == 756.0
    assert gpu_check.datasheet_peak_tflops("NVIDIA A100-SXM4-80GB") == 312.0
    assert gpu_check.datasheet_peak_tflops("NVIDIA A100-PCIE-40GB") == 312.0
    assert gpu_check.datasheet_peak_tflops("Tesla V100-SXM2-16GB") is None
