"""BootMAE pretraining model (Dong et al., LightDXY/BootMAE ``models/modeling_pretrain_bootmae.py``,
``VisionTransformerForMaskedImageModeling``) with the loss of its training loop.

The encoder sees the visible patches (cls + N - mask_len tokens). Two target-aware decoders
cross-attend to encoder features of the visible tokens:
* the pixel decoder (``decode_dim`` wide) reads the FIRST block's output and predicts the image,
  per patch and channel normalised, through a ConvTranspose head (``lm_head``);
* the feature decoder (``embed_dim`` wide) reads the LAST block's output and predicts the
  features that a momentum (EMA) copy of the encoder computes on the whole image.

The momentum encoder is held beside the model, not as a sub-layer: the optimizer never sees
it, it receives no gradient, and it is updated with :meth:`update_teacher` after every
optimizer step. Its state travels in checkpoints through :meth:`teacher_state_dict` /
:meth:`set_teacher_state_dict`.

Parameter names equal the official state_dict keys (``decode_blocks.0.c_attn.kv.weight``,
``lm_head.proj.weight``, ``mask_token_1`` ...).
"""
import math

import numpy as np
import paddle
import paddle.nn as nn
import paddle.nn.functional as F

from .base import PretrainingModel
from .common import (denormalize_patches, ema_update_, fixed_sincos_table,
                     gather_tokens, norm_eps_from, normalize_patches, to_uint8_hwc)
from .layers import (Attention, CrossAttentionBase, DropPath, Mlp, PatchEmbed, block_stack,
                     init_linears_and_norms, lazy_init_active, normal_, trunc_normal_,
                     xavier_uniform_, zeros_)
from .mae import images_from_batch, zero_filled_parameters
from .registry import register_model

__all__ = ["VisionTransformerForMaskedImageModeling", "MomentumEncoder", "CrossAttention",
           "DecodeBlock", "ema_update_", "masks_from_shuffle", "bootmae_base", "bootmae_large"]

PIXEL_NORM_EPS = 1e-5  # inside the sqrt of the per-patch, per-channel pixel target
FEATURE_LN_EPS = 1e-6  # affine-free LayerNorm applied to both sides of the feature loss


# ----------------------------------------------------------------------------- masks
def masks_from_shuffle(idx_shuffle, mask_len, grid_size, patch_size, weight_mask=True):
    """Loss and weight masks from a shuffle order whose last ``mask_len`` entries are dropped.

    idx_shuffle [B, N] int64. Returns a dict of float32 tensors:
    ``loss_mask`` [B, N] (1 = dropped, raster order), ``weight_mask`` [B, N]
    (with ``weight_mask``: m + m * AvgPool3x3(m), zero padding counted, so w in {0} U [1, 2];
    else m) and their pixel versions ``loss_mask_pixel`` / ``weight_mask_pixel`` [B, 1, H, W]
    (each patch constant, i.e. nearest upsampling)."""
    b, n = idx_shuffle.shape
    h, w = grid_size
    idx_unshuffle = paddle.argsort(idx_shuffle, axis=1)  # inverse permutation (distinct keys)
    keep = n - mask_len
    order_mask = paddle.concat([paddle.zeros([b, keep]), paddle.ones([b, mask_len])], axis=1)
    loss_mask = paddle.take_along_axis(order_mask, idx_unshuffle, axis=1)  # [B, N], raster
    grid_mask = loss_mask.reshape([b, 1, h, w])
    if weight_mask:
        pooled = F.avg_pool2d(grid_mask, kernel_size=3, stride=1, padding=1, exclusive=False)
        grid_weight = grid_mask * pooled + grid_mask  # [B, 1, h, w]
    else:
        grid_weight = grid_mask

    def to_pixels(m):  # [B, 1, h, w] -> [B, 1, h*p, w*p]
        m = m.reshape([b, 1, h, 1, w, 1]).expand([b, 1, h, patch_size, w, patch_size])
        return m.reshape([b, 1, h * patch_size, w * patch_size])

    return {
        "loss_mask": loss_mask,
        "weight_mask": grid_weight.reshape([b, n]),
        "loss_mask_pixel": to_pixels(grid_mask),
        "weight_mask_pixel": to_pixels(grid_weight),
    }


