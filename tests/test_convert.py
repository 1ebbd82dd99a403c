"""The PyTorch checkpoint reader and the state_dict converter (no torch involved)."""
import glob
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import paddle
import pytest

from paddle_cae.convert import main, convert_state_dict, linear_weight_names
from paddle_cae.io import (
    CheckpointError,
    load_checkpoint,
    read_torch_checkpoint,
    read_torch_module_state,
    select_state_dict,
)
from paddle_cae.models.registry import _REGISTRY, register_model
from tests.torchfile import (
    BFloat16, Call, Device, Global, Parameter, TensorView, TorchModule,
    dalle_encoder_module, write_torch_legacy, write_torch_module_pickle, write_torch_zip,
)

FIXTURES = Path(__file__).parent / "fixtures"
CHECKPOINTS = sorted(glob.glob(str(FIXTURES / "*" / "checkpoint.pth")))


@pytest.mark.parametrize("path", CHECKPOINTS, ids=lambda p: Path(p).parent.name)
def test_every_fixture_checkpoint_reads_exactly_as_its_weights_npz(path):
    obj = read_torch_checkpoint(path)
    state = obj["model"]
    with np.load(Path(path).parent / "weights.npz") as ref:
        assert sorted(state) == sorted(ref.files)
        for key in ref.files:
            got = state[key]
            assert isinstance(got, np.ndarray), key
            assert got.dtype == ref[key].dtype and got.shape == ref[key].shape, key
            assert got.flags.c_contiguous and got.flags.writeable, key
            np.testing.assert_array_equal(got, ref[key], err_msg=key)


class LinearAndConv(paddle.nn.Layer):
    def __init__(self):
        super().__init__()
        self.fc = paddle.nn.Linear(3, 5)
        self.conv = paddle.nn.Conv2D(2, 4, 3)
        self.square = paddle.nn.Linear(4, 4)
        self.table = self.create_parameter([4, 4])  # 2-D but not a Linear weight
        self.norm = paddle.nn.BatchNorm2D(4)


def test_linear_weight_names_come_from_layer_types_not_names():
    model = LinearAndConv()
    assert linear_weight_names(model) == {"fc.weight", "square.weight"}


def test_convert_transposes_linear_weights_only_and_maps_batchnorm_stats():
    model = LinearAndConv()
    rng = np.random.default_rng(0)
    official = {
        "fc.weight": rng.standard_normal((5, 3)).astype(np.float32),  # torch [out, in]
        "fc.bias": rng.standard_normal(5).astype(np.float64),
        "conv.weight": rng.standard_normal((4, 2, 3, 3)).astype(np.float16),
        "conv.bias": np.zeros(4, np.float32),
        "square.weight": rng.standard_normal((4, 4)).astype(np.float32),
        "square.bias": np.zeros(4, np.float32),
        "table": rng.standard_normal((4, 4)).astype(np.float32),
        "norm.weight": np.ones(4, np.float32),
        "norm.bias": np.zeros(4, np.float32),
        "norm.running_mean": np.arange(4, dtype=np.float32),
        "norm.running_var": np.arange(1, 5, dtype=np.float32),
        "norm.num_batches_tracked": np.array(7, np.int64),
        "extra.thing": np.zeros(2, np.float32),
    }
    state, report = convert_state_dict(official, model)
    np.testing.assert_array_equal(state["fc.weight"], official["fc.weight"].T)
    np.testing.assert_array_equal(state["square.weight"], official["square.weight"].T)
    np.testing.assert_array_equal(state["table"], official["table"])  # not a Linear: kept
    np.testing.assert_array_equal(state["conv.weight"], official["conv.weight"].astype(np.float32))
    np.testing.assert_array_equal(state["norm._mean"], official["norm.running_mean"])
    np.testing.assert_array_equal(state["norm._variance"], official["norm.running_var"])
    assert all(v.dtype == np.float32 for v in state.values())
    assert report["missing"] == [] and report["mismatched"] == []
    assert report["unused"] == ["extra.thing"]
    assert "norm.num_batches_tracked" in report["dropped"]
    model.set_state_dict(state)
    np.testing.assert_array_equal(model.fc.weight.numpy(), official["fc.weight"].T)


