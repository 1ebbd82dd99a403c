"""The shared formulas of paddle_cae/models/common.py and the DataParallel unwrap."""
import numpy as np
import paddle
import paddle.nn as nn
import pytest

from paddle_cae.models import common
from paddle_cae.models.mae import zero_filled_parameters
from paddle_cae.models.pos_embed import sincos_pos_embed
from paddle_cae.runtime.distributed import unwrap_model


def test_gather_tokens_picks_rows_per_sample_and_broadcasts_a_shared_table():
    x = paddle.to_tensor(np.arange(2 * 5 * 3, dtype="float32").reshape(2, 5, 3))
    ids = paddle.to_tensor([[4, 0], [1, 1]])
    got = common.gather_tokens(x, ids).numpy()
    np.testing.assert_array_equal(got[0], x.numpy()[0, [4, 0]])
    np.testing.assert_array_equal(got[1], x.numpy()[1, [1, 1]])
    table = x[:1]  # [1, N, D]: the same rows for every sample
    got = common.gather_tokens(table, ids).numpy()
    np.testing.assert_array_equal(got[1], x.numpy()[0, [1, 1]])


@pytest.mark.parametrize("value,eps", [
    (None, 1e-6), (1e-5, 1e-5), ("partial(nn.LayerNorm, eps=1e-6)", 1e-6),
    ("partial(nn.LayerNorm, epsilon=2e-05)", 2e-5), ("nn.LayerNorm", 1e-5)])
def test_norm_eps_is_read_from_every_official_spelling(value, eps):
    assert common.norm_eps_from(value) == eps


def test_norm_eps_rejects_what_is_not_a_layer_norm():
    with pytest.raises(ValueError, match="norm_layer 'nn.BatchNorm1d'"):
        common.norm_eps_from("nn.BatchNorm1d")


def test_drop_path_rates_rise_linearly_to_the_rate():
    assert common.drop_path_rates(0.1, 1) == [0.0]
    rates = common.drop_path_rates(0.3, 4)
    np.testing.assert_allclose(rates, np.linspace(0, 0.3, 4))
    assert rates[0] == 0.0 and rates[-1] == 0.3


def test_fixed_table_holds_the_table_even_under_a_zero_global_initializer():
    layer = nn.Layer()
    with zero_filled_parameters():
        p = common.fixed_sincos_table(layer, 16, (2, 3), layout="mae")
    assert p.stop_gradient and list(p.shape) == [1, 7, 16]
    np.testing.assert_array_equal(p.numpy()[0], sincos_pos_embed(16, (2, 3), layout="mae"))


@pytest.mark.parametrize("axis,unbiased,eps", [(-1, True, 1e-6), ([3, 5], False, 1e-5)])
def test_patch_normalisation_matches_numpy_and_is_undone(axis, unbiased, eps):
    rng = np.random.default_rng(0)
    shape = (2, 5, 12) if axis == -1 else (2, 3, 2, 4, 2, 4)
    x = (3 * rng.standard_normal(shape) + 1).astype("float32")
    norm = common.normalize_patches(paddle.to_tensor(x), axis=axis, eps=eps, unbiased=unbiased)
    ax = tuple(axis) if isinstance(axis, list) else axis
    want = (x - x.mean(ax, keepdims=True)) / np.sqrt(
        x.var(ax, ddof=1 if unbiased else 0, keepdims=True) + eps)
    np.testing.assert_allclose(norm.numpy(), want, rtol=1e-5, atol=1e-5)
    back = common.denormalize_patches(norm, paddle.to_tensor(x), axis=axis, eps=eps,
                                      unbiased=unbiased)
    np.testing.assert_allclose(back.numpy(), x, rtol=1e-5, atol=1e-5)


def _linear(seed):
    paddle.seed(seed)
    layer = nn.Linear(3, 2)
    layer.register_buffer("steps", paddle.to_tensor([seed], dtype="int64"))
    return layer


@pytest.mark.parametrize("fused", ["1", "0"])
def test_ema_update_averages_floats_copies_integers(fused):
    from paddle_cae.fast import accelerate_steps

    accelerate_steps({"PADDLE_CAE_FUSED_OPS": fused})  # the EMA kernel, or the reference
    ema, online = _linear(0), _linear(1)
    w0, w1 = ema.weight.numpy(), online.weight.numpy()
    common.ema_update_(ema, online, 0.75)
    want = (paddle.to_tensor(w0) * 0.75 + paddle.to_tensor(w1) * 0.25).numpy()
    np.testing.assert_array_equal(ema.weight.numpy(), want)  # the Paddle expression, bit for bit
    assert ema.steps.numpy().tolist() == [1]
    state = {k: v.detach().clone() for k, v in online.state_dict().items()}  # a dict works too
    common.ema_update_(state, ema, 0.0)
    np.testing.assert_array_equal(state["weight"].numpy(), ema.weight.numpy())


def test_ema_update_names_a_missing_or_misshapen_entry():
    ema = _linear(0)
    with pytest.raises(KeyError, match="'bias'"):
        common.ema_update_(ema, {"weight": ema.weight, "steps": ema.steps}, 0.5)
    with pytest.raises(ValueError, match="'weight' has shape \\[2, 3\\] online"):
        common.ema_update_(ema, dict(ema.state_dict(), weight=paddle.zeros([2, 3])), 0.5)


def test_unwrap_model_returns_the_layer_itself_without_a_wrapper():
    layer = nn.Linear(2, 2)
    assert unwrap_model(layer) is layer

    class DataParallelLike(paddle.DataParallel):  # no process group needed to test the rule
        def __init__(self, inner):
            nn.Layer.__init__(self)
            self._layers = inner

    assert unwrap_model(DataParallelLike(layer)) is layer
