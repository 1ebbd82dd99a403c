"""Optimizers, parameter groups and schedules: behaviour beyond what the fixtures pin down."""
import json
import math
from pathlib import Path

import numpy as np
import paddle
import paddle.nn as nn
import pytest

from paddle_cae.optim import (
    LARS,
    SGD,
    AdamW,
    apply_lr,
    build_optimizer,
    cosine_scheduler,
    describe_param_groups,
    ema_decay_for_epoch,
    feature_weight_at,
    layer_id_for_vit,
    mae_lr_at,
    param_groups,
)

FIXTURES = Path(__file__).parent / "fixtures"


# ----------------------------------------------------------------- helpers
class TinyViT(nn.Layer):
    """Parameter names of a ViT with two blocks and a frozen position table."""

    def __init__(self, depth=2, dim=4, with_mask_token=True):
        super().__init__()
        self.cls_token = self.create_parameter([1, 1, dim])
        self.pos_embed = self.create_parameter([1, 5, dim])
        self.pos_embed.stop_gradient = True
        if with_mask_token:
            self.mask_token = self.create_parameter([1, 1, dim])
        self.patch_embed = nn.Layer()
        self.patch_embed.proj = nn.Conv2D(3, dim, 2, 2)
        self.blocks = nn.LayerList()
        for _ in range(depth):
            blk = nn.Layer()
            blk.norm1 = nn.LayerNorm(dim)
            blk.fc = nn.Linear(dim, dim)
            self.blocks.append(blk)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, 3)


class SelfDescribingViT(TinyViT):
    def no_weight_decay(self):
        return {"cls_token", "mask_token"}

    def num_layers_for_decay(self):
        return len(self.blocks) + 1

    def layer_id(self, name):
        return 0 if name.startswith("head") else len(self.blocks) + 1


def _params(shapes, seed=0, scale=1.0):
    rng = np.random.default_rng(seed)
    out = []
    for shape in shapes:
        p = paddle.create_parameter(list(shape), "float32")
        p.set_value((scale * rng.standard_normal(shape)).astype(np.float32))
        out.append(p)
    return out


def _set_grads(params, grads):
    loss = sum((p * paddle.to_tensor(g)).sum() for p, g in zip(params, grads))
    loss.backward()


def _grad_sequence(shapes, steps, seed=1):
    rng = np.random.default_rng(seed)
    return [[(rng.standard_normal(s) * 10.0 ** rng.integers(-3, 1)).astype(np.float32)
             for s in shapes] for _ in range(steps)]


def _torch_adamw_reference(init, grads, lr, scales, wds, betas, eps):
    """PyTorch's AdamW update, written out in float64."""
    b1, b2 = betas
    ps = [x.astype(np.float64) for x in init]
    ms = [np.zeros_like(p) for p in ps]
    vs = [np.zeros_like(p) for p in ps]
    history = []
    for t, step_grads in enumerate(grads, start=1):
        for i, g in enumerate(step_grads):
            g = g.astype(np.float64)
            group_lr = lr * scales[i]
            ps[i] = ps[i] * (1 - group_lr * wds[i])
            ms[i] = b1 * ms[i] + (1 - b1) * g
            vs[i] = b2 * vs[i] + (1 - b2) * g * g
            denom = np.sqrt(vs[i]) / math.sqrt(1 - b2 ** t) + eps
            ps[i] = ps[i] - group_lr / (1 - b1 ** t) * ms[i] / denom
        history.append([p.copy() for p in ps])
    return history


# ------------------------------------------------------------------- AdamW
def _adamw_path(path):
    """(fused, multi_tensor) for AdamW's three code paths."""
    return {"plain": (False, False), "fused": (True, False), "multi": (False, True)}[path]


