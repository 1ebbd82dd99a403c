import json
import os
import shutil
from pathlib import Path

import numpy as np
import paddle
import pytest

import paddle_cae.models.dalle as dalle
from paddle_cae.models import create_model, list_models
from paddle_cae.models.dalle import (
    DalleEncoder,
    DalleWeightsError,
    dalle_state_shapes,
    load_dalle_encoder,
    map_pixels,
)
from paddle_cae.runtime.checkpoint import save_checkpoint
from tests.torchfile import Device, Parameter, TorchModule, write_torch_module_pickle, write_torch_zip

FIXTURE = Path(__file__).parent / "fixtures" / "dalle_encoder"
TINY = dict(n_hid=16, n_blk_per_group=1, vocab_size=64)


@pytest.fixture(scope="module")
def reference():
    weights = dict(np.load(FIXTURE / "weights.npz"))
    case = dict(np.load(FIXTURE / "case.npz"))
    return weights, case


def _assert_one_line_naming(err, path):
    text = str(err.value)
    assert "\n" not in text
    assert str(path) in text
    return text


# --------------------------------------------------------------------------- the model
def test_map_pixels_maps_0_1_to_0p1_0p9():
    x = paddle.to_tensor([0.0, 0.5, 1.0])
    np.testing.assert_allclose(map_pixels(x).numpy(), [0.1, 0.5, 0.9], atol=1e-7)
    np.testing.assert_allclose(map_pixels(np.array([1.0]), eps=0.2), [0.8])


def test_parameter_names_and_shapes_equal_the_official_release_state_dict():
    config = json.loads((FIXTURE / "config.json").read_text())
    release = {k: tuple(v) for k, v in config["release_model"]["state_dict_keys_and_shapes"].items()}
    assert dalle_state_shapes() == release
    assert sum(int(np.prod(s)) for s in release.values()) == 53_786_240


def test_tiny_model_parameters_use_the_official_names_and_layout(reference):
    weights, _ = reference
    model = DalleEncoder(**TINY)
    got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert got == {k: v.shape for k, v in weights.items()}
    assert got == dalle_state_shapes(**TINY)


def test_codebook_indices_are_int64_row_major_argmax():
    paddle.seed(0)
    model = DalleEncoder(**TINY)
    images = map_pixels(paddle.rand([2, 3, 32, 32]))
    logits = model(images)
    assert list(logits.shape) == [2, 64, 4, 4]
    tokens = model.get_codebook_indices(images)
    assert tokens.dtype == paddle.int64
    assert list(tokens.shape) == [2, 16]
    np.testing.assert_array_equal(tokens.numpy(), logits.numpy().argmax(1).reshape(2, 16))


def test_encoder_is_frozen_and_gives_no_gradient():
    model = DalleEncoder(**TINY)
    assert not model.training
    assert all(p.stop_gradient for p in model.parameters())
    images = paddle.rand([1, 3, 16, 16])
    images.stop_gradient = False
    assert model.get_codebook_indices(images).stop_gradient


def test_encoder_rejects_images_with_the_wrong_channel_count():
    with pytest.raises(ValueError, match="expects images"):
        DalleEncoder(**TINY)(paddle.rand([1, 1, 16, 16]))


def test_tokenizer_constructors_are_registered():
    assert {"dalle_encoder", "dalle_encoder_tiny"} <= set(list_models("tokenizer"))
    tiny = create_model("dalle_encoder_tiny")
    assert tiny.arch() == dict(group_count=4, input_channels=3, **TINY)


# ---------------------------------------------------------------------------- loading
def _module_tree(state, group_count, n_hid, n_blk_per_group, input_channels, vocab_size):
    """``state`` as DALL-E's pickled Encoder module tree (what encoder.pkl holds)."""
    def conv(prefix, use_float16=True):
        w = state[prefix + ".w"]
        return TorchModule("dall_e.utils", "Conv2d",
                           attrs={"n_in": w.shape[1], "n_out": w.shape[0], "kw": w.shape[2],
                                  "use_float16": use_float16, "device": Device("cpu"), "requires_grad": False},
                           parameters={"w": Parameter(w, False), "b": Parameter(state[prefix + ".b"], False)})

    def relu():
        return TorchModule("torch.nn.modules.activation", "ReLU", attrs={"inplace": False})

    def sequential(modules):
        return TorchModule("torch.nn.modules.container", "Sequential", modules=modules)

    n_layers = group_count * n_blk_per_group
    blocks = {"input": conv("blocks.input")}
    for g in range(1, group_count + 1):
        group = {}
        for i in range(1, n_blk_per_group + 1):
            prefix = f"blocks.group_{g}.block_{i}"
            id_path = (conv(prefix + ".id_path") if prefix + ".id_path.w" in state
                       else TorchModule("torch.nn.modules.linear", "Identity"))
            res = {}
            for j in range(1, 5):
                res[f"relu_{j}"] = relu()
                res[f"conv_{j}"] = conv(f"{prefix}.res_path.conv_{j}")
            group[f"block_{i}"] = TorchModule(
                "dall_e.encoder", "EncoderBlock", attrs={"n_layers": n_layers, "post_gain": 1 / n_layers ** 2},
                modules={"id_path": id_path, "res_path": sequential(res)})
        if g < group_count:
            group["pool"] = TorchModule("torch.nn.modules.pooling", "MaxPool2d", attrs={"kernel_size": 2})
        blocks[f"group_{g}"] = sequential(group)
    blocks["output"] = sequential({"relu": relu(), "conv": conv("blocks.output.conv", use_float16=False)})
    return TorchModule("dall_e.encoder", "Encoder",
                       attrs={"group_count": group_count, "n_hid": n_hid, "n_blk_per_group": n_blk_per_group,
                              "input_channels": input_channels, "vocab_size": vocab_size,
                              "device": Device("cpu"), "requires_grad": False, "use_mixed_precision": True},
                       modules={"blocks": sequential(blocks)})


