"""CAE pretraining model: Context Autoencoder (Chen et al., 2022).

The image is split into visible and masked patches (``bool_masked_pos``, True = masked,
the same count M in every sample). The forward reads like the paper:

1. ``forward_encoder``:  the encoder sees cls + the N - M visible patches only;
2. ``forward_alignment_target``: the same encoder, without gradient, sees cls + the M masked
   patches only; its normed outputs are the latent targets;
3. ``forward_regressor``: mask queries cross-attend to [visible tokens, current queries]
   and predict the latents of the masked patches;
4. ``forward_decoder``: self-attention over the predicted latents only, then a linear head
   to the tokenizer's vocabulary;
5. ``forward_loss``: cross-entropy on the masked tokens + ``align_loss_weight`` * MSE between
   predicted and target latents.

Parameter names equal the current official checkpoint (``encoder.*``,
``regresser.regressor_blocks.{k}.*``, ``decoder.decoder_blocks.{m}.*``, ``mask_token``,
``rd_pos_embed``), so conversion is a copy plus the transposition of Linear weights;
``official_key_map`` also reads the two older namings (see ``cae_official_key_map``).
"""
import paddle
import paddle.nn as nn
import paddle.nn.functional as F

from .base import PretrainingModel
from .common import (LN_EPS, drop_path_rates, ema_update_, fixed_sincos_table, fp32_region,
                     gather_tokens, norm_eps_from)
from .layers import (CrossAttentionBase, DropPath, Mlp, PatchEmbed, block_stack,
                     init_linears_and_norms, trunc_normal_, xavier_uniform_, zeros_)
from .registry import register_model


# ----------------------------------------------------------------------------- helpers
def split_visible_masked(bool_masked_pos):
    """Indices of the visible and of the masked patches, each in raster order.

    bool_masked_pos: [B, N] (or [B, H, W]) boolean, True = masked, the same number M of
    masked patches in every sample. Returns (ids_visible [B, N-M], ids_masked [B, M]).
    """
    mask = bool_masked_pos.flatten(1) if bool_masked_pos.ndim > 2 else bool_masked_pos
    mask = mask.astype("int32")  # [B, N]
    counts = mask.sum(axis=1).numpy()
    if counts.size and counts.min() != counts.max():
        raise ValueError(
            "bool_masked_pos must mask the same number of patches in every sample "
            f"(got counts {sorted(set(counts.tolist()))}); build masks with a fixed "
            "num_masking_patches")
    num_masked = int(counts[0]) if counts.size else 0
    num_visible = mask.shape[1] - num_masked
    # 0 (visible) / 1 (masked) with the position as tie-break: the keys are distinct, so any
    # sort keeps both groups in raster order (Paddle 2.6's argsort has no ``stable``)
    n = mask.shape[1]
    key = mask.astype("int64") * n + paddle.arange(n, dtype="int64")
    order = paddle.argsort(key, axis=1)  # [B, N]
    return order[:, :num_visible], order[:, num_visible:]


def _arg(args, name, default):
    if args is None:
        return default
    if isinstance(args, dict):
        return args.get(name, default)
    return getattr(args, name, default)


# ------------------------------------------------------------------------------ layers
class CrossAttention(CrossAttentionBase):
    """Cross-attention of CAE's regressor and attentive probe: separate bias-less ``q``,
    ``k``, ``v`` Linears (plus ``q_bias``/``v_bias``), each with its own input."""

    def _projections(self, dim, inner):
        self.q = nn.Linear(dim, inner, bias_attr=False)
        self.k = nn.Linear(dim, inner, bias_attr=False)
        self.v = nn.Linear(dim, inner, bias_attr=False)

    def forward(self, x_q, x_k, x_v):
        q = self._linear(x_q, self.q.weight, self.q_bias)  # [B, Nq, h*d]
        k = self._linear(x_k, self.k.weight)  # [B, Nk, h*d]
        v = self._linear(x_v, self.v.weight, self.v_bias)  # [B, Nk, h*d]
        return self.attend(q, k, v)  # [B, Nq, D]


