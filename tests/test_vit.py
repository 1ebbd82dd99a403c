"""ViT building blocks and the registered classifiers."""
import numpy as np
import paddle
import pytest

from paddle_cae.models import create_model, list_models
from paddle_cae.models.layers import DropPath, TorchBatchNorm1D, relative_position_index
from paddle_cae.models.pos_embed import resize_pos_embed, sincos_pos_embed


def trainable_count(model):
    return sum(int(np.prod(p.shape)) for p in model.parameters() if not p.stop_gradient)


def expected_classifier_params(family, dim, depth, heads, patch, img=224, classes=1000):
    """Parameter count implied by the papers' configurations, from first principles."""
    n = (img // patch) ** 2
    total = 3 * patch * patch * dim + dim  # patch embedding conv
    total += dim  # cls token
    if family == "mae":
        total += (n + 1) * dim  # learned position table (CAE/BootMAE: fixed, not trained)
    per_block = 4 * dim  # two LayerNorms
    per_block += 3 * dim * dim + dim * dim + dim  # qkv and proj weights, proj bias
    per_block += 3 * dim if family == "mae" else 2 * dim  # full qkv bias vs q/v biases
    per_block += 2 * dim * 4 * dim + 4 * dim + dim  # MLP
    if family == "cae":
        per_block += 2 * dim  # layer-scale gammas
        grid = img // patch
        per_block += ((2 * grid - 1) ** 2 + 3) * heads  # relative position table
    total += depth * per_block
    total += 2 * dim  # fc_norm of mean pooling
    total += dim * classes + classes  # head
    return total


@pytest.mark.slow
def test_vit_base_patch16_has_the_published_parameter_count():
    assert trainable_count(create_model("vit_base_patch16", num_classes=1000)) == 86_567_656


@pytest.mark.parametrize("name,family,dim,depth,heads,patch,img", [
    ("vit_large_patch16", "mae", 1024, 24, 16, 16, 224),
    ("vit_huge_patch14", "mae", 1280, 32, 16, 14, 224),
    ("cae_tiny_patch16_224", "cae", 192, 12, 12, 16, 224),
    ("cae_small_patch16_224", "cae", 384, 12, 12, 16, 224),
    ("cae_base_patch16_224", "cae", 768, 12, 12, 16, 224),
    ("cae_base_patch16_384", "cae", 768, 12, 12, 16, 384),
    ("cae_large_patch16_224", "cae", 1024, 24, 16, 16, 224),
    ("bootmae_base_patch16_224", "bootmae", 768, 12, 12, 16, 224),
    ("bootmae_large_patch16_224", "bootmae", 1024, 24, 16, 16, 224),
])
def test_registered_classifier_parameter_counts(name, family, dim, depth, heads, patch, img):
    with paddle.LazyGuard():  # shapes only: no need to fill 600M parameters
        model = create_model(name, num_classes=1000)
    assert trainable_count(model) == expected_classifier_params(family, dim, depth, heads, patch, img)


def test_every_classifier_name_is_registered():
    names = set(list_models("classify"))
    for n in ["vit_base_patch16", "vit_large_patch16", "vit_huge_patch14", "cae_tiny_patch16_224",
              "cae_small_patch16_224", "cae_base_patch16_224", "cae_large_patch16_224",
              "cae_base_patch16_384", "bootmae_base_patch16_224", "bootmae_large_patch16_224"]:
        assert n in names


def test_unknown_model_name_lists_the_known_ones():
    with pytest.raises(KeyError, match="vit_base_patch16"):
        create_model("vit_gigantic")


def test_sincos_layouts_are_the_same_table_with_halves_swapped():
    mae = sincos_pos_embed(64, 4, layout="mae")
    moco = sincos_pos_embed(64, 4, layout="moco")
    assert mae.shape == (17, 64)
    np.testing.assert_array_equal(mae[0], 0)
    np.testing.assert_allclose(mae[1:, :32], moco[1:, 32:], atol=2e-6)
    np.testing.assert_allclose(mae[1:, 32:], moco[1:, :32], atol=2e-6)


def test_mae_layout_puts_the_column_first():
    table = sincos_pos_embed(8, 3, cls_token=False, layout="mae")
    # token 1 is row 0, column 1: the first quarter is sin(column * omega_0) = sin(1)
    assert table[1, 0] == pytest.approx(np.sin(1.0), abs=1e-6)
    assert table[1, 4] == pytest.approx(0.0, abs=1e-6)  # sin(row * omega_0) = 0
    # token 3 is row 1, column 0
    assert table[3, 0] == pytest.approx(0.0, abs=1e-6)
    assert table[3, 4] == pytest.approx(np.sin(1.0), abs=1e-6)


def test_resize_pos_embed_keeps_cls_and_is_identity_on_same_grid():
    table = np.random.RandomState(0).randn(1, 17, 8).astype(np.float32)
    assert resize_pos_embed(table, 4) is table
    resized = resize_pos_embed(table, 6)
    assert resized.shape == (1, 37, 8)
    np.testing.assert_array_equal(resized[:, 0], table[:, 0])
    # a constant grid stays constant under bicubic resampling
    const = np.ones((1, 17, 8), np.float32)
    np.testing.assert_allclose(resize_pos_embed(const, 7)[:, 1:], 1.0, atol=1e-5)


def test_relative_position_index_layout():
    index = relative_position_index((2, 2))
    num_rel = 3 * 3 + 3
    assert index.shape == (5, 5)
    assert index[0, 0] == num_rel - 1
    assert (index[0, 1:] == num_rel - 3).all() and (index[1:, 0] == num_rel - 2).all()
    # query (0,0) vs key (1,1): dy = -1, dx = -1 -> (0) * 3 + 0
    assert index[1, 4] == 0
    # identical positions share the centre entry (dy = dx = 0)
    assert set(np.diag(index)[1:]) == {4}


def test_drop_path_is_identity_in_eval_and_rescales_in_train():
    paddle.seed(1)
    layer = DropPath(0.5)
    x = paddle.ones([1000, 4])
    layer.eval()
    np.testing.assert_array_equal(layer(x).numpy(), x.numpy())
    layer.train()
    y = layer(x).numpy()
    rows = set(np.unique(y))
    assert rows <= {0.0, 2.0}
    assert 0.4 < (y[:, 0] == 0).mean() < 0.6


def test_torch_batchnorm_updates_running_var_with_unbiased_variance():
    bn = TorchBatchNorm1D(3, eps=1e-6, momentum=0.1)
    x = np.random.RandomState(0).randn(8, 3).astype(np.float32)
    bn.train()
    y = bn(paddle.to_tensor(x)).numpy()
    np.testing.assert_allclose(y, (x - x.mean(0)) / np.sqrt(x.var(0) + 1e-6), atol=1e-5)
    np.testing.assert_allclose(bn._variance.numpy(), 0.9 + 0.1 * x.var(0, ddof=1), rtol=1e-5)
    np.testing.assert_allclose(bn._mean.numpy(), 0.1 * x.mean(0), atol=1e-6)


def test_classifier_rejects_a_wrong_input_size_with_a_clear_message():
    model = create_model("cae_base_patch16_224", img_size=32, patch_size=8, embed_dim=64, depth=1,
                         num_heads=4, num_classes=3)
    with pytest.raises(ValueError, match="input_size"):
        model(paddle.zeros([1, 3, 48, 48]))


def test_cae_fixed_position_table_is_not_trained():
    model = create_model("cae_base_patch16_224", img_size=32, patch_size=8, embed_dim=64, depth=1,
                         num_heads=4, num_classes=3)
    model(paddle.randn([2, 3, 32, 32])).sum().backward()
    assert model.pos_embed.stop_gradient and model.pos_embed.grad is None
    assert model.blocks[0].attn.relative_position_bias_table.grad is not None


# ------------------------------------------------------------ classifier initialisation
def _tiny(name, **kw):
    cfg = dict(num_classes=10, img_size=16, patch_size=4, embed_dim=48, depth=4, num_heads=4)
    cfg.update(kw)
    return create_model(name, **cfg)


@pytest.mark.parametrize("name,fix_init", [("vit_base_patch16", False), ("cae_base_patch16_224", True),
                                           ("bootmae_base_patch16_224", True)])
def test_classifier_init_follows_the_official_class(name, fix_init):
    """Linears N(0, 0.02) (timm trunc_normal_ with +-2 absolute bounds), the patch conv at
    PyTorch's default U(+-1/sqrt(fan_in)), proj/fc2 of block l divided by sqrt(2l) (CAE, BootMAE)."""
    paddle.seed(0)
    model = create_model(name, num_classes=10, img_size=64, patch_size=8, embed_dim=256, depth=3,
                         num_heads=4)
    fc1 = np.concatenate([b.mlp.fc1.weight.numpy().ravel() for b in model.blocks])
    np.testing.assert_allclose(fc1.std(), 0.02, rtol=0.02)
    assert np.abs(fc1).max() > 3 * 0.02  # not truncated at 1 or 2 std
    for layer_id, blk in enumerate(model.blocks, start=1):
        scale = np.sqrt(2.0 * layer_id) if fix_init else 1.0
        for w in (blk.attn.proj.weight.numpy(), blk.mlp.fc2.weight.numpy()):
            np.testing.assert_allclose(w.std() * scale, 0.02, rtol=0.05)
    conv = model.patch_embed.proj
    bound = 1 / np.sqrt(3 * 8 * 8)
    for p in (conv.weight.numpy(), conv.bias.numpy()):
        assert np.abs(p).max() <= bound and np.abs(p).max() > 0.8 * bound
    np.testing.assert_allclose(conv.weight.numpy().std(), bound / np.sqrt(3), rtol=0.03)
    cls_std = model.cls_token.numpy().std()
    assert (cls_std < 1e-5) if name.startswith("bootmae") else (0.01 < cls_std < 0.03)


def _separable_batch(step, n=32, size=16):
    templates = np.random.RandomState(123).randn(10, 3, size, size).astype("float32")
    rs = np.random.RandomState(step)
    y = rs.randint(0, 10, n)
    x = templates[y] + 0.5 * rs.randn(n, 3, size, size).astype("float32")
    return paddle.to_tensor(x), paddle.to_tensor(y)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["bootmae", "cae"])