@pytest.mark.parametrize("path", ["plain", "fused", "multi"])
def test_adamw_updates_match_torch_formula_with_group_lr_scales(path):
    fused, multi = _adamw_path(path)
    shapes = [(6, 5), (5,), (2, 3, 3)]
    scales = [0.5, 1.0, 0.25]
    lr, betas, eps = 2e-3, (0.9, 0.999), 1e-8
    # tiny weights: float32 rounding of p stays far below the size of each update
    params = _params(shapes, scale=1e-4)
    init = [p.numpy() for p in params]
    grads = _grad_sequence(shapes, steps=5)
    groups = [{"params": [p], "lr_scale": s, "weight_decay": 0.0} for p, s in zip(params, scales)]
    opt = AdamW(groups, lr=lr, betas=betas, eps=eps, fused=fused, multi_tensor=multi)
    reference = _torch_adamw_reference(init, grads, lr, scales, [0.0] * 3, betas, eps)
    previous = [x.astype(np.float64) for x in init]
    for t in range(5):
        _set_grads(params, grads[t])
        opt.step()
        opt.clear_grad()
        for i, p in enumerate(params):
            got = p.numpy().astype(np.float64)
            ref_prev = reference[t - 1][i] if t else init[i].astype(np.float64)
            ref_update = reference[t][i] - ref_prev
            err = np.abs((got - previous[i]) - ref_update).max() / np.abs(ref_update).max()
            # paddle.optimizer.AdamW is off by ~5e-6 here (float32 bias-correction powers)
            assert err < 1.5e-6, (t, i, err)
        previous = [p.numpy().astype(np.float64) for p in params]


@pytest.mark.parametrize("path", ["plain", "fused", "multi"])
def test_adamw_weight_decay_is_decoupled_and_scaled_by_group_lr(path):
    fused, multi = _adamw_path(path)
    a, b = _params([(4, 3), (4, 3)])
    before = [a.numpy().astype(np.float64), b.numpy().astype(np.float64)]
    groups = [{"params": [a], "lr_scale": 0.5, "weight_decay": 0.3},
              {"params": [b], "lr_scale": 1.0, "weight_decay": 0.0}]
    opt = AdamW(groups, lr=0.1, fused=fused, multi_tensor=multi)
    zeros = np.zeros((4, 3), np.float32)
    _set_grads([a, b], [zeros, zeros])  # zero moments: only the decay moves a weight
    opt.step()
    np.testing.assert_allclose(a.numpy(), before[0] * (1 - 0.1 * 0.5 * 0.3), rtol=1e-6)
    np.testing.assert_allclose(b.numpy(), before[1], rtol=1e-7)


def test_adamw_fused_multi_tensor_and_plain_paths_agree():
    shapes = [(7, 3), (3,), (2, 2, 5)]
    grads = _grad_sequence(shapes, steps=4, seed=3)
    results = []
    for path in ("plain", "fused", "multi"):
        fused, multi = _adamw_path(path)
        params = _params(shapes, seed=2)
        opt = AdamW(params, lr=1e-2, betas=(0.9, 0.95), weight_decay=0.05, fused=fused,
                    multi_tensor=multi)
        for g in grads:
            _set_grads(params, g)
            opt.step()
            opt.clear_grad()
        results.append([p.numpy() for p in params] + [opt.state[0]["exp_avg_sq"].numpy()])
    for other in results[1:]:
        for a, b in zip(results[0], other):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-8)


def test_adamw_chooses_its_cpu_kernel_when_accelerated(monkeypatch):
    """The fused-kernel switch and the tensors' place are read once, when the optimizer is
    accelerated: a step looks nothing up again (and the switch changed later does not
    matter); switched off, the optimizer stays the reference AdamW (multi-tensor path)."""
    from paddle_cae.fast import accelerate_optimizer
    from paddle_cae.fast.kernels import extension as fused_ops
    from paddle_cae.fast.optim import FastAdamW

    if not fused_ops.extension_available():
        pytest.skip("fused kernels not built here")
    shapes = [(4, 3), (3,)]
    grads = _grad_sequence(shapes, steps=2, seed=5)
    results = {}
    for switch in ("1", "0"):
        monkeypatch.setenv("PADDLE_CAE_FUSED_OPS", switch)
        params = _params(shapes, seed=4)
        opt = accelerate_optimizer(AdamW(params, lr=1e-2, betas=(0.9, 0.95), weight_decay=0.05))
        assert (type(opt) is FastAdamW) == (switch == "1")
        assert (getattr(opt, "_kernel", None) is not None) == (switch == "1")
        monkeypatch.setenv("PADDLE_CAE_FUSED_OPS", "0" if switch == "1" else "1")

        def no_lookup(*a, **k):
            raise AssertionError("the kernel choice was looked up during a step")

        monkeypatch.setattr(fused_ops, "_use", no_lookup)
        monkeypatch.setattr(fused_ops, "usable", no_lookup)
        for g in grads:
            _set_grads(params, g)
            opt.step()
            opt.clear_grad()
        monkeypatch.undo()
        results[switch] = [p.numpy() for p in params]
    for a, b in zip(results["1"], results["0"]):  # kernel vs multi-tensor path: ~1e-6
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-8)


