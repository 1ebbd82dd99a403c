"""Parity runners for the optimizer pieces: LARS steps, layer-decay parameter groups and the
lr schedules, plus the BootMAE parameter-group check the fine-tune classifier runner calls."""
import numpy as np
import paddle

from paddle_cae.models import create_model
from paddle_cae.optim import LARS, cosine_scheduler, describe_param_groups, mae_lr_at
from paddle_cae.optim.param_groups import model_no_weight_decay

GROUP_FIELDS = ("lr_scale", "weight_decay", "layer_id")


# per-parameter values and schedules are float64 arithmetic on both sides
EXACT = {"rtol": 1e-12, "atol": 0.0}


def _assert_close(fx, what, actual, expected, rtol=None, atol=None):
    rtol = fx.rtol if rtol is None else rtol
    atol = fx.atol if atol is None else atol
    np.testing.assert_allclose(np.asarray(actual, np.float64), np.asarray(expected, np.float64),
                               rtol=rtol, atol=atol, err_msg=f"{fx.name}/{what}")


def compare_param_groups(fx, described, expected, label, frozen=(), rtol=None, atol=None):
    """``described``: our ``{name: {...}}``; ``expected``: the reference ``{name: {...}}``.
    The two must name the same parameters and agree on every field the reference gives."""
    ours = set(described)
    theirs = set(expected)
    assert ours == theirs, (
        f"{fx.name}/{label}: parameter sets differ; only ours: {sorted(ours - theirs)}, "
        f"only reference: {sorted(theirs - ours)}"
    )
    for name in frozen:
        assert name not in described, f"{fx.name}/{label}: frozen {name} landed in a group"
    for name, ref in expected.items():
        got = described[name]
        for field in GROUP_FIELDS:
            if field in ref:
                _assert_close(fx, f"{label}/{name}/{field}", got[field], ref[field], rtol, atol)


# -------------------------------------------------------------------------- LARS
def run_mae_lars(fx):
    args = fx.model_args
    state = fx.official_state()
    weight = paddle.create_parameter(list(state["weight"].shape), "float32")
    bias = paddle.create_parameter(list(state["bias"].shape), "float32")
    weight.set_value(np.asarray(state["weight"]))
    bias.set_value(np.asarray(state["bias"]))
    opt = LARS([weight, bias], lr=args["lr"], weight_decay=args["weight_decay"],
               momentum=args["momentum"], trust_coefficient=args["trust_coefficient"])
    grads_w = fx.input("grad_weight")
    grads_b = fx.input("grad_bias")
    for k in range(grads_w.shape[0]):
        # gradients reach the parameters through backward, as in training
        loss = (weight * paddle.to_tensor(grads_w[k])).sum() + \
            (bias * paddle.to_tensor(grads_b[k])).sum()
        loss.backward()
        opt.step()
        opt.clear_grad()
        step = k + 1
        fx.check(f"weight_step{step}", weight)
        fx.check(f"bias_step{step}", bias)
        fx.check(f"mu_weight_step{step}", opt.state[0]["mu"])
        fx.check(f"mu_bias_step{step}", opt.state[1]["mu"])


# ------------------------------------------------------------------ param groups
def run_mae_param_groups(fx):
    args = fx.model_args
    with paddle.LazyGuard():  # names and shapes only, no weights materialised
        model = create_model("vit_base_patch16", num_classes=args["num_classes"],
                             drop_path_rate=args["drop_path_rate"],
                             global_pool=args["global_pool"], img_size=args["img_size"])
    call = fx.config["call_args"]["param_groups_lrd"]
    assert call["no_weight_decay_list"] == "model.no_weight_decay()"
    described = describe_param_groups(
        model, call["weight_decay"], layer_decay=call["layer_decay"],
        no_weight_decay_list=model_no_weight_decay(model), rule="mae")
    compare_param_groups(fx, described, fx.json("groups.json"), "groups.json")

    sched = fx.json("lr_schedule.json")
    a = sched["args"]
    for point in sched["schedule"]:
        got = mae_lr_at(point["epoch"], a["lr"], a["min_lr"], a["warmup_epochs"], a["epochs"])
        _assert_close(fx, f"lr_schedule@{point['epoch']}", got, point["lr"])


def run_cae_param_groups(fx):
    args = dict(fx.model_args)
    with paddle.LazyGuard():
        model = create_model(
            "cae_base_patch16_224", img_size=args["img_size"], num_classes=args["num_classes"],
            init_values=args["init_values"], use_rel_pos_bias=args["use_rel_pos_bias"],
            global_pool=args["use_mean_pooling"],
            pos_embed_type="sincos" if args.get("args", {}).get("sin_pos_emb", True) else "none")
    inputs = fx.config["inputs"]
    ref = fx.json("param_groups.json")
    assert sorted(model_no_weight_decay(model)) == sorted(ref["skip_weight_decay_list"])
    described = describe_param_groups(
        model, inputs["weight_decay"], layer_decay=inputs["layer_decay"],
        no_weight_decay_list=model_no_weight_decay(model), rule="beit")
    compare_param_groups(fx, described, ref["params"], "param_groups.json",
                         frozen=ref.get("excluded_params", {}))
    # group membership: same partition of the parameters, same per-group values
    ours = {}
    for name, info in described.items():
        ours.setdefault((info["layer_id"], info["weight_decay"]), set()).add(name)
    theirs = {}
    for name, info in ref["params"].items():
        theirs.setdefault((info["layer_id"], info["weight_decay"]), set()).add(name)
    assert ours == theirs, f"{fx.name}: parameter groups partition the parameters differently"

    sched = fx.json("lr_schedule.json")
    _assert_close(fx, "lr_schedule", cosine_scheduler(1e-3, 1e-6, 10, 5, warmup_epochs=2),
                  sched["values"])
    _assert_close(fx, "lr_schedule/warmup_steps_7",
                  cosine_scheduler(1e-3, 1e-6, 10, 5, warmup_epochs=2, warmup_steps=7),
                  sched["variant_warmup_steps_7"]["values"])
    _assert_close(fx, "wd_schedule", cosine_scheduler(0.05, 0.05, 10, 5),
                  sched["weight_decay_schedule"]["values"])


def check_bootmae_param_groups(fx, model):
    """Compare every variant of bootmae_finetune/param_groups.json (layer_decay with
    backbone_decay 1 and 0.5) with the groups built for ``model``."""
    ref = fx.json("param_groups.json")
    variants = [v for v in ref.values() if isinstance(v, dict) and "params" in v]
    assert variants, f"{fx.name}: param_groups.json holds no variant"
    for variant in variants:
        label = f"param_groups.json[backbone_decay={variant['backbone_decay']}]"
        described = describe_param_groups(
            model, variant["weight_decay"], layer_decay=variant["layer_decay"],
            no_weight_decay_list=model_no_weight_decay(model), rule="beit",
            backbone_decay=variant["backbone_decay"])
        compare_param_groups(fx, described, variant["params"], label,
                             frozen=variant.get("frozen_not_in_any_group", ()), **EXACT)


KINDS = {
    "mae_lars": run_mae_lars,
    "mae_param_groups": run_mae_param_groups,
    "cae_param_groups": run_cae_param_groups,
}