def test_classifier_from_its_own_init_learns_under_the_recipe_optimizer(method):
    """The fine-tune recipe's optimizer (AdamW, layer decay, weight decay, betas, at the peak lr
    2e-3) on the classifier's own initialisation (no --finetune) lowers the training loss on an
    easy problem. With the previous init (+-1 std truncation everywhere, also on the 4x4 patch
    conv) the loss stayed at ln 10 for BootMAE and CAE."""
    import paddle.nn.functional as F

    from paddle_cae.loading.classifier import build_classifier, classifier_config
    from paddle_cae.cli.classify import build_run_optimizer
    from paddle_cae.cli.finetune_args import parse_finetune_args

    recipe = f"configs/finetune/{method}_base_patch16_224.yaml"
    args = parse_finetune_args(["--config", recipe, "--lr", "2e-3", "--input_size", "16", "--drop_path", "0",
                                "--model_args", '{"patch_size": 4, "embed_dim": 48, "depth": 4, "num_heads": 4}'])
    args.abs_lr = args.lr
    paddle.seed(0)
    model = build_classifier(classifier_config(args, 10))
    optimizer = build_run_optimizer(args, model)
    assert min(g["lr_scale"] for g in optimizer.param_groups) < 0.2  # layer decay is on
    losses = []
    for step in range(40):
        x, y = _separable_batch(step)
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()
        optimizer.clear_grad()
        losses.append(float(loss))
    assert abs(np.mean(losses[:3]) - np.log(10)) < 0.05  # head starts at ~0: chance
    assert np.mean(losses[-5:]) < 0.5 * np.log(10), losses  # ~0.6-0.8 here; the old init 1.65-1.9


