"""ViT classifiers for fine-tuning and linear probing, one class for the three methods.

What differs between MAE, CAE and BootMAE classifiers is a handful of switches; each method's
variant is one small constructor (:func:`mae_classifier`, :func:`cae_classifier`,
:func:`bootmae_classifier`) that sets them, and the registered names (the official model
names) call it with a size:

| switch            | MAE (models_vit)      | CAE (modeling_finetune) | BootMAE              |
|-------------------|-----------------------|-------------------------|----------------------|
| attn_style        | timm (full qkv bias)  | beit (q/v bias)         | beit                 |
| pos_embed_type    | learned               | sincos (frozen, moco)   | sincos (frozen, moco)|
| use_rel_pos_bias  | no                    | yes (per block)         | no                   |
| init_values       | none                  | 0.1 (layer scale)       | none                 |
| pooling           | mean + fc_norm / cls  | mean + fc_norm / cls    | mean + fc_norm / cls |
| fix_init_weight   | no                    | yes                     | yes                  |
| cls_token_std     | trunc-normal 0.02     | trunc-normal 0.02       | normal 1e-6          |
| head_init_std     | 2e-5                  | 0.02 (x init_scale)     | 0.02 (x init_scale)  |

``family`` names the method whose rules load and evaluate the classifier
(:func:`paddle_cae.methods.method_of_classifier`); nothing here depends on it.
"""
import math

import paddle
import paddle.nn as nn

from .base import Classifier
from .common import LN_EPS, fixed_sincos_table, norm_eps_from
from .layers import (PatchEmbed, TorchBatchNorm1D, block_stack, init_linears_and_norms,
                     lazy_init_active, normal_, trunc_normal_, zeros_)
from .registry import register_model


def torch_default_conv_init_(conv):
    """PyTorch's default Conv2d init: kaiming-uniform with a = sqrt(5), i.e. weight and bias
    U(+-1/sqrt(fan_in)), fan_in = in_channels * kh * kw (Paddle weight [out, in, kh, kw])."""
    w = conv.weight
    bound = 1.0 / math.sqrt(w.shape[1] * w.shape[2] * w.shape[3])
    w.set_value(paddle.uniform(w.shape, dtype="float32", min=-bound, max=bound).astype(w.dtype))
    if conv.bias is not None:
        conv.bias.set_value(paddle.uniform(conv.bias.shape, dtype="float32", min=-bound,
                                           max=bound).astype(conv.bias.dtype))


