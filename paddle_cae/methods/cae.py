"""CAE (Chen et al., 2023): block masks, a latent regressor and DALL-E tokenizer targets."""
from ..data.pipeline import FlipTwoViews, Pipeline, ToFloat
from ..data.transforms import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, _get, bool_mask
from ..runtime.config import Arg
from .base import Method, register_method


class CAEPipeline(Pipeline):
    """flip -> ONE crop box (scale 0.08-1) resized twice: ``input_size`` bicubic for the
    encoder (Normalize on the device) and ``second_input_size`` LANCZOS for the tokenizer
    (DALL-E's map_pixels 0.8 x + 0.1 on the device) -> uint8; + block (or random) mask:
    ``{"images", "tokenizer_images", "bool_masked_pos"}``."""

    def __init__(self, mask_generator, input_size=224, second_input_size=112, scale=(0.08, 1.0),
                 interpolation="bicubic", second_interpolation="lanczos",
                 mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD, color_jitter=0.0):
        if color_jitter and color_jitter > 0:
            raise NotImplementedError("--color_jitter > 0 is not supported (every CAE recipe uses 0)")
        # flip first, then crop: the official order
        self.views = FlipTwoViews(input_size, second_input_size, scale=scale, interpolation=interpolation,
                                  second_interpolation=second_interpolation)
        self.conversions = {"images": ToFloat.normalise(mean, std),
                            "tokenizer_images": ToFloat.map_pixels(0.1)}
        self.mask_generator = mask_generator

    def sample(self, source):
        view, tokenizer_view = self.views(source, self.resampler)
        return {"images": view,                                      # [3, S, S]
                "tokenizer_images": tokenizer_view,                  # [3, S2, S2]
                "bool_masked_pos": bool_mask(self.mask_generator)}  # [N] bool

    def __repr__(self):
        return (f"CAEPipeline({self.views!r}, {self.conversions!r}, mask={self.mask_generator!r}, "
                f"resampler {self.resampler!r})")


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
    # its own flags (the pretraining table adds them; their defaults are stated here only)
    flags = (
        Arg("model_type", "str", "cae", "model type (only 'cae'; 'caev2' is not implemented)",
            choices=("cae", "caev2")),
        Arg("discrete_vae_weight_path", "str", None, "folder with the DALL-E tokenizer weights "
            "(encoder.pkl or encoder_weight.pd)"),
        Arg("tokenizer_args", "dict", {}, "architecture of the tokenizer file when it cannot be read from the "
            "file itself, e.g. '{\"n_hid\": 256, \"vocab_size\": 8192}'"),
        Arg("discrete_vae_type", "str", "dall-e", "tokenizer type", choices=("dall-e",)),
        Arg("dvae_num_layers", "int", 3, "accepted for compatibility (unused by the DALL-E tokenizer)",
            minimum=1),
        Arg("regressor_depth", "int", 4, "blocks of the latent contextual regressor", minimum=0),
        Arg("decoder_depth", "int", 4, "self-attention blocks of the decoder", minimum=0,
            aliases=("num_decoder_self_attention",)),
        Arg("decoder_embed_dim", "int", 768, "width of the regressor and decoder", minimum=1),
        Arg("decoder_num_heads", "int", 12, "heads of the regressor and decoder", minimum=1),
        Arg("decoder_num_classes", "int", 8192, "decoder output classes (= tokenizer vocabulary)", minimum=1),
        Arg("decoder_layer_scale_init_value", "float", 0.1, "layer-scale init of regressor/decoder blocks",
            minimum=0.0),
        Arg("num_out_dim", "int", 512, "CAE v2 output width (unused by CAE)", minimum=1),
        Arg("align_loss_weight", "float", 2.0, "weight of the alignment loss", minimum=0.0,
            aliases=("dual_loss_weight",)),
        Arg("dual_loss_type", "str", "mse", "alignment loss (Paddle CAE)", choices=("mse",)),
        Arg("dual_path_ema", "float", 0.0, "momentum of the alignment target encoder (Paddle CAE); 0 = the "
            "current encoder without gradient", minimum=0.0, maximum=1.0),
        Arg("latent_alignment_loss_weight", "float", 0.0, "CAE v2 loss weight (unused by CAE)", minimum=0.0),
    )
    needs_tokenizer = True
    beit_eval_rules = True
    # the official optimiser asks the top-level model, which declares nothing: only 1-D tensors
    # and biases skip decay (cls and mask tokens decay)
    pretrain_asks_no_weight_decay = True
    pretrain_only_prefixes = ("decoder", "mask_token", "lm_head", "regresser.", "regressor",
                              "alignment_encoder.", "teacher", "rd_pos_embed", "encoder_to_",
                              "pretext_neck.")
    norm_seeds_fc_norm = True   # CAE starts fc_norm from the encoder's final LayerNorm

    def prepare_run(self, args):
        """The run's DALL-E tokenizer (:mod:`paddle_cae.loading.tokenizer`); its vocabulary is
        the class count unless the run set one."""
        from ..loading.tokenizer import load_tokenizer, vocabulary_as_class_count

        tokenizer, path = load_tokenizer(args)
        vocabulary_as_class_count(args, tokenizer, path)
        return tokenizer, path

    def attach(self, model, prepared):
        from ..loading.tokenizer import attach_tokenizer

        attach_tokenizer(model, *prepared)

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
        return CAEPipeline(mask_generator, input_size, second, scale,
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