# ------------------------------------------------- --model_args against the named flags
TINY_ARGS = {"patch_size": 4, "embed_dim": 16, "depth": 1, "num_heads": 2}


def _classifier_from_flags(model, model_args, *flags, num_classes=10):
    import json

    from paddle_cae.loading.classifier import build_classifier, classifier_config
    from paddle_cae.cli.finetune_args import parse_finetune_args

    args = parse_finetune_args(["--model", model, "--input_size", "16",
                                "--model_args", json.dumps(dict(TINY_ARGS, **model_args)), *flags])
    return build_classifier(classifier_config(args, num_classes))


@pytest.mark.parametrize("model", ["vit_base_patch16", "cae_base_patch16_224", "bootmae_base_patch16_224"])
def test_model_args_that_agree_with_the_named_flags_are_accepted(model):
    m = _classifier_from_flags(model, {"num_classes": 10, "global_pool": True, "img_size": 16})
    assert m.head.weight.shape == [16, 10] and m.global_pool
    m = _classifier_from_flags(model, {"global_pool": False}, "--cls_token")
    assert not m.global_pool and m.fc_norm is None


@pytest.mark.parametrize("model_args,flags,names", [
    ({"num_classes": 5}, (), ("'num_classes': 5", "--nb_classes", "10")),
    ({"global_pool": False}, (), ("'global_pool': False", "--global_pool")),
    ({"global_pool": True}, ("--cls_token",), ("'global_pool': True", "--global_pool")),
    ({"img_size": 32}, (), ("'img_size': 32", "--input_size", "16")),
    ({"drop_path_rate": 0.3}, ("--drop_path", "0.1"), ("'drop_path_rate': 0.3", "--drop_path")),
    ({"init_scale": 1.0}, (), ("'init_scale': 1.0", "--init_scale", "0.001")),
])
def test_model_args_that_contradict_a_named_flag_name_both(model_args, flags, names):
    from paddle_cae.loading.classifier import ModelArgsConflict

    with pytest.raises(ModelArgsConflict) as err:
        _classifier_from_flags("bootmae_base_patch16_224", model_args, *flags)
    assert isinstance(err.value, ValueError)  # the entry points print it as one line
    for name in names:
        assert name in str(err.value)