def _as_index(value, name):
    if isinstance(value, paddle.Tensor):
        return value.astype("int64")
    array = np.asarray(value)
    if array.dtype.kind not in "iu":
        raise TypeError(f"{name} must hold integers, got dtype {array.dtype}")
    return paddle.to_tensor(array.astype(np.int64))


# ----------------------------------------------------------------------------- layers
class CrossAttention(CrossAttentionBase):
    """Cross-attention of BootMAE's decoders: queries from the decoder tokens (``q``), keys
    and values from encoder features of width ``c_dim`` (one ``kv`` Linear)."""

    def __init__(self, dim, c_dim, num_heads=8, qkv_bias=False, qk_scale=None, attn_drop=0.0,
                 proj_drop=0.0, attn_head_dim=None):
        super().__init__(dim, num_heads, qkv_bias, qk_scale, attn_drop, proj_drop,
                         attn_head_dim, c_dim=c_dim)

    def _projections(self, dim, inner, c_dim):
        self.q = nn.Linear(dim, inner, bias_attr=False)
        self.kv = nn.Linear(c_dim, inner * 2, bias_attr=False)

    def forward(self, x, fea):
        if self.q_bias is None:
            q = F.linear(x, self.q.weight)
            kv = F.linear(fea, self.kv.weight)
        else:
            zero_k = paddle.zeros_like(self.v_bias)
            zero_k.stop_gradient = True
            q = F.linear(x, self.q.weight, self.q_bias)
            kv = F.linear(fea, self.kv.weight, paddle.concat([zero_k, self.v_bias]))
        k, v = kv.split(2, axis=-1)  # [B, M, h*d] each
        return self.attend(q, k, v)


