"""paddle_cae.io.read_weights: one reader deciding the format from the content."""
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import paddle
import pytest

from paddle_cae.loading.pretrained import read_weights_file
from paddle_cae.io import (
    CheckpointError,
    TorchModuleStub,
    detect_format,
    load_checkpoint,
    module_state_dict,
    read_torch_checkpoint,
    read_weights,
    read_weights_with_format,
    save_checkpoint,
)
from tests.torchfile import Call, Global, TorchModule, write_torch_legacy, write_torch_module_pickle, write_torch_zip

ROOT = Path(__file__).resolve().parent.parent


def _state(seed=0):
    rng = np.random.default_rng(seed)
    return {"blocks.0.w": rng.standard_normal((3, 4)).astype(np.float32),
            "blocks.0.b": rng.standard_normal(3).astype(np.float32),
            "steps": np.arange(5, dtype=np.int64)}


def _write(kind, path, state):
    """``path`` holding ``{"model": state}`` (``state`` itself for npz) in format ``kind``."""
    path = str(path)
    if kind == "torch-zip":
        write_torch_zip(path, {"model": state})
    elif kind == "torch-legacy":
        write_torch_legacy(path, {"model": state})
    elif kind == "pd":
        save_checkpoint({"model": state}, path)
    elif kind == "paddle-save":
        paddle.save({"model": {k: paddle.to_tensor(v) for k, v in state.items()}, "epoch": 3}, path)
    elif kind == "npz":
        with open(path, "wb") as f:  # (np.savez would append .npz to a file name)
            np.savez(f, **state)
    return path


def _weights_of(obj, kind):
    return obj if kind == "npz" else obj["model"]


def _assert_same(got, want):
    assert list(got) == list(want)
    for key, value in want.items():
        assert isinstance(got[key], np.ndarray) and got[key].dtype == value.dtype, key
        np.testing.assert_array_equal(got[key], value)


def _one_line_naming(err, path):
    text = str(err.value)
    assert str(path) in text and "\n" not in text, text
    return text


KINDS = ["torch-zip", "torch-legacy", "pd", "paddle-save", "npz"]
FORMAT_OF = {"paddle-save": "pd"}


@pytest.mark.parametrize("kind", KINDS)
def test_each_format_is_recognised_from_its_content_and_read_as_numpy(tmp_path, kind):
    state = _state()
    path = _write(kind, tmp_path / "weights.bin", state)  # the same neutral suffix for all
    obj, fmt = read_weights_with_format(path)
    assert fmt == FORMAT_OF.get(kind, kind)
    assert detect_format(Path(path).read_bytes(), path) == fmt
    # paddle.save nests each tensor as (name, ndarray): the reader hands back the arrays
    _assert_same(_weights_of(obj, kind), state)


@pytest.mark.parametrize("kind,suffix", [("npz", ".pth"), ("torch-zip", ".pd"), ("pd", ".npz"),
                                         ("torch-legacy", ".pdparams"), ("paddle-save", ".pkl")])
def test_a_misleading_suffix_does_not_change_the_format(tmp_path, kind, suffix):
    state = _state(1)
    path = _write(kind, tmp_path / f"weights{suffix}.tmp", state)
    os.replace(path, tmp_path / f"weights{suffix}")
    path = tmp_path / f"weights{suffix}"
    obj, fmt = read_weights_with_format(path)
    assert fmt == FORMAT_OF.get(kind, kind)
    _assert_same(_weights_of(obj, kind), state)


def test_a_reader_limited_to_some_formats_says_what_it_found_and_what_it_expected(tmp_path):
    npz = _write("npz", tmp_path / "weights.pth", _state())
    with pytest.raises(CheckpointError) as err:
        read_torch_checkpoint(npz)
    text = _one_line_naming(err, npz)
    assert "numpy .npz" in text and "expected a PyTorch .pth" in text
    pth = _write("torch-zip", tmp_path / "official.pd", _state())
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(pth)
    text = _one_line_naming(err, pth)
    assert "PyTorch" in text and "expected a .pd/.pdparams" in text and "paddle_cae.convert" in text
    # --finetune reads torch and .pd files; an .npz does not say which layout it has
    with pytest.raises(CheckpointError) as err:
        read_weights_file(npz)
    assert "numpy .npz" in _one_line_naming(err, npz)
    assert read_weights_file(pth).layout == "torch"
    # the pre-1.6 stream is a pickle too: recognised by its magic number, not read as a .pd
    legacy = _write("torch-legacy", tmp_path / "legacy.pth", _state())
    weights = read_weights_file(legacy)
    assert weights.layout == "torch"
    _assert_same(weights.state, _state())
    assert read_weights_file(_write("pd", tmp_path / "ours.pth", _state())).layout == "paddle"


