"""BootMAE (Dong et al., 2022): block masks with a fixed count, pixel and bootstrapped-feature
targets from a momentum teacher."""
import random

import numpy as np
import paddle

from ..data.masking import bootmae_shuffle_from_mask
from ..data.pipeline import CropFlip, Pipeline, ToFloat
from ..data.transforms import HALF_MEAN, HALF_STD, _get, bool_mask, numpy_rng, window_size_of
from ..optim.schedules import ema_decay_for_epoch, feature_weight_at
from ..runtime.config import Arg
from .base import PER_PATCH_NOTE, Method, register_method

MAX_ROLL = 3  # the official loop rolls each batch's order right by random.randint(0, 3)


def roll_for_batch(batch_seed):
    """The roll of one global batch, uniform in 0..MAX_ROLL, from its seed (Python's
    ``random`` when the seed is None)."""
    rng = random.Random(int(batch_seed)) if batch_seed is not None else random
    return rng.randint(0, MAX_ROLL)


class BootMAEPipeline(Pipeline):
    """RandomResizedCrop (scale 0.2-1, bicubic) -> flip -> uint8 -> Normalize(0.5, 0.5) on the
    device, a block mask (120 of 196, blocks <= 60) and the per-sample patch ``order`` of
    BootMAE's mask-to-index step before its roll (visible patches first, each group in random
    order, the last ``mask_num`` dropped): ``{"images", "bool_masked_pos", "order"}``. The
    method rolls the orders of one global batch alike (:meth:`BootMAEMethod.finish_batch`)."""

    def __init__(self, mask_generator, mask_num, input_size=224, scale=(0.2, 1.0),
                 interpolation="bicubic", mean=HALF_MEAN, std=HALF_STD):
        self.crop_flip = CropFlip(input_size, scale=scale, interpolation=interpolation)
        self.conversions = {"images": ToFloat.normalise(mean, std)}
        self.mask_generator = mask_generator
        self.mask_num = int(mask_num)

    def sample(self, source):
        # the official order: the mask and its order are drawn before the crop
        mask = bool_mask(self.mask_generator)
        side = int(round(np.sqrt(mask.size)))
        order, _ = bootmae_shuffle_from_mask(mask.reshape(side, side).astype(np.int64),
                                             self.mask_num, rng=numpy_rng(), roll=0)
        return {"images": self.crop_flip(source, self.resampler), "bool_masked_pos": mask, "order": order}

    def __repr__(self):
        return (f"BootMAEPipeline({self.crop_flip!r}, {self.conversions['images']!r}, "
                f"mask={self.mask_generator!r}, mask_num={self.mask_num}, resampler {self.resampler!r})")


