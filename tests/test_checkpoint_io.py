"""The package's own .pd checkpoints: atomic writing and the safe reader."""
import os
import pickle
import types

import numpy as np
import paddle
import pytest

from paddle_cae.io import pd as pd_io
from paddle_cae.runtime.checkpoint import CheckpointError, load_checkpoint, save_checkpoint


class RunsShell:
    """Pickles into a call of os.system: what a hostile checkpoint would contain."""

    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


def test_round_trip_keeps_nested_arrays_scalars_strings_and_none(tmp_path):
    state = {
        "model": {"w": np.arange(6, dtype=np.float32).reshape(2, 3), "idx": np.arange(4, dtype=np.int64),
                  "flag": np.array([True, False])},
        "epoch": 7, "lr": 1.5e-4, "name": "cae_base", "done": False, "scaler": None,
        "history": [1, 2.5, "x", (3, 4)], "np_scalar": np.float32(0.5), "scalar0d": np.array(2.0),
    }
    path = save_checkpoint(state, tmp_path / "ck.pd")
    loaded = load_checkpoint(path)
    assert set(loaded) == set(state)
    for k, v in state["model"].items():
        assert loaded["model"][k].dtype == v.dtype
        np.testing.assert_array_equal(loaded["model"][k], v)
    assert (loaded["epoch"], loaded["lr"], loaded["name"], loaded["done"], loaded["scaler"]) == (7, 1.5e-4, "cae_base", False, None)
    assert loaded["history"] == [1, 2.5, "x", (3, 4)]
    assert loaded["np_scalar"] == 0.5 and isinstance(loaded["np_scalar"], float)
    assert loaded["scalar0d"].shape == () and loaded["scalar0d"] == 2.0


def test_paddle_tensors_are_saved_as_numpy_and_paddle_load_reads_our_files(tmp_path):
    layer = paddle.nn.Linear(3, 2)
    path = save_checkpoint({"model": layer.state_dict(), "step": 3}, tmp_path / "m.pd")
    ours = load_checkpoint(path)
    assert isinstance(ours["model"]["weight"], np.ndarray)
    np.testing.assert_array_equal(ours["model"]["weight"], layer.weight.numpy())
    theirs = paddle.load(str(path))
    np.testing.assert_array_equal(np.asarray(theirs["model"]["weight"]), layer.weight.numpy())
    assert theirs["step"] == 3


def test_reads_state_dicts_written_by_paddle_save(tmp_path):
    layer = paddle.nn.Sequential(paddle.nn.Linear(3, 4), paddle.nn.BatchNorm1D(4))
    path = tmp_path / "model.pdparams"
    paddle.save(layer.state_dict(), str(path))
    loaded = load_checkpoint(path)
    assert sorted(loaded) == sorted(layer.state_dict())  # paddle's name-table entry is dropped
    for k, v in layer.state_dict().items():
        np.testing.assert_array_equal(loaded[k], v.numpy())


def test_save_refuses_objects_that_are_not_plain_data(tmp_path):
    with pytest.raises(TypeError, match=r"checkpoint\['bad'\]"):
        save_checkpoint({"bad": object()}, tmp_path / "x.pd")
    assert list(tmp_path.iterdir()) == []


