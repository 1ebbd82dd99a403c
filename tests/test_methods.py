"""The Method contract: every model name finds its method in one lookup, and a fourth method
(model + method in ONE file, plus a config) pretrains through ``main_pretrain.py``'s ``main``."""
import importlib.util
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from paddle_cae.methods import (classifier_name, get_method, method_for, method_names,
                                pretrain_only_prefixes)
from paddle_cae.models.registry import list_models

ROOT = Path(__file__).resolve().parents[1]

# A toy masked-image model: a 1-block encoder over the visible patches (built from the
# package's layers) and a linear pixel head on every position; the data pipeline delivers a
# block mask. Model and method live in this one file.
TOY_METHOD_FILE = '''
import paddle
import paddle.nn as nn

from paddle_cae.data.pipeline import CropFlip, Pipeline, ToFloat
from paddle_cae.data.transforms import _get, bool_mask, mean_std
from paddle_cae.methods import Method, register_method
from paddle_cae.models.base import PretrainingModel
from paddle_cae.models.layers import Block, PatchEmbed
from paddle_cae.models.registry import register_model


class ToyMIM(PretrainingModel):
    input_keys = ("images", "bool_masked_pos")

    def __init__(self, img_size=32, patch_size=4, embed_dim=32, num_heads=2, masked_weight=1.0):
        super().__init__()
        self.patch_embed = PatchEmbed(img_size, patch_size, 3, embed_dim)
        self.mask_token = self.create_parameter([1, 1, embed_dim])
        self.block = Block(embed_dim, num_heads, qkv_bias=True)
        self.pixel_head = nn.Linear(embed_dim, patch_size * patch_size * 3)
        self.patch = patch_size
        self.masked_weight = masked_weight

    def forward(self, batch):
        images, mask = batch["images"], batch["bool_masked_pos"].astype("float32").unsqueeze(-1)
        x = self.patch_embed(images)
        x = x * (1 - mask) + self.mask_token * mask
        pred = self.pixel_head(self.block(x))
        b, c, h, w = images.shape
        p = self.patch
        target = images.reshape([b, c, h // p, p, w // p, p]).transpose([0, 2, 4, 3, 5, 1])
        target = target.reshape([b, (h // p) * (w // p), p * p * c])
        err = ((pred - target) ** 2).mean(axis=-1, keepdim=True)
        loss = (err * mask).sum() / mask.sum() * self.masked_weight
        return {"loss": loss, "loss_masked": loss}

    def encoder_state_dict(self):
        return {k: v for k, v in self.state_dict().items() if not k.startswith("pixel_head.")}


@register_model("pretrain", method="toy")
def toy_mim_tiny(**kwargs):
    return ToyMIM(**kwargs)


class ToyPipeline(Pipeline):
    def __init__(self, mask_generator, input_size, mean, std):
        self.mask_generator = mask_generator
        self.crop_flip = CropFlip(input_size, scale=(0.5, 1.0))
        self.conversions = {"images": ToFloat.normalise(mean, std)}

    def sample(self, source):
        return {"images": self.crop_flip(source, self.resampler),
                "bool_masked_pos": bool_mask(self.mask_generator)}


@register_method
class ToyMethod(Method):
    name = "toy"
    pretrain_defaults = dict(batch_size=8, epochs=1, save_ckpt_freq=1, min_lr=0.0, warmup_epochs=0,
                             drop_path=0.0, opt_betas=[0.9, 0.95], crop_min_size=0.5,
                             imagenet_default_mean_and_std=True, layer_scale_init_value=0.0,
                             num_mask_patches=16)
    model_flags = {"input_size": "img_size"}
    pretrain_only_prefixes = ("pixel_head.",)

    def pretrain_transform(self, args, mask_generator=None):
        mean, std = mean_std(bool(_get(args, "imagenet_default_mean_and_std", True)))
        return ToyPipeline(mask_generator or self.mask_generator(args),
                            int(_get(args, "input_size", 224)), mean, std)
'''

TOY_CONFIG = """
model: toy_mim_tiny
model_args: {patch_size: 4, embed_dim: 32, num_heads: 2}
input_size: 32
batch_size: 4
epochs: 1
max_train_step: 1
num_workers: 0
print_freq: 1
blr: 1.5e-4
weight_decay: 0.05
save_ckpt_freq: 1
seed: 0
"""


def package_models(task):
    """The names the package's model files register (other tests register toy models too)."""
    from paddle_cae.models import registry

    return [n for n in list_models(task)
            if registry._REGISTRY[n].__module__.startswith("paddle_cae.models.")]


def test_every_registered_pretraining_and_classifier_name_has_a_method():
    assert {"mae", "cae", "bootmae"} <= set(method_names())
    for name in package_models("pretrain"):
        method = method_for(name)
        assert method.name in method_names()
        # its classifier exists and belongs to the same method
        target = classifier_name(name)
        assert target != name and target in list_models("classify")
        assert method_for(target) is method, name
    for name in package_models("classify"):
        assert method_for(name).name in method_names(), name
    # aliases: the classifier each is fine-tuned as, and the method of both is the same
    for alias in ("base_patch16_224", "mae_vit_base_patch16", "cae_base_patch16_224_8k_vocab"):
        target = classifier_name(alias)
        assert target != alias and target in list_models("classify")
        assert method_for(alias) is method_for(target)