def add_input_norms(layer, dim, norm_eps):
    """The LayerNorms of a cross-attention's query, key and value inputs, under the official
    names ``norm1_q``, ``norm1_k``, ``norm1_v``."""
    layer.norm1_q = nn.LayerNorm(dim, epsilon=norm_eps)
    layer.norm1_k = nn.LayerNorm(dim, epsilon=norm_eps)
    layer.norm1_v = nn.LayerNorm(dim, epsilon=norm_eps)


class RegressorBlock(nn.Layer):
    """One block of the latent contextual regressor.

    z <- z + gamma_1 * CrossAttn(q = LN_q(z + pos_q), k = LN_k(kv + pos_kv), v = LN_v(kv))
    z <- LN_2(z)                     (post-norm of the residual stream)
    z <- z + gamma_2 * MLP(z)
    Values carry no position. With a layer-scale value of 0 the gammas are fixed ones.
    """

    def __init__(self, dim, num_heads, mlp_ratio=4.0, qkv_bias=False, qk_scale=None, drop=0.0,
                 attn_drop=0.0, drop_path=0.0, init_values=0.0, attn_head_dim=None,
                 norm_eps=LN_EPS):
        super().__init__()
        add_input_norms(self, dim, norm_eps)
        self.norm2_cross = nn.LayerNorm(dim, epsilon=norm_eps)
        cross_attention = CrossAttention
        self.cross_attn = cross_attention(dim, num_heads, qkv_bias, qk_scale, attn_drop, drop,
                                          attn_head_dim)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.mlp_cross = Mlp(dim, int(dim * mlp_ratio), drop=drop)
        trainable = init_values is not None and init_values > 0
        init = nn.initializer.Constant(float(init_values) if trainable else 1.0)
        self.gamma_1_cross = self.create_parameter([dim], default_initializer=init)
        self.gamma_2_cross = self.create_parameter([dim], default_initializer=init)
        self.gamma_1_cross.stop_gradient = not trainable
        self.gamma_2_cross.stop_gradient = not trainable

    def forward(self, z, kv, pos_q, pos_kv):
        attn = self.cross_attn(self.norm1_q(z + pos_q), self.norm1_k(kv + pos_kv),
                               self.norm1_v(kv))
        z = z + self.drop_path(self.gamma_1_cross * attn)
        z = self.norm2_cross(z)
        return z + self.drop_path(self.gamma_2_cross * self.mlp_cross(z))


class CAEEncoder(nn.Layer):
    """ViT encoder over a subset of the patches: cls + the patches NOT marked in
    ``bool_masked_pos``, fixed sin-cos positions (MoCo layout, zero for cls), BEiT blocks
    with layer scale, final LayerNorm."""

    def __init__(self, img_size=224, patch_size=16, in_chans=3, embed_dim=768, depth=12,
                 num_heads=12, mlp_ratio=4.0, qkv_bias=True, qk_scale=None, drop_rate=0.0,
                 attn_drop_rate=0.0, drop_path_rate=0.0, init_values=None, attn_head_dim=None,
                 norm_eps=LN_EPS):
        super().__init__()
        self.embed_dim = self.num_features = embed_dim
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim)
        self.num_patches = self.patch_embed.num_patches
        self.cls_token = self.create_parameter(
            [1, 1, embed_dim], default_initializer=nn.initializer.Constant(0.0))
        self.pos_embed = fixed_sincos_table(self, embed_dim, self.patch_embed.grid_size,
                                            layout="moco")
        self.pos_drop = nn.Dropout(drop_rate) if drop_rate > 0 else nn.Identity()
        self.blocks = block_stack(depth, embed_dim, num_heads, mlp_ratio, qkv_bias, qk_scale,
                                  drop_rate, attn_drop_rate, drop_path_rate,
                                  init_values=init_values, attn_head_dim=attn_head_dim,
                                  attn_style="beit", norm_eps=norm_eps)
        self.norm = nn.LayerNorm(embed_dim, epsilon=norm_eps)

    def forward(self, images, bool_masked_pos=None, ids_keep=None):
        """images [B, C, H, W] -> [B, 1 + n, D] for the n kept patches (raster order).
        Give either the mask (True = dropped) or the kept indices directly."""
        x = self.patch_embed(images)  # [B, N, D]
        b = x.shape[0]
        pos = self.pos_embed.detach()  # [1, 1 + N, D], fixed
        if ids_keep is None and bool_masked_pos is not None:
            ids_keep, _ = split_visible_masked(bool_masked_pos)
        if ids_keep is not None:
            x = gather_tokens(x, ids_keep)  # [B, n, D]
            x = x + gather_tokens(pos[:, 1:], ids_keep)
        else:
            x = x + pos[:, 1:]
        cls = (self.cls_token + pos[:, :1]).expand([b, -1, -1])  # the cls row of pos is zero
        x = self.pos_drop(paddle.concat([cls, x], axis=1))  # [B, 1 + n, D]
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x)


