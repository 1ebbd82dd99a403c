"""The console shows what a user can act on: no ccache warning (also in the processes a run
starts), no Paddle C++ INFO/WARNING lines, no ``ReduceMeanCheckIfOneDNNSupport`` from an export."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from paddle_cae.startup import native_stdout_silenced, prepare_process
from tests.test_finetune import demo_runs

ROOT = Path(__file__).resolve().parents[1]
GLOG_LINE = re.compile(r"^[IW]\d{4} \d\d:\d\d:\d\d")
IMAGE = ROOT / "demo" / "digits" / "val" / "3" / sorted(os.listdir(ROOT / "demo" / "digits" / "val" / "3"))[0]


def noise(text):
    return [line for line in text.splitlines()
            if "ccache" in line or GLOG_LINE.match(line) or "ReduceMeanCheckIfOneDNNSupport" in line]


@pytest.mark.slow
def test_prepare_process_quiets_children_and_keeps_what_the_user_set():
    env = {"PYTHONWARNINGS": "error::ResourceWarning"}
    prepare_process(env)
    assert env["PYTHONWARNINGS"].split(",") == ["error::ResourceWarning", "ignore:No ccache found"]
    assert env["GLOG_minloglevel"] == "2" and env["OMP_NUM_THREADS"] == "1"
    prepare_process(env)  # idempotent
    assert env["PYTHONWARNINGS"].count("ccache") == 1
    mine = {"GLOG_minloglevel": "0", "OMP_NUM_THREADS": "2"}
    prepare_process(mine)
    assert mine["GLOG_minloglevel"] == "0" and mine["OMP_NUM_THREADS"] == "2"
    # a child that imports paddle with the environment prepared prints no ccache warning
    child = dict(os.environ)
    child.pop("PYTHONWARNINGS", None)
    prepare_process(child)
    proc = subprocess.run([sys.executable, "-c", "import paddle"], env=child, capture_output=True, text=True)
    assert proc.returncode == 0 and "ccache" not in proc.stderr


def test_native_stdout_is_silenced_only_inside_the_block(capfd):
    with native_stdout_silenced():
        os.write(1, b"from C++\n")
    os.write(1, b"after\n")
    assert capfd.readouterr().out == "after\n"


@pytest.mark.slow
def test_export_and_the_exported_example_print_only_their_own_lines(tmp_path):
    env = dict(os.environ)
    for name in ("PYTHONWARNINGS", "GLOG_minloglevel"):
        env.pop(name, None)
    out = tmp_path / "exported"
    proc = subprocess.run([sys.executable, str(ROOT / "main_infer.py"), "--resume", demo_runs()["best"],
                           "--export", str(out), "--img_path", str(IMAGE)], cwd=tmp_path, env=env,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert not noise(proc.stdout + proc.stderr), noise(proc.stdout + proc.stderr)
    assert proc.stdout.startswith("exported ")
    proc = subprocess.run([sys.executable, str(ROOT / "examples" / "predict_exported.py"), str(out), str(IMAGE)],
                          cwd=tmp_path, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert not noise(proc.stdout + proc.stderr), noise(proc.stdout + proc.stderr)
    assert proc.stdout.startswith("Inference results") and proc.stderr.strip() == ""