def test_an_unknown_pretraining_model_is_an_error_naming_it():
    with pytest.raises(ValueError, match="no_such_model"):
        method_for("no_such_model")
    with pytest.raises(ValueError, match="unknown method 'nope'"):
        get_method("nope")


def test_the_methods_hold_the_recipe_differences():
    mae, cae, boot = get_method("mae"), get_method("cae"), get_method("bootmae")
    # BootMAE scales an absolute --lr by the batch, MAE and CAE take it as is; blr always scales
    assert boot.absolute_lr(1e-3, None, 512) == pytest.approx(2e-3)
    assert mae.absolute_lr(1e-3, None, 512) == cae.absolute_lr(1e-3, None, 512) == 1e-3
    assert mae.absolute_lr(None, 1e-3, 512) == pytest.approx(2e-3)
    # the block-mask size of each recipe comes from the method, not from a shared default
    args = {"input_size": 224, "model": "x"}
    assert int(np.asarray(boot.mask_generator(args)()).sum()) == 120
    assert int(np.asarray(cae.mask_generator(args)()).sum()) <= 98
    assert mae.mask_generator(args) is None
    # every method's pretraining-only parts are ignored when fine-tuning
    assert {"decoder", "regressor", "de_pos_embed"} <= set(pretrain_only_prefixes())
    assert cae.needs_tokenizer and not mae.needs_tokenizer and not boot.needs_tokenizer


@pytest.fixture
def restored_registries():
    """The toy's registrations are undone after the test (other tests list every model)."""
    from paddle_cae.methods import base as methods_base
    from paddle_cae.models import registry

    method_names()  # load the built-in methods and models first
    tables = [registry._REGISTRY, registry._TASKS, registry._METHODS, registry._CLASSIFIERS,
              methods_base._METHODS,
              methods_base._BY_MODEL]
    saved = [dict(t) for t in tables]
    yield
    for table, copy in zip(tables, saved):
        table.clear()
        table.update(copy)
    sys.modules.pop("toy_method", None)


def _load_toy(tmp_path):
    path = tmp_path / "toy_method.py"
    path.write_text(textwrap.dedent(TOY_METHOD_FILE))
    spec = importlib.util.spec_from_file_location("toy_method", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["toy_method"] = module
    spec.loader.exec_module(module)
    return module


def test_a_fourth_method_in_one_file_pretrains_through_main_pretrain(tmp_path, capsys,
                                                                     restored_registries):
    _load_toy(tmp_path)
    method = method_for("toy_mim_tiny")
    assert method.name == "toy" and get_method("toy") is method
    # its pipeline: the method's block mask (16 patches by its default) beside the image
    sample = method.pretrain_transform({"input_size": 32, "patch_size": 4})(Image.new("RGB", (40, 40)))
    assert sample["images"].shape == (3, 32, 32) and sample["bool_masked_pos"].sum() == 16

    config = tmp_path / "toy.yaml"
    config.write_text(TOY_CONFIG)
    out = tmp_path / "out"
    spec = importlib.util.spec_from_file_location("main_pretrain", ROOT / "main_pretrain.py")
    main_pretrain = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(main_pretrain)
    rc = main_pretrain.main(["--config", str(config), "--output_dir", str(out)])
    assert rc == 0, capsys.readouterr().err
    checkpoints = list(out.glob("*checkpoint-0.pd"))
    assert checkpoints
    from paddle_cae.runtime.checkpoint import load_checkpoint

    state = load_checkpoint(str(checkpoints[0]))
    assert state["model_name"] == "toy_mim_tiny"
    assert {"mask_token", "pixel_head.weight", "block.attn.qkv.weight"} <= set(state["model"])


def test_the_argument_tables_do_not_import_the_data_layer():
    import subprocess

    code = ("import sys; import paddle_cae.cli.pretrain_args, paddle_cae.cli.finetune_args; "
            "print(sorted(m for m in sys.modules if m.startswith(('paddle_cae.data', "
            "'paddle_cae.methods'))))")
    out = subprocess.run([sys.executable, "-c", code], cwd=str(ROOT), capture_output=True, text=True,
                         check=True).stdout.strip().splitlines()[-1]
    assert out == "[]"


@pytest.mark.slow
def test_the_mask_grid_follows_the_built_models_patch_size_not_its_name():
    """The engine lays the data pipeline's masks out on the built model's patches
    (``input_patch_size``); the model name is never parsed for it."""
    import paddle
    from PIL import Image

    from paddle_cae.models import create_model

    with paddle.LazyGuard():
        huge = create_model("mae_vit_huge_patch14")
    assert huge.input_patch_size() == 14
    args = {"input_size": 224, "model": "mae_vit_huge_patch14", "patch_size": huge.input_patch_size()}
    sample = get_method("mae").pretrain_transform(args)(Image.new("RGB", (230, 230)))
    assert sample["noise"].shape == (16 * 16,)
    # without the model's answer the name's "patch14" is not read: the default 16 applies
    sample = get_method("mae").pretrain_transform(dict(args, patch_size=None))(Image.new("RGB", (230, 230)))
    assert sample["noise"].shape == (14 * 14,)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["mae_vit_base_patch16", "cae_base_patch16_224_8k_vocab", "bootmae_base"])
def test_every_pretraining_model_answers_its_patch_size(name):
    import paddle

    from paddle_cae.models import create_model

    with paddle.LazyGuard():
        model = create_model(name, patch_size=8)
    assert model.input_patch_size() == 8