def test_adamw_zero_lr_leaves_params_but_advances_moments():
    (p,) = _params([(4, 4)])
    before = p.numpy()
    g = np.full((4, 4), 2.0, np.float32)
    opt = AdamW([p], lr=0.0, weight_decay=0.05, fused=True)
    _set_grads([p], [g])
    opt.step()
    np.testing.assert_array_equal(p.numpy(), before)
    assert opt.state[0]["step"] == 1
    np.testing.assert_allclose(opt.state[0]["exp_avg"].numpy(), 0.1 * g, rtol=1e-6)


def test_optimizer_skips_parameters_without_gradient():
    a, b = _params([(3, 2), (2,)])
    b_before = b.numpy()
    opt = AdamW([a, b], lr=0.1)
    _set_grads([a], [np.ones((3, 2), np.float32)])
    opt.step()
    np.testing.assert_array_equal(b.numpy(), b_before)
    assert 1 not in opt.state


@pytest.mark.parametrize("name", ["adamw", "lars", "sgd"])
def test_resume_from_saved_state_continues_identically(name, tmp_path):
    shapes = [(5, 4), (4,)]
    grads = _grad_sequence(shapes, steps=6, seed=4)

    def make(params):
        groups = [{"params": [params[0]], "lr_scale": 0.5, "weight_decay": 0.05},
                  {"params": [params[1]], "lr_scale": 1.0, "weight_decay": 0.0}]
        return build_optimizer(name, groups, lr=0.05, momentum=0.9)

    straight = _params(shapes, seed=5)
    opt = make(straight)
    for g in grads:
        _set_grads(straight, g)
        opt.step()
        opt.clear_grad()

    first = _params(shapes, seed=5)
    opt = make(first)
    for g in grads[:3]:
        _set_grads(first, g)
        opt.step()
        opt.clear_grad()
    paddle.save({"optimizer": opt.state_dict(),
                 "params": [p.numpy() for p in first]}, str(tmp_path / "ckpt.pd"))

    saved = paddle.load(str(tmp_path / "ckpt.pd"))
    resumed = _params(shapes, seed=99)
    for p, value in zip(resumed, saved["params"]):
        p.set_value(value)
    opt = make(resumed)
    opt.set_state_dict(saved["optimizer"])
    for g in grads[3:]:
        _set_grads(resumed, g)
        opt.step()
        opt.clear_grad()
    for a, b in zip(straight, resumed):
        np.testing.assert_array_equal(a.numpy(), b.numpy())


def test_set_state_dict_rejects_other_group_layout():
    a, b = _params([(2, 2), (2,)])
    opt = AdamW([{"params": [a]}, {"params": [b]}], lr=0.1)
    other = AdamW([a, b], lr=0.1)
    with pytest.raises(ValueError, match="parameter groups"):
        other.set_state_dict(opt.state_dict())


# -------------------------------------------------------------------- LARS
def test_lars_zero_weight_uses_trust_ratio_one():
    (w,) = _params([(3, 4)])
    w.set_value(np.zeros((3, 4), np.float32))
    g = np.arange(12, dtype=np.float32).reshape(3, 4)
    opt = LARS([w], lr=0.5, weight_decay=0.05, momentum=0.9)
    _set_grads([w], [g])
    opt.step()
    np.testing.assert_allclose(w.numpy(), -0.5 * g, rtol=1e-6)


