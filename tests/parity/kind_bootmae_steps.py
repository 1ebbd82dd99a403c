"""Parity runners for multi-step BootMAE trajectories: the official training loops run for a
few optimizer steps from recorded weights and batches, compared step by step.

* ``bootmae_finetune_steps``: ``engine_for_finetuning.train_one_epoch`` of the official
  fine-tuning script (layer-decay AdamW groups, per-iteration cosine schedule with warm-up,
  Mixup/CutMix with label smoothing, soft-target cross entropy, drop path, the logged
  gradient norm) on the official classifier from its own initialisation.
* ``bootmae_pretrain_steps``: ``run_pretraining.train_one_epoch`` (AdamW (0.9, 0.95) with
  the BEiT weight-decay rule, feature-loss ramp and teacher momentum per epoch, EMA teacher
  after every step, the logged gradient norm).

Models and optimizers are built and accelerated as the CLIs do (``paddle_cae.fast``: the
kernels, or the reference with ``PADDLE_CAE_FUSED_OPS=0``). The random draws of the reference (Mixup's lambda and box, drop-path masks, the patch order)
are recorded in ``case.npz`` and fed to the package's own code paths: Mixup from the same
numpy seeds, drop-path masks through ``DropPath.sample_mask``, the order as ``idx_shuffle``.
"""
import argparse

import numpy as np
import paddle

from paddle_cae.convert import linear_weight_names
from paddle_cae.data.mixup import Mixup
from paddle_cae.engine.losses import soft_target_cross_entropy
from paddle_cae.engine.stepper import Stepper
from paddle_cae.fast import accelerate, accelerate_optimizer
from paddle_cae.models.layers import DropPath
from paddle_cae.optim.schedules import apply_lr, cosine_scheduler
from paddle_cae.runtime.amp import Precision


def _replay_drop_path(masks):
    """``DropPath.sample_mask`` returning the recorded masks [calls, B] in call order."""
    queue = [np.asarray(m, dtype=np.float32) for m in masks]

    def sample_mask(self, x):
        mask = queue.pop(0)
        assert mask.shape[0] == x.shape[0], "drop-path mask of another batch size"
        shape = [x.shape[0]] + [1] * (x.ndim - 1)
        return paddle.to_tensor(mask.reshape(shape)).astype(x.dtype)

    return sample_mask, queue


def _check_groups(fx, model, optimizer, filename="param_groups.json"):
    """Every trainable parameter's lr scale and weight decay in ``optimizer`` against the
    reference's per-parameter groups."""
    expected = fx.json(filename)
    names = {p.name: n for n, p in model.named_parameters()}
    got = {}
    for group in optimizer._param_groups:
        for p in group["params"]:
            got[names[p.name]] = (float(group.get("lr_scale", 1.0)), float(group["weight_decay"]))
    assert sorted(got) == sorted(expected), (
        f"{fx.name}: grouped parameters differ: {sorted(set(got) ^ set(expected))}")
    for name, ref in expected.items():
        scale, decay = got[name]
        assert abs(scale - ref["lr_scale"]) <= 1e-12 * max(1.0, ref["lr_scale"]), (name, scale, ref)
        assert decay == ref["weight_decay"], (name, decay, ref)


def _check_final_state(fx, model, prefix="out_final_", rtol=None, atol=None):
    linear = linear_weight_names(model)
    state = model.state_dict()
    keys = [k for k in fx.case if k.startswith(prefix) and not k.startswith(prefix + "teacher_")]
    assert keys, f"{fx.name}: no {prefix}* arrays"
    for key in keys:
        name = key[len(prefix):]
        assert name in state, f"{fx.name}: model has no entry {name}"
        got = state[name].numpy()
        if name in linear:
            got = got.T
        fx.check(key[len("out_"):], got, rtol=rtol, atol=atol)


