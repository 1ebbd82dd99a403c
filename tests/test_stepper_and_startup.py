"""The logic around an optimisation step that we own (loss scaling, skipped steps, clipping,
non-finite losses) and the start-up barrier of multi-process runs."""
import socket
import threading

import numpy as np
import paddle
import pytest

from paddle_cae.cli.pretrain import run
from paddle_cae.engine.stepper import NonFiniteLossError, Stepper
from paddle_cae.models.mae import MaskedAutoencoderViT
from paddle_cae.optim import AdamW
from paddle_cae.runtime.amp import (DynamicLossScaler, Precision, clip_grad_norm_,
                                    global_grad_norm, parse_amp_flag)
from paddle_cae.runtime.distributed import StartupTimeout, startup_barrier


def tiny_setup(scaling):
    paddle.seed(0)
    layer = paddle.nn.Linear(4, 2)
    opt = AdamW(layer.parameters(), lr=0.1, weight_decay=0.0)
    precision = Precision("float16", device_has_amp=scaling)
    precision.dtype = "float16" if scaling else None  # CPU: bookkeeping only, no autocast
    return layer, opt, Stepper(layer, opt, precision)


def test_loss_scaler_grows_after_clean_steps_and_halves_on_overflow():
    scaler = DynamicLossScaler(init_scale=8.0, growth_interval=3)
    for _ in range(3):
        scaler.update(found_inf=False)
    assert scaler.scale == 16.0
    scaler.update(found_inf=True)
    assert scaler.scale == 8.0 and scaler.skipped_steps == 1
    restored = DynamicLossScaler(init_scale=65536.0)
    restored.load_state_dict(scaler.state_dict())
    assert restored.scale == 8.0 and restored.skipped_steps == 1


def test_scaled_step_equals_unscaled_step():
    x = paddle.to_tensor(np.random.RandomState(0).randn(5, 4).astype("float32"))
    results = []
    for scaling in (False, True):
        layer, _, stepper = tiny_setup(scaling)
        info = stepper.backward(layer(x).square().mean(), 0)
        assert info["stepped"]
        results.append(layer.weight.numpy())
    np.testing.assert_allclose(results[0], results[1], rtol=1e-6, atol=1e-7)


def test_non_finite_loss_without_scaling_stops():
    layer, _, stepper = tiny_setup(scaling=False)
    loss = layer(paddle.ones([1, 4])).sum() * float("nan")
    with pytest.raises(NonFiniteLossError):
        stepper.backward(loss, 0)


def test_non_finite_loss_with_scaling_skips_the_step_and_keeps_the_weights():
    layer, _, stepper = tiny_setup(scaling=True)
    before = layer.weight.numpy().copy()
    scale = stepper.scaler.scale
    info = stepper.backward(layer(paddle.ones([1, 4])).sum() * float("inf"), 0)
    assert info["skipped"] and not info["stepped"]
    np.testing.assert_array_equal(layer.weight.numpy(), before)
    assert stepper.scaler.scale == scale / 2
    stepper.max_consecutive_skips = 2
    stepper.backward(layer(paddle.ones([1, 4])).sum() * float("inf"), 0)
    with pytest.raises(NonFiniteLossError, match="consecutive"):
        stepper.backward(layer(paddle.ones([1, 4])).sum() * float("inf"), 0)


def test_clipping_follows_pytorch_semantics():
    p = paddle.create_parameter([4], "float32")
    p.set_value(paddle.zeros([4]))
    (p * paddle.to_tensor([3.0, 4.0, 0.0, 0.0])).sum().backward()
    norm = clip_grad_norm_([p], max_norm=1.0)
    assert norm == pytest.approx(5.0)
    np.testing.assert_allclose(p.grad.numpy(), np.array([3, 4, 0, 0]) / (5 + 1e-6), rtol=1e-6)


def test_global_grad_norm_is_the_norm_of_all_gradients_together():
    rng = np.random.default_rng(0)
    params, grads = [], []
    for shape in ([3, 5], [7], [2, 3, 4]):
        p = paddle.create_parameter(shape, "float32")
        g = rng.standard_normal(shape).astype("float32")
        (p * paddle.to_tensor(g)).sum().backward()
        params.append(p)
        grads.append(g)
    skipped = paddle.create_parameter([2], "float32")  # no gradient: not counted
    expected = np.sqrt(sum((g.astype(np.float64) ** 2).sum() for g in grads))
    assert global_grad_norm(params + [skipped]) == pytest.approx(expected, rel=1e-6)


def test_amp_flag_values():
    assert parse_amp_flag("fp16") == "float16" and parse_amp_flag(True) == "float16"
    assert parse_amp_flag("off") is None and parse_amp_flag("bf16") == "bfloat16"
    with pytest.raises(ValueError, match="--amp"):
        parse_amp_flag("fp8")
    cpu = Precision("float16", device_has_amp=False)
    assert not cpu.enabled and "fp32" in cpu.notice


def test_a_nan_loss_stops_the_run_naming_the_last_good_checkpoint(tmp_path, monkeypatch):
    calls = {"n": 0}
    original = MaskedAutoencoderViT.forward_loss

    def poisoned(self, imgs, pred, mask):
        calls["n"] += 1
        loss = original(self, imgs, pred, mask)
        return loss * float("nan") if calls["n"] == 4 else loss

    monkeypatch.setattr(MaskedAutoencoderViT, "forward_loss", poisoned)
    out = tmp_path / "out"
    with pytest.raises(NonFiniteLossError) as err:
        run(["--config", "demo/mae.yaml", "--num_workers", "0", "--batch_size", "8",
             "--epochs", "1", "--save_latest_freq", "2", "--output_dir", str(out),
             "--auto_resume", "false", "--amp", "false"])
    message = str(err.value)
    assert "batch 3" in message and str(out / "checkpoint-latest.pd") in message


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_startup_barrier_names_the_ranks_that_did_not_come():
    port = free_port()
    with pytest.raises(StartupTimeout, match=r"rank\(s\) 2 of 3"):
        # rank 1 arrives, rank 2 never does
        t = threading.Thread(target=startup_barrier, args=(1, 3, f"127.0.0.1:{port}", 3.0),
                             daemon=True)
        t.start()
        startup_barrier(0, 3, f"127.0.0.1:{port}", timeout=1.5)


def test_startup_barrier_lets_everyone_through_when_all_arrive():
    port = free_port()
    errors = []

    def member(rank):
        try:
            startup_barrier(rank, 3, f"127.0.0.1:{port}", timeout=10)
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=member, args=(r,)) for r in (1, 2)]
    for t in threads:
        t.start()
    startup_barrier(0, 3, f"127.0.0.1:{port}", timeout=10)
    for t in threads:
        t.join()
    assert not errors


@pytest.mark.parametrize("config", ["demo/mae", "demo/cae", "demo/bootmae"])
def test_every_demo_config_trains(config, tmp_path):
    runner = run(["--config", config, "--num_workers", "0", "--epochs", "1", "--max_train_step", "2",
                  "--batch_size", "8", "--output_dir", str(tmp_path), "--auto_resume", "false"])
    assert runner.global_step == 2
    assert (tmp_path / "checkpoint-0.pd").exists() and (tmp_path / "encoder.pd").exists()