class LatentRegresser(nn.Layer):
    def __init__(self, embed_dim=768, depth=4, num_heads=12, mlp_ratio=4.0, qkv_bias=True,
                 qk_scale=None, drop_rate=0.0, attn_drop_rate=0.0, drop_path_rate=0.0,
                 init_values=0.1, norm_eps=LN_EPS):
        super().__init__()
        dpr = drop_path_rates(drop_path_rate, depth)
        self.regressor_blocks = nn.LayerList([
            RegressorBlock(embed_dim, num_heads, mlp_ratio, qkv_bias, qk_scale, drop_rate,
                           attn_drop_rate, dpr[i], init_values=init_values, norm_eps=norm_eps)
            for i in range(depth)
        ])
        self.norm = nn.LayerNorm(embed_dim, epsilon=norm_eps)

    def forward(self, x_masked, x_visible, pos_masked, pos_visible):
        """x_masked [B, M, Dd] queries, x_visible [B, N-M, Dd] -> [B, M, Dd]."""
        pos_kv = paddle.concat([pos_visible, pos_masked], axis=1)  # [B, N, Dd]
        for blk in self.regressor_blocks:
            # keys/values are rebuilt each block from the CURRENT mask queries
            kv = paddle.concat([x_visible, x_masked], axis=1)  # [B, N, Dd]
            x_masked = blk(x_masked, kv, pos_masked, pos_kv)
        return self.norm(x_masked)


class Decoder(nn.Layer):
    """Self-attention over the predicted latents of the masked patches only, then a head
    to the tokenizer vocabulary."""

    def __init__(self, num_classes=8192, embed_dim=768, depth=4, num_heads=12, mlp_ratio=4.0,
                 qkv_bias=True, qk_scale=None, drop_rate=0.0, attn_drop_rate=0.0,
                 drop_path_rate=0.0, init_values=0.1, norm_eps=LN_EPS):
        super().__init__()
        self.decoder_blocks = block_stack(depth, embed_dim, num_heads, mlp_ratio, qkv_bias,
                                          qk_scale, drop_rate, attn_drop_rate, drop_path_rate,
                                          init_values=init_values, attn_style="beit",
                                          norm_eps=norm_eps)
        self.norm = nn.LayerNorm(embed_dim, epsilon=norm_eps)
        self.head = nn.Linear(embed_dim, num_classes)

    def forward(self, latent, pos_masked):
        x = latent + pos_masked  # [B, M, Dd]
        for blk in self.decoder_blocks:
            x = blk(x)
        return self.head(self.norm(x))  # [B, M, V]


