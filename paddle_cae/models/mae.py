"""MAE pretraining model (He et al., facebookresearch/mae ``models_mae.MaskedAutoencoderViT``).

An asymmetric encoder-decoder: the ViT encoder sees only the kept 25% of the patches; a
light decoder (512-d, 8 blocks) sees every position (kept tokens + mask tokens) and predicts
the pixels of each patch. The loss is taken on the removed patches only.

Parameter names equal the official state_dict keys (``blocks.0.attn.qkv.weight``,
``decoder_blocks.0.mlp.fc1.bias``, ``decoder_embed.weight``, ``mask_token`` ...), so loading an
official checkpoint is a copy plus the transposition of Linear weights (``paddle_cae.convert``).
"""
import contextlib
import math

import paddle
import paddle.nn as nn

from .base import PretrainingModel
from .common import (denormalize_patches, fixed_sincos_table, gather_tokens, norm_eps_from,
                     normalize_patches, to_uint8_hwc)
from .layers import PatchEmbed, block_stack, init_linears_and_norms, normal_, xavier_uniform_
from .registry import register_model

__all__ = ["MaskedAutoencoderViT", "images_from_batch", "zero_filled_parameters",
           "mae_vit_base_patch16", "mae_vit_large_patch16", "mae_vit_huge_patch14"]

def images_from_batch(batch, key="images"):
    """The image tensor of a batch given as a tensor, a (images, ...) tuple/list or a dict."""
    if isinstance(batch, dict):
        if key not in batch:
            raise KeyError(f"batch dict has no '{key}' entry (keys: {sorted(batch)})")
        return batch[key]
    if isinstance(batch, (tuple, list)):
        return batch[0]
    return batch


@contextlib.contextmanager
def zero_filled_parameters():
    """Parameters created inside start as zeros instead of Paddle's default random draws
    (seconds of single-threaded sampling for a ViT-B), for models that set every value
    themselves afterwards."""
    from paddle.base import initializer as base_init

    saved = (getattr(base_init, "_global_weight_initializer", lambda: None)(),
             getattr(base_init, "_global_bias_initializer", lambda: None)())
    zero = nn.initializer.Constant(0.0)
    nn.initializer.set_global_initializer(zero, zero)
    try:
        yield
    finally:
        nn.initializer.set_global_initializer(*saved)


