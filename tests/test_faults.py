"""Training under faults and bad input: gradient accumulation that all-reduces only the last
micro-batch and a rank that hangs without exiting (two gloo ranks launched by
``paddle.distributed.launch``), the start-up check, symbolic-link loops in the data, resuming at
another global batch, a full disk, model arguments of the wrong type, DataLoader workers whose
parent is killed, a refused multi-tensor AdamW call, the logged scalars read without a host sync
per step, and the message of a run stopped by a non-finite loss."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from paddle_cae.runtime.distributed import CollectiveWatchdog, collective_timeout_s, rendezvous_endpoint
from tests.test_data_parallel import launch as launch_two_ranks

ROOT = Path(__file__).resolve().parent.parent
WORKER = str(ROOT / "tests" / "workers" / "dp_faults.py")


def launch(tmp_path, *worker_args, env_extra=None):
    return launch_two_ranks(tmp_path, *worker_args, timeout=1800, worker=WORKER,
                            env_extra=env_extra)


def cli_env():
    """The environment of a command-line run of this checkout."""
    return dict(os.environ, OMP_NUM_THREADS="1",
                PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))


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


# ------------------------------------------------------------- resume at another global batch
def _state(batches_done, batch_size=32, accum=1, images_per_batch=None, epoch=3):
    state = {"epoch": epoch, "batches_done": batches_done,
             "args": {"batch_size": batch_size, "accum_iter": accum}}
    if images_per_batch is not None:
        state["images_per_batch"] = images_per_batch
    return state


def test_resume_at_the_same_global_batch_continues_at_the_saved_batch():
    from paddle_cae.runtime.resume import resume_position

    assert resume_position(_state(12, images_per_batch=64), 32, 2, 1) == (3, 12, None)
    assert resume_position(_state(None, images_per_batch=64), 32, 2, 1) == (4, 0, None)
    assert resume_position(_state(12), 32, 2, 1) == (3, 12, None)  # older file: same processes


def test_resume_at_another_global_batch_continues_after_the_same_images():
    from paddle_cae.runtime.resume import resume_position

    # 12 batches of 2 x 32 images = 768 images; 1 process x 32, accum 2 -> batch 24 (12 updates)
    epoch, start, note = resume_position(_state(12, images_per_batch=64), 32, 1, 2, "ck.pd")
    assert (epoch, start) == (3, 24) and "768 images" in note
    # an epoch-end checkpoint: the next epoch simply starts at the new size
    epoch, start, note = resume_position(_state(None, images_per_batch=64), 48, 1, 1)
    assert (epoch, start) == (4, 0) and "global batch 48" in note


def test_resume_that_cannot_continue_after_the_same_images_is_refused_naming_both_sizes():
    from paddle_cae.runtime.resume import ResumeBatchError, resume_position

    with pytest.raises(ResumeBatchError) as err:
        resume_position(_state(12, images_per_batch=64), 40, 2, 1, "out/checkpoint-latest.pd")
    text = str(err.value)
    assert "\n" not in text and "out/checkpoint-latest.pd" in text
    assert "global batch 64" in text and "global batch 80" in text and "768 images" in text


@pytest.mark.slow
def test_a_mid_epoch_checkpoint_resumed_at_another_batch_size_skips_the_images_it_has_seen(tmp_path):
    from paddle_cae.io import load_checkpoint, save_checkpoint

    main = str(ROOT / "main_pretrain.py")
    env = cli_env()
    small = ["--config", "demo/mae.yaml", "--num_workers", "0", "--epochs", "1",
             "--auto_resume", "false"]
    first = tmp_path / "first"
    proc = subprocess.run([sys.executable, main, *small, "--batch_size", "32", "--max_train_step",
                           "2", "--output_dir", str(first)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=1800)  # hang guard
    assert proc.returncode == 0, proc.stderr[-2000:]
    state = load_checkpoint(first / "checkpoint-0.pd")
    assert state["images_per_batch"] == 32
    state["batches_done"] = 2  # as if saved mid-epoch after 64 images
    mid = save_checkpoint(state, tmp_path / "mid.pd")

    def resume(batch_size, out):
        return subprocess.run([sys.executable, main, *small, "--batch_size", str(batch_size),
                               "--max_train_step", "6", "--resume", str(mid),
                               "--output_dir", str(tmp_path / out)], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=1800)  # hang guard

    proc = resume(16, "sixteen")  # 64 images = 4 batches of 16
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "after the same 64 images, at batch 4" in proc.stdout + proc.stderr
    proc = resume(24, "twentyfour")  # 64 images are not whole batches of 24
    assert proc.returncode != 0 and "Traceback" not in proc.stdout + proc.stderr
    last = (proc.stdout + proc.stderr).strip().splitlines()[-1]
    assert "global batch 32" in last and "global batch 24" in last, last


# ------------------------------------------------------------------------ disk full in a save
def test_a_full_disk_during_a_save_is_one_line_naming_the_folder_and_the_space_needed(tmp_path, monkeypatch):
    import errno
    import pickle

    import numpy as np

    from paddle_cae.io import CheckpointWriteError, load_checkpoint, pd, save_checkpoint

    old = {"model": {"w": np.ones(4, np.float32)}, "epoch": 1}
    path = save_checkpoint(old, tmp_path / "checkpoint-latest.pd")
    real_dump = pickle.dump

    def dump_until_full(obj, f, protocol=None):  # the device fills up half-way through
        real_dump({"partial": np.zeros(1000)}, f, protocol=protocol)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(pd.pickle, "dump", dump_until_full)
    state = {"model": {"w": np.ones(3 << 20, np.float32)}, "epoch": 2}
    with pytest.raises(CheckpointWriteError) as err:
        save_checkpoint(state, path)
    text = str(err.value)
    assert "\n" not in text and str(tmp_path) in text and "No space left" in text
    assert "needs about 12 MiB" in text and "MiB free" in text
    assert isinstance(err.value, ValueError)  # the CLIs print ValueErrors as one line
    monkeypatch.undo()
    assert load_checkpoint(path)["epoch"] == 1  # the previous checkpoint is intact
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-latest.pd"]  # no temp file


# -------------------------------------------------------------------- --model_args of a bad type
@pytest.mark.parametrize("name,args,key", [
    ("mae_vit_base_patch16", {"embed_dim": "big"}, "embed_dim"),
    ("vit_base_patch16", {"drop_path_rate": {"rate": 0.1}}, "drop_path_rate"),
    ("cae_base_patch16_224_8k_vocab", {"depth": 2, "qkv_bias": "yes"}, "qkv_bias"),
    ("bootmae_base", {"embedd_dim": 64}, "embedd_dim"),  # no such argument
])
def test_a_model_argument_of_the_wrong_type_or_unknown_is_one_line_naming_the_key(name, args, key):
    from paddle_cae.models.registry import ModelArgumentError, create_model

    with pytest.raises(ModelArgumentError) as err:
        create_model(name, **args)
    assert f"'{key}'" in str(err.value) and "\n" not in str(err.value)


def test_model_arguments_of_the_right_kind_still_build():
    from paddle_cae.models.registry import create_model

    model = create_model("vit_base_patch16", img_size=32, embed_dim=24, depth=1, num_heads=3,
                         mlp_ratio=2, num_classes=5)  # an int where the default is a float
    assert model.head.weight.shape == [24, 5]


@pytest.mark.slow
def test_the_clis_print_one_line_for_a_bad_model_argument_from_a_flag_or_a_config(tmp_path):
    env = cli_env()
    config = tmp_path / "ft.yaml"
    config.write_text((ROOT / "configs" / "demo" / "finetune_mae.yaml").read_text()
                      + '\nmodel_args: {"embed_dim": "big"}\n')
    runs = [[str(ROOT / "main_pretrain.py"), "--config", "demo/mae.yaml", "--model_args",
             '{"embed_dim": "big"}'],
            [str(ROOT / "main_finetune.py"), "--config", str(config)]]
    for cmd in runs:
        proc = subprocess.run([sys.executable, *cmd, "--output_dir", str(tmp_path / "out")],
                              cwd=tmp_path, env=env, capture_output=True, text=True, timeout=1800)  # hang guard
        text = proc.stdout + proc.stderr
        assert proc.returncode != 0 and "Traceback" not in text, text[-2000:]
        assert "'embed_dim' is 'big', expected a number" in text.strip().splitlines()[-1]


# ------------------------------------------------------------- workers end with their parent
_FORK_AND_DIE = """
import os, sys, time
from paddle_cae.data import workers
if sys.argv[1] == "watchdog":
    workers._set_parent_death_signal = lambda sig: False
