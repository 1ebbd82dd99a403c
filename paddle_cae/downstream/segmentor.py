"""The segmentation network of the official CAE / BootMAE / BEiT recipes: a ViT encoder whose
token maps after four blocks go through a multi-scale neck into UperNet.

    image [B, 3, H, W]
      -> encoder (the classifier of --model, built for the crop: position table and relative
         position tables resized to the crop's grid)                 tokens [B, 1 + h*w, D]
      -> the patch tokens after blocks ``out_indices`` (3, 5, 7, 11 for 12 blocks), as maps
                                                                  4 x [B, D, h, w], h = H / p
      -> neck: deconv x4 (deconv, BatchNorm, GELU, deconv), deconv x2, identity, max-pool
                                         [B, D, 4h, 4w], [B, D, 2h, 2w], [B, D, h, w], [B, D, h/2, w/2]
      -> UperNet decode head (PaddleSeg) on all four, auxiliary FCN head on the third
      -> logits upsampled to the input size (bilinear)                        [B, classes, H, W]

The encoder, the neck and :class:`Segmentor` are written here (pure Paddle); the UperNet head
comes from PaddleSeg (:func:`build_uper_head`). Other patch sizes keep the output strides 4, 8,
16, 32 (:class:`MultiScaleNeck`).
"""
import paddle
import paddle.nn as nn
import paddle.nn.functional as F

from . import require

LAYER_SCALE_KEYS = ("gamma_1", "gamma_2")


# ----------------------------------------------------------------------------- encoder
def prune_classifier(vit):
    """Drop the parts of a classifier a segmentation encoder never runs (final norm, fc_norm,
    head), so every remaining parameter gets a gradient (data-parallel needs that)."""
    for name in ("norm", "fc_norm", "head"):
        if getattr(vit, name, None) is not None:
            setattr(vit, name, None)
    return vit


def encoder_feature_maps(vit, images, out_indices, pos_embed_trainable=False):
    """The patch tokens of ``vit`` after each block in ``out_indices``, as maps
    ``[B, D, H / p, W / p]`` (no norm: the official backbones use ``out_with_norm=False``)."""
    b, _, height, width = images.shape
    grid_h, grid_w = vit.patch_embed.grid_size
    p = vit.patch_embed.patch_size
    p = p[0] if isinstance(p, (tuple, list)) else p
    if (height, width) != (grid_h * p, grid_w * p):
        raise ValueError(f"the encoder was built for {grid_h * p}x{grid_w * p} crops, got "
                         f"{height}x{width}: images must be padded or cropped to --crop_size")
    x = vit.patch_embed(images)  # [B, N, D]
    cls = vit.cls_token.expand([b, -1, -1])
    x = paddle.concat([cls, x], axis=1)  # [B, 1 + N, D]
    if vit.pos_embed is not None:
        pos = vit.pos_embed if pos_embed_trainable else vit.pos_embed.detach()
        x = x + pos
    x = vit.pos_drop(x)
    wanted = set(int(i) for i in out_indices)
    by_block = {}
    for i, blk in enumerate(vit.blocks[: max(wanted) + 1]):
        x = blk(x)
        if i in wanted:
            tokens = x[:, 1:]  # [B, N, D]
            by_block[i] = tokens.transpose([0, 2, 1]).reshape([b, -1, grid_h, grid_w])
    return [by_block[int(i)] for i in out_indices]