def test_lars_one_dim_params_get_no_decay_and_no_trust_scaling():
    (b,) = _params([(5,)])
    before = b.numpy()
    g = np.ones(5, np.float32)
    opt = LARS([b], lr=0.1, weight_decay=0.5, momentum=0.9)
    _set_grads([b], [g])
    opt.step()
    np.testing.assert_allclose(b.numpy(), before - 0.1 * g, rtol=1e-6)


# --------------------------------------------------------------------- SGD
def test_sgd_nesterov_matches_torch_update_formula():
    (p,) = _params([(4, 3)])
    x = p.numpy().astype(np.float64)
    grads = _grad_sequence([(4, 3)], steps=3, seed=6)
    lr, mom, wd = 0.1, 0.9, 0.01
    opt = SGD([p], lr=lr, momentum=mom, weight_decay=wd, nesterov=True)
    buf = None
    for (g,) in grads:
        _set_grads([p], [g])
        opt.step()
        opt.clear_grad()
        d = g.astype(np.float64) + wd * x
        buf = d if buf is None else mom * buf + d
        x = x - lr * (d + mom * buf)
        np.testing.assert_allclose(p.numpy(), x, rtol=1e-5, atol=1e-7)


def test_build_optimizer_rejects_unknown_name():
    with pytest.raises(ValueError, match="unknown optimizer"):
        build_optimizer("adagrad", _params([(2,)]), lr=0.1)


# ------------------------------------------------------------ param groups
def test_frozen_parameters_are_left_out_of_every_group():
    model = TinyViT()
    groups = param_groups(model, 0.05, layer_decay=0.5)
    names = [n for g in groups for n in g["param_names"]]
    assert "pos_embed" not in names
    trainable = [n for n, p in model.named_parameters() if not p.stop_gradient]
    assert sorted(names) == sorted(trainable)
    assert len(names) == len(set(names))


def test_layer_ids_follow_block_index_and_put_head_last():
    assert layer_id_for_vit("cls_token", 12) == 0
    assert layer_id_for_vit("patch_embed.proj.weight", 12) == 0
    assert layer_id_for_vit("blocks.0.attn.qkv.weight", 12) == 1
    assert layer_id_for_vit("blocks.11.mlp.fc2.bias", 12) == 12
    assert layer_id_for_vit("rel_pos_bias.relative_position_bias_table", 12) == 13
    assert layer_id_for_vit("fc_norm.weight", 12) == 13
    # exact-name match only: a name that merely starts with cls_token is not an embedding
    assert layer_id_for_vit("cls_token_extra", 12) == 13


def test_mask_token_layer_differs_between_mae_and_beit_rules():
    assert layer_id_for_vit("mask_token", 4, rule="beit") == 0
    assert layer_id_for_vit("mask_token", 4, rule="mae") == 5


def test_layer_decay_scales_and_weight_decay_exclusions():
    model = TinyViT(depth=2, with_mask_token=False)
    info = describe_param_groups(model, 0.05, layer_decay=0.5, no_weight_decay_list={"cls_token"},
                                 rule="beit")
    assert info["cls_token"]["lr_scale"] == 0.5 ** 3
    assert info["cls_token"]["weight_decay"] == 0.0  # on the skip list
    assert info["patch_embed.proj.weight"]["weight_decay"] == 0.05
    assert info["blocks.1.fc.weight"]["lr_scale"] == 0.5 and info["blocks.1.fc.weight"]["layer_id"] == 2
    assert info["blocks.0.norm1.weight"]["weight_decay"] == 0.0  # 1-D
    assert info["head.bias"]["weight_decay"] == 0.0
    assert info["head.weight"]["lr_scale"] == 1.0 and info["head.weight"]["weight_decay"] == 0.05


def test_without_layer_decay_all_scales_are_one_and_tokens_decay():
    info = describe_param_groups(TinyViT(), 0.05, no_weight_decay_list=())
    assert {v["lr_scale"] for v in info.values()} == {1.0}
    # pretraining recipes: cls and mask tokens are decayed, only 1-D/bias exempt
    assert info["cls_token"]["weight_decay"] == 0.05
    assert info["mask_token"]["weight_decay"] == 0.05
    assert {v["group_name"] for v in info.values()} == {"decay", "no_decay"}


