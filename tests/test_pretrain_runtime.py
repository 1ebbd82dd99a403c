"""The pretraining runtime end to end on the bundled demo digits: defaults, accumulation,
multi-process equivalence, kill-and-resume, corrupt data, checkpoints and VisualDL logs."""
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import paddle
import pytest

from paddle_cae.cli.pretrain import run
from paddle_cae.runtime.checkpoint import load_checkpoint, save_checkpoint
from paddle_cae.runtime.resume import find_resume_checkpoint

ROOT = Path(__file__).resolve().parent.parent
MAIN = str(ROOT / "main_pretrain.py")
DEMO = str(ROOT / "demo" / "digits")
SMALL = ["--config", "demo/mae.yaml", "--num_workers", "0", "--print_freq", "50"]


def env_for_subprocess():
    env = dict(os.environ)
    env["OMP_NUM_THREADS"] = "1"
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def model_state(path):
    return load_checkpoint(path)["model"]


def assert_states_close(a, b, atol=0.0):
    assert sorted(a) == sorted(b)
    for key in a:
        if atol == 0.0:
            np.testing.assert_array_equal(a[key], b[key], err_msg=key)
        else:
            np.testing.assert_allclose(a[key], b[key], atol=atol, rtol=1e-4, err_msg=key)


def read_log(output_dir):
    return [json.loads(line) for line in (Path(output_dir) / "log.txt").read_text().splitlines()]