r, w = os.pipe()
pid = os.fork()
if pid == 0:
    how = workers.exit_with_parent(interval_s=0.1)
    os.write(w, how.encode())
    time.sleep(120)
    os._exit(0)
how = os.read(r, 16).decode()
print(pid, how, flush=True)
os._exit(0)  # the parent dies without a word, as under kill -9
"""


@pytest.mark.parametrize("mechanism", ["prctl", "watchdog"])
def test_a_worker_ends_when_its_parent_dies(mechanism):
    from tests.orphans import alive

    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    out = subprocess.run([sys.executable, "-c", _FORK_AND_DIE, mechanism], env=env,
                         capture_output=True, text=True, timeout=1800).stdout.split()  # hang guard
    pid, how = int(out[0]), out[1]
    assert how == mechanism
    for _ in range(600):  # the orphan would sleep 120 s
        if not alive(pid):
            break
        subprocess.run(["sleep", "0.05"])
    assert not alive(pid)


@pytest.mark.slow
def test_kill_9_of_a_training_process_leaves_no_dataloader_worker_behind(tmp_path):
    from tests.orphans import kill_training_and_count

    seen, left = kill_training_and_count(tmp_path, workers=2, wait_s=60.0)
    assert seen == 2 and left == 0


# ------------------------------------------------------------------- AdamW multi-tensor refusal
def test_a_refused_multi_tensor_adamw_call_is_an_error_line_and_the_update_is_unchanged(monkeypatch, caplog):
    import numpy as np
    import paddle

    from paddle_cae.optim import adamw

    def run(refuse):
        paddle.seed(0)
        layer = paddle.nn.Linear(4, 3)
        opt = adamw.AdamW([{"params": layer.parameters()}], lr=1e-2, weight_decay=0.05,
                          multi_tensor=True)
        if refuse:
            def refused(*args, **kwargs):
                raise RuntimeError("fused_adam_ is not supported here")
            monkeypatch.setattr(adamw, "_fused_adam", refused)
        for _ in range(2):
            layer(paddle.ones([2, 4])).square().mean().backward()
            opt.step()
            opt.clear_grad()
        monkeypatch.undo()
        return opt, [p.numpy().copy() for p in layer.parameters()]

    if not adamw._HAS_MULTI:
        pytest.skip("this Paddle has no multi-tensor AdamW kernel")
    _, expected = run(refuse=False)
    with caplog.at_level("ERROR"):
        opt, got = run(refuse=True)
    assert opt.multi_tensor_fallback == "RuntimeError: fused_adam_ is not supported here"
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1 and "refused the multi-tensor update" in errors[0]
    for a, b in zip(got, expected):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


# --------------------------------------------------- logged scalars without a host sync per step
def test_deferred_scalars_read_each_interval_once_with_exact_means_and_no_sync_in_add(monkeypatch):
    import paddle

    from paddle_cae.engine.scalars import DeferredScalars, update_metrics
    from paddle_cae.runtime.logging import MetricLogger

    scalars = DeferredScalars(every=2)
    reads = []
    for meth in ("numpy", "item", "tolist", "__float__"):
        original = getattr(paddle.Tensor, meth)
        monkeypatch.setattr(paddle.Tensor, meth,
                            lambda self, *a, _o=original, _m=meth, **k: reads.append(_m) or _o(self, *a, **k))
    losses = [1.0, 2.0, 4.0, 8.0, 16.0]
    metrics, got = MetricLogger(), []
    for k, value in enumerate(losses):
        scalars.add({"loss": paddle.to_tensor(value), "grad_norm": None if k % 2 else
                     paddle.to_tensor(10.0 * k), "lr": 0.5})
        assert reads == []  # adding never waits for the device
        got.append(scalars.read_queued())
        reads.clear()
        update_metrics(metrics, got[-1])
    rest = scalars.flush()
    update_metrics(metrics, rest)
    assert got[0] is None and got[1]["loss"] == (1.5, 2) and got[1]["grad_norm"] == (0.0, 1)
    assert got[3]["loss"] == (6.0, 2) and got[3]["lr"] == (0.5, 2)
    assert rest["loss"] == (16.0, 1) and scalars.flush() == {}
    assert metrics.averages()["loss"] == pytest.approx(sum(losses) / 5)
    assert metrics.averages()["grad_norm"] == pytest.approx((0 + 20 + 40) / 3)


# ------------------------------------------------------------- the message of a non-finite stop
def test_a_nan_stop_names_the_last_checkpoint_written_while_the_loss_was_sane():
    from paddle_cae.engine.scalars import LossTrend

    trend = LossTrend()
    for k, loss in enumerate([1.0, 0.8, 0.7]):
        trend.reading(f"epoch 0, batch {20 * k}", loss)
    trend.checkpoint("out/checkpoint-0.pd")
    trend.checkpoint("out/checkpoint-latest.pd")
    trend.reading("epoch 1, batch 0", 0.9)
    trend.reading("epoch 1, batch 20", 5.0)
    trend.checkpoint("out/checkpoint-latest.pd")  # diverging: finite weights, loss 5.0
    trend.reading("epoch 1, batch 40", 3.0e4)
    text = trend.stop_message("epoch 1, batch 57", "loss is nan", amp=True)
    assert "\n" not in text
    assert "last checkpoint written while the loss was sane: out/checkpoint-0.pd (loss 0.7)" in text
    assert "written after the loss began to rise: out/checkpoint-latest.pd" in text
    assert "1 (epoch 0, batch 0) -> 0.8 -> 0.7 -> 0.9 -> 5 -> 3e+04" in text
    assert "--clip_grad" in text and "lower learning rate" in text and "--amp false" in text


@pytest.mark.slow
def test_a_diverging_run_names_the_checkpoint_from_before_the_divergence(tmp_path):
    main = str(ROOT / "main_pretrain.py")
    env = cli_env()
    common = ["--config", "demo/mae.yaml", "--num_workers", "0", "--max_train_step", "6",
              "--batch_size", "16", "--print_freq", "2", "--save_ckpt_freq", "1",
              "--output_dir", str(tmp_path / "out")]
    sane = subprocess.run([sys.executable, main, *common, "--epochs", "1", "--lr", "1e-3"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=1800)  # hang guard
    assert sane.returncode == 0, sane.stderr[-2000:]
    # the same run continued at a learning rate that makes it diverge: its checkpoints keep
    # finite (but useless) weights for a few epochs before the loss overflows
    diverging = subprocess.run([sys.executable, main, *common, "--epochs", "8", "--lr", "150",
                                "--warmup_epochs", "2"], cwd=tmp_path, env=env,
                               capture_output=True, text=True, timeout=1800)  # hang guard
    text = diverging.stdout + diverging.stderr
    assert diverging.returncode != 0 and "Traceback" not in text, text[-3000:]
    last = text.strip().splitlines()[-1]
    assert "non-finite loss" in last and "loss trend: " in last
    assert f"last checkpoint written while the loss was sane: {tmp_path / 'out' / 'checkpoint-0.pd'}" in last
    assert "written after the loss began to rise" in last and "--clip_grad" in last


# --------------------------------------------------------------- start-up on Paddle's endpoint
def test_after_the_start_up_check_the_rendezvous_port_is_free_for_paddles_store_at_once():
    # the check runs on the port Paddle's own store binds next; no connection of the check may
    # leave it in TIME_WAIT, or the store's bind would fail
    import socket
    import threading

    from paddle_cae.runtime.distributed import startup_barrier

    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()
    errors = []

    def member(rank):
        try:
            startup_barrier(rank, 3, f"127.0.0.1:{port}", timeout=30)
        except Exception as err:  # noqa: BLE001
            errors.append(err)

    threads = [threading.Thread(target=member, args=(r,)) for r in (1, 2)]
    for t in threads:
        t.start()
    startup_barrier(0, 3, f"127.0.0.1:{port}", timeout=30)
    for t in threads:
        t.join(1800)  # hang guard
    assert not errors
    store = socket.socket()  # no SO_REUSEADDR: fails while a TIME_WAIT holds the port
    try:
        store.bind(("127.0.0.1", port))
        store.listen(1)
    finally:
        store.close()
