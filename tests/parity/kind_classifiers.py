"""Parity runners for the classifiers: MAE / CAE / BootMAE fine-tuning ViTs and the
linear-probe head."""
import numpy as np
import paddle
import paddle.nn as nn
import paddle.nn.functional as F

from paddle_cae.engine.losses import label_smoothing_cross_entropy
from paddle_cae.fast import accelerate
from paddle_cae.models.vit import LinearProbeHead, classifier_from_official_args

_FAMILY = {"mae_vit_finetune": "mae", "cae_finetune": "cae", "bootmae_finetune_cls": "bootmae"}


def _images(fx):
    name = "imgs" if "in_imgs" in fx.case else "images"
    return paddle.to_tensor(fx.input(name)), name


def run_finetune_classifier(fx):
    paddle.seed(0)
    model = accelerate(classifier_from_official_args(_FAMILY[fx.kind], **fx.model_args))
    fx.load_into(model)
    model.train()
    images, _ = _images(fx)
    labels = paddle.to_tensor(fx.input("labels"))

    features = model.forward_features(images)
    logits = model.head(features)
    loss = F.cross_entropy(logits, labels)
    loss.backward()

    if "out_features" in fx.case:
        fx.check("features", features)
    fx.check("logits", logits)
    fx.check("loss", loss)
    for key in fx.case:
        if key.startswith("out_loss_l"):  # label-smoothing variants (0.1), not differentiated
            fx.check(key[len("out_"):], label_smoothing_cross_entropy(logits, labels, 0.1))
    fx.check_model_grads(model, fx.config["grads"])

    if (fx.dir / "param_groups.json").exists():
        from tests.parity.kind_optim import check_bootmae_param_groups

        check_bootmae_param_groups(fx, model)


class _ProbeHolder(nn.Layer):
    """Holds the probe head under the name ``head`` as in the official full model."""

    def __init__(self, in_features, num_classes, momentum):
        super().__init__()
        self.head = LinearProbeHead(in_features, num_classes, eps=1e-6, momentum=momentum)


def run_linprobe_head(fx):
    args = fx.model_args
    holder = _ProbeHolder(args["in_features"], args["num_classes"], args.get("bn_momentum", 0.1))
    fx.load_into(holder)
    bn = holder.head.bn
    bn.num_batches_tracked.set_value(
        paddle.to_tensor(fx.official_state()["head.0.num_batches_tracked"]))
    x = paddle.to_tensor(fx.input("x"))
    labels = paddle.to_tensor(fx.input("labels"))

    holder.train()
    out = holder.head(x)
    loss = F.cross_entropy(out, labels)
    loss.backward()
    fx.check("train", out)
    fx.check("loss", loss)
    fx.check_model_grads(holder, fx.config["grads"])
    fx.check("running_mean", bn._mean)
    fx.check("running_var", bn._variance)
    fx.check("num_batches_tracked", np.asarray(bn.num_batches_tracked.numpy()))

    holder.eval()
    with paddle.no_grad():
        fx.check("eval", holder.head(x))


KINDS = {
    "mae_vit_finetune": run_finetune_classifier,
    "cae_finetune": run_finetune_classifier,
    "bootmae_finetune_cls": run_finetune_classifier,
    "mae_linprobe_head": run_linprobe_head,
}