def test_cae_layer_scale_in_model_args_must_match_the_flag():
    from paddle_cae.loading.classifier import ModelArgsConflict

    m = _classifier_from_flags("cae_base_patch16_224", {"init_values": 0.1}, "--layer_scale_init_value", "0.1")
    np.testing.assert_allclose(m.blocks[0].gamma_1.numpy(), 0.1)
    m = _classifier_from_flags("cae_base_patch16_224", {"init_values": 0.2})  # flag not set: model_args
    np.testing.assert_allclose(m.blocks[0].gamma_1.numpy(), 0.2)
    with pytest.raises(ModelArgsConflict, match="--layer_scale_init_value"):
        _classifier_from_flags("cae_base_patch16_224", {"init_values": 0.2}, "--layer_scale_init_value", "0.1")


def test_finetune_entry_point_reports_a_model_args_conflict_in_one_line(capsys):
    from paddle_cae.cli.classify import main

    rc = main(["--model", "bootmae_base_patch16_224", "--input_size", "32", "--num_workers", "0",
               "--model_args", '{"num_classes": 3, "patch_size": 4, "embed_dim": 16, "depth": 1, "num_heads": 2}',
               "--output_dir", "/nonexistent/never_written", "--epochs", "1"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "'num_classes': 3" in err[0] and "--nb_classes" in err[0]


def test_mae_head_init_std_depends_on_finetune():
    from paddle_cae.loading.classifier import classifier_config
    from paddle_cae.cli.finetune_args import parse_finetune_args

    scratch = classifier_config(parse_finetune_args(["--model", "vit_base_patch16"]), 10)
    tuned = classifier_config(parse_finetune_args(["--model", "vit_base_patch16", "--finetune", "x.pd"]), 10)
    assert (scratch["head_init_std"], tuned["head_init_std"]) == (0.02, 2e-5)
    paddle.seed(0)
    m = _classifier_from_flags("vit_base_patch16", {"embed_dim": 256})
    np.testing.assert_allclose(m.head.weight.numpy().std(), 0.02, rtol=0.1)


def test_probe_depth_truncates_the_encoder_model_args_describe():
    from paddle_cae.loading.classifier import ModelArgsConflict, build_classifier

    config = {"model": "bootmae_base_patch16_224", "num_classes": 10, "input_size": 16, "global_pool": True,
              "model_args": dict(TINY_ARGS, depth=3), "probe": "standard", "depth": 2}
    assert len(build_classifier(config).blocks) == 2
    with pytest.raises(ModelArgsConflict, match="--depth 4 keeps more blocks"):
        build_classifier(dict(config, depth=4))


def test_classifier_config_names_whose_transform_rules_the_run_follows():
    from paddle_cae.loading.classifier import classifier_config
    from paddle_cae.cli.finetune_args import parse_finetune_args, parse_linprobe_args

    for model, family in (("vit_base_patch16", "mae"), ("cae_base_patch16_224", "cae"),
                          ("bootmae_base_patch16_224", "bootmae")):
        assert classifier_config(parse_finetune_args(["--model", model]), 10)["transform_method"] == family
        assert classifier_config(parse_linprobe_args(["--model", model]), 10)["transform_method"] is None
    attentive = parse_linprobe_args(["--model", "cae_base_patch16_224", "--linear_type", "attentive"])
    assert classifier_config(attentive, 10)["transform_method"] == "cae"