class VisionTransformer(Classifier):
    def __init__(self, img_size=224, patch_size=16, in_chans=3, num_classes=1000, embed_dim=768,
                 depth=12, num_heads=12, mlp_ratio=4.0, qkv_bias=True, qk_scale=None,
                 drop_rate=0.0, attn_drop_rate=0.0, drop_path_rate=0.0, norm_eps=LN_EPS,
                 attn_style="timm", pos_embed_type="learned", sincos_layout="moco",
                 use_rel_pos_bias=False, init_values=None, global_pool=True,
                 fix_init_weight=False, cls_token_std=None, head_init_std=2e-5, init_scale=1.0,
                 lin_probe=False, family="mae"):
        super().__init__()
        self.family = family
        self.num_classes = num_classes
        self.embed_dim = self.num_features = embed_dim
        self.global_pool = global_pool
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim)
        grid = self.patch_embed.grid_size
        num_patches = self.patch_embed.num_patches

        self.cls_token = self.create_parameter(
            [1, 1, embed_dim], default_initializer=nn.initializer.Constant(0.0))
        self.pos_embed_type = pos_embed_type
        if pos_embed_type == "learned":
            self.pos_embed = self.create_parameter(
                [1, num_patches + 1, embed_dim], default_initializer=nn.initializer.Constant(0.0))
        elif pos_embed_type == "sincos":
            self.pos_embed = fixed_sincos_table(self, embed_dim, grid, layout=sincos_layout)
        elif pos_embed_type == "none":
            self.pos_embed = None
        else:
            raise ValueError(f"pos_embed_type must be learned, sincos or none, got {pos_embed_type!r}")
        self.pos_drop = nn.Dropout(drop_rate) if drop_rate > 0 else nn.Identity()

        self.blocks = block_stack(depth, embed_dim, num_heads, mlp_ratio, qkv_bias, qk_scale,
                                  drop_rate, attn_drop_rate, drop_path_rate,
                                  init_values=init_values,
                                  window_size=grid if use_rel_pos_bias else None,
                                  attn_style=attn_style, norm_eps=norm_eps)
        # mean pooling: the final norm becomes fc_norm on the pooled patch tokens
        if global_pool:
            self.norm = None
            self.fc_norm = nn.LayerNorm(embed_dim, epsilon=norm_eps)
        else:
            self.norm = nn.LayerNorm(embed_dim, epsilon=norm_eps)
            self.fc_norm = None
        self.lin_probe = bool(lin_probe)
        if lin_probe:
            self.head = LinearProbeHead(embed_dim, num_classes)
        else:
            self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        self._init_weights(fix_init_weight, cls_token_std, head_init_std, init_scale, lin_probe)

    # ------------------------------------------------------------------ init
    def _init_weights(self, fix_init_weight, cls_token_std, head_init_std, init_scale, lin_probe):
        """The initialisation of the official classifier class (what a run without ``--finetune``
        trains from; with ``--finetune`` only the parts the checkpoint does not fill matter).

        * every Linear weight: timm ``trunc_normal_(std=0.02)``, whose bounds are +-2 ABSOLUTE,
          i.e. an untruncated N(0, 0.02) in effect (the three official classes import timm's
          function directly; only the pretraining models use BEiT's +-1 std wrapper); bias 0;
          LayerNorm 1 / 0;
        * the patch-embedding conv keeps PyTorch's default Conv2d init (none of the official
          ``_init_weights`` touches a conv): weight and bias U(+-1/sqrt(C p^2));
        * ``fix_init_weight`` (CAE, BootMAE): ``attn.proj`` and ``mlp.fc2`` weights of block
          ``l`` (1-based) divided by sqrt(2 l);
        * cls token: timm trunc-normal 0.02 (untruncated in effect; MAE, CAE), or N(0,
          ``cls_token_std``) when given (BootMAE: 1e-6);
          MAE's learned position table trunc-normal 0.02;
        * head: N(0, ``head_init_std``), bias 0, both multiplied by ``init_scale`` (CAE, BootMAE).

        A conv drawn like the Linear layers (std ~0.011 instead of 1/sqrt(3 C p^2)) would make
        small patches' content a few percent of the fixed sin-cos table: under layer decay a
        BootMAE/CAE classifier trained from its own init would not learn."""
        if lazy_init_active():  # under paddle.LazyGuard nothing is materialised yet
            return

        def linear_weight(_, weight):
            trunc_normal_(weight, std=0.02, a=-2.0, b=2.0)

        init_linears_and_norms(self, linear_weight)
        torch_default_conv_init_(self.patch_embed.proj)
        if fix_init_weight:
            for layer_id, blk in enumerate(self.blocks, start=1):
                for weight in (blk.attn.proj.weight, blk.mlp.fc2.weight):
                    weight.set_value(weight / math.sqrt(2.0 * layer_id))
        if cls_token_std is not None:
            normal_(self.cls_token, std=cls_token_std)
        else:
            trunc_normal_(self.cls_token, std=0.02, a=-2.0, b=2.0)
        if self.pos_embed_type == "learned":
            trunc_normal_(self.pos_embed, std=0.02, a=-2.0, b=2.0)
        if lin_probe:  # MAE/CAE/BootMAE linear probes: timm trunc_normal_(std=0.01), +-2 absolute
            trunc_normal_(self.head.linear.weight, std=0.01, a=-2.0, b=2.0)
            zeros_(self.head.linear.bias)
        elif isinstance(self.head, nn.Linear):
            trunc_normal_(self.head.weight, std=head_init_std, a=-2.0, b=2.0)
            zeros_(self.head.bias)
            if init_scale != 1.0:
                self.head.weight.set_value(self.head.weight * init_scale)
                self.head.bias.set_value(self.head.bias * init_scale)

    # -------------------------------------------------------------- metadata
    def trainable_prefixes(self):
        """A linear probe trains its BatchNorm + Linear head only."""
        return ("head.",) if self.lin_probe else None

    def no_weight_decay(self):
        return {"pos_embed", "cls_token"}

    def num_layers_for_decay(self):
        return len(self.blocks) + 1

    def layer_id(self, name):
        """Layer index for layer-wise lr decay: embeddings 0, block i -> i + 1, rest L + 1."""
        if name in ("cls_token", "pos_embed", "mask_token") or name.startswith("patch_embed"):
            return 0
        if name.startswith("blocks."):
            return int(name.split(".")[1]) + 1
        return len(self.blocks) + 1

    # --------------------------------------------------------------- forward
    def forward_tokens(self, x, depth=None):
        """All tokens [B, 1 + N, D] after ``depth`` blocks (all by default), before any norm."""
        x = self.patch_embed(x)  # [B, N, D]
        cls = self.cls_token.expand([x.shape[0], -1, -1])
        x = paddle.concat([cls, x], axis=1)  # [B, 1 + N, D]
        if self.pos_embed is not None:
            pos = self.pos_embed
            if self.pos_embed_type == "sincos":
                pos = pos.detach()
            x = x + pos
        x = self.pos_drop(x)
        for blk in self.blocks[: depth if depth is not None else len(self.blocks)]:
            x = blk(x)
        return x

    def pool(self, tokens):
        if self.global_pool:
            return self.fc_norm(tokens[:, 1:].mean(axis=1))  # mean of patch tokens, cls excluded
        return self.norm(tokens)[:, 0]

    def forward_features(self, x):
        return self.pool(self.forward_tokens(x))

    def forward(self, x):
        return self.head(self.forward_features(x))


