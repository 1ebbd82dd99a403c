"""Faults under data-parallel training, with two gloo ranks launched by
``paddle.distributed.launch``: gradient accumulation that all-reduces only the last micro-batch,
and a rank that hangs without exiting."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from paddle_cae.runtime.distributed import CollectiveWatchdog, collective_timeout_s, rendezvous_endpoint

ROOT = Path(__file__).resolve().parent.parent
WORKER = str(ROOT / "tests" / "workers" / "dp_faults.py")


def launch(tmp_path, *worker_args, env_extra=None, timeout=180):
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               **(env_extra or {}))
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
def test_accumulation_all_reduces_only_the_last_micro_batch_of_each_group(tmp_path):
    proc, results, logs = launch(tmp_path, "--mode", "nosync", "--accum", "2")
    assert proc.returncode == 0 and len(results) == 2, logs[-3000:]
    for r in results:
        # the ranks feed different inputs: equal gradients after micro-batch 0 would mean they
        # were all-reduced; after the update the weights agree (the last one was)
        assert r["stepped"] == [False, True, False, True]
        assert r["reduced"] == [False, False], logs[-3000:]
        assert r["in_sync"] is True


@pytest.mark.slow
def test_the_detector_sees_the_all_reduce_of_a_forward_outside_no_sync(tmp_path):
    # the way the loops ran before: Paddle prepares the all-reduce in the forward
    proc, results, logs = launch(tmp_path, "--mode", "forward_outside", "--accum", "2")
    assert proc.returncode == 0 and len(results) == 2, logs[-3000:]
    assert all(r["reduced"] == [True, True] for r in results), logs[-3000:]


@pytest.mark.slow
def test_a_rank_hanging_without_exiting_ends_the_job_after_the_collective_timeout(tmp_path):
    proc, results, logs = launch(tmp_path, "--mode", "hang",
                                 env_extra={"PADDLE_PG_TIMEOUT": "4000"})
    assert proc.returncode != 0 and not results, logs[-3000:]
    assert "no training step completed for 4 s" in logs and "PADDLE_PG_TIMEOUT" in logs
    assert "rank 0 step 1 done" in logs and "rank 0 step 2 done" not in logs


def test_collective_timeout_comes_from_the_launchers_variable():
    assert collective_timeout_s({}) == 1800.0
    assert collective_timeout_s({"PADDLE_PG_TIMEOUT": "90000"}) == 90.0
    with pytest.raises(ValueError, match="PADDLE_PG_TIMEOUT"):
        collective_timeout_s({"PADDLE_PG_TIMEOUT": "30s"})


def test_the_watchdog_fires_only_after_a_heartbeat_and_a_silence_longer_than_its_limit():
    import threading

    fired = threading.Event()
    watchdog = CollectiveWatchdog(0, 0.2, exit=lambda code: fired.set())
    assert not fired.wait(0.6)  # not armed before the first heartbeat
    watchdog.beat("step 1")
    assert fired.wait(30)
    assert watchdog.fired


def test_the_start_up_check_uses_the_endpoint_of_paddles_own_rendezvous():
    env = {"PADDLE_MASTER": "10.0.0.1:6170", "PADDLE_TRAINER_ENDPOINTS": "10.0.0.1:6171,10.0.0.2:6171"}
    assert rendezvous_endpoint(env)[0] == "10.0.0.1:6170"
    assert rendezvous_endpoint(dict(env, MASTER_ADDR="10.0.0.9", MASTER_PORT="29500"))[0] == \
        "10.0.0.9:29500"
    assert rendezvous_endpoint({"PADDLE_TRAINER_ENDPOINTS": "10.0.0.1:6171"})[0] == "10.0.0.1:6171"
    assert rendezvous_endpoint({}) == (None, None)


# ------------------------------------------------------------------ symbolic links in the data
def _image_tree(root, classes=("a", "b"), per_class=3):
    from PIL import Image

    for c in classes:
        (root / c / "sub").mkdir(parents=True)
        for k in range(per_class):
            folder = root / c / ("sub" if k % 2 else "")
            Image.new("RGB", (4, 4), (k, 0, 0)).save(folder / f"{k}.png")
    return root


def test_a_link_to_its_own_folder_and_to_the_parent_adds_no_sample_and_is_reported(tmp_path, caplog):
    from paddle_cae.data.datasets import ImageFolder

    root = _image_tree(tmp_path / "train")
    os.symlink(".", root / "a" / "self")
    os.symlink("..", root / "a" / "sub" / "up")  # the split folder: every class again
    os.symlink("../b", root / "a" / "other")  # another class's folder
    with caplog.at_level("WARNING"):
        data = ImageFolder(root)
    per_class = [sum(1 for _, label in data.samples if label == i) for i in range(2)]
    assert per_class == [3, 3]
    assert len({p for p, _ in data.samples}) == 6
    assert any("symbolic link loop" in r.getMessage() and "2 more" in r.getMessage()
               for r in caplog.records)


def test_linked_folders_are_followed_once_and_the_sample_order_is_the_sorted_walk(tmp_path):
    from paddle_cae.data.datasets import IMG_EXTENSIONS, ImageFolder

    root = _image_tree(tmp_path / "train", per_class=5)
    elsewhere = _image_tree(tmp_path / "elsewhere", classes=("x",), per_class=2)
    os.symlink(elsewhere / "x", root / "a" / "linked")  # an ordinary link into the tree
    (root / "a" / "sub-2").mkdir()
    (root / "a" / "sub-2" / "z.png").write_bytes((root / "a" / "0.png").read_bytes())
    expected = []
    for c in ("a", "b"):  # what os.walk(followlinks=True) listed before, for a tree without loops
        for dirpath, _, names in sorted(os.walk(root / c, followlinks=True)):
            expected += [os.path.join(dirpath, n) for n in sorted(names)
                         if n.lower().endswith(IMG_EXTENSIONS)]
    assert [p for p, _ in ImageFolder(root).samples] == expected


def test_a_slow_scan_reports_its_progress(tmp_path, caplog):
    from paddle_cae.data.datasets import FolderScan

    root = _image_tree(tmp_path / "train")
    scan = FolderScan(str(root), [str(root / "a")], (".png",), progress_every_s=0.0)
    with caplog.at_level("INFO"):
        files = scan.files_under(str(root / "a"))
    assert len(files) == 3
    assert any("scanning" in r.getMessage() and "folders so far" in r.getMessage()
               for r in caplog.records)