class MaskedAutoencoderViT(PretrainingModel):
    """Masked autoencoder with a ViT backbone (timm attention flavour, full qkv bias)."""

    input_keys = ("images", "noise")

    image_mean = (0.485, 0.456, 0.406)  # the method's input normalisation (ImageNet)
    image_std = (0.229, 0.224, 0.225)

    def __init__(self, img_size=224, patch_size=16, in_chans=3, embed_dim=1024, depth=24,
                 num_heads=16, decoder_embed_dim=512, decoder_depth=8, decoder_num_heads=16,
                 mlp_ratio=4.0, norm_layer=None, norm_pix_loss=False, mask_ratio=0.75,
                 norm_eps=None):
        super().__init__()
        eps = norm_eps if norm_eps is not None else norm_eps_from(norm_layer)
        self.norm_pix_loss = norm_pix_loss
        self.mask_ratio = mask_ratio
        self.in_chans = in_chans

        with zero_filled_parameters():  # initialize_weights sets every value
            # ----------------------------------------------------------- encoder
            self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim)
            grid = self.patch_embed.grid_size
            num_patches = self.patch_embed.num_patches
            self.cls_token = self._zeros([1, 1, embed_dim])
            self.pos_embed = fixed_sincos_table(self, embed_dim, grid, layout="mae")
            self.blocks = block_stack(depth, embed_dim, num_heads, mlp_ratio, qkv_bias=True,
                                      attn_style="timm", norm_eps=eps)
            self.norm = nn.LayerNorm(embed_dim, epsilon=eps)

            # ----------------------------------------------------------- decoder
            self.decoder_embed = nn.Linear(embed_dim, decoder_embed_dim)
            self.mask_token = self._zeros([1, 1, decoder_embed_dim])
            self.decoder_pos_embed = fixed_sincos_table(self, decoder_embed_dim, grid,
                                                        layout="mae")
            self.decoder_blocks = block_stack(decoder_depth, decoder_embed_dim, decoder_num_heads,
                                              mlp_ratio, qkv_bias=True, attn_style="timm",
                                              norm_eps=eps)
            self.decoder_norm = nn.LayerNorm(decoder_embed_dim, epsilon=eps)
            patch = self.patch_embed.patch_size[0]
            self.decoder_pred = nn.Linear(decoder_embed_dim, patch * patch * in_chans)
        self.num_patches = num_patches
        self.initialize_weights()

    # ------------------------------------------------------------------ params
    def _zeros(self, shape):
        return self.create_parameter(shape, default_initializer=nn.initializer.Constant(0.0))

    def initialize_weights(self):
        """The official scheme: xavier-uniform Linear weights (the fused qkv as one matrix),
        zero biases, LayerNorm 1/0, patch-embed weight xavier on its [D, C*p*p] view with the
        bias at PyTorch's default conv init, cls/mask tokens N(0, 0.02)."""
        init_linears_and_norms(self, lambda _, weight: xavier_uniform_(weight))
        w = self.patch_embed.proj.weight  # [D, C, p, p]
        fan_in = w.shape[1] * w.shape[2] * w.shape[3]
        xavier_uniform_(w, fan_in=fan_in, fan_out=w.shape[0])
        bound = 1.0 / math.sqrt(fan_in)
        b = self.patch_embed.proj.bias
        b.set_value(paddle.uniform(b.shape, dtype="float32", min=-bound, max=bound))
        normal_(self.cls_token, std=0.02)
        normal_(self.mask_token, std=0.02)

    # ---------------------------------------------------------------- metadata
    def no_weight_decay(self):
        # the official recipe decays cls/mask tokens; only the frozen tables are excluded
        return {"pos_embed", "decoder_pos_embed"}

    def official_key_map(self, key):
        """Official key -> ours. Pretrain files (encoder-only or ``_full``) use our names;
        a fine-tuned file's classifier (``fc_norm``, ``head``) has no place here."""
        if key.startswith(("fc_norm.", "head.")):
            return None
        return key

    def encoder_state_dict(self):
        """The encoder alone, as the official encoder-only release holds it (patch_embed,
        cls_token, pos_embed, blocks, norm): what fine-tuning starts from."""
        return {k: v for k, v in self.state_dict().items()
                if k.startswith(("patch_embed.", "blocks.", "norm.")) or k in ("cls_token",
                                                                              "pos_embed")}

    # ---------------------------------------------------------------- patches
    @property
    def patch_size(self):
        return self.patch_embed.patch_size[0]

    def patchify(self, imgs):
        """imgs [B, C, H, W] -> [B, N, p*p*C], each patch ordered (row, col, channel)."""
        p = self.patch_size
        b, c, hh, ww = imgs.shape
        h, w = hh // p, ww // p
        x = imgs.reshape([b, c, h, p, w, p])
        x = x.transpose([0, 2, 4, 3, 5, 1])  # [B, h, w, p, p, C]
        return x.reshape([b, h * w, p * p * c])

    def unpatchify(self, x):
        """x [B, N, p*p*C] -> imgs [B, C, H, W] (inverse of :meth:`patchify`)."""
        p = self.patch_size
        h, w = self.patch_embed.grid_size
        b = x.shape[0]
        c = x.shape[-1] // (p * p)
        x = x.reshape([b, h, w, p, p, c])
        x = x.transpose([0, 5, 1, 3, 2, 4])  # [B, C, h, p, w, p]
        return x.reshape([b, c, h * p, w * p])

    # ---------------------------------------------------------------- masking
    def random_masking(self, x, mask_ratio, noise=None):
        """Keep ``int(N * (1 - mask_ratio))`` patches per sample: those with the smallest noise.

        x [B, N, D]; noise [B, N] in [0, 1) (drawn here unless given).
        Returns x_masked [B, K, D], mask [B, N] (0 keep, 1 removed; raster order) and
        ids_restore [B, N] (argsort of the shuffle, to undo it)."""
        b, n, d = x.shape
        len_keep = int(n * (1 - mask_ratio))
        if noise is None:
            noise = paddle.rand([b, n], dtype="float32")
        else:
            noise = paddle.to_tensor(noise, dtype="float32") if not isinstance(
                noise, paddle.Tensor) else noise
            if tuple(noise.shape) != (b, n):
                raise ValueError(f"noise must have shape [{b}, {n}], got {list(noise.shape)}")
        ids_shuffle = paddle.argsort(noise, axis=1)  # ascending: small is kept
        ids_restore = paddle.argsort(ids_shuffle, axis=1)  # a permutation: distinct keys
        x_masked = gather_tokens(x, ids_shuffle[:, :len_keep])  # [B, K, D]
        mask = paddle.concat([paddle.zeros([b, len_keep]), paddle.ones([b, n - len_keep])], axis=1)
        mask = paddle.take_along_axis(mask, ids_restore, axis=1)  # [B, N], raster order
        return x_masked, mask, ids_restore

    # ---------------------------------------------------------------- forward
    def forward_encoder(self, imgs, mask_ratio, noise=None):
        x = self.patch_embed(imgs)  # [B, N, D]
        x = x + self.pos_embed[:, 1:, :]
        x, mask, ids_restore = self.random_masking(x, mask_ratio, noise)  # [B, K, D]
        cls = (self.cls_token + self.pos_embed[:, :1, :]).expand([x.shape[0], -1, -1])
        x = paddle.concat([cls, x], axis=1)  # [B, 1 + K, D]
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x), mask, ids_restore

    def forward_decoder(self, x, ids_restore):
        x = self.decoder_embed(x)  # [B, 1 + K, Dd]
        b, n = ids_restore.shape
        mask_tokens = self.mask_token.expand([b, n + 1 - x.shape[1], -1])  # [B, N - K, Dd]
        x_ = paddle.concat([x[:, 1:, :], mask_tokens], axis=1)  # [B, N, Dd], shuffled order
        x_ = gather_tokens(x_, ids_restore)  # [B, N, Dd], raster order
        x = paddle.concat([x[:, :1, :], x_], axis=1)  # [B, 1 + N, Dd]
        x = x + self.decoder_pos_embed
        for blk in self.decoder_blocks:
            x = blk(x)
        x = self.decoder_norm(x)
        x = self.decoder_pred(x)  # [B, 1 + N, p*p*C]
        return x[:, 1:, :]  # [B, N, p*p*C]

    def forward_loss(self, imgs, pred, mask):
        """Mean squared error over the removed patches. imgs [B, C, H, W]; pred [B, N, p*p*C];
        mask [B, N] with 1 = removed."""
        target = self.patchify(imgs)  # [B, N, p*p*C]
        if self.norm_pix_loss:  # each patch by its own mean and (unbiased) std
            target = normalize_patches(target, axis=-1, eps=1.0e-6, unbiased=True)
        diff = pred - target
        # d * d: the same float32 squares and gradient as d ** 2 (exact squaring either way),
        # without Paddle's slower CPU pow kernel
        loss = (diff * diff).mean(axis=-1)  # [B, N], per patch
        return (loss * mask).sum() / mask.sum()

    def forward(self, batch, mask_ratio=None, noise=None):
        """batch: images [B, C, H, W] (or a tuple/dict holding them under 'images').

        Returns ``{"loss", "pred" [B, N, p*p*C], "mask" [B, N], "latent" [B, 1 + K, D],
        "ids_restore" [B, N]}``; ``noise`` [B, N] replaces the random draw of the mask."""
        imgs = images_from_batch(batch)
        if isinstance(batch, dict) and noise is None:
            noise = batch.get("noise")
        mask_ratio = self.mask_ratio if mask_ratio is None else mask_ratio
        latent, mask, ids_restore = self.forward_encoder(imgs, mask_ratio, noise)
        pred = self.forward_decoder(latent, ids_restore)
        loss = self.forward_loss(imgs, pred, mask)
        return {"loss": loss, "pred": pred, "mask": mask, "latent": latent,
                "ids_restore": ids_restore}


    def predicted_pixels(self, imgs, pred):
        """pred [B, N, p*p*C] -> image [B, C, H, W] in the input's normalised space; with
        norm_pix_loss each patch is mapped back with its TRUE mean and std, taken from ``imgs``
        (as the official demo does)."""
        if self.norm_pix_loss:
            pred = denormalize_patches(pred, self.patchify(imgs), axis=-1, eps=1.0e-6,
                                       unbiased=True)
        return self.unpatchify(pred)

    @paddle.no_grad()
    def reconstruction_image(self, batch, outputs):
        """First sample as uint8 HWC: [input | visible patches | visible + prediction]; with
        norm_pix_loss the prediction is mapped back with each patch's own mean and std."""
        imgs = images_from_batch(batch)[:1]
        pred = outputs["pred"][:1].astype(imgs.dtype)  # [1, N, p*p*C]
        recon = self.predicted_pixels(imgs, pred)  # [1, C, H, W]
        mask = self.unpatchify(outputs["mask"][:1].astype(imgs.dtype).unsqueeze(-1).expand(
            pred.shape))  # [1, C, H, W]
        panel = paddle.concat([imgs, imgs * (1 - mask), imgs * (1 - mask) + recon * mask], axis=3)
        return to_uint8_hwc(panel[0], self.image_mean, self.image_std)


# ------------------------------------------------------------------ constructors
def _mae(embed_dim, depth, num_heads, patch_size, overrides):
    cfg = dict(patch_size=patch_size, embed_dim=embed_dim, depth=depth, num_heads=num_heads,
               decoder_embed_dim=512, decoder_depth=8, decoder_num_heads=16, mlp_ratio=4.0)
    cfg.update(overrides)  # any argument, the sizes included, may be overridden
    return MaskedAutoencoderViT(**cfg)


@register_model("pretrain", method="mae", classifier="vit_base_patch16")
def mae_vit_base_patch16(**kwargs):
    return _mae(768, 12, 12, 16, kwargs)


@register_model("pretrain", method="mae", classifier="vit_large_patch16")
def mae_vit_large_patch16(**kwargs):
    return _mae(1024, 24, 16, 16, kwargs)


@register_model("pretrain", method="mae", classifier="vit_huge_patch14")
def mae_vit_huge_patch14(**kwargs):
    return _mae(1280, 32, 16, 14, kwargs)
