"""Data-parallel training under loss scaling: two gloo ranks launched with
``paddle.distributed.launch``; a non-finite loss on one rank only must neither deadlock the
job nor let the ranks drift apart (they skip the step together and keep one loss scale)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
WORKER = str(ROOT / "tests" / "workers" / "dp_overflow.py")


def launch(tmp_path, *worker_args, timeout=120):
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    logs = tmp_path / "logs"
    cmd = [sys.executable, "-m", "paddle.distributed.launch", "--nproc_per_node", "2",
           "--log_dir", str(logs), WORKER, *worker_args]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=timeout)
    text = "".join(p.read_text() for p in sorted(logs.glob("workerlog.*")))
    results = [json.loads(line.split("RESULT ", 1)[1]) for line in text.splitlines()
               if line.startswith("RESULT ")]
    return proc, sorted(results, key=lambda r: r["rank"]), text


@pytest.mark.slow
@pytest.mark.parametrize("accum", [1, 2])
def test_one_rank_overflowing_skips_the_step_on_every_rank(tmp_path, accum):
    proc, results, logs = launch(tmp_path, "--accum", str(accum))
    assert proc.returncode == 0 and len(results) == 2, logs[-3000:]
    r0, r1 = results
    # the group holding step 1 is skipped on both ranks, every other group steps
    assert r0["steps"] == r1["steps"], logs[-3000:]
    skipped_groups = [i // accum for i, (_, skipped, _) in enumerate(r0["steps"]) if skipped]
    assert skipped_groups == [1 // accum]
    assert sum(stepped for stepped, _, _ in r0["steps"]) == 6 // accum - 1
    assert r0["scale"] == r1["scale"] == 65536.0 / 2 and r0["skipped"] == r1["skipped"] == 1
    assert r0["in_sync"] is True and r1["in_sync"] is True


@pytest.mark.slow
def test_a_non_finite_loss_on_one_rank_without_scaling_stops_every_rank(tmp_path):
    proc, results, logs = launch(tmp_path, "--scaling", "0")
    assert len(results) == 2, logs[-3000:]
    errors = {r["rank"]: r["error"] for r in results}
    assert "loss is" in errors[1] and "another rank" in errors[0]
    assert all(len(r["steps"]) == 1 for r in results)
