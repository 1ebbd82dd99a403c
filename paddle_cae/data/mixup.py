"""Mixup / CutMix with label smoothing, batch mode (one lambda per batch), as the fine-tune recipes use
them (MAE, CAE, BootMAE: mixup alpha 0.8, cutmix alpha 1.0, prob 1.0, switch 0.5, smoothing 0.1).

Each sample is mixed with the batch reversed (sample i with sample B-1-i). The targets become soft
labels ``lam * onehot(y) + (1 - lam) * onehot(y_reversed)`` with the smoothing folded in, to be used
with a soft-target cross entropy.
"""
import math

import numpy as np
import paddle


def one_hot_smoothed(target, num_classes, smoothing=0.0):
    """int labels [B] -> float32 [B, num_classes] with ``smoothing`` spread over all classes."""
    off = smoothing / num_classes
    on = 1.0 - smoothing + off
    target = paddle.to_tensor(target).astype("int64").reshape([-1])
    hot = paddle.nn.functional.one_hot(target, num_classes).astype("float32")  # [B, C]
    return hot * (on - off) + off


def mixup_target(target, num_classes, lam=1.0, smoothing=0.0):
    y1 = one_hot_smoothed(target, num_classes, smoothing)
    y2 = paddle.flip(y1, axis=[0])
    return y1 * lam + y2 * (1.0 - lam)


def cutmix_box(height, width, lam, rng):
    """Box covering about (1 - lam) of the image, centre uniform over the image, clipped at the
    border. Returns (top, bottom, left, right) and the lambda of the area actually kept."""
    cut_ratio = math.sqrt(1.0 - lam)
    cut_h, cut_w = int(height * cut_ratio), int(width * cut_ratio)
    cy, cx = int(rng.randint(0, height)), int(rng.randint(0, width))
    top, bottom = np.clip(cy - cut_h // 2, 0, height), np.clip(cy + cut_h // 2, 0, height)
    left, right = np.clip(cx - cut_w // 2, 0, width), np.clip(cx + cut_w // 2, 0, width)
    kept = 1.0 - float((bottom - top) * (right - left)) / float(height * width)
    return (int(top), int(bottom), int(left), int(right)), kept


class Mixup:
    """``mixup(images [B, C, H, W], labels [B]) -> (mixed images, soft targets [B, num_classes])``.

    With probability ``prob`` the batch is mixed: CutMix with probability ``switch_prob`` when both
    alphas are positive (else whichever is enabled), lambda ~ Beta(alpha, alpha). CutMix's lambda
    is corrected to the pasted area. ``rng``: a numpy RandomState/Generator-like object with
    ``rand``, ``beta`` and ``randint`` (default: numpy's global state)."""

    def __init__(self, mixup_alpha=0.8, cutmix_alpha=1.0, prob=1.0, switch_prob=0.5,
                 label_smoothing=0.1, num_classes=1000, mode="batch", rng=None):
        if mode != "batch":
            raise NotImplementedError(f"mixup mode '{mode}': only 'batch' is implemented")
        if mixup_alpha < 0 or cutmix_alpha < 0:
            raise ValueError("mixup_alpha and cutmix_alpha must be >= 0")
        self.mixup_alpha = mixup_alpha
        self.cutmix_alpha = cutmix_alpha
        self.prob = prob
        self.switch_prob = switch_prob
        self.label_smoothing = label_smoothing
        self.num_classes = num_classes
        self.rng = rng

    @property
    def enabled(self):
        return self.prob > 0 and (self.mixup_alpha > 0 or self.cutmix_alpha > 0)

    def _params(self, rng):
        """(lam, use_cutmix) for one batch."""
        if not self.enabled or rng.rand() >= self.prob:
            return 1.0, False
        if self.mixup_alpha > 0 and self.cutmix_alpha > 0:
            use_cutmix = bool(rng.rand() < self.switch_prob)
        else:
            use_cutmix = self.cutmix_alpha > 0
        alpha = self.cutmix_alpha if use_cutmix else self.mixup_alpha
        return float(rng.beta(alpha, alpha)), use_cutmix

    def __call__(self, images, labels):
        rng = self.rng if self.rng is not None else np.random.mtrand._rand
        lam, use_cutmix = self._params(rng)
        if lam < 1.0:
            reversed_images = paddle.flip(images, axis=[0])
            if use_cutmix:
                height, width = images.shape[-2:]
                (top, bottom, left, right), lam = cutmix_box(height, width, lam, rng)
                if bottom > top and right > left:
                    images = images.clone()
                    images[:, :, top:bottom, left:right] = reversed_images[:, :, top:bottom, left:right]
            else:
                images = images * lam + reversed_images * (1.0 - lam)
        targets = mixup_target(labels, self.num_classes, lam, self.label_smoothing)
        return images, targets

    def __repr__(self):
        return (f"Mixup(mixup_alpha={self.mixup_alpha}, cutmix_alpha={self.cutmix_alpha}, prob={self.prob}, "
                f"switch_prob={self.switch_prob}, label_smoothing={self.label_smoothing}, "
                f"num_classes={self.num_classes})")