# ------------------------------------------------------------------------------- model
class ContextAutoencoderViT(PretrainingModel):
    """CAE pretraining model. Constructor arguments carry the official names.

    alignment: 'current' (default, what the official code effectively computes: the
        target is the current encoder under no_grad, with its drop-path active in train
        mode) or 'ema' (a separate frozen copy ``alignment_encoder`` updated after each
        target computation as copy <- m * copy + (1 - m) * encoder with
        m = ``alignment_momentum``; m = 0 gives the one-step-stale copy of the older
        lxtGH/PASSL code). The copy is never trainable.
    """

    input_keys = ("images", "bool_masked_pos", "target_ids", "tokenizer_images")

    # training checkpoints written before the tokenizer stopped being a sub-layer hold its
    # weights under this prefix; they are not part of the model
    stale_checkpoint_prefixes = ("_tokenizer.",)

    def __init__(self, img_size=224, patch_size=16, in_chans=3, embed_dim=768, depth=12,
                 num_heads=12, mlp_ratio=4.0, qkv_bias=True, qk_scale=None, drop_rate=0.0,
                 attn_drop_rate=0.0, drop_path_rate=0.0, norm_layer=None, init_values=None,
                 attn_head_dim=None, init_std=0.02, decoder_embed_dim=768, regressor_depth=4,
                 decoder_num_classes=None, decoder_num_heads=12,
                 decoder_layer_scale_init_value=0.1, decoder_depth=4, fix_init_weight=False,
                 vocab_size=None, align_loss_weight=2.0, alignment="current",
                 alignment_momentum=0.0, args=None, **unused):
        super().__init__()
        if _arg(args, "model_type", "cae") != "cae":
            raise NotImplementedError(
                f"model_type {_arg(args, 'model_type', None)!r}: only 'cae' is implemented")
        # the official constructor lets its argparse namespace override these three
        regressor_depth = _arg(args, "regressor_depth", regressor_depth)
        decoder_embed_dim = _arg(args, "decoder_embed_dim", decoder_embed_dim)
        decoder_depth = _arg(args, "decoder_depth", decoder_depth)
        if decoder_num_classes is None:
            decoder_num_classes = vocab_size if vocab_size is not None else 8192
        elif vocab_size is not None and vocab_size != decoder_num_classes:
            raise ValueError(f"vocab_size={vocab_size} and decoder_num_classes="
                             f"{decoder_num_classes} disagree; give one of them")
        if alignment not in ("current", "ema"):
            raise ValueError(f"alignment must be 'current' or 'ema', got {alignment!r}")
        norm_eps = norm_eps_from(norm_layer)
        self.init_std = init_std
        self.align_loss_weight = float(align_loss_weight)
        self.alignment = alignment
        self.alignment_momentum = float(alignment_momentum)
        self.vocab_size = decoder_num_classes

        encoder_kwargs = dict(
            img_size=img_size, patch_size=patch_size, in_chans=in_chans, embed_dim=embed_dim,
            depth=depth, num_heads=num_heads, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias,
            qk_scale=qk_scale, drop_rate=drop_rate, attn_drop_rate=attn_drop_rate,
            drop_path_rate=drop_path_rate, init_values=init_values, attn_head_dim=attn_head_dim,
            norm_eps=norm_eps)
        self.encoder = CAEEncoder(**encoder_kwargs)
        self.num_patches = self.encoder.num_patches
        grid = self.encoder.patch_embed.grid_size

        if decoder_embed_dim != embed_dim:
            self.encoder_to_regresser = nn.Linear(embed_dim, decoder_embed_dim)
            self.encoder_to_regresser_norm = nn.LayerNorm(decoder_embed_dim, epsilon=norm_eps)
        else:
            self.encoder_to_regresser = self.encoder_to_regresser_norm = None

        self.rd_pos_embed = fixed_sincos_table(self, decoder_embed_dim, grid,
                                               layout="moco")  # [1, 1+N, Dd]
        self.regresser = LatentRegresser(
            decoder_embed_dim, regressor_depth, decoder_num_heads, mlp_ratio, qkv_bias, qk_scale,
            drop_rate, attn_drop_rate, drop_path_rate, decoder_layer_scale_init_value, norm_eps)
        self.mask_token = self.create_parameter(
            [1, 1, decoder_embed_dim], default_initializer=nn.initializer.Constant(0.0))
        self.decoder = Decoder(
            decoder_num_classes, decoder_embed_dim, decoder_depth, decoder_num_heads, mlp_ratio,
            qkv_bias, qk_scale, drop_rate, attn_drop_rate, drop_path_rate,
            decoder_layer_scale_init_value, norm_eps)
        self._init_weights(fix_init_weight)

        if alignment == "ema":
            self.alignment_encoder = CAEEncoder(**encoder_kwargs)
            self.alignment_encoder.set_state_dict(self.encoder.state_dict())
            for p in self.alignment_encoder.parameters():
                p.stop_gradient = True
        else:
            self.alignment_encoder = None
        self._tokenizer = None

    # ------------------------------------------------------------------ init
    def _init_weights(self, fix_init_weight):
        """The official result: every Linear xavier-uniform (bias 0), unless
        ``fix_init_weight``, which keeps BEiT's trunc-normal at +-1 std with proj/fc2 of block
        l divided by sqrt(2 l). LayerNorms 1/0; conv, cls and mask tokens trunc-normal
        (+-1 std), conv bias 0."""
        std = self.init_std
        def linear_weight(_, weight):
            if fix_init_weight:
                trunc_normal_(weight, std=std, a=-std, b=std)
            else:
                xavier_uniform_(weight)

        init_linears_and_norms(self, linear_weight)
        conv = self.encoder.patch_embed.proj
        trunc_normal_(conv.weight, std=std, a=-std, b=std)
        zeros_(conv.bias)
        trunc_normal_(self.encoder.cls_token, std=std, a=-std, b=std)
        trunc_normal_(self.mask_token, std=std, a=-std, b=std)
        if fix_init_weight:
            # BEiT rescale: proj / fc2 of the l-th block (1-based) of each stack by 1/sqrt(2 l)
            stacks = [
                [(b.attn.proj, b.mlp.fc2) for b in self.encoder.blocks],
                [(b.cross_attn.proj, b.mlp_cross.fc2) for b in self.regresser.regressor_blocks],
                [(b.attn.proj, b.mlp.fc2) for b in self.decoder.decoder_blocks],
            ]
            for stack in stacks:
                for i, linears in enumerate(stack):
                    for lin in linears:
                        lin.weight.set_value(lin.weight / (2.0 * (i + 1)) ** 0.5)

    # -------------------------------------------------------------- metadata
    def no_weight_decay(self):
        """The official pretraining decays everything but 1-D tensors and biases."""
        return set()

    def num_layers_for_decay(self):
        return len(self.encoder.blocks) + 1

    def layer_id(self, name):
        """Layer index for layer-wise lr decay (the official pretraining uses none):
        embeddings 0, encoder block i -> i + 1, everything else L + 1."""
        if name in ("encoder.cls_token", "encoder.pos_embed") or \
                name.startswith("encoder.patch_embed"):
            return 0
        if name.startswith("encoder.blocks."):
            return int(name.split(".")[2]) + 1
        return len(self.encoder.blocks) + 1

    def official_key_map(self, key):
        """Our parameter name for an official checkpoint key (any of the three namings),
        or None for keys to drop. See ``cae_official_key_map``."""
        return cae_official_key_map(key, keep_alignment_copy=self.alignment_encoder is not None)

    # ---------------------------------------------------------------- tokenizer
    def set_tokenizer(self, tokenizer):
        """Attach the frozen tokenizer used when a batch brings ``tokenizer_images`` instead
        of ``target_ids``. It is not a sub-layer: its weights are neither trained, counted
        nor saved with this model. Its vocabulary must be the decoder's class count."""
        vocab = getattr(tokenizer, "vocab_size", None)
        classes = self.decoder.head.weight.shape[-1]
        if vocab is not None and vocab != classes:
            raise ValueError(f"the tokenizer has a vocabulary of {vocab}, the model predicts "
                             f"{classes} classes (--decoder_num_classes)")
        if tokenizer is not None and isinstance(tokenizer, nn.Layer):
            tokenizer.eval()
            for p in tokenizer.parameters():
                p.stop_gradient = True
        # not through nn.Layer.__setattr__, which would register a Layer as a sub-layer (its
        # weights would then be saved, broadcast to every data-parallel rank and counted)
        object.__setattr__(self, "_tokenizer", tokenizer)

    @paddle.no_grad()
    def tokenize(self, tokenizer_images):
        """Token ids [B, h*w] of every patch; the tokenizer returns ids or logits [B, V, h, w]."""
        if self._tokenizer is None:
            raise ValueError("the batch has tokenizer_images but no tokenizer is attached: call "
                             "model.set_tokenizer(...) or pass target_ids")
        tok = self._tokenizer
        with fp32_region():  # the targets in float32 also under --amp, as the official code
            if tokenizer_images.dtype != paddle.float32:
                tokenizer_images = tokenizer_images.astype("float32")
            out = tok.get_codebook_indices(tokenizer_images) if hasattr(
                tok, "get_codebook_indices") else tok(tokenizer_images)
        if out.dtype in (paddle.float16, paddle.float32, paddle.float64, paddle.bfloat16):
            out = out.argmax(axis=1)  # logits [B, V, h, w] -> ids [B, h, w]
        return out.flatten(1).astype("int64")

    # --------------------------------------------------------------- forward
    def project_to_regresser(self, x):
        if self.encoder_to_regresser is None:
            return x
        return self.encoder_to_regresser_norm(self.encoder_to_regresser(x))

    def forward_encoder(self, images, ids_visible):
        x = self.encoder(images, ids_keep=ids_visible)  # [B, 1 + N - M, D]
        return self.project_to_regresser(x)  # [B, 1 + N - M, Dd]

    @paddle.no_grad()
    def forward_alignment_target(self, images, ids_masked):
        """The encoder (or its copy) on cls + the masked patches only; cls dropped."""
        encoder = self.alignment_encoder if self.alignment_encoder is not None else self.encoder
        target = encoder(images, ids_keep=ids_masked)[:, 1:]  # [B, M, D]
        target = self.project_to_regresser(target)  # [B, M, Dd]
        if self.alignment_encoder is not None and self.training:
            self.update_alignment_encoder()
        return target.detach()

    def update_alignment_encoder(self):
        ema_update_(self.alignment_encoder, self.encoder, self.alignment_momentum)

    def forward_regressor(self, x_visible, ids_visible, ids_masked):
        b = x_visible.shape[0]
        pos = self.rd_pos_embed.detach()[:, 1:]  # [1, N, Dd]
        pos_visible = gather_tokens(pos, ids_visible)  # [B, N - M, Dd]
        pos_masked = gather_tokens(pos, ids_masked)  # [B, M, Dd]
        queries = self.mask_token.expand([b, ids_masked.shape[1], -1])  # [B, M, Dd], no pos
        latent_pred = self.regresser(queries, x_visible, pos_masked, pos_visible)
        return latent_pred, pos_masked

    def forward_decoder(self, latent_pred, pos_masked):
        logits = self.decoder(latent_pred, pos_masked)  # [B, M, V]
        return logits.reshape([-1, logits.shape[-1]])  # [B*M, V] (sample, raster order)

    def forward_loss(self, logits, labels, latent_pred, latent_target):
        logits = logits.astype("float32")
        loss_main = F.cross_entropy(logits, labels)
        mse = F.mse_loss(latent_pred.astype("float32"), latent_target.astype("float32"))
        loss_align = self.align_loss_weight * mse
        with paddle.no_grad():
            mlm_acc = (logits.argmax(axis=-1) == labels).astype("float32").mean()
        return loss_main, loss_align, mlm_acc

    def encoder_state_dict(self):
        """The encoder alone, under the names a CAE classifier uses (``encoder.`` stripped)."""
        return {k[len("encoder."):]: v for k, v in self.state_dict().items()
                if k.startswith("encoder.")}

    def forward(self, images, bool_masked_pos=None, target_ids=None, tokenizer_images=None):
        """images [B, C, H, W] (normalised); bool_masked_pos [B, N] or [B, h, w] (True =
        masked, equal count M per sample); target_ids [B, N] or [B, h, w] int tokens of
        ALL patches, or tokenizer_images for the attached tokenizer.

        Returns {"loss", "loss_main", "loss_align", "mlm_acc", "logits" [B*M, V],
        "labels" [B*M], "latent_pred" [B, M, Dd], "latent_target" [B, M, Dd]}.
        """
        if isinstance(images, dict):  # a batch of the pretraining engine
            batch = images
            images = batch["images"]
            bool_masked_pos = batch.get("bool_masked_pos", bool_masked_pos)
            target_ids = batch.get("target_ids", target_ids)
            tokenizer_images = batch.get("tokenizer_images", tokenizer_images)
        if bool_masked_pos is None:
            raise ValueError("CAE forward needs bool_masked_pos (the block mask of each sample)")
        mask = bool_masked_pos.astype("bool")
        mask = mask.flatten(1) if mask.ndim > 2 else mask  # [B, N]
        if mask.shape[1] != self.num_patches:
            raise ValueError(f"bool_masked_pos has {mask.shape[1]} patches per sample, the "
                             f"model expects {self.num_patches}")
        if target_ids is None:
            if tokenizer_images is None:
                raise ValueError("CAE needs target_ids or tokenizer_images in the batch")
            target_ids = self.tokenize(tokenizer_images)
        target_ids = target_ids.flatten(1) if target_ids.ndim > 2 else target_ids  # [B, N]
        ids_visible, ids_masked = split_visible_masked(mask)

        x = self.forward_encoder(images, ids_visible)  # [B, 1 + N - M, Dd]
        latent_target = self.forward_alignment_target(images, ids_masked)  # [B, M, Dd]
        x_visible = x[:, 1:]  # cls output is not used
        latent_pred, pos_masked = self.forward_regressor(x_visible, ids_visible, ids_masked)
        logits = self.forward_decoder(latent_pred, pos_masked)  # [B*M, V]
        labels = paddle.take_along_axis(target_ids.astype("int64"), ids_masked, axis=1)
        labels = labels.flatten()  # [B*M]
        loss_main, loss_align, mlm_acc = self.forward_loss(logits, labels, latent_pred,
                                                           latent_target)
        return {"loss": loss_main + loss_align, "loss_main": loss_main,
                "loss_align": loss_align, "mlm_acc": mlm_acc, "logits": logits,
                "labels": labels, "latent_pred": latent_pred, "latent_target": latent_target}


