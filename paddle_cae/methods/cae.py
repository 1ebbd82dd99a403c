"""CAE (Chen et al., 2023): block masks, a latent regressor and DALL-E tokenizer targets."""
from ..data.transforms import CAEPretrainTransform, _get
from .base import Method, register_method


@register_method
class CAEMethod(Method):
    name = "cae"
    pretrain_defaults = dict(batch_size=64, epochs=300, save_ckpt_freq=50, min_lr=1e-5, warmup_epochs=5,
                             drop_path=0.0, opt_betas=[0.9, 0.999], crop_min_size=0.08,
                             imagenet_default_mean_and_std=False, layer_scale_init_value=0.1,
                             num_mask_patches=98)
    finetune_defaults = dict(Method.finetune_defaults, rel_pos_bias=True,
                             imagenet_default_mean_and_std=True)
    linprobe_defaults = dict(Method.linprobe_defaults, imagenet_default_mean_and_std=True)
    model_flags = {"input_size": "img_size", "drop_path": "drop_path_rate",
                   "layer_scale_init_value": "init_values", "regressor_depth": "regressor_depth",
                   "decoder_depth": "decoder_depth", "decoder_embed_dim": "decoder_embed_dim",
                   "decoder_num_heads": "decoder_num_heads", "decoder_num_classes": "vocab_size",
                   "decoder_layer_scale_init_value": "decoder_layer_scale_init_value",
                   "align_loss_weight": "align_loss_weight", "fix_init_weight": "fix_init_weight"}
    needs_tokenizer = True
    default_mask_patches = 98
    beit_eval_rules = True
    # the official optimiser asks the top-level model, which declares nothing: only 1-D tensors
    # and biases skip decay (cls and mask tokens decay)
    pretrain_asks_no_weight_decay = True
    pretrain_only_prefixes = ("decoder", "mask_token", "lm_head", "regresser.", "regressor",
                              "alignment_encoder.", "teacher", "rd_pos_embed", "encoder_to_",
                              "pretext_neck.")
    norm_seeds_fc_norm = True   # CAE starts fc_norm from the encoder's final LayerNorm

    def model_kwargs(self, args):
        kwargs = super().model_kwargs(args)
        if getattr(args, "dual_path_ema", 0):
            extra = dict(alignment="ema", alignment_momentum=float(args.dual_path_ema))
            kwargs = {**extra, **kwargs}
        return kwargs

    def pretrain_transform(self, args, mask_generator=None):
        input_size, mean, std, mask_generator = self.pipeline_basics(args, mask_generator)
        second = int(_get(args, "second_input_size", input_size // 2))
        scale = (float(_get(args, "crop_min_size", 0.08)), float(_get(args, "crop_max_size", 1.0)))
        return CAEPretrainTransform(mask_generator, input_size, second, scale,
                                    _get(args, "train_interpolation", "bicubic"),
                                    _get(args, "second_interpolation", "lanczos"), mean, std,
                                    color_jitter=float(_get(args, "color_jitter", 0.0)))

    def classifier_kwargs(self, config, kwargs, merge):
        merge(kwargs, "use_rel_pos_bias", bool(config.get("rel_pos_bias", True)),
              "--rel_pos_bias / --disable_rel_pos_bias (its method default when not given)")
        merge(kwargs, "pos_embed_type", "sincos" if config.get("sin_pos_emb", True) else "none",
              "--sin_pos_emb")
        if config.get("layer_scale_init_value") is not None:
            merge(kwargs, "init_values", config["layer_scale_init_value"] or None,
                  "--layer_scale_init_value")
        merge(kwargs, "init_scale", config.get("init_scale", 0.001), "--init_scale")