def test_backbone_decay_scales_every_layer_but_the_head():
    model = TinyViT(depth=2, with_mask_token=False)
    plain = describe_param_groups(model, 0.05, layer_decay=0.6, rule="beit")
    boot = describe_param_groups(model, 0.05, layer_decay=0.6, rule="beit", backbone_decay=0.5)
    for name in plain:
        if plain[name]["layer_id"] == 3:
            assert boot[name]["lr_scale"] == 1.0
        else:
            assert boot[name]["lr_scale"] == pytest.approx(0.5 * plain[name]["lr_scale"], rel=1e-12)


def test_model_declared_rules_are_used():
    model = SelfDescribingViT(depth=2)
    info = describe_param_groups(model, 0.05, layer_decay=0.5)
    assert info["cls_token"]["weight_decay"] == 0.0 and info["mask_token"]["weight_decay"] == 0.0
    assert info["head.weight"]["layer_id"] == 0 and info["head.weight"]["lr_scale"] == 0.5 ** 3
    assert info["blocks.0.fc.weight"]["layer_id"] == 3
    # an explicit empty list overrides the model's own
    info = describe_param_groups(model, 0.05, layer_decay=0.5, no_weight_decay_list=())
    assert info["cls_token"]["weight_decay"] == 0.05


def test_param_groups_drive_paddle_adamw_lr_multipliers():
    model = TinyViT(depth=2, with_mask_token=False)
    groups = param_groups(model, 0.0, layer_decay=0.5, rule="beit")
    opt = paddle.optimizer.AdamW(learning_rate=1e-2, parameters=groups, weight_decay=0.0)
    params = dict(model.named_parameters())
    head_w, blk_w = params["head.weight"], params["blocks.0.fc.weight"]
    before = {k: params[k].numpy() for k in ("head.weight", "blocks.0.fc.weight")}
    loss = (head_w.sum() + blk_w.sum()) * 1.0
    loss.backward()
    opt.step()
    # the first Adam step moves every entry by ~lr * multiplier
    head_move = np.abs(head_w.numpy() - before["head.weight"]).mean()
    blk_move = np.abs(blk_w.numpy() - before["blocks.0.fc.weight"]).mean()
    assert head_move == pytest.approx(1e-2, rel=1e-3)
    assert blk_move == pytest.approx(1e-2 * 0.5 ** 2, rel=1e-3)


def test_apply_lr_sets_scaled_lr_and_only_touches_decayed_groups():
    model = TinyViT(depth=2, with_mask_token=False)
    opt = build_optimizer("adamw", param_groups(model, 0.05, layer_decay=0.5, rule="beit"), lr=1.0)
    apply_lr(opt, 0.2, weight_decay=0.01)
    for group in opt.param_groups:
        assert group["lr"] == pytest.approx(0.2 * group["lr_scale"], rel=1e-12)
        assert group["weight_decay"] in (0.0, 0.01)
    assert {g["weight_decay"] for g in opt.param_groups} == {0.0, 0.01}


# --------------------------------------------------------------- schedules
def test_mae_lr_warms_up_from_zero_then_follows_half_cosine():
    kw = dict(base_lr=1.0, min_lr=0.1, warmup_epochs=4, epochs=14)
    assert mae_lr_at(0, **kw) == 0.0
    assert mae_lr_at(2, **kw) == 0.5
    assert mae_lr_at(4, **kw) == 1.0
    assert mae_lr_at(9, **kw) == pytest.approx(0.55, rel=1e-12)
    assert mae_lr_at(14, **kw) == pytest.approx(0.1, rel=1e-12)