def test_failed_save_leaves_the_previous_file_intact_and_no_temp_files(tmp_path, monkeypatch):
    path = tmp_path / "ck.pd"
    save_checkpoint({"epoch": 1, "w": np.ones(3)}, path)
    before = path.read_bytes()

    def dump_half_then_fail(obj, f, protocol):
        f.write(pickle.dumps(obj, protocol=protocol)[:10])  # a partial write, then the crash
        raise OSError("disk full")

    monkeypatch.setattr(pd_io, "pickle", types.SimpleNamespace(dump=dump_half_then_fail))
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint({"epoch": 2, "w": np.zeros(3)}, path)
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert load_checkpoint(path)["epoch"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck.pd"]


def test_object_arrays_fail_before_anything_is_written(tmp_path):
    path = tmp_path / "ck.pd"
    save_checkpoint({"epoch": 1}, path)
    with pytest.raises(TypeError):
        save_checkpoint({"epoch": 2, "junk": np.array([object()], dtype=object)}, path)
    assert load_checkpoint(path) == {"epoch": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck.pd"]


@pytest.mark.parametrize("payload", ["os_system", "builtins_eval", "subprocess"])
def test_pickles_that_call_code_are_refused_and_nothing_runs(tmp_path, payload):
    marker = tmp_path / "pwned"
    if payload == "os_system":
        data = pickle.dumps({"model": RunsShell(f"touch {marker}")}, protocol=4)
        refused = "posix.system" if os.name == "posix" else "nt.system"  # where os.system lives
    elif payload == "builtins_eval":
        source = f"open({str(marker)!r}, 'w')".encode()
        data = b"\x80\x02cbuiltins\neval\nX" + len(source).to_bytes(4, "little") + source + b"\x85R."
        refused = "builtins.eval"
    else:
        data = b"\x80\x02csubprocess\nPopen\n]X\x05\x00\x00\x00touchaX" \
            + len(str(marker)).to_bytes(4, "little") + str(marker).encode() + b"a\x85R."
        refused = "subprocess.Popen"
    path = tmp_path / "evil.pd"
    path.write_bytes(data)
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path)
    message = str(info.value)
    assert str(path) in message and refused in message and "\n" not in message
    assert not marker.exists()


def test_paddle_style_hostile_global_inside_a_state_dict_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    state = {"weight": np.ones(2, np.float32), "bias": RunsShell(f"touch {marker}")}
    path = tmp_path / "model.pdparams"
    path.write_bytes(pickle.dumps(state, protocol=2))
    with pytest.raises(CheckpointError, match=r"refused to load global '(posix|nt)\.system'"):
        load_checkpoint(path)
    assert not marker.exists()


def test_truncated_file_raises_checkpoint_error_naming_the_file(tmp_path):
    path = save_checkpoint({"w": np.arange(1000, dtype=np.float32), "epoch": 3}, tmp_path / "ck.pd")
    data = open(path, "rb").read()
    for cut in (1, 20, len(data) // 2, len(data) - 1):
        broken = tmp_path / f"cut{cut}.pd"
        broken.write_bytes(data[:cut])
        with pytest.raises(CheckpointError) as info:
            load_checkpoint(broken)
        assert str(broken) in str(info.value) and "\n" not in str(info.value)
    assert issubclass(CheckpointError, ValueError)


@pytest.mark.parametrize("content", [b"", b"\x89PNG\r\n\x1a\n" + bytes(100), b"epoch: 3\nlr: 0.1\n",
                                     bytes(range(256)), b"PK\x03\x04" + bytes(60)])
def test_files_that_are_not_checkpoints_raise_checkpoint_error(tmp_path, content):
    path = tmp_path / "not_a_checkpoint.pd"
    path.write_bytes(content)
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path)
    assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_missing_file_raises_checkpoint_error(tmp_path):
    with pytest.raises(CheckpointError, match="nope.pd"):
        load_checkpoint(tmp_path / "nope.pd")


# ------------------------------------------------------------- disk use and run identity
def training_state(epoch, value, kind="pretrain", model="mae_vit_base_patch16", keep_last=None):
    return {"kind": kind, "model_name": model, "model": {"w": np.full((64, 64), value, np.float32)},
            "optimizer": {}, "epoch": epoch, "batches_done": None, "global_step": epoch,
            "args": {"keep_last": keep_last}}


def test_one_save_writes_the_state_once_and_later_saves_keep_older_files_intact(tmp_path):
    from paddle_cae.runtime.resume import save_training_checkpoint

    first = training_state(0, 1.0)
    latest = save_training_checkpoint(first, tmp_path, "latest")
    numbered = save_training_checkpoint(first, tmp_path, 0)
    best = save_checkpoint(first, tmp_path / "checkpoint-best.pd")  # as a fine-tune epoch does
    assert os.stat(latest).st_ino == os.stat(numbered).st_ino == os.stat(best).st_ino  # one copy
    second = training_state(1, 2.0)
    save_training_checkpoint(second, tmp_path, "latest")
    assert os.stat(latest).st_ino != os.stat(numbered).st_ino
    assert load_checkpoint(numbered)["model"]["w"][0, 0] == 1.0
    assert load_checkpoint(latest)["model"]["w"][0, 0] == 2.0
    # a plain dict (not a training state) is always written in full
    plain = {"w": np.ones(3, np.float32)}
    save_checkpoint(plain, tmp_path / "a.pd")
    save_checkpoint(plain, tmp_path / "b.pd")
    assert os.stat(tmp_path / "a.pd").st_ino != os.stat(tmp_path / "b.pd").st_ino


def test_keep_last_removes_older_numbered_checkpoints_only(tmp_path):
    from paddle_cae.runtime.resume import save_training_checkpoint

    for epoch in range(4):
        state = training_state(epoch, float(epoch), keep_last=2)
        save_training_checkpoint(state, tmp_path, "latest")
        save_training_checkpoint(state, tmp_path, epoch)
    save_checkpoint(training_state(1, 9.0), tmp_path / "checkpoint-best.pd")
    assert sorted(os.listdir(tmp_path)) == ["checkpoint-2.pd", "checkpoint-3.pd", "checkpoint-best.pd",
                                            "checkpoint-latest.pd"]
    assert load_checkpoint(tmp_path / "checkpoint-latest.pd")["epoch"] == 3


def test_temporaries_of_a_killed_save_are_removed_at_start(tmp_path):
    from paddle_cae.runtime.resume import remove_stale_temporaries

    stale = tmp_path / ".checkpoint-latest.pd.abc123.tmp"
    stale.write_bytes(b"\0" * 1000)
    other = tmp_path / ".notes.tmp"
    other.write_text("x")
    assert remove_stale_temporaries(tmp_path) == [str(stale)]
    assert not stale.exists() and other.exists()


def test_checkpoint_identity_is_read_from_the_first_bytes(tmp_path):
    from paddle_cae.runtime.resume import peek_identity

    path = save_checkpoint(training_state(0, 1.0, "finetune", "vit_base_patch16"), tmp_path / "c.pd")
    assert peek_identity(path) == ("finetune", "vit_base_patch16")
    save_checkpoint({"model": {"w": np.ones(2)}, "epoch": 0}, tmp_path / "old.pd")
    assert peek_identity(tmp_path / "old.pd") is None


def test_runs_resume_only_their_own_kind_and_refuse_to_overwrite_another(tmp_path):
    from paddle_cae.runtime.resume import (ForeignCheckpointError, check_no_foreign_checkpoints,
                                           find_resume_checkpoint, scan_output_dir)

    save_checkpoint(training_state(3, 1.0), tmp_path / "checkpoint-3.pd")
    path, state = find_resume_checkpoint(tmp_path, kind="pretrain", model_name="mae_vit_base_patch16")
    assert path.endswith("checkpoint-3.pd") and state["epoch"] == 3
    assert find_resume_checkpoint(tmp_path, kind="finetune", model_name="vit_base_patch16") == (None, None)
    assert find_resume_checkpoint(tmp_path, kind="pretrain", model_name="cae_base_patch16_224") == (None, None)
    _, _, foreign = scan_output_dir(tmp_path, None, "finetune", "vit_base_patch16", load=False)
    with pytest.raises(ForeignCheckpointError) as err:
        check_no_foreign_checkpoints(foreign, "finetune", "vit_base_patch16")
    message = str(err.value)
    assert "checkpoint-3.pd" in message and "pretrain checkpoint of mae_vit_base_patch16" in message
    assert "--output_dir" in message and "\n" not in message
