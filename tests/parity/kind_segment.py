"""Parity runners for semantic segmentation: the encoder + multi-scale neck the package builds
for ``main_segment.py`` (official ``backbone/cae.py::CAE`` / ``backbone/mae.py::MAE``) and the
layer-decay parameter groups of its optimizer (official ``LayerDecayOptimizerConstructor``).

Everything is rebuilt from ``config.json``: the network through ``build_network`` (as
``main_segment.py`` builds it), the encoder weights through ``--finetune``'s loader, the groups
through ``segmentation_groups``. The neck's weights are not in any pretraining checkpoint, so they
are set from the fixture's ``fpn*`` arrays by name (ConvTranspose weights in their own layout).
"""
import numpy as np
import paddle
import paddle.nn as nn

from paddle_cae.cli.segment import load_encoder_weights
from paddle_cae.convert import linear_weight_names
from paddle_cae.downstream.optim import segmentation_groups
from paddle_cae.downstream.seg_args import build_network
from paddle_cae.fast import accelerate

# the classifier whose encoder the official backbone class corresponds to
_MODEL = {"cae": "cae_base_patch16_224", "mae": "vit_base_patch16"}
_BN_BUFFERS = {"running_mean": "_mean", "running_var": "_variance"}


def seg_config(family, args, num_classes=5, channels=16):
    """main_segment.py's network config for the official backbone arguments ``args``."""
    model_args = {k: args[k] for k in ("patch_size", "in_chans", "embed_dim", "depth",
                                       "num_heads", "mlp_ratio") if k in args}
    if family == "cae":
        model_args["qkv_bias"] = bool(args.get("qkv_bias", True))
    return {
        "model": _MODEL[family], "model_args": model_args, "num_classes": num_classes,
        "crop_size": int(args["img_size"]), "out_indices": list(args["out_indices"]),
        "channels": channels, "dropout_ratio": 0.0, "drop_path": float(args["drop_path_rate"]),
        "rel_pos_bias": bool(args["use_rel_pos_bias"]),
        "layer_scale_init_value": args.get("init_values"),
        "pos_embed_trainable": bool(args.get("use_abs_pos_emb", False)),
    }


def our_name(name):
    """The segmentor's parameter name of an official backbone name (neck under ``neck.``)."""
    return ("neck." if name.startswith("fpn") else "backbone.") + name


def _build_backbone(fx, family):
    """(segmentor without decode head, official state) with every weight of the fixture loaded."""
    args = fx.model_args
    assert args["patch_size"] == 16 and not args.get("out_with_norm", False), fx.name
    paddle.seed(0)
    model = accelerate(build_network(seg_config(family, args), decode_head=nn.Identity()))
    report = load_encoder_weights(model.backbone, str(fx.dir / "checkpoint.pth"))
    state = fx.official_state()
    backbone_state = model.backbone.state_dict()
    loaded = set(report.loaded) | {k for k, _ in report.adapted}
    for key in state:
        if key.startswith("fpn") or key.endswith("relative_position_index"):
            continue
        assert key in loaded, f"{fx.name}: --finetune did not load {key}"
        if key == "pos_embed":  # the frozen table must be the checkpoint's, not rebuilt
            np.testing.assert_array_equal(backbone_state[key].numpy(), state[key])
    for key, own in backbone_state.items():
        if key.endswith("relative_position_index"):
            np.testing.assert_array_equal(own.numpy(), state[key], err_msg=f"{fx.name}/{key}")
    neck_state = model.neck.state_dict()
    for key, value in state.items():
        if not key.startswith("fpn"):
            continue
        module, _, leaf = key.rpartition(".")
        if leaf == "num_batches_tracked":
            continue
        target = f"{module}.{_BN_BUFFERS.get(leaf, leaf)}"
        assert target in neck_state, f"{fx.name}: the neck has no {target} for {key}"
        assert list(neck_state[target].shape) == list(value.shape), (key, value.shape)
        neck_state[target].set_value(np.asarray(value))
    return model, state


def run_seg_backbone(fx):
    family = fx.kind.split("_")[0]
    model, state = _build_backbone(fx, family)
    images = paddle.to_tensor(fx.input("images"))
    weights = [paddle.to_tensor(fx.input(f"w{i}")) for i in range(4)]

    model.train()
    feats = model.features(images)
    loss = sum((f * w).sum() for f, w in zip(feats, weights))
    loss.backward()
    for i, f in enumerate(feats):
        fx.check(f"feat{i}", f)
    fx.check("loss", loss)

    params = dict(model.named_parameters())
    linear = linear_weight_names(model)
    assert model.backbone.pos_embed.grad is None, f"{fx.name}: the frozen pos_embed got a gradient"
    zero = fx.config["tolerance"].get("zero_grads", {})
    largest = max(float(np.abs(fx.case["grad_" + n]).max()) for n in fx.config["grads"]
                  if n not in zero)
    for name in fx.config["grads"]:
        ours = our_name(name)
        assert ours in params, f"{fx.name}: the segmentor has no parameter {ours}"
        p = params[ours]
        assert p.grad is not None, f"{fx.name}: no gradient reached {ours}"
        g = p.grad.numpy()
        if ours in linear:
            g = g.T
        if name in zero:  # analytically zero (a bias in front of train-mode BatchNorm)
            assert g.shape == fx.case["grad_" + name].shape
            assert np.abs(g).max() <= 1e-6 * largest, (
                f"{fx.name}/grad_{name}: {np.abs(g).max():.3e} is not ~0")
            fx.mark_checked("grad_" + name)
        else:
            fx.check_grad(name, g)
    trainable = {n for n, p in params.items() if not p.stop_gradient}
    expected = {our_name(n) for n in fx.config["grads"]}
    assert trainable == expected, (
        f"{fx.name}: trainable parameters differ; only ours {sorted(trainable - expected)}, "
        f"only reference {sorted(expected - trainable)}")

    bn = model.neck.fpn1[1]
    for leaf, ours in _BN_BUFFERS.items():
        fx.check(f"after_train_fpn1.1.{leaf}", getattr(bn, ours))
    fx.check("after_train_fpn1.1.num_batches_tracked", bn_batches_tracked(bn))

    # eval mode on a fresh copy of the checkpoint (running statistics as stored)
    model, _ = _build_backbone(fx, family)
    model.eval()
    with paddle.no_grad():
        feats = model.features(images)
        loss = sum((f * w).sum() for f, w in zip(feats, weights))
    for i, f in enumerate(feats):
        fx.check(f"feat{i}_eval", f)
    fx.check("loss_eval", loss)