class NeckBatchNorm2D(nn.BatchNorm2D):
    """The neck's BatchNorm with the running statistics of the official (PyTorch) one: the
    batch is normalised with its biased variance, but ``_variance`` is updated with the
    UNBIASED one (n = B*H*W values per channel; Paddle's own update uses the biased one), and
    ``num_batches_tracked`` counts the training batches (informational, not checkpointed).
    ``momentum`` is Paddle's (weight of the running value: 0.9 = PyTorch's 0.1).
    ``SyncBatchNorm.convert_sync_batchnorm`` turns it into Paddle's SyncBatchNorm (multi-GPU
    runs), whose update uses the biased variance over the global batch, a relative
    difference of 1 / (n - 1) of the batch's share."""

    def __init__(self, num_features, momentum=0.9, epsilon=1e-5):
        super().__init__(num_features, momentum=momentum, epsilon=epsilon)
        self.register_buffer("num_batches_tracked", paddle.zeros([], dtype="int64"),
                             persistable=False)

    def forward(self, x):
        if not self.training:
            return super().forward(x)
        with paddle.no_grad():
            previous = self._variance.clone()
        out = super().forward(x)
        with paddle.no_grad():
            xf = x.astype("float32")
            n = int(x.shape[0]) * int(x.shape[2]) * int(x.shape[3])
            centred = xf - xf.mean(axis=[0, 2, 3], keepdim=True)
            var = (centred * centred).sum(axis=[0, 2, 3]) / max(n - 1, 1)
            m = self._momentum
            self._variance.set_value(m * previous + (1.0 - m) * var.astype(previous.dtype))
            self.num_batches_tracked.set_value(self.num_batches_tracked + 1)
        return out


class MultiScaleNeck(nn.Layer):
    """BEiT's four-level neck (written after the official ``fpn1..fpn4``): from four maps of
    stride p (the patch size) to strides 4, 8, 16 and 32 pixels. Patch size 16: deconv x4
    (deconv, BatchNorm, GELU, deconv), deconv x2, identity, max-pool /2; patch size 8 (the
    official variant): deconv x2, identity, max-pool /2, max-pool /4; other patch sizes follow
    the same rule (e.g. 4: identity, max-pool /2, /4, /8)."""

    def __init__(self, embed_dim, patch_size=16, bn_momentum=0.9, bn_eps=1e-5):
        super().__init__()
        self.embed_dim = embed_dim
        # PyTorch BatchNorm momentum 0.1 = Paddle momentum 0.9 (weight of the running value)
        self.bn_momentum, self.bn_eps = bn_momentum, bn_eps
        levels = [self._level(patch_size / (4 * 2 ** k)) for k in range(4)]
        self.fpn1, self.fpn2, self.fpn3, self.fpn4 = levels
        self.strides = [4, 8, 16, 32]

    def _level(self, scale):
        d = self.embed_dim
        if scale == 4:
            return nn.Sequential(nn.Conv2DTranspose(d, d, kernel_size=2, stride=2),
                                 NeckBatchNorm2D(d, momentum=self.bn_momentum, epsilon=self.bn_eps),
                                 nn.GELU(), nn.Conv2DTranspose(d, d, kernel_size=2, stride=2))
        if scale == 2:
            return nn.Sequential(nn.Conv2DTranspose(d, d, kernel_size=2, stride=2))
        if scale == 1:
            return nn.Identity()
        if scale < 1 and float(1 / scale).is_integer():
            k = int(1 / scale)
            return nn.MaxPool2D(kernel_size=k, stride=k)
        raise ValueError(f"the multi-scale neck needs a patch size of 4 x 2^k pixels (4, 8, 16, "
                         f"32, ...), got a scale of {scale}")

    def forward(self, maps):
        return [op(m) for op, m in zip((self.fpn1, self.fpn2, self.fpn3, self.fpn4), maps)]