# --------------------------------------------------------------------------- fine-tuning
def run_bootmae_finetune_steps(fx, monkeypatch=None):
    from paddle_cae.cli.classify import build_run_optimizer
    from paddle_cae.models.vit import classifier_from_official_args

    train = fx.config["train_args"]
    paddle.seed(0)
    model = accelerate(classifier_from_official_args("bootmae", **fx.model_args))
    fx.load_into(model)
    args = argparse.Namespace(phase="finetune", model="bootmae_base_patch16_224",
                              weight_decay=train["weight_decay"], layer_decay=train["layer_decay"],
                              backbone_decay=1.0, abs_lr=train["lr"], opt_betas=[0.9, 0.999],
                              opt_eps=train["opt_eps"])
    optimizer = accelerate_optimizer(build_run_optimizer(args, model))  # as cli/classify does
    _check_groups(fx, model, optimizer)
    stepper = Stepper(model, optimizer, Precision(None))

    steps = train["epochs"] * train["steps_per_epoch"]
    lrs = cosine_scheduler(train["lr"], train["min_lr"], train["epochs"],
                           train["steps_per_epoch"], warmup_epochs=train["warmup_epochs"])
    fx.check("lr_schedule", lrs, rtol=0, atol=1e-15)

    mixup = Mixup(mixup_alpha=train["mixup"], cutmix_alpha=train["cutmix"], prob=1.0,
                  switch_prob=0.5, label_smoothing=train["smoothing"],
                  num_classes=fx.model_args["num_classes"])
    images, labels = fx.input("images"), fx.input("labels")
    seeds = fx.input("mixup_seeds")
    mixed, targets = [], []
    for step in range(steps):
        mixup.rng = np.random.RandomState(int(seeds[step]))
        x, t = mixup(paddle.to_tensor(images[step]), paddle.to_tensor(labels[step]))
        mixed.append(x.numpy())
        targets.append(t.numpy())
    fx.check("mixed_images", np.stack(mixed))
    fx.check("targets", np.stack(targets))

    sample_mask, queue = _replay_drop_path(fx.input("drop_path_masks").reshape(
        -1, images.shape[1]))
    original = DropPath.sample_mask
    DropPath.sample_mask = sample_mask
    losses, norms, max_lrs = [], [], []
    try:
        model.train()
        for step in range(steps):
            apply_lr(optimizer, lrs[step], train["weight_decay"])
            max_lrs.append(lrs[step])  # the head's group: lr scale 1
            logits = model(paddle.to_tensor(mixed[step]))
            loss = soft_target_cross_entropy(logits, paddle.to_tensor(targets[step]))
            info = stepper.backward(loss, step)
            assert info["stepped"]
            losses.append(float(loss))
            norms.append(float(info["grad_norm"]))
    finally:
        DropPath.sample_mask = original
    assert not queue, f"{fx.name}: {len(queue)} recorded drop-path masks left unused"
    fx.check("loss", np.array(losses))
    fx.check("grad_norm", np.array(norms))
    fx.check("max_lr", np.array(max_lrs), rtol=1e-12, atol=0)
    tol = fx.config["tolerance"]
    _check_final_state(fx, model, rtol=tol["final_rtol"], atol=tol["final_atol"])


# --------------------------------------------------------------------------- pretraining
def run_bootmae_pretrain_steps(fx):
    from paddle_cae.methods import get_method
    from paddle_cae.models.bootmae import VisionTransformerForMaskedImageModeling
    from paddle_cae.optim import build_optimizer, param_groups

    train = fx.config["train_args"]
    paddle.seed(0)
    model = VisionTransformerForMaskedImageModeling(
        **fx.model_args, feature_weight=train["feature_weight"], weight_mask=train["weight_mask"],
        mask_num=train["mask_num"], epochs=train["epochs"],
        model_ema_decay=train["model_ema_decay"], model_ema_dynamic=train["model_ema_dynamic"])
    fx.load_into(model)
    model.reset_teacher()  # timm's ModelEma starts as a copy of the model
    accelerate(model)  # as cli/pretrain does (the teacher included)
    # as the pretraining CLI builds them
    method = get_method("bootmae")
    groups = param_groups(model, train["weight_decay"], **method.group_options("pretrain", model))
    optimizer = accelerate_optimizer(build_optimizer(
        "adamw", groups, lr=train["lr"], betas=(0.9, 0.95), eps=train["opt_eps"],
        weight_decay=train["weight_decay"]))
    _check_groups(fx, model, optimizer)
    stepper = Stepper(model, optimizer, Precision(None))

    per_epoch = train["steps_per_epoch"]
    lrs = cosine_scheduler(train["lr"], train["min_lr"], train["epochs"], per_epoch,
                           warmup_epochs=train["warmup_epochs"])
    fx.check("lr_schedule", lrs, rtol=0, atol=1e-15)
    images, orders = fx.input("images"), fx.input("idx_shuffle")
    parts = {"loss": [], "loss_pixel": [], "loss_feature": []}
    norms, max_lrs, decays = [], [], []
    model.train()
    for epoch in range(train["run_epochs"]):
        # what the pretraining loop takes from the method once per epoch
        forward_kwargs = method.forward_kwargs(model, epoch)
        momentum = method.teacher_momentum(model, epoch)
        decays.append(momentum)
        for i in range(per_epoch):
            step = epoch * per_epoch + i
            apply_lr(optimizer, lrs[step], train["weight_decay"])
            max_lrs.append(lrs[step])
            out = model({"images": paddle.to_tensor(images[step]),
                         "idx_shuffle": paddle.to_tensor(orders[step])}, **forward_kwargs)
            info = stepper.backward(out["loss"], step)
            assert info["stepped"]
            model.update_teacher(momentum)
            for name in parts:
                parts[name].append(float(out[name]))
            norms.append(float(info["grad_norm"]))
    for name, values in parts.items():
        fx.check(name, np.array(values))
    fx.check("grad_norm", np.array(norms))
    fx.check("max_lr", np.array(max_lrs), rtol=1e-12, atol=0)
    fx.check("teacher_decay", np.array(decays), rtol=0, atol=1e-15)
    tol = fx.config["tolerance"]
    _check_final_state(fx, model, rtol=tol["final_rtol"], atol=tol["final_atol"])
    teacher = model.teacher_state_dict()
    linear = linear_weight_names(model)
    for key in [k for k in fx.case if k.startswith("out_final_teacher_")]:
        name = key[len("out_final_teacher_"):]
        got = teacher[name].numpy()
        fx.check(key[len("out_"):], got.T if name in linear else got,
                 rtol=tol["final_rtol"], atol=tol["final_atol"])


KINDS = {
    "bootmae_finetune_steps": run_bootmae_finetune_steps,
    "bootmae_pretrain_steps": run_bootmae_pretrain_steps,
}