@pytest.mark.parametrize("kind", KINDS)
def test_a_truncated_file_is_one_line_naming_it(tmp_path, kind):
    data = Path(_write(kind, tmp_path / "full", _state(2))).read_bytes()
    for cut in (1, 9, len(data) // 2, len(data) - 7):
        path = tmp_path / f"cut{cut}.weights"
        path.write_bytes(data[:cut])
        with pytest.raises(CheckpointError) as err:
            read_weights(path)
        _one_line_naming(err, path)


def test_empty_and_unknown_files_are_refused(tmp_path):
    for name, content in (("empty.pd", b""), ("image.pth", b"\x89PNG\r\n\x1a\n" + bytes(64))):
        path = tmp_path / name
        path.write_bytes(content)
        with pytest.raises(CheckpointError) as err:
            read_weights(path)
        _one_line_naming(err, path)
    with pytest.raises(CheckpointError, match="missing.pd"):
        read_weights(tmp_path / "missing.pd")
    import tarfile  # torch <= 0.3 wrote tar archives: named as such, not as garbage

    old = tmp_path / "ancient.pth"
    (tmp_path / "storages").write_bytes(bytes(2048))
    with tarfile.open(old, "w") as archive:
        archive.add(tmp_path / "storages", arcname="storages")
    with pytest.raises(CheckpointError) as err:
        read_weights(old)
    assert "tar" in _one_line_naming(err, old)


def test_zip_archive_of_other_files_is_neither_torch_nor_npz(tmp_path):
    import zipfile

    path = tmp_path / "other.npz"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("w.npy", b"")
        archive.writestr("readme.txt", "hello")
    with pytest.raises(CheckpointError) as err:
        read_weights(path)
    text = _one_line_naming(err, path)
    assert "data.pkl" in text and ".npy" in text


def test_legacy_torch_stream_is_recognised_whatever_pickle_protocol_its_header_uses(tmp_path):
    state = _state(3)
    data = Path(write_torch_legacy(tmp_path / "old.pth", {"model": state})).read_bytes()
    magic = pickle.dumps(0x1950A86A20F9469CFC6C, protocol=2)
    assert data.startswith(magic)
    path = tmp_path / "old4.pth"
    path.write_bytes(pickle.dumps(0x1950A86A20F9469CFC6C, protocol=4) + data[len(magic):])
    obj, fmt = read_weights_with_format(path)
    assert fmt == "torch-legacy"
    _assert_same(obj["model"], state)
    # a plain pickle of the same number alone is not mistaken for it by the .pd reader
    other = tmp_path / "number.pd"
    other.write_bytes(pickle.dumps(12345, protocol=4))
    assert read_weights_with_format(other) == (12345, "pd")


class RunsShell:
    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


@pytest.mark.parametrize("kind", ["pd", "torch-zip", "torch-legacy-named-pth"])
def test_a_pickle_naming_a_forbidden_global_is_refused_and_nothing_runs(tmp_path, kind):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    if kind == "pd":
        path.write_bytes(pickle.dumps({"model": {"w": RunsShell(f"touch {marker}")}}, protocol=4))
    elif kind == "torch-zip":
        evil = pickle.dumps({"model": RunsShell(f"touch {marker}")}, protocol=2)
        write_torch_zip(path, {"model": {}}, pickle_bytes=evil)
    else:  # a plain pickle given to the torch reader: the refused global is named, not only the format
        path.write_bytes(pickle.dumps([RunsShell(f"touch {marker}")], protocol=2))
    for read in (read_weights, read_torch_checkpoint):
        with pytest.raises(CheckpointError) as err:
            read(path)
        assert "system" in _one_line_naming(err, path) and "refused" in str(err.value)
    assert not marker.exists()


def test_unlisted_module_class_is_refused_and_listed_ones_only_when_modules_are_asked_for(tmp_path):
    w = np.arange(6, dtype=np.float32).reshape(2, 3)
    path = tmp_path / "encoder.pkl"
    write_torch_module_pickle(path, TorchModule("torch.nn.modules.linear", "Linear", parameters={"weight": w}))
    with pytest.raises(CheckpointError, match="torch.nn.modules.linear.Linear"):
        read_weights(path)
    stub = read_weights(path, modules=True)
    assert isinstance(stub, TorchModuleStub)
    np.testing.assert_array_equal(module_state_dict(stub)["weight"], w)
    bad = tmp_path / "bad.pkl"
    write_torch_module_pickle(bad, TorchModule("evil.layers", "Backdoor", parameters={"weight": w}))
    with pytest.raises(CheckpointError, match="evil.layers.Backdoor"):
        read_weights(bad, modules=True)


def test_a_reduce_of_an_allowed_global_with_a_forbidden_argument_is_refused(tmp_path):
    path = tmp_path / "trick.pth"
    call = Call(Global("builtins", "getattr"), [Call(Global("builtins", "__import__"), ["os"]), "system"])
    write_torch_zip(path, {"model": {"w": call}})
    with pytest.raises(CheckpointError, match="builtins.getattr"):
        read_weights(path)


def test_npz_with_object_arrays_is_refused_without_unpickling(tmp_path):
    path = tmp_path / "objects.npz"
    np.savez(path, w=np.array([{"a": 1}], dtype=object))
    with pytest.raises(CheckpointError) as err:
        read_weights(path)
    assert "npz" in _one_line_naming(err, path)


@pytest.mark.slow
def test_the_reader_imports_neither_paddle_nor_the_models_and_models_do_not_import_the_converter():
    code = ("import sys, paddle_cae.io; "
            "assert not [m for m in sys.modules if m == 'paddle' or m.startswith('paddle_cae.models')], "
            "sorted(sys.modules); "
            "import paddle_cae.models.dalle; assert 'paddle_cae.convert' not in sys.modules")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert done.returncode == 0, done.stderr[-2000:]


# ----------------------------------------------------------------------------- memory bombs
BOMB_EXPAND = 1 << 26  # what the compressed bombs unpack to (64 MiB; the limit is ~1 MiB here)


@pytest.fixture(scope="module")
def bombs(tmp_path_factory):
    from tests.bombs import write_bombs

    return write_bombs(tmp_path_factory.mktemp("bombs"), BOMB_EXPAND)


@pytest.mark.parametrize("name", ["bytearray.pd", "list_range.pd", "reconstruct.pd", "zip_bomb.pth",
                                  "stride0.pth", "zip_bomb.npz", "header.npz"])
def test_a_file_asking_for_more_memory_than_its_size_allows_is_refused_in_one_line(bombs, name):
    path = bombs[name]
    with pytest.raises(CheckpointError) as err:
        read_weights(path)
    text = _one_line_naming(err, path)
    assert "refused" in text and ("bomb" in text or "declares" in text), text


def test_a_memo_slot_numbered_in_the_billions_costs_no_memory(bombs):
    # the C unpickler would size its memo array to the slot number (4 GiB for these 9 bytes)
    assert read_weights(bombs["memo_slot.pd"]) is None


def test_reading_every_bomb_keeps_the_peak_memory_small(bombs):
    code = ("import sys\n"
            "from paddle_cae.io import read_weights\n"
            "from tests.bombs import peak_rss_mb\n"
            "for path in sys.argv[1:]:\n"
            "    try:\n"
            "        read_weights(path)\n"
            "    except Exception:\n"
            "        pass\n"
            "print(peak_rss_mb())\n")
    proc = subprocess.run([sys.executable, "-c", code, *bombs.values()], cwd=ROOT,
                          capture_output=True, text=True, timeout=1800)  # hang guard
    assert proc.returncode == 0, proc.stderr[-2000:]
    # each bomb alone asks for 64 MiB to 4 GiB; the reader itself needs a few dozen MB
    assert float(proc.stdout.strip()) < 60 + BOMB_EXPAND / 2 ** 20, proc.stdout


def test_legitimate_files_near_the_limit_still_read(tmp_path):
    # a deflated torch archive of random floats (it cannot shrink): a compressed member is read
    # when it does not expand past the limit
    rng = np.random.default_rng(0)
    state = {"w": rng.standard_normal(1 << 20).astype(np.float32)}
    plain = tmp_path / "plain.pth"
    write_torch_zip(plain, {"model": state})
    from tests.bombs import _deflated

    _deflated(plain, tmp_path / "deflated.pth")
    _assert_same(read_weights(tmp_path / "deflated.pth")["model"], state)