class DecodeBlock(nn.Layer):
    """Target-aware decoder block: self-attention, cross-attention to the encoder's
    features of the visible tokens, MLP; each pre-norm with a residual."""

    def __init__(self, dim, c_dim, num_heads, mlp_ratio=4.0, qkv_bias=False, qk_scale=None,
                 drop=0.0, attn_drop=0.0, drop_path=0.0, norm_eps=1e-6, attn_head_dim=None):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, epsilon=norm_eps)
        self.attn = Attention(dim, num_heads, qkv_bias, qk_scale, attn_drop, drop,
                              attn_head_dim=attn_head_dim, style="beit")
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, epsilon=norm_eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop=drop)
        self.norm3 = nn.LayerNorm(dim, epsilon=norm_eps)
        self.norm4 = nn.LayerNorm(c_dim, epsilon=norm_eps)
        cross_attention = CrossAttention
        self.c_attn = cross_attention(dim, c_dim, num_heads, qkv_bias, qk_scale, attn_drop, drop,
                                      attn_head_dim=attn_head_dim)

    def forward(self, x, fea):
        x = x + self.drop_path(self.attn(self.norm1(x)))
        x = x + self.drop_path(self.c_attn(self.norm3(x), self.norm4(fea)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class PatchDeEmbed(nn.Layer):
    """Patch tokens [B, N, C] -> image [B, in_chans, H, W] with a ConvTranspose2D whose
    kernel = stride = patch (weight [C, in_chans, p, p], PyTorch's layout too)."""

    def __init__(self, grid_size, patch_size, in_chans, embed_dim):
        super().__init__()
        self.grid_size = tuple(grid_size)
        self.proj = nn.Conv2DTranspose(embed_dim, in_chans, kernel_size=patch_size,
                                       stride=patch_size)

    def forward(self, x):
        b, n, c = x.shape
        x = x.transpose([0, 2, 1]).reshape([b, c, self.grid_size[0], self.grid_size[1]])
        return self.proj(x)  # [B, in_chans, H, W]


# ----------------------------------------------------------------------------- encoders
def _add_encoder(layer, img_size, patch_size, in_chans, embed_dim, depth, num_heads, mlp_ratio,
                 qkv_bias, qk_scale, drop_rate, attn_drop_rate, drop_path_rate, norm_eps,
                 attn_head_dim):
    """Give ``layer`` the encoder pieces under the official names: patch_embed, cls_token,
    pos_embed (frozen sin-cos, MoCo layout) and blocks."""
    layer.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim)
    grid = layer.patch_embed.grid_size
    layer.pos_embed = fixed_sincos_table(layer, embed_dim, grid, layout="moco")
    layer.cls_token = layer.create_parameter(
        [1, 1, embed_dim], default_initializer=nn.initializer.Constant(0.0))
    layer.blocks = block_stack(depth, embed_dim, num_heads, mlp_ratio, qkv_bias, qk_scale,
                               drop_rate, attn_drop_rate, drop_path_rate, init_values=None,
                               attn_head_dim=attn_head_dim, attn_style="beit", norm_eps=norm_eps)


def _embed_tokens(layer, images):
    """images [B, C, H, W] -> [B, 1 + N, D]: patches, cls first, plus the position table."""
    x = layer.patch_embed(images)  # [B, N, D]
    cls = layer.cls_token.expand([x.shape[0], -1, -1])
    x = paddle.concat([cls, x], axis=1)  # [B, 1 + N, D]
    return x + layer.pos_embed


_ENCODER_PREFIXES = ("patch_embed.", "blocks.")
_ENCODER_KEYS = ("cls_token", "pos_embed")


class MomentumEncoder(nn.Layer):
    """The teacher: the encoder part that produces the feature target (no final norm).
    Holds exactly the state the official ``get_feature`` reads."""

    def __init__(self, img_size=224, patch_size=16, in_chans=3, embed_dim=768, depth=12,
                 num_heads=12, mlp_ratio=4.0, qkv_bias=True, qk_scale=None, drop_rate=0.0,
                 attn_drop_rate=0.0, drop_path_rate=0.0, norm_eps=1e-6, attn_head_dim=None):
        super().__init__()
        _add_encoder(self, img_size, patch_size, in_chans, embed_dim, depth, num_heads,
                     mlp_ratio, qkv_bias, qk_scale, drop_rate, attn_drop_rate, drop_path_rate,
                     norm_eps, attn_head_dim)

    def official_key_map(self, key):
        """Official ``model`` / ``model_ema`` / fixture ``teacher`` key -> ours; the keys a
        teacher never reads (final norm, decoders) are dropped."""
        if key.startswith(_ENCODER_PREFIXES) or key in _ENCODER_KEYS:
            return key
        return None

    @paddle.no_grad()
    def get_feature(self, images):
        """Last block's output for every patch of the whole image, no final norm: [B, N, D]."""
        x = _embed_tokens(self, images)
        for blk in self.blocks:
            x = blk(x)
        return x[:, 1:, :]

    def forward(self, images):
        return self.get_feature(images)


# ----------------------------------------------------------------------------- the model
class VisionTransformerForMaskedImageModeling(PretrainingModel):
    """BootMAE pretraining model. Constructor arguments mirror the official class; the
    remaining ones configure the loss and the teacher as the official training loop does
    (``--feature_weight``, ``--weight_mask``, ``--mask_num``, ``--epochs``,
    ``--model_ema_decay``, ``--model_ema_dynamic``)."""

    image_mean = image_std = (0.5, 0.5, 0.5)  # the method's input normalisation
    input_keys = ("images", "idx_shuffle")

    def __init__(self, img_size=224, patch_size=16, in_chans=3, embed_dim=768, depth=12,
                 fea_list=(0, 6), num_classes=1000, num_heads=12, mlp_ratio=4.0, qkv_bias=True,
                 qk_scale=None, drop_rate=0.0, attn_drop_rate=0.0, no_grad=False,
                 drop_path_rate=0.0, norm_layer=None, init_values=None, attn_head_dim=None,
                 decoder_depth=2, decode_dim=512, use_abs_pos_emb=True, use_rel_pos_bias=False,
                 use_shared_rel_pos_bias=False, init_std=0.02,
                 feature_weight=1.0, weight_mask=True, mask_num=None, epochs=800,
                 model_ema_decay=0.999, model_ema_dynamic=False, with_teacher=True):
        super().__init__()
        # num_classes, no_grad, init_values, use_*_pos_* are accepted for compatibility with
        # the official signature; the official model ignores them as well (no layer scale,
        # absolute sin-cos positions only).
        eps = norm_eps_from(norm_layer)
        self.embed_dim = self.num_features = embed_dim
        self.decode_dim = decode_dim
        self.fea_list = [int(i) for i in fea_list]
        self.init_std = init_std
        encoder_cfg = dict(img_size=img_size, patch_size=patch_size, in_chans=in_chans,
                           embed_dim=embed_dim, depth=depth, num_heads=num_heads,
                           mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, qk_scale=qk_scale,
                           drop_rate=drop_rate, attn_drop_rate=attn_drop_rate,
                           drop_path_rate=drop_path_rate, norm_eps=eps,
                           attn_head_dim=attn_head_dim)

        with zero_filled_parameters():  # initialize_weights sets every value
            # ---------------------------------------------------------------- encoder
            _add_encoder(self, **encoder_cfg)
            self.norm = nn.LayerNorm(embed_dim, epsilon=eps)
            grid = self.patch_embed.grid_size
            self.grid_size = grid
            self.num_patches = self.patch_embed.num_patches
            self.patch = self.patch_embed.patch_size[0]
            self.de_pos_embed = fixed_sincos_table(self, decode_dim, grid, layout="moco")

            # ---------------------------------------------------------- pixel decoder

            def decoder(width):
                return nn.LayerList([
                    DecodeBlock(width, embed_dim, num_heads, mlp_ratio, qkv_bias, qk_scale,
                                 drop_rate, attn_drop_rate, 0.0, eps, attn_head_dim)
                    for _ in range(decoder_depth)
                ])

            self.decode_blocks = decoder(decode_dim)
            self.decode_norm = nn.LayerNorm(decode_dim, epsilon=eps)
            self.down = nn.Linear(embed_dim, decode_dim)
            self.mask_token = self.create_parameter(
                [1, 1, decode_dim], default_initializer=nn.initializer.Constant(0.0))
            self.lm_head = PatchDeEmbed(grid, self.patch, in_chans, decode_dim)

            # -------------------------------------------------------- feature decoder
            self.decode_blocks_1 = decoder(embed_dim)
            self.down_1 = nn.Linear(embed_dim, embed_dim)
            self.mask_token_1 = self.create_parameter(
                [1, 1, embed_dim], default_initializer=nn.initializer.Constant(0.0))
            self.decode_norm_1 = nn.LayerNorm(embed_dim, epsilon=eps)
            self.lm_head_1 = nn.Linear(embed_dim, embed_dim)
        self.initialize_weights()

        # ------------------------------------------------------------ loss config
        self.feature_weight = float(feature_weight)
        self.weight_mask = bool(weight_mask)
        self.mask_num = int(mask_num) if mask_num is not None else int(0.75 * self.num_patches)
        if not 0 < self.mask_num < self.num_patches:
            raise ValueError(f"mask_num must be in [1, {self.num_patches - 1}] for a "
                             f"{grid[0]}x{grid[1]} grid, got {self.mask_num}")
        # the recipe's schedules, computed by the training loop (its method) from these
        self.epochs = int(epochs)
        self.model_ema_decay = float(model_ema_decay)
        self.model_ema_dynamic = bool(model_ema_dynamic)

        # ---------------------------------------------------------------- teacher
        # Built in its own name scope so that the student's (and anything later built)
        # global parameter names, which key the optimizer state, do not depend on it;
        # kept out of _sub_layers so that parameters() and state_dict() do not include it.
        teacher = None
        if with_teacher:
            with paddle.utils.unique_name.guard(), zero_filled_parameters():
                teacher = MomentumEncoder(**encoder_cfg)  # values copied by reset_teacher
            for p in teacher.parameters():
                p.stop_gradient = True
            teacher.eval()
        object.__setattr__(self, "_teacher", teacher)
        if teacher is not None and not lazy_init_active():
            # (under paddle.LazyGuard no value exists yet to copy: call reset_teacher() after
            # materialising the parameters)
            self.reset_teacher()

    # ------------------------------------------------------------------ init
    def initialize_weights(self):
        """The official scheme: BEiT init first (overwritten below for every Linear), then
        ``*qkv*`` Linear weights uniform(+-sqrt(6 / (out/3 + in))), other Linear weights
        xavier-uniform, biases 0; LayerNorm 1/0; patch-embed uniform(+-sqrt(6 / (C*p*p + D)))
        with bias 0; cls N(0, 1e-6); mask tokens trunc-normal(0.02, +-0.02); the
        ConvTranspose head keeps PyTorch's default init (uniform(+-1/sqrt(fan_in)))."""
        std = self.init_std
        trunc_normal_(self.mask_token, std=std, a=-std, b=std)
        trunc_normal_(self.mask_token_1, std=std, a=-std, b=std)
        def linear_weight(name, weight):
            if "qkv" in name:  # as three matrices: fan-out of one of q, k, v
                fan_in, out = weight.shape  # paddle [in, out]
                xavier_uniform_(weight, fan_in=fan_in, fan_out=out // 3)
            else:
                xavier_uniform_(weight)

        init_linears_and_norms(self, linear_weight)
        normal_(self.cls_token, std=1e-6)
        w = self.patch_embed.proj.weight  # [D, C, p, p]
        fan = w.shape[1] * w.shape[2] * w.shape[3]
        xavier_uniform_(w, fan_in=fan, fan_out=w.shape[0])
        zeros_(self.patch_embed.proj.bias)
        w = self.lm_head.proj.weight  # [Dd, C, p, p]; torch's fan_in of a ConvTranspose = C*p*p
        bound = 1.0 / math.sqrt(w.shape[1] * w.shape[2] * w.shape[3])
        for p in (w, self.lm_head.proj.bias):
            p.set_value(paddle.uniform(p.shape, dtype="float32", min=-bound, max=bound))

    # -------------------------------------------------------------- metadata
    def no_weight_decay(self):
        return {"pos_embed", "cls_token"}

    def official_key_map(self, key):
        """Official key -> ours: the same names; a fine-tuned file's classifier is dropped."""
        if key.startswith(("fc_norm.", "head.")):
            return None
        return key

    # --------------------------------------------------------------- teacher
    @property
    def teacher(self):
        """The momentum encoder (a Layer outside this model's parameters), or None."""
        return self._teacher

    def _require_teacher(self):
        if self._teacher is None:
            raise RuntimeError("this BootMAE model has no momentum teacher (built with "
                               "with_teacher=False, i.e. without --model_ema); the feature "
                               "loss needs it: enable --model_ema or set --feature_weight 0")
        return self._teacher

    @paddle.no_grad()
    def reset_teacher(self):
        """Make the teacher an exact copy of the current encoder (done at construction)."""
        teacher = self._require_teacher()
        own = self.state_dict()
        for key, value in teacher.state_dict().items():
            paddle.assign(own[key].detach(), value)

    @property
    def has_teacher(self):
        return self._teacher is not None

    def update_teacher(self, decay):
        """One EMA step after an optimizer step: teacher <- decay * teacher + (1 - decay) *
        encoder, per state entry (the momentum of the epoch: the training loop computes it,
        :meth:`paddle_cae.methods.bootmae.BootMAEMethod.teacher_momentum`). Returns ``decay``."""
        ema_update_(self._require_teacher(), self, float(decay))
        return decay

    def teacher_state_dict(self):
        """The teacher's state, under the official key names (a subset of ``model_ema``)."""
        return self._require_teacher().state_dict()

    def set_teacher_state_dict(self, state):
        """Load the teacher; every teacher key must be present with its shape. Extra keys of
        an official ``model_ema`` (final norm, decoders) are ignored."""
        teacher = self._require_teacher()
        own = teacher.state_dict()
        missing = [k for k in own if k not in state]
        if missing:
            raise KeyError(f"teacher state lacks {len(missing)} keys, e.g. {missing[:5]}")
        for key, value in own.items():
            src = state[key]
            shape = tuple(src.shape)
            if shape != tuple(value.shape):
                raise ValueError(f"teacher state '{key}': shape {list(shape)}, expected "
                                 f"{list(value.shape)}")
        teacher.set_state_dict({k: state[k] for k in own})

    # --------------------------------------------------------------- forward
    def forward_encoder(self, images, mask_len, idx_shuffle):
        """Visible tokens through the encoder.

        images [B, C, H, W]; idx_shuffle [B, N] (the last ``mask_len`` are dropped).
        Returns x (after the final norm) [B, 1 + K, D], the recorded block outputs
        (feas[0] for the pixel decoder, feas[1] for the feature decoder, each [B, 1 + K, D],
        before the norm) and the shuffle with cls prepended [B, 1 + N]."""
        x = _embed_tokens(self, images)  # [B, 1 + N, D]
        b = x.shape[0]
        ids = paddle.concat([paddle.zeros([b, 1], dtype="int64"), idx_shuffle + 1], axis=1)
        keep = self.num_patches - mask_len
        x = gather_tokens(x, ids[:, :1 + keep])  # [B, 1 + K, D]
        feas = []
        for i, blk in enumerate(self.blocks):
            x = blk(x)
            if i in self.fea_list:
                feas.append(x)
        if len(feas) == 1:
            feas.append(feas[0])
        return self.norm(x), feas, ids

    def _decoder_input(self, tokens, mask_token, pos_table, ids, mask_len):
        """Visible tokens [B, 1 + K, C] + mask tokens carrying the position rows of the
        dropped patches, back in raster order with cls first: [B, 1 + N, C]."""
        b, _, c = tokens.shape
        dropped = ids[:, ids.shape[1] - mask_len:]  # [B, M] (indices into the 1 + N table)
        mask_pe = gather_tokens(pos_table.expand([b, -1, -1]), dropped)  # [B, M, C]
        masked = mask_token.expand([b, mask_len, c]) + mask_pe
        x = paddle.concat([tokens, masked], axis=1)  # [B, 1 + N, C], shuffled order
        ids_unshuffle = paddle.argsort(ids, axis=1)  # inverse permutation (distinct keys)
        return gather_tokens(x, ids_unshuffle)  # [B, 1 + N, C], raster order

    def forward_pixel_decoder(self, x, fea, ids, mask_len):
        z = self._decoder_input(self.down(x), self.mask_token, self.de_pos_embed, ids, mask_len)
        for blk in self.decode_blocks:
            z = blk(z, fea)
        z = self.decode_norm(z)
        return self.lm_head(z[:, 1:, :])  # [B, C, H, W]

    def forward_feature_decoder(self, x, fea, ids, mask_len):
        z = self._decoder_input(self.down_1(x), self.mask_token_1, self.pos_embed, ids, mask_len)
        for blk in self.decode_blocks_1:
            z = blk(z, fea)
        z = self.decode_norm_1(z)
        return self.lm_head_1(z[:, 1:, :])  # [B, N, D]

    def forward_predictions(self, images, mask_len, idx_shuffle):
        """The official model's forward: (pixel prediction [B, C, H, W], feature prediction
        [B, N, D])."""
        x, feas, ids = self.forward_encoder(images, mask_len, idx_shuffle)
        pred_pixel = self.forward_pixel_decoder(x, feas[0], ids, mask_len)
        pred_feature = self.forward_feature_decoder(x, feas[1], ids, mask_len)
        return pred_pixel, pred_feature

    def pixel_target(self, images):
        """Each patch and channel normalised by its own mean and biased variance:
        [B, C, H, W] -> [B, C, H, W]."""
        x = self._pixel_patches(images)  # [B, C, h, p, w, p]
        x = normalize_patches(x, axis=[3, 5], eps=PIXEL_NORM_EPS, unbiased=False)
        return x.reshape(images.shape)

    def _pixel_patches(self, images):
        b, c, hh, ww = images.shape
        p = self.patch
        return images.reshape([b, c, hh // p, p, ww // p, p])

    def feature_target(self, images):
        """Teacher features of the whole image [B, N, D] (no gradient)."""
        teacher = self._require_teacher()
        teacher.eval()
        with paddle.no_grad():
            target = teacher.get_feature(images)
        target.stop_gradient = True
        return target

    def forward_loss(self, pred_pixel, pred_feature, pixel_target, feature_target, masks,
                     feature_weight):
        """Rloss = mean(w_pix * (pred - target)^2) / mean(m_pix) over [B, C, H, W];
        Ploss = mean(w * (LN(target) - LN(pred))^2) / mean(m_pix) over [B, N, D]
        (LN affine-free, eps 1e-6); total = Rloss + feature_weight * Ploss."""
        masked_fraction = masks["loss_mask_pixel"].mean()
        # squares as d * d: the values and gradients of d ** 2, without Paddle's slow CPU pow
        d = pred_pixel - pixel_target
        loss_pixel = (masks["weight_mask_pixel"] * (d * d)).mean()
        loss_pixel = loss_pixel / masked_fraction
        if feature_weight > 0:
            d = pred_feature.shape[-1]
            diff = (F.layer_norm(feature_target, d, epsilon=FEATURE_LN_EPS)
                    - F.layer_norm(pred_feature, d, epsilon=FEATURE_LN_EPS))
            weight = masks["weight_mask"].unsqueeze(-1)  # [B, N, 1]
            loss_feature = (weight * (diff * diff)).mean() / masked_fraction
        else:
            loss_feature = paddle.zeros([], dtype=pred_pixel.dtype)
        return loss_pixel + loss_feature * feature_weight, loss_pixel, loss_feature

    # ------------------------------------------------------------- forward
    def forward(self, batch, idx_shuffle=None, mask_len=None, feature_weight=None):
        """One training forward with the official loss.

        batch: images [B, C, H, W], an (images, idx_shuffle) pair, or the engine's dict
        (``images``, ``idx_shuffle``). ``idx_shuffle`` [B, N] is the final patch order whose
        last ``mask_len`` (default ``mask_num``) entries are dropped: the data pipeline of
        :mod:`paddle_cae.methods.bootmae` makes it from the block mask and rolls it per batch.
        ``feature_weight``: the feature-loss weight of this step (the training loop passes the
        official ramp's value, :meth:`paddle_cae.methods.bootmae.BootMAEMethod.forward_kwargs`);
        default the constant ``feature_weight`` the model was built with.

        Returns ``{"loss", "loss_pixel", "loss_feature", "feature_weight" (float),
        "pred_pixel" [B, C, H, W], "pred_feature" [B, N, D], "target_feature" [B, N, D]
        (None when the feature weight is 0), "pixel_target" [B, C, H, W], "mask" [B, N]
        (1 = dropped), "weight_mask" [B, N], "weight_mask_pixel" [B, 1, H, W]}``."""
        images = images_from_batch(batch)
        if idx_shuffle is None:
            if isinstance(batch, dict):
                idx_shuffle = batch.get("idx_shuffle")
            elif isinstance(batch, (tuple, list)) and len(batch) > 1:
                idx_shuffle = batch[1]
        if idx_shuffle is None:
            raise ValueError("BootMAE forward needs idx_shuffle [B, N] (the patch order its data "
                             "pipeline delivers)")
        mask_len = self.mask_num if mask_len is None else int(mask_len)
        idx_shuffle = _as_index(idx_shuffle, "idx_shuffle")
        if tuple(idx_shuffle.shape) != (images.shape[0], self.num_patches):
            raise ValueError(f"idx_shuffle must be [{images.shape[0]}, {self.num_patches}], "
                             f"got {list(idx_shuffle.shape)}")
        feature_weight = float(self.feature_weight if feature_weight is None else feature_weight)

        masks = masks_from_shuffle(idx_shuffle, mask_len, self.grid_size, self.patch,
                                   self.weight_mask)
        with paddle.no_grad():
            pixel_target = self.pixel_target(images)
        pred_pixel, pred_feature = self.forward_predictions(images, mask_len, idx_shuffle)
        target_feature = self.feature_target(images) if feature_weight > 0 else None
        loss, loss_pixel, loss_feature = self.forward_loss(
            pred_pixel, pred_feature, pixel_target, target_feature, masks, feature_weight)
        return {
            "loss": loss, "loss_pixel": loss_pixel, "loss_feature": loss_feature,
            "feature_weight": feature_weight,
            "pred_pixel": pred_pixel, "pred_feature": pred_feature,
            "target_feature": target_feature, "pixel_target": pixel_target,
            "mask": masks["loss_mask"], "weight_mask": masks["weight_mask"],
            "weight_mask_pixel": masks["weight_mask_pixel"],
        }

    # ------------------------------------------------------- engine hooks
    def unused_parameter_names(self):
        """With no feature loss (``feature_weight`` 0, the default without --model_ema) the
        feature decoder never reaches the loss."""
        if self.feature_weight != 0.0:
            return []
        branch = ("mask_token_1", "decode_blocks_1.", "decode_norm_1.", "lm_head_1.", "down_1.")
        return [name for name, _ in self.named_parameters() if name.startswith(branch)]

    def extra_state(self):
        """Saved beside the weights: the teacher (numpy arrays, official key names)."""
        if self._teacher is None:
            return {}
        return {"teacher": {k: v.numpy() for k, v in self.teacher_state_dict().items()}}

    def load_extra_state(self, state):
        if self._teacher is not None and state and "teacher" in state:
            self.set_teacher_state_dict(state["teacher"])

    def encoder_state_dict(self):
        """The encoder for fine-tuning (patch_embed, cls_token, pos_embed, blocks, norm)."""
        return {k: v for k, v in self.state_dict().items()
                if k.startswith(_ENCODER_PREFIXES + ("norm.",)) or k in _ENCODER_KEYS}

    def predicted_pixels(self, images, pred_pixel):
        """The pixel decoder's output [B, C, H, W] (each patch and channel normalised) mapped
        back to the input's normalised space with the TRUE statistics of ``images``."""
        x = self._pixel_patches(images)  # [B, C, h, p, w, p]
        pred = denormalize_patches(pred_pixel.reshape(x.shape), x, axis=[3, 5],
                                   eps=PIXEL_NORM_EPS, unbiased=False)
        return pred.reshape(images.shape)

    @paddle.no_grad()
    def reconstruction_image(self, batch, outputs):
        """First sample as uint8 HWC: [input | visible patches | visible + prediction], the
        prediction mapped back with each patch's own mean and std."""
        images = images_from_batch(batch)[:1]
        pred = self.predicted_pixels(images, outputs["pred_pixel"][:1].astype(images.dtype))
        m = outputs["weight_mask_pixel"][:1] > 0  # [1, 1, H, W]
        m = m.astype(images.dtype)
        panel = paddle.concat([images, images * (1 - m), images * (1 - m) + pred * m], axis=3)
        return to_uint8_hwc(panel[0], self.image_mean, self.image_std)


# ------------------------------------------------------------------ constructors
def _bootmae(overrides, **size):
    cfg = dict(patch_size=16, mlp_ratio=4.0, qkv_bias=True, decode_dim=512, **size)
    cfg.update(overrides)  # any argument, the sizes included, may be overridden
    return VisionTransformerForMaskedImageModeling(**cfg)


@register_model("pretrain", method="bootmae", classifier="bootmae_base_patch16_224")
def bootmae_base(**kwargs):
    return _bootmae(kwargs, embed_dim=768, depth=12, num_heads=12, fea_list=(0, 11),
                    model_ema_dynamic=True)


@register_model("pretrain", method="bootmae", classifier="bootmae_large_patch16_224")
def bootmae_large(**kwargs):
    return _bootmae(kwargs, embed_dim=1024, depth=24, num_heads=16, fea_list=(0, 23),
                    model_ema_dynamic=False)