# ------------------------------------------------------------------- checkpoint names
# (official prefix, our prefix); the first match wins, so longer prefixes come first
_RENAMES = (
    # lxtGH/CAE (2022)
    ("pretext_neck.regressor_blocks.", "regresser.regressor_blocks."),
    ("pretext_neck.decoder_blocks.", "decoder.decoder_blocks."),
    ("pretext_neck.norm2.", "decoder.norm."),
    ("pretext_neck.norm.", "regresser.norm."),
    ("pretext_neck.head.", "decoder.head."),
    # PASSL / PLSC (.pd)
    ("regressor_and_decoder.blocks.", "regresser.regressor_blocks."),
    ("regressor_and_decoder.self_att_blocks.", "decoder.decoder_blocks."),
    ("regressor_and_decoder.norm2.", "decoder.norm."),
    ("regressor_and_decoder.norm.", "regresser.norm."),
    ("regressor_and_decoder.head.", "decoder.head."),
    # both older namings
    ("encoder_to_decoder_norm.", "encoder_to_regresser_norm."),
    ("encoder_to_decoder.", "encoder_to_regresser."),
)
_PASSL_REGRESSOR_NORMS = {"norm1_q_cross": "norm1_q", "norm1_k_cross": "norm1_k",
                          "norm1_v_cross": "norm1_v"}