def test_cosine_schedule_repeats_peak_and_stops_above_final_value():
    values = cosine_scheduler(1.0, 0.0, epochs=3, niter_per_ep=4, warmup_epochs=1)
    assert values.dtype == np.float64 and len(values) == 12
    np.testing.assert_allclose(values[:4], [0.0, 1 / 3, 2 / 3, 1.0], rtol=1e-15)
    assert values[4] == 1.0  # cosine part starts again from the base value
    i = np.arange(8)
    np.testing.assert_allclose(values[4:], 0.5 * (1 + np.cos(np.pi * i / 8)), rtol=1e-14)
    assert values[-1] > 0.0


def test_cosine_schedule_warmup_steps_override_warmup_epochs():
    values = cosine_scheduler(1.0, 0.0, epochs=2, niter_per_ep=5, warmup_epochs=1, warmup_steps=3)
    np.testing.assert_allclose(values[:3], [0.0, 0.5, 1.0])
    assert values[3] == 1.0 and len(values) == 10


def test_cosine_schedule_without_warmup_starts_at_base_and_constant_when_equal():
    assert cosine_scheduler(0.5, 0.1, 2, 3)[0] == 0.5
    np.testing.assert_array_equal(cosine_scheduler(0.05, 0.05, 2, 3), np.full(6, 0.05))


def test_cosine_schedule_rejects_warmup_longer_than_training():
    with pytest.raises(ValueError, match="warm-up"):
        cosine_scheduler(1.0, 0.0, epochs=1, niter_per_ep=2, warmup_epochs=2)


def test_bootmae_ema_decay_and_feature_weight_match_reference_schedule():
    ref = json.loads((FIXTURES / "bootmae_ema" / "ema_schedule.json").read_text())
    d0 = ref["model_ema_decay"]
    for mode, dynamic in (("static", False), ("dynamic", True)):
        for point in ref["schedule"][mode]:
            got = ema_decay_for_epoch(point["epoch"], dynamic=dynamic, base_decay=d0)
            assert got == pytest.approx(point["decay"], rel=1e-12, abs=0), (mode, point)
    fw_key = next(k for k in ref if k.startswith("feature_weight_schedule"))
    for point in ref[fw_key]:
        got = feature_weight_at(point["epoch"], ref["epochs"], 1.0)
        assert got == pytest.approx(point["feature_weight"], rel=1e-12, abs=0)


def test_ema_decay_is_constant_within_an_epoch_and_capped():
    assert ema_decay_for_epoch(99) < 0.9999
    assert ema_decay_for_epoch(100) == ema_decay_for_epoch(5000) == 0.9999
    assert ema_decay_for_epoch(400, dynamic=True) == pytest.approx(0.99999, rel=1e-15)
    assert ema_decay_for_epoch(5000, dynamic=True) == ema_decay_for_epoch(400, dynamic=True)


def recipe_group_options(method, phase, model=None):
    """``rule`` and ``no_weight_decay_list`` as the official recipe of ``method`` builds its
    groups (the method decides)."""
    from paddle_cae.methods import get_method

    return get_method(method).group_options(phase, model)


class DeclaresPosAndCls(TinyViT):
    def no_weight_decay(self):
        return {"pos_embed", "cls_token"}


def test_recipe_options_ask_the_model_where_the_official_pretraining_does():
    # MAE (timm's add_weight_decay) never asks the model: tokens decay whatever it declares
    declaring = DeclaresPosAndCls()
    opts = recipe_group_options("mae", "pretrain", declaring)
    assert opts["rule"] == "mae" and opts["no_weight_decay_list"] == set()
    assert describe_param_groups(declaring, 0.05, **opts)["cls_token"]["weight_decay"] == 0.05
    # CAE and BootMAE (BEiT's create_optimizer) ask it: a model declaring nothing decays its
    # tokens, one declaring cls_token does not
    for method in ("cae", "bootmae"):
        opts = recipe_group_options(method, "pretrain", TinyViT())
        assert opts["rule"] == "beit"
        assert describe_param_groups(TinyViT(), 0.05, **opts)["cls_token"]["weight_decay"] == 0.05
        opts = recipe_group_options(method, "pretrain", declaring)
        info = describe_param_groups(declaring, 0.05, **opts)
        assert info["cls_token"]["weight_decay"] == 0.0 and info["mask_token"]["weight_decay"] == 0.05