@pytest.fixture
def encoder_pkl(tmp_path, reference):
    weights, _ = reference
    path = tmp_path / "encoder.pkl"
    write_torch_module_pickle(path, _module_tree(weights, group_count=4, input_channels=3, **TINY))
    return path


def _logits(model, case):
    return model(paddle.to_tensor(case["in_images_mapped"])).numpy()


def test_pickled_module_file_loads_and_reproduces_the_reference_logits(encoder_pkl, reference):
    _, case = reference
    model = load_dalle_encoder(encoder_pkl, **TINY)
    np.testing.assert_allclose(_logits(model, case), case["out_logits"], atol=5e-6, rtol=1e-5)


def test_pickled_module_is_converted_once_and_the_cache_is_used_later(encoder_pkl, reference, monkeypatch):
    _, case = reference
    cache = encoder_pkl.with_suffix(".pd")
    assert not cache.exists()
    first = _logits(load_dalle_encoder(encoder_pkl, **TINY), case)
    assert cache.is_file()

    read_weights = dalle.read_weights

    def must_not_read_the_pickle(path, **kwargs):
        if Path(path) == encoder_pkl:
            raise AssertionError("encoder.pkl was read again although a converted cache exists")
        return read_weights(path, **kwargs)

    monkeypatch.setattr(dalle, "read_weights", must_not_read_the_pickle)
    np.testing.assert_array_equal(_logits(load_dalle_encoder(encoder_pkl, **TINY), case), first)


def test_cache_older_than_the_pickle_is_rebuilt(encoder_pkl, reference):
    _, case = reference
    load_dalle_encoder(encoder_pkl, **TINY)
    cache = encoder_pkl.with_suffix(".pd")
    os.utime(cache, (1_000_000, 1_000_000))  # older than encoder.pkl
    model = load_dalle_encoder(encoder_pkl, **TINY)
    assert cache.stat().st_mtime > 1_000_000
    np.testing.assert_allclose(_logits(model, case), case["out_logits"], atol=5e-6, rtol=1e-5)


def test_damaged_cache_is_rebuilt_from_the_pickle(encoder_pkl, reference):
    _, case = reference
    load_dalle_encoder(encoder_pkl, **TINY)
    cache = encoder_pkl.with_suffix(".pd")
    cache.write_bytes(cache.read_bytes()[:100])
    model = load_dalle_encoder(encoder_pkl, **TINY)
    np.testing.assert_allclose(_logits(model, case), case["out_logits"], atol=5e-6, rtol=1e-5)


def test_cache_goes_to_the_given_cache_dir(encoder_pkl, tmp_path):
    cache_dir = tmp_path / "cache"
    load_dalle_encoder(encoder_pkl, cache_dir=cache_dir, **TINY)
    assert (cache_dir / "encoder.pd").is_file()
    assert not encoder_pkl.with_suffix(".pd").exists()


def test_state_dict_pth_and_pd_files_load_the_same_weights(tmp_path, reference):
    weights, case = reference
    pth = tmp_path / "dalle.pth"
    write_torch_zip(pth, {"model": weights})
    pd_file = tmp_path / "dalle.pd"
    save_checkpoint({"model": weights}, pd_file)
    for path in (pth, pd_file, FIXTURE / "checkpoint.pth"):
        model = load_dalle_encoder(path, **TINY)
        np.testing.assert_allclose(_logits(model, case), case["out_logits"], atol=5e-6, rtol=1e-5)
    assert not (FIXTURE / "checkpoint.pd").exists()  # only .pkl conversions are cached


def test_numpy_archive_of_the_state_dict_loads_the_same_weights(tmp_path, reference, encoder_pkl):
    weights, case = reference
    path = tmp_path / "dalle_encoder.npz"
    np.savez(path, **{k: np.asarray(v) for k, v in weights.items()})
    model = load_dalle_encoder(path, **TINY)
    np.testing.assert_allclose(_logits(model, case), case["out_logits"], atol=5e-6, rtol=1e-5)
    np.testing.assert_array_equal(_logits(model, case), _logits(load_dalle_encoder(encoder_pkl, **TINY), case))
    assert not path.with_suffix(".pd").exists()  # only .pkl conversions are cached
    half = tmp_path / "half.npz"  # the release stores its convs in float16: accepted, read as float32
    np.savez_compressed(half, **{k: np.asarray(v).astype(np.float16) for k, v in weights.items()})
    assert load_dalle_encoder(half, **TINY).blocks.input.w.dtype == paddle.float32
    assert create_model("dalle_encoder_tiny", pretrained=str(path)) is not None