_TARGET_ENCODER_PREFIXES = ("alignment_encoder.", "teacher.", "teacher_network.")


def cae_official_key_map(key, keep_alignment_copy=False):
    """Map a CAE pretraining checkpoint key to our parameter name, or None to drop it.

    Reads the current Atten4Vis naming (``alignment_encoder.*`` = a copy of the encoder,
    dropped), the older lxtGH naming (``teacher.*`` dropped, ``pretext_neck.*``,
    ``encoder_to_decoder*``) and the PASSL naming (``teacher_network.*`` dropped,
    ``regressor_and_decoder.*``). With ``keep_alignment_copy`` (a model built with
    alignment='ema') the target-encoder keys are kept as ``alignment_encoder.*``.
    """
    if key.startswith("module."):
        key = key[len("module."):]
    for prefix in _TARGET_ENCODER_PREFIXES:
        if key.startswith(prefix):
            return "alignment_encoder." + key[len(prefix):] if keep_alignment_copy else None
    for old, new in _RENAMES:
        if key.startswith(old):
            passl = old.startswith("regressor_and_decoder.blocks.")
            key = new + key[len(old):]
            if passl:
                parts = key.split(".")
                parts[3] = _PASSL_REGRESSOR_NORMS.get(parts[3], parts[3])
                key = ".".join(parts)
            break
    return key