@pytest.mark.slow
def test_recipe_options_of_the_real_pretraining_models_match_the_official_recipes():
    from paddle_cae.models import create_model

    small = dict(img_size=32, patch_size=16, embed_dim=32, depth=1, num_heads=2)
    cases = {"mae_vit_base_patch16": ("mae", set()),
             "cae_base_patch16_224_8k_vocab": ("cae", set()),
             "bootmae_base": ("bootmae", {"pos_embed", "cls_token"})}
    for name, (method, skip) in cases.items():
        model = create_model(name, **small)
        assert recipe_group_options(method, "pretrain", model)["no_weight_decay_list"] == skip, name


def test_recipe_options_of_fine_tuning_ask_the_classifier():
    assert recipe_group_options("cae", "finetune", SelfDescribingViT())["no_weight_decay_list"] \
        == {"cls_token", "mask_token"}


def test_peak_lr_rules_of_the_official_scripts():
    from paddle_cae.optim.schedules import peak_lr

    assert peak_lr(None, 1.5e-4, 4096) == (pytest.approx(1.5e-4 * 16), "blr 0.00015 x 4096 / 256")
    assert peak_lr(2e-3, 1.5e-4, 4096) == (2e-3, "absolute --lr")
    value, rule = peak_lr(1.5e-4, None, 512, scaled_by_batch=True, scaled_by="BootMAE")
    assert value == pytest.approx(3e-4) and rule == "lr 0.00015 x 512 / 256 (BootMAE scaling)"


def test_lr_schedule_and_group_rule_names_are_checked():
    from paddle_cae.optim.param_groups import assign_param_groups
    from paddle_cae.optim.schedules import LearningRateSchedule

    with pytest.raises(ValueError, match="lr schedule"):
        LearningRateSchedule("linear", 1e-3, 0.0, 1, 10, 5, 0.05)
    with pytest.raises(ValueError, match="rule"):
        assign_param_groups([("blocks.0.w", [2, 2], True)], 0.05, rule="timm")
    # both reach the peak after warm-up; MAE warms up over fractional epochs (1/5 after one of
    # five updates), BEiT's array is linspace(0, peak, 5) (1/4 after one update)
    mae = LearningRateSchedule("mae", 1e-3, 0.0, 1, 10, 5, 0.05)
    beit = LearningRateSchedule("beit", 1e-3, 0.0, 1, 10, 5, 0.05)
    assert mae.at(1, 0)[0] == pytest.approx(1e-3) and beit.at(1, 0)[0] == pytest.approx(1e-3)
    assert mae.at(0, 1)[0] == pytest.approx(1e-3 / 5) and beit.at(0, 1)[0] == pytest.approx(1e-3 / 4)


def test_the_fast_adamw_state_resumes_the_reference_adamw_and_back():
    """accelerate_optimizer changes the class, not the state: a checkpoint of either resumes
    the other (a CPU run continued on a GPU, or with PADDLE_CAE_FUSED_OPS=0)."""
    from paddle_cae.fast import accelerate_optimizer

    shapes = [(4, 3), (3,)]
    params = _params(shapes, seed=4)
    fast = accelerate_optimizer(AdamW(params, lr=1e-2), environ={"PADDLE_CAE_FUSED_OPS": "1"})
    for g in _grad_sequence(shapes, steps=2, seed=5):
        _set_grads(params, g)
        fast.step()
        fast.clear_grad()
    state = fast.state_dict()
    assert state["optimizer"] == "AdamW"
    reference = AdamW(_params(shapes, seed=4), lr=1e-2)
    reference.set_state_dict(state)
    assert reference.state[0]["step"] == 2
    np.testing.assert_array_equal(reference.state[0]["exp_avg"].numpy(),
                                  fast.state[0]["exp_avg"].numpy())
    again = accelerate_optimizer(AdamW(_params(shapes, seed=4), lr=1e-2),
                                 environ={"PADDLE_CAE_FUSED_OPS": "1"})
    again.set_state_dict(reference.state_dict())
    assert again.state[1]["step"] == 2