# ---------------------------------------------------------------------------------------------
# the test writer is faithful to torch.save, so the reader is tested on the real format
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", CHECKPOINTS, ids=lambda p: Path(p).parent.name)
def test_test_writer_reproduces_fixture_files_byte_for_byte(path, tmp_path):
    import zipfile

    with zipfile.ZipFile(path) as archive:
        pkl_name = next(n for n in archive.namelist() if n.endswith("/data.pkl"))
        prefix = pkl_name[: -len("/data.pkl")]
        serialization_id = archive.read(f"{prefix}/.data/serialization_id")
        n_storages = sum(1 for n in archive.namelist() if n.startswith(f"{prefix}/data/"))
    obj = read_torch_checkpoint(path)
    out = write_torch_zip(tmp_path / "again.pth", obj, prefix=prefix, serialization_id=serialization_id)
    n_tensors = sum(len(v) for v in obj.values())
    if n_storages == n_tensors:
        assert Path(out).read_bytes() == Path(path).read_bytes()
    else:
        # tensors sharing one storage come back as separate copies, so the bytes differ
        again = read_torch_checkpoint(out)
        for part in obj:
            for key, value in obj[part].items():
                np.testing.assert_array_equal(again[part][key], value, err_msg=key)


def test_strides_offsets_and_shared_storage_are_honoured(tmp_path):
    storage = np.arange(24, dtype=np.float32)
    obj = {
        "transposed": TensorView(storage, 0, (4, 6), (1, 4)),  # a .t() of a [6, 4] tensor
        "offset_slice": TensorView(storage, 5, (2, 3), (6, 2)),
        "broadcast": TensorView(storage, 3, (2, 3), (0, 1)),  # expand(): stride 0
        "whole": TensorView(storage, 0, (24,), (1,)),
        "scalar": np.array(3.5, dtype=np.float64),
        "empty": np.zeros((0, 3), dtype=np.float32),
    }
    path = write_torch_zip(tmp_path / "views.pth", obj)
    got = read_torch_checkpoint(path)
    np.testing.assert_array_equal(got["transposed"], storage.reshape(6, 4).T)
    np.testing.assert_array_equal(got["offset_slice"], np.array([[5, 7, 9], [11, 13, 15]], np.float32))
    np.testing.assert_array_equal(got["broadcast"], np.array([[3, 4, 5], [3, 4, 5]], np.float32))
    np.testing.assert_array_equal(got["whole"], storage)
    assert got["scalar"].shape == () and got["scalar"] == 3.5
    assert got["empty"].shape == (0, 3)
    for value in got.values():
        assert value.flags.c_contiguous and value.flags.owndata
    got["whole"][0] = 100.0  # copies: writing one tensor does not change another
    assert got["transposed"][0, 0] == 0.0


def test_views_reaching_outside_their_storage_are_rejected(tmp_path):
    path = write_torch_zip(tmp_path / "oob.pth", {"w": TensorView(np.arange(4, dtype=np.float32), 2, (3,), (1,))})
    with pytest.raises(CheckpointError, match="storage"):
        read_torch_checkpoint(path)


def test_every_storage_dtype_and_bfloat16_widening(tmp_path):
    values = np.array([1.0, -2.5, 3.140625, 0.0], dtype=np.float32)
    bf16_bits = (values.view(np.uint32) >> 16).astype(np.uint16)  # exact: values fit in bfloat16
    obj = {
        "f64": np.arange(3, dtype=np.float64), "f16": np.arange(3, dtype=np.float16),
        "i64": np.arange(3, dtype=np.int64), "i32": np.arange(3, dtype=np.int32),
        "i16": np.arange(3, dtype=np.int16), "i8": np.arange(-1, 2, dtype=np.int8),
        "u8": np.arange(3, dtype=np.uint8), "bool": np.array([True, False, True]),
        "bf16": BFloat16(bf16_bits.reshape(2, 2)),
    }
    got = read_torch_checkpoint(write_torch_zip(tmp_path / "dtypes.pth", obj))
    for key, value in obj.items():
        if key == "bf16":
            continue
        assert got[key].dtype == value.dtype, key
        np.testing.assert_array_equal(got[key], value)
    assert got["bf16"].dtype == np.float32
    np.testing.assert_array_equal(got["bf16"], values.reshape(2, 2))


def test_training_checkpoint_with_args_namespace_parameters_and_devices(tmp_path):
    namespace = Call(Global("argparse", "Namespace"), ())
    weight = np.ones((2, 2), np.float32)
    obj = {"model": {"module.w": Parameter(weight), "module.b": np.zeros(2, np.float32)},
           "epoch": 4, "args": namespace, "device": Device("cuda:0"), "scaler": {"scale": 65536.0}}
    got = read_torch_checkpoint(write_torch_zip(tmp_path / "train.pth", obj))
    assert got["epoch"] == 4 and got["device"] == "cuda:0" and got["scaler"] == {"scale": 65536.0}
    assert isinstance(got["args"], dict)
    state = select_state_dict(got)
    assert sorted(state) == ["b", "w"]  # 'module.' stripped
    np.testing.assert_array_equal(state["w"], weight)