class LinearProbeHead(nn.Layer):
    """MAE's probe head: BatchNorm without affine (eps 1e-6, PyTorch statistics) + Linear.
    Sub-layers are named ``0`` / ``1`` like the official nn.Sequential (``head.0``, ``head.1``)."""

    def __init__(self, in_features, num_classes, eps=1e-6, momentum=0.1):
        super().__init__()
        self.add_sublayer("0", TorchBatchNorm1D(in_features, eps=eps, momentum=momentum))
        self.add_sublayer("1", nn.Linear(in_features, num_classes))

    @property
    def bn(self):
        return self._sub_layers["0"]

    @property
    def linear(self):
        return self._sub_layers["1"]

    def forward(self, x):
        return self.linear(self.bn(x))


# ------------------------------------------------------- official arguments
_OFFICIAL_COMMON = ("img_size", "patch_size", "in_chans", "num_classes", "embed_dim", "depth",
                    "num_heads", "mlp_ratio", "qkv_bias", "qk_scale", "drop_rate",
                    "attn_drop_rate", "drop_path_rate")


# ------------------------------------------------------------------ the variants
def mae_classifier(**cfg):
    """MAE's ``models_vit.VisionTransformer``: timm attention, learned positions."""
    cfg = dict(dict(attn_style="timm", pos_embed_type="learned", head_init_std=2e-5), **cfg)
    return VisionTransformer(family="mae", **cfg)


def cae_classifier(**cfg):
    """CAE's ``modeling_finetune.VisionTransformer``: BEiT attention, fixed sin-cos positions,
    relative position bias, layer scale 0.1, fix_init_weight, a scaled head."""
    cfg = dict(dict(attn_style="beit", pos_embed_type="sincos", sincos_layout="moco",
                    use_rel_pos_bias=True, init_values=0.1, global_pool=True, fix_init_weight=True,
                    head_init_std=0.02, init_scale=0.001), **cfg)
    return VisionTransformer(family="cae", **cfg)


def bootmae_classifier(**cfg):
    """BootMAE's ``modeling_finetune_bootmae.VisionTransformer``: as CAE's without relative
    position bias or layer scale, its cls token drawn from N(0, 1e-6)."""
    cfg = dict(dict(attn_style="beit", pos_embed_type="sincos", sincos_layout="moco",
                    use_rel_pos_bias=False, init_values=None, global_pool=True, fix_init_weight=True,
                    cls_token_std=1e-6, head_init_std=0.02, init_scale=0.001), **cfg)
    return VisionTransformer(family="bootmae", **cfg)


# ------------------------------------------------------- official arguments
_OFFICIAL_COMMON = ("img_size", "patch_size", "in_chans", "num_classes", "embed_dim", "depth",
                    "num_heads", "mlp_ratio", "qkv_bias", "qk_scale", "drop_rate",
                    "attn_drop_rate", "drop_path_rate")


