"""MAE (He et al., 2022): the model masks a random subset itself; pixel targets."""
import numpy as np

from ..data.pipeline import CropFlip, Pipeline, ToFloat
from ..data.transforms import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, _get, numpy_rng, window_size_of
from ..runtime.config import Arg
from .base import PER_PATCH_NOTE, Method, register_method


class MAEPipeline(Pipeline):
    """RandomResizedCrop (scale 0.2-1, bicubic) -> flip -> uint8 -> ImageNet Normalize on the
    device: ``{"images"}``. With ``num_patches`` each sample also carries ``noise`` [N] ~
    U[0, 1): the draw MAE's random_masking sorts to pick the kept patches, made here per
    sample so the masks do not depend on batch size or the number of processes."""

    def __init__(self, input_size=224, scale=(0.2, 1.0), interpolation="bicubic",
                 mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD, num_patches=None):
        self.crop_flip = CropFlip(input_size, scale=scale, interpolation=interpolation)
        self.conversions = {"images": ToFloat.normalise(mean, std)}
        self.num_patches = num_patches

    def sample(self, source):
        sample = {"images": self.crop_flip(source, self.resampler)}
        if self.num_patches:
            sample["noise"] = numpy_rng().random_sample(self.num_patches).astype(np.float32)
        return sample

    def __repr__(self):
        return f"MAEPipeline({self.crop_flip!r}, {self.conversions['images']!r}, resampler {self.resampler!r})"


@register_method
class MAEMethod(Method):
    name = "mae"
    pretrain_defaults = dict(batch_size=64, epochs=400, save_ckpt_freq=20, min_lr=0.0, warmup_epochs=40,
                             drop_path=0.0, opt_betas=[0.9, 0.95], crop_min_size=0.2,
                             imagenet_default_mean_and_std=True, layer_scale_init_value=0.0)
    finetune_defaults = dict(Method.finetune_defaults, epochs=50, lr_schedule="mae",
                             imagenet_default_mean_and_std=True)
    linprobe_defaults = dict(Method.linprobe_defaults, imagenet_default_mean_and_std=True)
    model_flags = {"input_size": "img_size", "norm_pix_loss": "norm_pix_loss", "mask_ratio": "mask_ratio"}
    # its own flags (the pretraining table adds them; their defaults are stated here only)
    flags = (
        Arg("norm_pix_loss", "bool", False, "per-patch normalised pixels as targets"),
        Arg("mask_ratio", "float", 0.75, "fraction of patches removed", minimum=0.0, maximum=1.0),
    )
    imagenet_stats_only = True   # MAE's pipeline has no mean/std switch
    masks_in_model = True        # the model masks a random subset, from per-sample noise
    pretrain_lr_schedule = "mae"
    group_rule = "mae"
    pretrain_asks_no_weight_decay = False   # timm's add_weight_decay: only 1-D tensors and biases
    pretrain_only_prefixes = ("decoder", "mask_token")

    def pretrain_transform(self, args, mask_generator=None):
        scale = (float(_get(args, "crop_min_size", 0.2)), float(_get(args, "crop_max_size", 1.0)))
        grid = window_size_of(args)
        return MAEPipeline(int(_get(args, "input_size", 224)), scale=scale,
                           interpolation=_get(args, "train_interpolation", "bicubic"),
                           num_patches=grid[0] * grid[1])

    def inference_kwargs(self, args):
        kwargs = super().inference_kwargs(args)
        if args.get("norm_pix_loss") is not None:
            kwargs.setdefault("norm_pix_loss", bool(args["norm_pix_loss"]))
        return kwargs

    def classifier_kwargs(self, config, kwargs, merge):
        if config.get("head_init_std") is not None:
            kwargs.setdefault("head_init_std", config["head_init_std"])

    def head_init_std(self, args, probe):
        # MAE's main_finetune re-draws the head at std 2e-5 only after loading --finetune
        # weights; from scratch its head keeps timm's std 0.02
        if probe is not None:
            return None
        return 2e-5 if getattr(args, "finetune", "") else 0.02

    def reconstruct(self, model, images, seed=0):
        out = model(images)
        # with norm_pix_loss the per-patch statistics of the TRUE image, as MAE's demo does (the
        # picture therefore borrows statistics of the hidden patches)
        recon = model.predicted_pixels(images, out["pred"])
        p = model.patch_size
        mask = model.unpatchify(out["mask"].unsqueeze(-1).expand([-1, -1, p * p * 3]))
        return images * (1 - mask), recon, mask

    def reconstruction_note(self, model):
        return PER_PATCH_NOTE if getattr(model, "norm_pix_loss", False) else ""
