"""Parity runners for the MAE / BootMAE pretraining fixtures.

Each runner rebuilds the model from ``config.json`` alone (``model_args`` are the official
constructor arguments), loads ``checkpoint.pth`` through the package's converter, feeds the
recorded inputs and checks every recorded output and gradient.
"""
import inspect

import numpy as np
import paddle
import paddle.nn as nn

from paddle_cae.convert import read_torch_checkpoint
from paddle_cae.fast import accelerate, accelerate_steps
from paddle_cae.methods import get_method
from paddle_cae.models.bootmae import VisionTransformerForMaskedImageModeling, ema_update_
from paddle_cae.models.mae import MaskedAutoencoderViT
from paddle_cae.optim.schedules import ema_decay_for_epoch, feature_weight_at


def _constructor_args(cls, model_args, fixture):
    """The fixture's official arguments, refusing any the class does not know."""
    accepted = set(inspect.signature(cls.__init__).parameters) - {"self"}
    unknown = sorted(set(model_args) - accepted)
    assert not unknown, f"{fixture}: {cls.__name__} has no argument(s) {unknown}"
    return dict(model_args)


# ------------------------------------------------------------------------------- MAE
def run_mae_pretrain(fx):
    paddle.seed(0)
    model = accelerate(MaskedAutoencoderViT(**_constructor_args(MaskedAutoencoderViT, fx.model_args,
                                                                fx.name)))
    fx.load_into(model)
    model.train()
    mask_ratio = fx.config.get("call_args", {}).get("mask_ratio", 0.75)
    imgs = paddle.to_tensor(fx.input("imgs"))
    out = model(imgs, mask_ratio=mask_ratio, noise=paddle.to_tensor(fx.input("noise")))
    fx.check("loss", out["loss"])
    fx.check("pred", out["pred"])
    fx.check("mask", out["mask"])
    fx.check("latent", out["latent"])
    fx.check("ids_restore", out["ids_restore"].astype("int64"))
    out["loss"].backward()
    fx.check_model_grads(model)


# --------------------------------------------------------------------------- BootMAE
def run_bootmae_pretrain_loss(fx):
    paddle.seed(0)
    train = fx.config.get("train_args", {})
    args = _constructor_args(VisionTransformerForMaskedImageModeling, fx.model_args, fx.name)
    mask_len = int(fx.input("mask_len"))
    args.update(feature_weight=train.get("feature_weight", 1.0),
                weight_mask=train.get("weight_mask", True),
                mask_num=int(train.get("mask_num", mask_len)),
                epochs=train.get("epochs", 800))
    model = accelerate(VisionTransformerForMaskedImageModeling(**args))
    fx.load_into(model)
    # the fixtures store the momentum encoder under "teacher"; official runs under "model_ema"
    stored = read_torch_checkpoint(fx.dir / "checkpoint.pth")
    fx.load_into(model.teacher, key="teacher" if "teacher" in stored else "model_ema")
    model.train()

    # the order the fixture used is the official mask_to_index of its block mask (roll 0)
    idx_shuffle = fx.input("idx_shuffle")
    dropped = np.zeros(idx_shuffle.shape, dtype=bool)
    np.put_along_axis(dropped, idx_shuffle[:, idx_shuffle.shape[1] - mask_len:], True, axis=1)
    np.testing.assert_array_equal(dropped, fx.input("bool_masked_pos").reshape(dropped.shape))

    epoch = train.get("epoch")
    # the loop passes the method's feature-weight ramp of the epoch in
    schedule = {} if epoch is None else get_method("bootmae").forward_kwargs(model, epoch)
    out = model(paddle.to_tensor(fx.input("images")), idx_shuffle=idx_shuffle, mask_len=mask_len,
                **schedule)
    np.testing.assert_allclose(out["feature_weight"], float(fx.input("feature_weight")),
                               rtol=1e-6, err_msg=f"{fx.name}: feature-weight ramp")
    fx.check("loss_total", out["loss"])
    fx.check("loss_pixel", out["loss_pixel"])
    fx.check("loss_feature", out["loss_feature"])
    fx.check("pred_pixel", out["pred_pixel"])
    fx.check("pred_feature", out["pred_feature"])
    fx.check("target_feature", out["target_feature"])
    fx.check("pixel_target", out["pixel_target"])
    fx.check("weight_mask", out["weight_mask"])
    fx.check("weight_mask_pixel", out["weight_mask_pixel"][:, 0])

    teacher_before = {k: v.numpy().copy() for k, v in model.teacher_state_dict().items()}
    out["loss"].backward()
    fx.check_model_grads(model)
    for name, p in model.teacher.named_parameters():
        assert p.grad is None, f"{fx.name}: the teacher received a gradient in {name}"
    for k, v in model.teacher_state_dict().items():
        np.testing.assert_array_equal(v.numpy(), teacher_before[k], err_msg=k)