class Segmentor(nn.Layer):
    """Encoder + neck + decode head (+ auxiliary head inside the decode head, PaddleSeg style:
    the head returns ``[main logits, aux logits]`` in training)."""

    stale_checkpoint_prefixes = ()  # checkpoint keys to drop on a strict load (none)

    def __init__(self, backbone, neck, decode_head, out_indices, pos_embed_trainable=False,
                 align_corners=False):
        super().__init__()
        if len(out_indices) != 4:
            raise ValueError(f"out_indices must name 4 blocks, got {list(out_indices)}")
        depth = len(backbone.blocks)
        if not all(0 <= int(i) < depth for i in out_indices):
            raise ValueError(f"out_indices {list(out_indices)} must lie in 0..{depth - 1} "
                             f"(the encoder has {depth} blocks)")
        self.backbone = backbone
        self.neck = neck
        self.decode_head = decode_head
        self.out_indices = [int(i) for i in out_indices]
        self.pos_embed_trainable = bool(pos_embed_trainable)
        self.align_corners = align_corners
        if backbone.pos_embed is not None:
            backbone.pos_embed.stop_gradient = not self.pos_embed_trainable

    def features(self, images):
        """The four neck outputs (finest first)."""
        maps = encoder_feature_maps(self.backbone, images, self.out_indices, self.pos_embed_trainable)
        return self.neck(maps)

    def forward(self, images):
        """List of logits ``[B, classes, H, W]`` at the input size: the main head's first, the
        auxiliary head's second (when the head has one and is training)."""
        logits = self.decode_head(self.features(images))
        size = images.shape[2:]
        return [F.interpolate(x, size=size, mode="bilinear", align_corners=self.align_corners)
                for x in logits]

    # --------------------------------------------------------------- layer-wise lr decay
    def num_layers_for_decay(self):
        """Id of the last layer: depth + 1 (embeddings 0, block i -> i + 1, the rest depth + 1)."""
        return len(self.backbone.blocks) + 1

    def layer_id(self, name):
        """The official segmentation rule (``get_num_layer_for_vit``): the encoder's embeddings
        0, its block i -> i + 1; everything else (neck, heads) the last layer, lr scale 1."""
        if name.startswith("backbone."):
            return self.backbone.layer_id(name[len("backbone."):])
        return self.num_layers_for_decay()

    def no_weight_decay(self):
        """No names: the official constructor compares ``backbone.cls_token`` with ``cls_token``
        and never matches, so only 1-D tensors and biases skip weight decay."""
        return set()


# ---------------------------------------------------------------------------- builders
def build_uper_head(num_classes, embed_dim, channels, dropout_ratio=0.1, aux=True):
    """PaddleSeg's UperNet head of its CAE model (mmseg's UPerHead: pyramid pooling on the
    coarsest map, FPN, 3x3 fuse) with the auxiliary FCN head (3x3 conv to 256, dropout, 1x1)
    on the third map."""
    upernet_cae = require("paddleseg.models.upernet_cae")
    return upernet_cae.UPerNetHead(inplane=embed_dim, num_class=num_classes,
                                   channels_fpn=[embed_dim] * 4, channels=channels,
                                   dropout_ratio=dropout_ratio, fpn_channels=channels,
                                   enable_auxiliary_loss=aux)


def build_segmentor(encoder, config, decode_head=None):
    """A :class:`Segmentor` around ``encoder`` (a classifier of this package built for the crop)
    for the segmentation ``config`` (see :func:`paddle_cae.downstream.seg_config`)."""
    prune_classifier(encoder)
    p = encoder.patch_embed.patch_size
    p = p[0] if isinstance(p, (tuple, list)) else p
    dim = encoder.embed_dim
    neck = MultiScaleNeck(dim, patch_size=p)
    if decode_head is None:
        decode_head = build_uper_head(config["num_classes"], dim, config["channels"],
                                      config.get("dropout_ratio", 0.1), aux=True)
    return Segmentor(encoder, neck, decode_head, config["out_indices"],
                     pos_embed_trainable=config.get("pos_embed_trainable", False))


def default_out_indices(depth):
    """Blocks whose outputs feed the neck: 3, 5, 7, 11 for 12 blocks (the recipes), 7, 11, 15, 23
    for 24; for other depths four evenly spaced blocks ending with the last."""
    if depth == 12:
        return [3, 5, 7, 11]
    if depth == 24:
        return [7, 11, 15, 23]
    return sorted({max(0, round(depth * k / 4) - 1) for k in (1, 2, 3, 4)} | {depth - 1})[-4:] \
        if depth >= 4 else [min(i, depth - 1) for i in range(4)]


__all__ = ["MultiScaleNeck", "NeckBatchNorm2D", "Segmentor", "build_segmentor", "build_uper_head",
           "default_out_indices", "encoder_feature_maps", "prune_classifier"]