def _mae_official(cfg, official):
    return mae_classifier(global_pool=official.get("global_pool", False), **cfg)


def _beit_official(cfg, official):
    """What CAE's and BootMAE's official classes share (BEiT's code)."""
    if official.get("use_shared_rel_pos_bias"):
        raise NotImplementedError("a shared relative position bias is not supported")
    if official.get("lin_probe") or official.get("linear_type", "standard") != "standard":
        raise NotImplementedError("build probe models with the linear-probe constructors")
    return dict(cfg, global_pool=official.get("use_mean_pooling", True),
                init_scale=official.get("init_scale", 0.001))


def _cae_official(cfg, official):
    sin_pos = official.get("args", {}).get("sin_pos_emb", True)
    return cae_classifier(pos_embed_type="sincos" if sin_pos else "none",
                          use_rel_pos_bias=official.get("use_rel_pos_bias", False),
                          init_values=official.get("init_values"), **_beit_official(cfg, official))


def _bootmae_official(cfg, official):
    # the official class always adds the fixed sin-cos table and builds its blocks
    # without layer scale or relative position bias, whatever the flags say
    return bootmae_classifier(**_beit_official(cfg, official))


OFFICIAL_CLASSES = {"mae": _mae_official, "cae": _cae_official, "bootmae": _bootmae_official}


def classifier_from_official_args(family, **official):
    """Build a classifier from the constructor arguments of the official class of ``family``
    (models_vit / CAE modeling_finetune / BootMAE modeling_finetune_bootmae). Arguments the
    official class accepts but ignores are accepted and ignored here too."""
    if family not in OFFICIAL_CLASSES:
        raise ValueError(f"unknown classifier family {family!r} (expected {', '.join(OFFICIAL_CLASSES)})")
    cfg = {k: official[k] for k in _OFFICIAL_COMMON if k in official}
    cfg["norm_eps"] = norm_eps_from(official.get("norm_layer"))
    return OFFICIAL_CLASSES[family](cfg, official)


# ------------------------------------------------------------------ constructors
_SIZES = {
    "tiny": dict(embed_dim=192, depth=12, num_heads=12),
    "small": dict(embed_dim=384, depth=12, num_heads=12),
    "base": dict(embed_dim=768, depth=12, num_heads=12),
    "large": dict(embed_dim=1024, depth=24, num_heads=16),
    "huge": dict(embed_dim=1280, depth=32, num_heads=16),
}


def _sized(variant, size, **kwargs):
    return variant(**dict(dict(patch_size=16, mlp_ratio=4.0, qkv_bias=True, **_SIZES[size]), **kwargs))


def mae_vit(size, **kwargs):
    return _sized(mae_classifier, size, **kwargs)


def cae_vit(size, **kwargs):
    return _sized(cae_classifier, size, **kwargs)


def bootmae_vit(size, **kwargs):
    return _sized(bootmae_classifier, size, **kwargs)


@register_model("classify", method="mae")
def vit_base_patch16(**kwargs):
    return mae_vit("base", **kwargs)


@register_model("classify", method="mae")
def vit_large_patch16(**kwargs):
    return mae_vit("large", **kwargs)


@register_model("classify", method="mae")
def vit_huge_patch14(**kwargs):
    return mae_vit("huge", patch_size=14, **kwargs)


@register_model("classify", method="cae")
def cae_tiny_patch16_224(**kwargs):
    return cae_vit("tiny", **kwargs)


@register_model("classify", method="cae")
def cae_small_patch16_224(**kwargs):
    return cae_vit("small", **kwargs)


@register_model("classify", method="cae")
def cae_base_patch16_224(**kwargs):
    return cae_vit("base", **kwargs)


@register_model("classify", method="cae")
def cae_base_patch16_384(**kwargs):
    return cae_vit("base", img_size=384, **kwargs)


@register_model("classify", method="cae")
def cae_large_patch16_224(**kwargs):
    return cae_vit("large", **kwargs)


@register_model("classify", method="bootmae")
def bootmae_base_patch16_224(**kwargs):
    return bootmae_vit("base", **kwargs)


@register_model("classify", method="bootmae")
def bootmae_large_patch16_224(**kwargs):
    return bootmae_vit("large", **kwargs)