def test_argparse_namespace_with_attributes_becomes_a_dict(tmp_path):
    import argparse
    import pickle

    raw = pickle.dumps({"args": argparse.Namespace(lr=0.1, model="vit", layers=[1, 2])}, protocol=2)
    path = write_torch_zip(tmp_path / "args.pth", {}, pickle_bytes=raw)
    args = read_torch_checkpoint(path)["args"]
    assert dict(args) == {"lr": 0.1, "model": "vit", "layers": [1, 2]} and args.model == "vit"


def test_legacy_single_stream_format_is_read(tmp_path):
    obj = {"model": {"a": np.arange(6.0).reshape(2, 3),
                     "b": TensorView(np.arange(12, dtype=np.float32), 1, (3, 2), (1, 3))}, "epoch": 3}
    got = read_torch_checkpoint(write_torch_legacy(tmp_path / "old.pth", obj))
    assert got["epoch"] == 3
    np.testing.assert_array_equal(got["model"]["a"], obj["model"]["a"])
    np.testing.assert_array_equal(got["model"]["b"], np.array([[1, 4], [2, 5], [3, 6]], np.float32))


@pytest.mark.parametrize("with_id_path", [True, False])
def test_pickled_dalle_module_gives_its_state_dict_without_running_anything(tmp_path, with_id_path):
    module, expected = dalle_encoder_module(np.random.default_rng(3), with_id_path=with_id_path)
    path = write_torch_module_pickle(tmp_path / "encoder.pkl", module)
    state = read_torch_module_state(path)
    assert list(state) == list(expected)
    assert ("blocks.group_1.block_1.id_path.w" in state) == with_id_path
    for key, value in expected.items():
        np.testing.assert_array_equal(state[key], value, err_msg=key)
    # the plain reader does not accept module classes
    with pytest.raises(CheckpointError, match="dall_e.encoder.Encoder"):
        read_torch_checkpoint(path)


def test_dalle_state_dict_fixture_also_reads_through_the_module_reader():
    path = FIXTURES / "dalle_encoder" / "checkpoint.pth"
    state = read_torch_module_state(path)
    with np.load(FIXTURES / "dalle_encoder" / "weights.npz") as ref:
        assert sorted(state) == sorted(ref.files)
        assert "blocks.group_1.block_1.res_path.conv_1.w" in state


def test_module_classes_outside_the_allow_list_are_refused(tmp_path):
    evil = TorchModule("evil.layers", "Backdoor", parameters={"w": np.ones(2, np.float32)})
    root = TorchModule("torch.nn.modules.container", "Sequential", modules={"0": evil})
    path = write_torch_module_pickle(tmp_path / "evil.pkl", root)
    with pytest.raises(CheckpointError, match="evil.layers.Backdoor"):
        read_torch_module_state(path)


MALICIOUS_CALLS = {
    "os_system": lambda marker: Call(Global("os", "system"), [f"touch {marker}"]),
    "builtins_eval": lambda marker: Call(Global("builtins", "eval"), [f"open({str(marker)!r}, 'w')"]),
    "subprocess_popen": lambda marker: Call(Global("subprocess", "Popen"), [["touch", str(marker)]]),
    "getattr_trick": lambda marker: Call(Global("builtins", "getattr"), [Call(Global("builtins", "__import__"), ["os"]), "system"]),
}


@pytest.mark.parametrize("kind", sorted(MALICIOUS_CALLS))
@pytest.mark.parametrize("container", ["zip", "legacy"])
def test_checkpoints_that_try_to_run_code_are_refused(tmp_path, kind, container):
    marker = tmp_path / "pwned"
    obj = {"model": {"w": np.ones(2, np.float32)}, "args": MALICIOUS_CALLS[kind](marker)}
    path = tmp_path / "evil.pth"
    (write_torch_zip if container == "zip" else write_torch_legacy)(path, obj)
    for reader in (read_torch_checkpoint, read_torch_module_state):
        with pytest.raises(CheckpointError) as info:
            reader(path)
        message = str(info.value)
        assert str(path) in message and "refused to load global" in message and "\n" not in message
    assert not marker.exists()