# ------------------------------------------------------------------------------ EMA
def _stand_in(weights):
    """Paddle twin of the fixture's nn.Sequential(nn.Linear(5, 3), nn.LayerNorm(3)) with the
    given torch-layout arrays ('0.weight' [out, in], ...)."""
    out_f, in_f = weights["0.weight"].shape
    model = nn.Sequential(nn.Linear(in_f, out_f), nn.LayerNorm(out_f))
    state = {k: (v.T if k == "0.weight" else v) for k, v in weights.items()}
    model.set_state_dict({k: paddle.to_tensor(np.ascontiguousarray(v)) for k, v in state.items()})
    return model


def run_bootmae_ema(fx):
    schedule = fx.json("ema_schedule.json")
    d0 = schedule["model_ema_decay"]
    for flavour, dynamic in (("static", False), ("dynamic", True)):
        for point in schedule["schedule"][flavour]:
            got = ema_decay_for_epoch(point["epoch"], dynamic=dynamic, base_decay=d0)
            assert abs(got - point["decay"]) <= 1e-12, (flavour, point, got)
    ramp_key = next(k for k in schedule if k.startswith("feature_weight_schedule"))
    epochs = schedule["epochs"]
    for point in schedule[ramp_key]:
        got = feature_weight_at(point["epoch"], epochs, 1.0)
        assert abs(got - point["feature_weight"]) <= 1e-12, (point, got)

    # the reference's checkpoint holds the same student/teacher the case feeds in
    student_ref = fx.official_state("model")
    teacher_ref = fx.official_state("model_ema")
    names = sorted(k[len("in_student."):] for k in fx.case if k.startswith("in_student."))
    for k in names:
        np.testing.assert_array_equal(student_ref[k], fx.input("student." + k))
        np.testing.assert_array_equal(teacher_ref[k], fx.input("teacher." + k))

    student = _stand_in({k: fx.input("student." + k) for k in names})
    # the method's schedule, as the training loop uses it
    model = VisionTransformerForMaskedImageModeling(
        img_size=16, patch_size=8, embed_dim=8, depth=1, num_heads=2, decode_dim=8,
        decoder_depth=1, fea_list=(0,), mask_num=3, model_ema_decay=d0, model_ema_dynamic=True)
    assert get_method("bootmae").teacher_momentum(model, 250) == schedule["updates"][1]["decay"]

    accelerate_steps()  # the EMA kernel, as a run has it (PADDLE_CAE_FUSED_OPS=0: the reference)
    for update in schedule["updates"]:
        tag, decay = update["tag"], update["decay"]
        assert np.float32(decay) == fx.input("decay_" + tag)
        teacher = _stand_in({k: fx.input("teacher." + k) for k in names})
        ema_update_(teacher, student, decay)
        state = teacher.state_dict()
        for k in names:
            got = state[k].numpy()
            fx.check(f"teacher_{tag}.{k}", got.T if k == "0.weight" else got)


KINDS = {
    "mae_pretrain": run_mae_pretrain,
    "bootmae_pretrain_loss": run_bootmae_pretrain_loss,
    "bootmae_ema": run_bootmae_ema,
}