def bn_batches_tracked(bn):
    value = getattr(bn, "num_batches_tracked", None)
    assert value is not None, "the neck's BatchNorm does not count its batches"
    return np.asarray(value.numpy())


# ------------------------------------------------------------------ param groups
class _Named(nn.Layer):
    """Parameters of the given dotted names and shapes, nested as the names say."""

    def __init__(self, entries):
        super().__init__()
        children = {}
        for name, shape in entries:
            head, _, rest = name.partition(".")
            if rest:
                children.setdefault(head, []).append((rest, shape))
            else:
                self.add_parameter(head, self.create_parameter(list(shape)))
        for head, sub in children.items():
            self.add_sublayer(head, _Named(sub))


def run_seg_param_groups(fx):
    ref = fx.json("param_groups.json")
    inputs = fx.config["inputs"]
    assert inputs["num_layers"] == fx.model_args["depth"], fx.name
    with paddle.LazyGuard():
        heads = [(n, s["shape"]) for n, s in ref["params"].items()
                 if not n.startswith("backbone.")]
        head_layer = _Named(heads)
        model = build_network(seg_config("cae", fx.model_args), decode_head=head_layer)
    # the decode head's parameters, named as the reference names them
    rename = {}
    for name, _ in model.named_parameters():
        if name.startswith("backbone."):
            rename[name] = name
        elif name.startswith("neck."):
            rename[name] = "backbone." + name[len("neck."):]
        elif name.startswith("decode_head."):
            rename[name] = name[len("decode_head."):]
    groups = segmentation_groups(model, inputs["weight_decay"], inputs["layer_decay_rate"])
    base_lr = inputs["base_lr"]

    ours = {}
    for index, group in enumerate(groups):
        for name in group["param_names"]:
            ours[rename[name]] = dict(group_index=index, group_name=group["group_name"],
                                      lr_scale=group["lr_scale"], weight_decay=group["weight_decay"],
                                      lr=group["lr_scale"] * base_lr)
    theirs = ref["params"]
    assert set(ours) == set(theirs), (
        f"{fx.name}: parameter sets differ; only ours {sorted(set(ours) - set(theirs))}, "
        f"only reference {sorted(set(theirs) - set(ours))}")
    for name in ref.get("excluded_params", {}):
        assert name not in ours, f"{fx.name}: {name} must be in no group"
    described = dict(segmentation_describe(model, inputs))
    for name, exp in theirs.items():
        got = ours[name]
        for field in ("group_name", "group_index"):
            assert got[field] == exp[field], f"{fx.name}/{name}/{field}: {got[field]} != {exp[field]}"
        assert got["weight_decay"] == exp["weight_decay"], f"{fx.name}/{name}/weight_decay"
        mine = next(k for k, v in rename.items() if v == name)
        assert described[mine]["layer_id"] == exp["layer_id"], f"{fx.name}/{name}/layer_id"
        for field in ("lr_scale", "lr"):
            np.testing.assert_allclose(got[field], exp[field], rtol=fx.rtol, atol=fx.atol,
                                       err_msg=f"{fx.name}/{name}/{field}")
    # the groups themselves, in order
    assert len(groups) == len(ref["groups"]), f"{fx.name}: {len(groups)} groups, not {len(ref['groups'])}"
    for group, exp in zip(groups, ref["groups"]):
        assert group["group_name"] == exp["group_name"], (group["group_name"], exp["group_name"])
        assert [rename[n] for n in group["param_names"]] == exp["param_names"], group["group_name"]
        assert group["weight_decay"] == exp["weight_decay"], group["group_name"]
        np.testing.assert_allclose(group["lr_scale"] * base_lr, exp["lr"], rtol=fx.rtol, atol=fx.atol)
    np.testing.assert_allclose(
        [scale for scale in _layer_scales(groups, described)], ref["layer_scales"],
        rtol=fx.rtol, atol=fx.atol, err_msg=f"{fx.name}/layer_scales")


def segmentation_describe(model, inputs):
    from paddle_cae.optim import describe_param_groups

    return describe_param_groups(model, inputs["weight_decay"], layer_decay=inputs["layer_decay_rate"],
                                 rule="beit")


def _layer_scales(groups, described):
    by_id = {}
    for group in groups:
        for name in group["param_names"]:
            by_id[described[name]["layer_id"]] = group["lr_scale"]
    return [by_id[i] for i in sorted(by_id)]


KINDS = {
    "cae_seg_backbone": run_seg_backbone,
    "mae_seg_backbone": run_seg_backbone,
    "cae_seg_param_groups": run_seg_param_groups,
}