def test_plain_pickle_that_runs_code_is_refused(tmp_path):
    import pickle

    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    path = tmp_path / "evil.pth"
    path.write_bytes(pickle.dumps({"model": Evil()}, protocol=2))
    with pytest.raises(CheckpointError, match="system"):
        read_torch_checkpoint(path)
    assert not marker.exists()


def test_truncated_checkpoints_raise_checkpoint_error(tmp_path):
    data = (FIXTURES / "mae_pretrain" / "checkpoint.pth").read_bytes()
    for cut in (10, 100, len(data) // 2, len(data) - 30):
        path = tmp_path / f"cut{cut}.pth"
        path.write_bytes(data[:cut])
        with pytest.raises(CheckpointError) as info:
            read_torch_checkpoint(path)
        assert str(path) in str(info.value) and "\n" not in str(info.value)
    legacy = Path(write_torch_legacy(tmp_path / "legacy.pth", {"w": np.arange(100, dtype=np.float32)})).read_bytes()
    path = tmp_path / "legacy_cut.pth"
    path.write_bytes(legacy[:-50])
    with pytest.raises(CheckpointError, match="truncated"):
        read_torch_checkpoint(path)


def test_corrupted_storage_bytes_fail_the_zip_crc_check(tmp_path):
    data = bytearray((FIXTURES / "mae_lars" / "checkpoint.pth").read_bytes())
    data[900] ^= 0xFF  # inside checkpoint/data/0
    path = tmp_path / "flipped.pth"
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="flipped.pth"):
        read_torch_checkpoint(path)


@pytest.mark.parametrize("content", [b"", b"\x89PNG\r\n\x1a\n" + bytes(64), b"lr: 0.1\nepochs: 400\n",
                                     b"PK\x03\x04" + bytes(40)])
def test_files_that_are_not_checkpoints_raise_checkpoint_error(tmp_path, content):
    path = tmp_path / "weights.pth"
    path.write_bytes(content)
    with pytest.raises(CheckpointError) as info:
        read_torch_checkpoint(path)
    assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_zip_without_torch_pickle_is_not_a_checkpoint(tmp_path):
    import zipfile

    path = tmp_path / "other.zip"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("readme.txt", "hello")
    with pytest.raises(CheckpointError, match="data.pkl"):
        read_torch_checkpoint(path)


# ---------------------------------------------------------------------------------------------
# choosing the state_dict and converting it
# ---------------------------------------------------------------------------------------------
def test_select_state_dict_picks_the_requested_or_first_known_entry():
    a, b = {"x": np.zeros(1)}, {"x": np.ones(1)}
    assert select_state_dict({"model": a, "model_ema": b}) is a
    assert select_state_dict({"model": a, "model_ema": b}, key="model_ema") is b
    assert select_state_dict({"state_dict": a, "epoch": 3}) is a
    assert select_state_dict(a) is a
    assert list(select_state_dict({"module": {"module.x": np.zeros(1)}})) == ["x"]
    with pytest.raises(CheckpointError, match="teacher"):
        select_state_dict({"model": a}, key="teacher")
    with pytest.raises(CheckpointError, match="cannot find a state_dict"):
        select_state_dict({"epoch": 3, "optimizer": {"lr": 1}})


class WithKeyMap(paddle.nn.Layer):
    """A model declaring how official names map to its own (as model files do)."""

    def __init__(self):
        super().__init__()
        self.proj = paddle.nn.Linear(2, 3)
        self.head = paddle.nn.Linear(3, 4)

    def official_key_map(self, key):
        if key.startswith("teacher."):
            return None
        return key.replace("encoder_to_decoder.", "proj.")


def test_official_key_map_renames_drops_and_shape_mismatches_are_reported():
    model = WithKeyMap()
    official = {
        "encoder_to_decoder.weight": np.ones((3, 2), np.float32),
        "encoder_to_decoder.bias": np.ones(3, np.float32),
        "teacher.weight": np.ones((3, 2), np.float32),
        "head.weight": np.ones((5, 3), np.float32),  # 5 classes in the source, 4 in the model
        "head.bias": np.ones(5, np.float32),
        "blocks.0.attn.relative_position_index": np.zeros((5, 5), np.int64),
    }
    state, report = convert_state_dict(official, model)
    assert sorted(state) == ["proj.bias", "proj.weight"]
    assert state["proj.weight"].shape == (2, 3)
    assert sorted(report["dropped"]) == ["blocks.0.attn.relative_position_index", "teacher.weight"]
    assert sorted(report["mismatched"]) == [("head.bias", (5,), (4,)), ("head.weight", (5, 3), (3, 4))]
    assert report["missing"] == [] and report["unused"] == []
    # an explicit rename wins over the model's own map
    _, report = convert_state_dict(official, model, rename={"encoder_to_decoder.weight": "proj.weight"})
    assert "encoder_to_decoder.bias" in report["unused"] and "proj.bias" in report["missing"]