# ---------------------------------------------------------------------- constructors
# Defaults follow the official recipes (tools/run_pretraining.py defaults and
# scripts/cae_{base_800e,large_1600e}.sh): layer scale 0.1, regressor/decoder width 768 with
# 12 heads, 4 + 4 blocks. Large uses 1e-5 everywhere and a 1024-wide, 16-head regressor and
# decoder, as its script asks; the current Atten4Vis code silently ignores the script's
# --decoder_num_heads and --decoder_layer_scale_init_value (12 heads, 0.1), the lxtGH code
# honours them. Pass decoder_num_heads=12, decoder_layer_scale_init_value=0.1 to get the former.
_SIZES = {
    "tiny": dict(embed_dim=192, depth=12, num_heads=12, init_values=0.1),
    "small": dict(embed_dim=384, depth=12, num_heads=12, init_values=0.1),
    "base": dict(embed_dim=768, depth=12, num_heads=12, init_values=0.1),
    "large": dict(embed_dim=1024, depth=24, num_heads=16, init_values=1e-5,
                  decoder_embed_dim=1024, decoder_num_heads=16,
                  decoder_layer_scale_init_value=1e-5),
}


def _cae(size, **kwargs):
    cfg = dict(patch_size=16, mlp_ratio=4.0, qkv_bias=True, norm_layer=LN_EPS,
               decoder_embed_dim=768, regressor_depth=4, decoder_depth=4, decoder_num_heads=12,
               decoder_layer_scale_init_value=0.1, align_loss_weight=2.0)
    cfg.update(_SIZES[size])
    cfg.update(kwargs)
    return ContextAutoencoderViT(**cfg)


@register_model("pretrain", method="cae", classifier="cae_tiny_patch16_224")
def cae_tiny_patch16_224_8k_vocab(**kwargs):
    return _cae("tiny", **kwargs)


@register_model("pretrain", method="cae", classifier="cae_small_patch16_224")
def cae_small_patch16_224_8k_vocab(**kwargs):
    return _cae("small", **kwargs)


@register_model("pretrain", method="cae", classifier="cae_base_patch16_224")
def cae_base_patch16_224_8k_vocab(**kwargs):
    return _cae("base", **kwargs)


@register_model("pretrain", method="cae", classifier="cae_large_patch16_224")
def cae_large_patch16_224_8k_vocab(**kwargs):
    return _cae("large", **kwargs)
