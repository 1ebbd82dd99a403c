"""Kill -9 a training process with DataLoader workers and count the workers still alive.

    python -m tests.orphans [--wait 30]      # prints: workers N, alive after kill: M

Used by tests/test_faults.py; also run against an older checkout for the figure before."""
import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def children_of(pid):
    """Pids of the live (not zombie) processes whose parent is ``pid``."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid and fields[0] != "Z":
            found.append(int(entry))
    return found


def alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def kill_training_and_count(workdir, workers=2, wait_s=30.0, root=ROOT):
    """(workers seen, workers alive ``wait_s`` after SIGKILL of their training process)."""
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=str(root) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cmd = [sys.executable, str(root / "main_pretrain.py"), "--config", "demo/mae.yaml",
           "--num_workers", str(workers), "--epochs", "50", "--auto_resume", "false",
           "--output_dir", str(Path(workdir) / "out")]
    proc = subprocess.Popen(cmd, cwd=workdir, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    kids = []
    try:
        deadline = time.time() + 300
        while time.time() < deadline and proc.poll() is None:
            kids = children_of(proc.pid)
            if len(kids) >= workers:
                break
            time.sleep(0.2)
        time.sleep(1.0)  # the workers are past their start-up
        kids = children_of(proc.pid)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    deadline = time.time() + wait_s
    while time.time() < deadline and any(alive(k) for k in kids):
        time.sleep(0.2)
    left = [k for k in kids if alive(k)]
    for k in left:  # the orphans this measurement made
        try:
            os.kill(k, signal.SIGKILL)
        except OSError:
            pass
    return len(kids), len(left)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--wait", type=float, default=30.0)
    p.add_argument("--workers", type=int, default=2)
    a = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        seen, left = kill_training_and_count(tmp, a.workers, a.wait)
        print(f"workers {seen}, alive {a.wait:.0f} s after kill -9 of their parent: {left}")


if __name__ == "__main__":
    main()