@register_method
class BootMAEMethod(Method):
    name = "bootmae"
    # the classifier names of BootMAE's linear-probe script
    aliases = {"base_patch16_224": "bootmae_base_patch16_224",
               "large_patch16_224": "bootmae_large_patch16_224"}
    pretrain_defaults = dict(batch_size=128, epochs=800, save_ckpt_freq=20, min_lr=1e-5, warmup_epochs=5,
                             drop_path=0.0, opt_betas=[0.9, 0.95], crop_min_size=0.2,
                             imagenet_default_mean_and_std=False, layer_scale_init_value=0.0,
                             num_mask_patches=120, max_mask_patches_per_block=60)
    linprobe_defaults = dict(Method.linprobe_defaults, global_pool=True)
    model_flags = {"input_size": "img_size", "drop_path": "drop_path_rate", "mask_num": "mask_num",
                   "feature_weight": "feature_weight", "weight_mask": "weight_mask",
                   "epochs": "epochs", "model_ema_decay": "model_ema_decay",
                   "model_ema_dynamic": "model_ema_dynamic", "model_ema": "with_teacher"}
    # its own flags (the pretraining table adds them; their defaults are stated here only)
    flags = (
        Arg("model_ema", "bool", False, "keep a momentum (EMA) encoder as feature target"),
        Arg("model_ema_decay", "float", 0.999, "starting EMA decay, raised to 0.9999 over the first "
            "100 epochs", minimum=0.0, maximum=1.0),
        Arg("model_ema_dynamic", "bool", False, "further raise the EMA decay to 0.99999 over the "
            "first 400 epochs"),
        Arg("mask_num", "int", 147, "patches dropped from the encoder input", minimum=0),
        Arg("feature_weight", "float", 0.0, "weight of the feature-prediction loss", minimum=0.0),
        Arg("weight_mask", "bool", False, "larger loss weight at the centre of masked blocks"),
    )
    lr_scaled_by_batch = True      # BootMAE multiplies an absolute --lr by effective batch / 256
    beit_eval_rules = True
    pretrain_asks_no_weight_decay = True   # BEiT's create_optimizer: pos_embed, cls_token
    pretrain_only_prefixes = ("decoder", "mask_token", "decode_", "de_pos_embed", "down.", "down_1.",
                              "teacher", "encoder_to_")

    @property
    def title(self):
        return "BootMAE"

    def block_mask_generator(self, window, count, min_block, max_block):
        from ..data import masking

        return masking.bootmae_mask_generator(
            window, num_masking_patches=count, min_num_patches=min_block,
            max_num_patches=int(60 if max_block is None else max_block))

    def mask_num(self, args):
        """Patches the encoder drops per image: ``--mask_num``, else 3/4 of the grid (the
        model's default)."""
        value = _get(args, "mask_num", (_get(args, "model_args", {}) or {}).get("mask_num"))
        if value is not None:
            return int(value)
        height, width = window_size_of(args)
        return int(0.75 * height * width)

    def pretrain_transform(self, args, mask_generator=None):
        input_size, mean, std, mask_generator = self.pipeline_basics(args, mask_generator)
        scale = (float(_get(args, "crop_min_size", _get(args, "resize_scale", 0.2))),
                 float(_get(args, "crop_max_size", 1.0)))
        return BootMAEPipeline(mask_generator, self.mask_num(args), input_size, scale,
                               _get(args, "train_interpolation", "bicubic"), mean, std)

    def finish_batch(self, batch, batch_seed):
        """The official loop rolls the orders of a batch right by one draw in 0..3 (moving that
        many block-masked patches into the visible set): drawn here from ``batch_seed``, so
        every rank of one global batch rolls alike. ``order`` becomes the model's
        ``idx_shuffle``."""
        if "order" not in batch:
            return batch
        out = dict(batch)
        order = out.pop("order")
        shift = roll_for_batch(batch_seed)
        if isinstance(order, paddle.Tensor):
            out["idx_shuffle"] = paddle.roll(order, shift, axis=1)
        else:
            out["idx_shuffle"] = np.roll(np.asarray(order), shift, axis=1)
        return out

    def forward_kwargs(self, model, epoch):
        """The official loop sets the feature-loss weight per epoch (its ramp over ``epochs``)."""
        return {"feature_weight": feature_weight_at(epoch, model.epochs, model.feature_weight)}

    def teacher_momentum(self, model, epoch):
        """The teacher's EMA decay of ``epoch`` (the official schedule: constant, or rising
        with ``--model_ema_dynamic``); None without a teacher."""
        if not model.has_teacher:
            return None
        return ema_decay_for_epoch(epoch, dynamic=model.model_ema_dynamic, base_decay=model.model_ema_decay)

    def model_kwargs(self, args):
        kwargs = super().model_kwargs(args)
        kwargs.setdefault("mask_num", self.mask_num(args))  # the count its pipeline drops
        return kwargs

    def inference_kwargs(self, args):
        kwargs = super().inference_kwargs(args)
        if args.get("mask_num") is not None:
            kwargs.setdefault("mask_num", int(args["mask_num"]))
        kwargs["with_teacher"] = False
        return kwargs

    def classifier_kwargs(self, config, kwargs, merge):
        merge(kwargs, "init_scale", config.get("init_scale", 0.001), "--init_scale")

    def reconstruct(self, model, images, seed=0):
        from ..models.bootmae import masks_from_shuffle

        b, n = images.shape[0], model.num_patches
        rng = np.random.RandomState(seed)
        idx_shuffle = paddle.to_tensor(np.stack([rng.permutation(n) for _ in range(b)]).astype("int64"))
        pred_pixel, _ = model.forward_predictions(images, model.mask_num, idx_shuffle)
        masks = masks_from_shuffle(idx_shuffle, model.mask_num, model.grid_size, model.patch, False)
        mask = masks["loss_mask_pixel"].astype("float32").expand_as(images)
        # BootMAE normalises each patch and channel: undone with the true statistics
        recon = model.predicted_pixels(images, pred_pixel)
        return images * (1 - mask), recon, mask

    def reconstruction_note(self, model):
        return PER_PATCH_NOTE