def test_numpy_archive_that_is_not_an_encoder_or_not_numpy_is_refused(tmp_path, reference):
    weights, _ = reference
    missing = tmp_path / "missing.npz"
    np.savez(missing, **{k: np.asarray(v) for k, v in weights.items() if k != "blocks.input.b"})
    with pytest.raises(DalleWeightsError) as err:
        load_dalle_encoder(missing, **TINY)
    assert "blocks.input.b" in _assert_one_line_naming(err, missing)
    garbage = tmp_path / "garbage.npz"
    garbage.write_bytes(b"PK\x03\x04 not a zip")
    with pytest.raises(DalleWeightsError) as err:
        load_dalle_encoder(garbage, **TINY)
    _assert_one_line_naming(err, garbage)
    pickled = tmp_path / "pickled.npz"  # object arrays would need pickle: refused, never unpickled
    np.savez(pickled, **{"blocks.input.w": np.array([{"a": 1}], dtype=object)})
    with pytest.raises(DalleWeightsError) as err:
        load_dalle_encoder(pickled, **TINY)
    _assert_one_line_naming(err, pickled)


def test_missing_weights_file_raises_one_line_naming_it(tmp_path):
    path = tmp_path / "nowhere" / "encoder.pkl"
    with pytest.raises(FileNotFoundError) as err:
        load_dalle_encoder(path)
    assert "encoder.pkl" in _assert_one_line_naming(err, path)


@pytest.mark.parametrize("keep", [0, 100, 0.5])
def test_truncated_weights_file_raises_one_line_naming_it(tmp_path, encoder_pkl, keep):
    data = encoder_pkl.read_bytes()
    path = tmp_path / "broken.pkl"
    path.write_bytes(data[:int(len(data) * keep) if isinstance(keep, float) else keep])
    with pytest.raises(DalleWeightsError) as err:
        load_dalle_encoder(path, **TINY)
    _assert_one_line_naming(err, path)
    assert not path.with_suffix(".pd").exists()


def test_garbage_pd_file_raises_one_line_naming_it(tmp_path):
    path = tmp_path / "encoder.pd"
    path.write_bytes(b"\x80\x04not a pickle at all")
    with pytest.raises(DalleWeightsError) as err:
        load_dalle_encoder(path)
    _assert_one_line_naming(err, path)


def test_vit_checkpoint_instead_of_the_encoder_raises_one_line_naming_it(tmp_path):
    path = tmp_path / "mae_pretrain.pth"
    shutil.copy(FIXTURE.parent / "mae_pretrain" / "checkpoint.pth", path)
    with pytest.raises(DalleWeightsError) as err:
        load_dalle_encoder(path)
    text = _assert_one_line_naming(err, path)
    assert "blocks.input.w" in text and "does not look like a DALL-E encoder" in text


def test_wrong_vocabulary_size_raises_one_line_with_both_shapes(encoder_pkl):
    with pytest.raises(DalleWeightsError) as err:
        load_dalle_encoder(encoder_pkl, n_hid=16, n_blk_per_group=1, vocab_size=8192)
    text = _assert_one_line_naming(err, encoder_pkl)
    assert "blocks.output.conv.w" in text and "[64, 128, 1, 1]" in text and "[8192, 128, 1, 1]" in text
    assert not encoder_pkl.with_suffix(".pd").exists()


def test_release_architecture_refuses_a_tiny_encoder_and_names_what_the_file_holds(encoder_pkl):
    with pytest.raises(DalleWeightsError) as err:
        load_dalle_encoder(encoder_pkl)
    text = _assert_one_line_naming(err, encoder_pkl)
    assert "n_hid=256" in text and "n_hid=16" in text


def test_extra_or_missing_keys_are_refused(tmp_path, reference):
    weights, _ = reference
    extra = dict(weights, **{"blocks.extra.w": np.zeros(3, np.float32)})
    missing = {k: v for k, v in weights.items() if k != "blocks.input.b"}
    for name, state in (("extra", extra), ("missing", missing)):
        path = tmp_path / f"{name}.pth"
        write_torch_zip(path, state)
        with pytest.raises(DalleWeightsError) as err:
            load_dalle_encoder(path, **TINY)
        text = _assert_one_line_naming(err, path)
        assert ("blocks.extra.w" if name == "extra" else "blocks.input.b") in text


def test_unknown_file_type_is_refused(tmp_path):
    path = tmp_path / "encoder.onnx"
    path.write_bytes(b"0")
    with pytest.raises(DalleWeightsError) as err:
        load_dalle_encoder(path)
    _assert_one_line_naming(err, path)


def test_registered_constructor_loads_pretrained_weights(encoder_pkl, reference):
    _, case = reference
    model = create_model("dalle_encoder_tiny", pretrained=str(encoder_pkl))
    np.testing.assert_allclose(_logits(model, case), case["out_logits"], atol=5e-6, rtol=1e-5)
