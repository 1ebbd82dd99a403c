"""The PyTorch checkpoint reader and the state_dict converter (no torch involved)."""
import glob
import os
from pathlib import Path

import numpy as np
import paddle
import pytest

from paddle_cae.convert import (
    CheckpointError,
    convert_state_dict,
    linear_weight_names,
    read_torch_checkpoint,
    read_torch_module_state,
    select_state_dict,
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