@pytest.mark.slow
def test_main_pretrain_without_arguments_trains_the_demo_and_writes_a_checkpoint(tmp_path):
    proc = subprocess.run([sys.executable, MAIN], cwd=tmp_path, env=env_for_subprocess(),
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = tmp_path / "output" / "demo_mae"
    checkpoints = sorted(out.glob("checkpoint-*.pd"))
    assert out / "checkpoint-latest.pd" in checkpoints
    state = load_checkpoint(out / "checkpoint-latest.pd")
    assert state["kind"] == "pretrain" and state["batches_done"] is None
    assert state["epoch"] == state["args"]["epochs"] - 1
    log = read_log(out)
    assert log[-1]["train_loss"] < log[0]["train_loss"]  # it learns
    assert (out / "encoder.pd").exists()
    assert "effective batch size" in proc.stdout and "learning rate" in proc.stdout


def test_accumulating_two_batches_equals_one_batch_twice_as_large(tmp_path):
    common = SMALL + ["--epochs", "1", "--max_train_step", "2", "--auto_resume", "false",
                      "--warmup_epochs", "0", "--blr", "1e-2"]
    paddle.seed(0)
    big = run(common + ["--batch_size", "16", "--accum_iter", "1", "--max_train_step", "1",
                        "--output_dir", str(tmp_path / "big")])
    paddle.seed(0)
    acc = run(common + ["--batch_size", "8", "--accum_iter", "2",
                        "--output_dir", str(tmp_path / "acc")])
    assert big.global_step == acc.global_step == 1
    big_ckpt = load_checkpoint(tmp_path / "big" / "checkpoint-0.pd")
    acc_ckpt = load_checkpoint(tmp_path / "acc" / "checkpoint-0.pd")
    # the first moment after one AdamW step is (1 - beta1) * gradient: same gradient
    for i, moments in big_ckpt["optimizer"]["state"].items():
        other = acc_ckpt["optimizer"]["state"][i]
        np.testing.assert_allclose(other["exp_avg"], moments["exp_avg"], rtol=1e-4, atol=1e-9)
    # Adam normalises each gradient, so entries whose true gradient is zero move by an amount
    # set by rounding noise (anything up to the lr, and the noise depends on the summation
    # order, i.e. on the thread count): the key third of every qkv bias, which cancels in the
    # softmax. Those are only bounded by the lr; everything else moves alike.
    lr = 1e-2 * 16 / 256
    big_model, acc_model = dict(big_ckpt["model"]), dict(acc_ckpt["model"])
    for key in [k for k in big_model if k.endswith("attn.qkv.bias")]:
        third = big_model[key].shape[0] // 3
        for part, (x, y) in enumerate(zip(np.split(big_model.pop(key), 3), np.split(acc_model.pop(key), 3))):
            atol = 2 * lr if part == 1 else 2e-5
            np.testing.assert_allclose(y, x, atol=atol, rtol=1e-4, err_msg=f"{key}[{part * third}:]")
    assert_states_close(big_model, acc_model, atol=2e-5)


@pytest.mark.slow
def test_two_processes_match_one_process_with_the_same_global_batch(tmp_path):
    args = ["--config", "demo/mae.yaml", "--epochs", "1", "--max_train_step", "3",
            "--num_workers", "0", "--auto_resume", "false", "--print_freq", "50",
            "--warmup_epochs", "0"]
    env = env_for_subprocess()
    two = tmp_path / "two"
    cmd = [sys.executable, "-m", "paddle.distributed.launch", "--nproc_per_node", "2",
           "--log_dir", str(tmp_path / "launch_logs"), MAIN] + args + [
        "--batch_size", "8", "--output_dir", str(two)]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True)
    logs = "".join(p.read_text() for p in (tmp_path / "launch_logs").glob("workerlog.*"))
    assert proc.returncode == 0, logs[-3000:]
    record = read_log(two)[-1]
    assert record["ranks_in_sync"] is True  # bit-identical parameters on both ranks
    one = tmp_path / "one"
    proc = subprocess.run([sys.executable, MAIN] + args + ["--batch_size", "16", "--output_dir",
                                                           str(one)],
                          cwd=tmp_path, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert_states_close(model_state(two / "checkpoint-0.pd"), model_state(one / "checkpoint-0.pd"),
                        atol=1e-5)


@pytest.mark.slow
def test_a_killed_run_resumes_exactly_where_it_stopped(tmp_path):
    args = SMALL + ["--epochs", "2", "--max_train_step", "12", "--batch_size", "32",
                    "--save_latest_freq", "2", "--auto_resume", "true"]
    env = env_for_subprocess()
    reference = tmp_path / "reference"
    proc = subprocess.run([sys.executable, MAIN] + args + ["--output_dir", str(reference)],
                          cwd=tmp_path, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]

    killed = tmp_path / "killed"
    cmd = [sys.executable, MAIN] + args + ["--output_dir", str(killed)]
    victim = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    latest = killed / "checkpoint-latest.pd"
    deadline = time.time() + 300
    mid_epoch = None
    while time.time() < deadline and victim.poll() is None:
        if latest.exists():
            try:
                state = load_checkpoint(latest)
            except ValueError:
                state = None
            if state and state["batches_done"] is not None and state["epoch"] == 1:
                mid_epoch = state
                break
        time.sleep(0.05)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    assert mid_epoch is not None, "the run never wrote a mid-epoch checkpoint before ending"
    assert not (killed / "checkpoint-1.pd").exists()

    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "resumed from" in proc.stdout
    assert_states_close(model_state(killed / "checkpoint-1.pd"),
                        model_state(reference / "checkpoint-1.pd"))


def test_auto_resume_skips_a_truncated_checkpoint_for_the_previous_complete_one(tmp_path):
    save_checkpoint({"model": {"w": np.ones(3)}, "epoch": 3, "batches_done": None},
                    tmp_path / "run_checkpoint-3.pd")
    good = load_checkpoint(tmp_path / "run_checkpoint-3.pd")
    save_checkpoint({"model": {"w": np.zeros(3)}, "epoch": 4, "batches_done": None},
                    tmp_path / "run_checkpoint-4.pd")
    data = (tmp_path / "run_checkpoint-4.pd").read_bytes()
    (tmp_path / "run_checkpoint-4.pd").write_bytes(data[: len(data) // 2])
    # a checkpoint of another experiment in the same folder is not a candidate
    save_checkpoint({"model": {}, "epoch": 9, "batches_done": None},
                    tmp_path / "other_checkpoint-9.pd")
    path, state = find_resume_checkpoint(tmp_path, exp_name="run")
    assert Path(path).name == "run_checkpoint-3.pd"
    np.testing.assert_array_equal(state["model"]["w"], good["model"]["w"])


def test_a_mid_epoch_checkpoint_beats_the_end_of_the_previous_epoch(tmp_path):
    save_checkpoint({"model": {}, "epoch": 0, "batches_done": None}, tmp_path / "checkpoint-0.pd")
    save_checkpoint({"model": {}, "epoch": 1, "batches_done": 4}, tmp_path / "checkpoint-latest.pd")
    path, _ = find_resume_checkpoint(tmp_path)
    assert Path(path).name == "checkpoint-latest.pd"


def test_a_corrupt_jpeg_is_replaced_and_counted(tmp_path):
    data = tmp_path / "data" / "train"
    for label in ("a", "b"):
        (data / label).mkdir(parents=True)
        for k in range(12):
            src = sorted((Path(DEMO) / "train" / ("1" if label == "a" else "7")).glob("*.png"))[k]
            (data / label / f"{k}.png").write_bytes(src.read_bytes())
    (data / "a" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not really a jpeg")
    out = tmp_path / "out"
    run(SMALL + ["--data_path", str(tmp_path / "data"), "--batch_size", "25", "--epochs", "1",
                 "--output_dir", str(out), "--auto_resume", "false"])
    assert read_log(out)[-1]["train_replaced_images"] == 1


def test_visualdl_logs_can_be_read_back(tmp_path):
    from visualdl import LogReader

    out = tmp_path / "out"
    run(SMALL + ["--epochs", "1", "--max_train_step", "4", "--batch_size", "16", "--print_freq", "1",
                 "--vis_freq", "2", "--output_dir", str(out), "--auto_resume", "false"])
    files = list((out / "vdl").glob("vdlrecords.*.log"))
    assert files
    reader = LogReader(file_path=str(files[0]))
    tags = reader.get_tags()
    assert "loss/loss" in tags["scalar"] and "opt/lr" in tags["scalar"]
    losses = reader.get_data("scalar", "loss/loss")
    assert len(losses) == 4 and all(np.isfinite(r.value) for r in losses)
    assert "reconstruction" in tags["image"]  # original / masked / reconstruction
    assert len(reader.get_data("image", "reconstruction")) == 2


@pytest.mark.slow
def test_unknown_config_key_fails_naming_the_key(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: mae_vit_base_patch16\nmask_ration: 0.5\n")
    proc = subprocess.run([sys.executable, MAIN, "--config", str(bad)], cwd=tmp_path,
                          env=env_for_subprocess(), capture_output=True, text=True)
    assert proc.returncode != 0
    assert "mask_ration" in proc.stderr


def seed_commands():
    lines = (ROOT / "tests" / "data" / "seed_pretrain_commands.txt").read_text().splitlines()
    return [line for line in lines if line.strip() and not line.startswith("#")]


def seed_id(command):
    model = command.split("--model ")[1].split()[0]
    return "bootmae" if model == "${MODEL}" else model


@pytest.mark.slow
@pytest.mark.parametrize("command", seed_commands(), ids=[f"{i}-{seed_id(c)}" for i, c in
                                                          enumerate(seed_commands())])
def test_every_seed_pretraining_command_runs_on_the_demo_data(command, tmp_path, monkeypatch):
    """The seeds' command lines as written (full-size models), pointed at the demo data with
    one step of a tiny batch. The CAE ones get a small fixed-random DALL-E-shaped tokenizer
    with the release vocabulary."""
    from paddle_cae.models.dalle import DalleEncoder

    monkeypatch.chdir(tmp_path)  # commands without --output_dir write to ./output_dir
    tokenizer = tmp_path / "tokenizer" / "encoder.pd"
    paddle.seed(0)
    save_checkpoint({k: v.numpy() for k, v in DalleEncoder(n_hid=16, n_blk_per_group=1,
                                                             vocab_size=8192).state_dict().items()},
                    tokenizer)
    values = {"DATA_PATH": DEMO, "IMAGENET_DIR": DEMO, "OUTPUT_DIR": str(tmp_path / "out"),
              "TOKENIZER_PATH": str(tokenizer.parent), "MODEL": "bootmae_base", "my_name": "seed"}
    for name, value in values.items():
        command = command.replace("${%s}" % name, value).replace("$" + name, value)
    steps = "2" if "--accum_iter 2" in command else "1"  # one optimizer update
    argv = shlex.split(command) + ["--epochs", "1", "--batch_size", "2", "--max_train_step", steps,
                                   "--num_workers", "0", "--print_freq", "1"]
    runner = run(argv)
    assert runner.global_step >= 1
    out = tmp_path / "out" if "--output_dir" in command else tmp_path / "output_dir"
    assert list(out.glob("*checkpoint-0.pd"))


@pytest.mark.slow
def test_two_node_launch_on_loopback_trains_in_sync(tmp_path):
    """The multi-node form (--nnodes 2 --master host:port --rank r), both nodes on this host."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "out"
    procs = []
    for rank in (0, 1):
        cmd = [sys.executable, "-m", "paddle.distributed.launch", "--nnodes", "2",
               "--master", f"127.0.0.1:{port}", "--rank", str(rank), "--nproc_per_node", "1",
               "--log_dir", str(tmp_path / f"logs{rank}"), MAIN] + SMALL + [
            "--epochs", "1", "--max_train_step", "2", "--batch_size", "8", "--auto_resume", "false",
            "--output_dir", str(out)]
        procs.append(subprocess.Popen(cmd, cwd=tmp_path, env=env_for_subprocess(),
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    codes = [p.wait(timeout=1800) for p in procs]
    logs = "".join(p.read_text() for p in tmp_path.glob("logs*/workerlog.*"))
    assert codes == [0, 0], logs[-3000:]
    record = read_log(out)[-1]
    assert record["ranks_in_sync"] is True
    assert "2 process(es)" in logs


RESUME_PROBE = '''
import json, os, sys
sys.path.insert(0, {root!r})
from paddle_cae.engine import run as run_mod
from paddle_cae.cli.pretrain import run
from paddle_cae.runtime import distributed as dist_rt

rank = int(os.environ.get("PADDLE_TRAINER_ID", 0))
base = sys.argv[1]
original = run_mod.TrainingRun.maybe_resume


def recording(self):
    path = original(self)
    seen = dict(rank=rank, path=path, start_epoch=self.start_epoch, start_batch=self.start_batch,
                global_step=self.global_step, digest=dist_rt.state_digest(self.model_core))
    with open(os.path.join(base, "resume_rank%d.json" % rank), "w") as f:
        json.dump(seen, f)
    return path


run_mod.TrainingRun.maybe_resume = recording
# node-local folders: every rank runs in its own working directory with --output_dir out
os.chdir(os.path.join(base, "node%d" % rank))
run(sys.argv[2:] + ["--output_dir", "out"])
'''


@pytest.mark.slow
@pytest.mark.parametrize("rank1_folder", ["empty", "other_run"])
def test_resume_is_decided_by_rank_0_and_reaches_a_rank_that_cannot_see_the_checkpoint(tmp_path, rank1_folder):
    """Node-local output folders (each rank in its own working directory, --output_dir out):
    rank 0's folder holds the checkpoint; rank 1's is empty, or holds a checkpoint of the same
    name from another run (other weights). Both ranks must continue from rank 0's (same
    weights, same epoch), not rank 1 from its own view."""
    args = SMALL + ["--max_train_step", "2", "--batch_size", "8", "--warmup_epochs", "0"]
    env = env_for_subprocess()
    for rank, seed in ((0, "0"), (1, "1")):
        (tmp_path / f"node{rank}").mkdir()
        if rank == 1 and rank1_folder == "empty":
            continue
        proc = subprocess.run([sys.executable, MAIN] + args + [
            "--epochs", "1", "--auto_resume", "false", "--batch_size", "16", "--seed", seed,
            "--output_dir", "out"], cwd=tmp_path / f"node{rank}", env=env,
            capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr[-2000:]
    script = tmp_path / "probe.py"
    script.write_text(RESUME_PROBE.format(root=str(ROOT)))
    cmd = [sys.executable, "-m", "paddle.distributed.launch", "--nproc_per_node", "2",
           "--log_dir", str(tmp_path / "launch_logs"), str(script), str(tmp_path)] + args + [
        "--epochs", "2", "--auto_resume", "true"]
    launcher = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        code = launcher.wait(timeout=1800)
    except subprocess.TimeoutExpired:
        os.killpg(launcher.pid, signal.SIGKILL)
        code = None
    logs = "".join(p.read_text() for p in (tmp_path / "launch_logs").glob("workerlog.*"))
    seen = [json.loads((tmp_path / f"resume_rank{r}.json").read_text()) for r in (0, 1)]
    assert Path(seen[0]["path"]).parent == Path("out")
    for key in ("path", "start_epoch", "start_batch", "global_step", "digest"):
        assert seen[1][key] == seen[0][key], (key, seen)
    assert seen[0]["start_epoch"] == 1
    assert code == 0, logs[-3000:]
    assert "sent to every rank" in logs  # rank 0's state reached rank 1
    assert read_log(tmp_path / "node0" / "out")[-1]["ranks_in_sync"] is True


@pytest.mark.slow
@pytest.mark.parametrize("script", ["main_pretrain.py", "main_infer.py"])
def test_entrypoints_default_to_one_thread_respect_the_users_setting_and_start_quietly(script):
    probe = ("import os, runpy; runpy.run_path(%r, run_name='imported'); "
             "import paddle; print('threads', os.environ['OMP_NUM_THREADS'])" % str(ROOT / script))
    env = env_for_subprocess()
    env.pop("OMP_NUM_THREADS", None)
    proc = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, env=env, capture_output=True,
                          text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "threads 1" in proc.stdout
    assert "ccache" not in proc.stderr and "WARNING" not in proc.stderr, proc.stderr
    env["OMP_NUM_THREADS"] = "3"
    proc = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, env=env, capture_output=True,
                          text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "threads 3" in proc.stdout and "ccache" not in proc.stderr


def test_cae_takes_its_vocabulary_from_the_tokenizer_unless_the_user_sets_it(tmp_path, capsys):
    from paddle_cae.cli.pretrain import main

    text = (ROOT / "configs" / "demo" / "cae.yaml").read_text()
    assert "decoder_num_classes: 512" in text
    config = tmp_path / "cae_no_vocab.yaml"
    config.write_text(text.replace("decoder_num_classes: 512\n", "").replace(
        "demo/tokenizer/", str(ROOT / "demo" / "tokenizer") + "/"))
    common = ["--config", str(config), "--epochs", "1", "--max_train_step", "1", "--batch_size", "4",
              "--num_workers", "0", "--print_freq", "1"]
    runner = run(common + ["--output_dir", str(tmp_path / "a")])  # default 8192, tokenizer 512
    assert runner.args.decoder_num_classes == 512
    assert runner.model_core.decoder.head.weight.shape[-1] == 512
    # a vocabulary the user chose is kept, and a mismatch is still a one-line error
    assert main(common + ["--output_dir", str(tmp_path / "b"), "--decoder_num_classes", "8192"]) == 2
    err = capsys.readouterr().err
    assert "vocabulary of 512" in err and "--decoder_num_classes" in err


def test_bootmae_peak_lr_below_min_lr_warns(caplog):
    from paddle_cae.cli.pretrain import prepare_args
    from paddle_cae.runtime.distributed import DistEnv
    from paddle_cae.cli.pretrain_args import parse_pretrain_args

    base = ["--model", "bootmae_base", "--data_path", DEMO, "--lr", "1.5e-4", "--min_lr", "1e-4"]
    with caplog.at_level("WARNING", logger="paddle_cae"):
        args = prepare_args(parse_pretrain_args(base + ["--batch_size", "8"]), DistEnv())
    assert args.abs_lr == pytest.approx(1.5e-4 * 8 / 256)
    assert any("below --min_lr" in r.getMessage() and "BootMAE scaling" in r.getMessage()
               for r in caplog.records)
    caplog.clear()
    with caplog.at_level("WARNING", logger="paddle_cae"):
        prepare_args(parse_pretrain_args(base + ["--batch_size", "256"]), DistEnv())
    assert not any("below --min_lr" in r.getMessage() for r in caplog.records)


def test_demo_start_up_names_the_small_variant(tmp_path, caplog):
    with caplog.at_level("INFO", logger="paddle_cae"):
        run(["--epochs", "1", "--max_train_step", "1", "--batch_size", "8", "--num_workers", "0",
             "--output_dir", str(tmp_path)])
    line = next(r.getMessage() for r in caplog.records if "trainable parameters" in r.getMessage())
    assert line.startswith("model mae_vit_base_patch16, the demo's small variant (")
    assert "embed_dim=64" in line and "depth=2" in line