def test_fixture_checkpoint_converts_onto_a_paddle_layer_with_the_same_names(tmp_path):
    state = read_torch_checkpoint(FIXTURES / "mae_lars" / "checkpoint.pth")["model"]
    out_features, in_features = state["weight"].shape
    model = paddle.nn.Linear(in_features, out_features)
    converted, report = convert_state_dict(state, model)
    assert report["missing"] == [] and report["unused"] == [] and report["mismatched"] == []
    model.set_state_dict(converted)
    x = np.random.default_rng(0).standard_normal((2, in_features)).astype(np.float32)
    np.testing.assert_allclose(model(paddle.to_tensor(x)).numpy(), x @ state["weight"].T + state["bias"], rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# command line
# ---------------------------------------------------------------------------------------------

ROOT = Path(__file__).resolve().parent.parent


class TinyClassifier(paddle.nn.Layer):
    def __init__(self):
        super().__init__()
        self.fc = paddle.nn.Linear(3, 2)
        self.head = paddle.nn.Linear(2, 4)


class ConvWB(paddle.nn.Layer):
    """A conv with DALL-E's parameter names ``w``/``b``."""

    def __init__(self, n_in, n_out, kw):
        super().__init__()
        self.w = self.create_parameter([n_out, n_in, kw, kw])
        self.b = self.create_parameter([n_out], is_bias=True)


class TinyDalle(paddle.nn.Layer):
    def __init__(self):
        super().__init__()
        self.blocks = paddle.nn.LayerDict({"input": ConvWB(3, 4, 7)})


def _register(name, factory, task):
    if name not in _REGISTRY:
        factory.__name__ = name
        register_model(task)(factory)


_register("convert_test_tiny_classifier", lambda: TinyClassifier(), "classify")
_register("convert_test_tiny_dalle", lambda: TinyDalle(), "tokenizer")


def _tiny_official(rng):
    return {
        "fc.weight": rng.standard_normal((2, 3)).astype(np.float32),
        "fc.bias": rng.standard_normal(2).astype(np.float32),
        "head.weight": rng.standard_normal((4, 2)).astype(np.float32),
        "head.bias": rng.standard_normal(4).astype(np.float32),
    }


def test_cli_converts_selected_entry_and_writes_a_pd_with_the_report(tmp_path, capsys):
    rng = np.random.default_rng(5)
    model_sd, ema_sd = _tiny_official(rng), _tiny_official(rng)
    src = write_torch_zip(tmp_path / "train.pth", {"model": model_sd, "model_ema": ema_sd, "epoch": 9})
    dst = tmp_path / "out" / "ema.pd"
    assert main([src, str(dst), "--model", "convert_test_tiny_classifier", "--key", "model_ema"]) == 0
    printed = capsys.readouterr().out
    assert "loaded 4, missing 0, unused 0, mismatched 0" in printed
    saved = load_checkpoint(dst)
    np.testing.assert_array_equal(saved["model"]["fc.weight"], ema_sd["fc.weight"].T)
    np.testing.assert_array_equal(saved["model"]["head.bias"], ema_sd["head.bias"])
    assert saved["converted_from"]["source"] == "train.pth" and len(saved["converted_from"]["sha256"]) == 64
    model = TinyClassifier()
    model.set_state_dict(saved["model"])
    np.testing.assert_array_equal(model.fc.weight.numpy(), ema_sd["fc.weight"].T)


def test_cli_lists_unused_and_missing_keys(tmp_path, capsys):
    official = _tiny_official(np.random.default_rng(0))
    official["decoder.weight"] = np.zeros((2, 2), np.float32)
    del official["head.bias"]
    src = write_torch_zip(tmp_path / "partial.pth", {"model": official})
    assert main([src, str(tmp_path / "p.pd"), "--model", "convert_test_tiny_classifier"]) == 0
    out = capsys.readouterr().out
    assert "missing 1, unused 1" in out and "  head.bias" in out and "  decoder.weight" in out
    # --strict refuses to write a partial conversion
    assert main([src, str(tmp_path / "strict.pd"), "--model", "convert_test_tiny_classifier", "--strict"]) == 1
    assert not (tmp_path / "strict.pd").exists()


def test_cli_encoder_only_strips_the_encoder_prefix(tmp_path, capsys):
    official = _tiny_official(np.random.default_rng(1))
    pretrain = {f"encoder.{k}": v for k, v in official.items() if k.startswith("fc.")}
    pretrain["decoder.head.weight"] = np.zeros((4, 2), np.float32)
    src = write_torch_zip(tmp_path / "pretrain.pth", {"model": pretrain})
    dst = tmp_path / "backbone.pd"
    assert main([src, str(dst), "--model", "convert_test_tiny_classifier", "--encoder_only"]) == 0
    assert "loaded 2, missing 0" in capsys.readouterr().out
    assert sorted(load_checkpoint(dst)["model"]) == ["fc.bias", "fc.weight"]


def test_cli_reads_a_pickled_module_for_dalle(tmp_path, capsys):
    rng = np.random.default_rng(2)
    w = rng.standard_normal((4, 3, 7, 7)).astype(np.float32)
    conv = TorchModule("dall_e.utils", "Conv2d", attrs={"n_in": 3, "n_out": 4, "kw": 7, "device": Device("cpu")},
                       parameters={"w": Parameter(w, False), "b": Parameter(np.zeros(4, np.float32), False)})
    blocks = TorchModule("torch.nn.modules.container", "Sequential", modules={"input": conv})
    encoder = TorchModule("dall_e.encoder", "Encoder", attrs={"n_hid": 4}, modules={"blocks": blocks})
    src = write_torch_module_pickle(tmp_path / "encoder.pkl", encoder)
    dst = tmp_path / "dalle.pd"
    assert main([src, str(dst), "--model", "convert_test_tiny_dalle"]) == 0
    saved = load_checkpoint(dst)["model"]
    np.testing.assert_array_equal(saved["blocks.input.w"], w)  # conv weights are never transposed


def _run_cli(*args):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", "paddle_cae.convert", *map(str, args)],
                          capture_output=True, text=True, cwd=ROOT, env=env)


