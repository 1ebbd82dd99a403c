"""The data side of the speed wing: the exact C resampler as a pipeline's crop + resize.

:func:`accelerate_dataset` gives every crop stage of a dataset's transform (a pretraining
:class:`paddle_cae.data.pipeline.Pipeline`, a fine-tuning ``Compose`` with a
``RandomResizedCrop``) the :class:`ExactResampler`: the same pixels as the reference
(Pillow's ``crop`` then ``resize``), computed by ``resample.c`` without the crop copy, the
mirrored image or the HWC -> CHW copy. What the C code cannot do (no compiler, a failed
self-check against Pillow, ``PADDLE_CAE_FAST_RESIZE=0``, a filter or image mode it does not
have) falls back to Pillow: a missing library is logged once, when the dataset is
accelerated (before DataLoader workers fork, so they inherit the built library).
"""
import numpy as np
from PIL import Image

from . import resample
from ..data.pipeline import PillowResampler, use_resampler


class ExactResampler(PillowResampler):
    """Pillow's crop + resize computed by ``resample.c`` (:func:`resample.crop_resize`,
    :func:`resample.resize_box`); Pillow where the C code returns None."""

    name = "exact C resampler"

    def __call__(self, img, box, size, filter_, mirror_src=False, mirror_out=False, span=None):
        if span is None:
            out = resample.crop_resize(img, box, size, filter_, mirror_src, mirror_out)
        else:
            out = resample.resize_box(img, span, size, filter_, mirror_src, mirror_out)
        if out is None:
            return super().__call__(img, box, size, filter_, mirror_src, mirror_out, span=span)
        return out

    def image(self, img, box, size, filter_):
        if img.mode == "RGB":
            chw = resample.crop_resize(img, box, size, filter_)
            if chw is not None:
                return Image.fromarray(np.ascontiguousarray(chw.transpose(1, 2, 0)), "RGB")
        return super().image(img, box, size, filter_)


def accelerate_dataset(dataset):
    """Give the crop stages of ``dataset.transform`` the exact C resampler where it is
    available (built or loaded here); otherwise they keep Pillow's, and why is logged once.
    Returns ``dataset``."""
    transform = getattr(dataset, "transform", None)
    if transform is None:
        return dataset
    if resample.library() is None:  # the resampler module logs why, once per process
        return dataset
    use_resampler(transform, ExactResampler())
    return dataset


__all__ = ["ExactResampler", "accelerate_dataset"]