def test_cli_help_describes_the_flags():
    result = _run_cli("--help")
    assert result.returncode == 0
    for flag in ("--model", "--key", "--encoder_only", "--strict"):
        assert flag in result.stdout


@pytest.mark.parametrize("problem", ["not_a_checkpoint", "truncated", "runs_code"])
def test_cli_fails_with_one_line_and_writes_nothing(tmp_path, problem):
    marker = tmp_path / "pwned"
    src = tmp_path / "src.pth"
    if problem == "not_a_checkpoint":
        src.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(200))
    elif problem == "truncated":
        src.write_bytes((FIXTURES / "mae_pretrain" / "checkpoint.pth").read_bytes()[:3000])
    else:
        write_torch_zip(src, {"model": {"w": np.ones(1, np.float32)},
                              "args": Call(Global("os", "system"), [f"touch {marker}"])})
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    result = _run_cli(src, out_dir / "dst.pd", "--model", "vit_base_patch16")
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and str(src) in lines[0], result.stderr
    assert "Traceback" not in result.stderr
    assert list(out_dir.iterdir()) == []
    assert not marker.exists()


def test_command_line_converts_a_small_variant_given_by_model_args(tmp_path, capsys):
    """The MAE fine-tune fixture is a 2-block width-64 ViT: --model_args builds that network."""
    import json

    src = FIXTURES / "mae_vit_finetune" / "checkpoint.pth"
    cfg = json.loads((FIXTURES / "mae_vit_finetune" / "config.json").read_text())["model_args"]
    small = {k: cfg[k] for k in ("img_size", "patch_size", "embed_dim", "depth", "num_heads",
                                 "num_classes") if k in cfg}
    dst = tmp_path / "small.pd"
    rc = main([str(src), str(dst), "--model", "vit_base_patch16", "--model_args", json.dumps(small),
               "--strict"])
    assert rc == 0, capsys.readouterr().err
    out = load_checkpoint(dst)
    assert out["converted_from"]["model_args"] == small
    reference = np.load(FIXTURES / "mae_vit_finetune" / "weights.npz")
    np.testing.assert_array_equal(out["model"]["blocks.1.attn.qkv.weight"],
                                  reference["blocks.1.attn.qkv.weight"].T)
    rc = main([str(src), str(tmp_path / "x.pd"), "--model", "vit_base_patch16", "--model_args", "{oops"])
    assert rc == 1
    err = capsys.readouterr().err
    assert "--model_args" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "x.pd").exists()
