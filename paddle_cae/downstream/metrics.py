"""Segmentation metrics as mmseg reports them (``mean_iou``): areas summed over the whole
validation set, then per class IoU = intersection / union and accuracy = intersection / label
area; mIoU and mAcc average the classes that occur (a class with no pixel in the labels and none
predicted has no IoU and is left out), aAcc = correct pixels / labelled pixels. Pixels labelled
255 are ignored.
"""
import numpy as np

IGNORE_INDEX = 255


class SegmentationMeter:
    """Accumulates the per-class areas of (prediction, label) pairs."""

    def __init__(self, num_classes, ignore_index=IGNORE_INDEX):
        self.num_classes = int(num_classes)
        self.ignore_index = ignore_index
        self.reset()

    def reset(self):
        n = self.num_classes
        self.intersect = np.zeros(n, np.float64)
        self.area_pred = np.zeros(n, np.float64)
        self.area_label = np.zeros(n, np.float64)

    def update(self, pred, label):
        """``pred`` and ``label``: integer arrays of the same shape (class ids; label may hold the
        ignore value)."""
        pred = np.asarray(pred).reshape(-1)
        label = np.asarray(label).reshape(-1)
        if pred.shape != label.shape:
            raise ValueError(f"prediction has {pred.size} pixels, label {label.size}")
        keep = label != self.ignore_index
        pred, label = pred[keep], label[keep]
        n = self.num_classes
        hit = pred[pred == label]
        self.intersect += np.bincount(hit, minlength=n)[:n]
        self.area_pred += np.bincount(pred, minlength=n)[:n]
        self.area_label += np.bincount(label, minlength=n)[:n]

    def areas(self):
        """[3, classes] (intersection, prediction, label) for summing across processes."""
        return np.stack([self.intersect, self.area_pred, self.area_label])

    def add_areas(self, areas):
        areas = np.asarray(areas, np.float64)
        self.intersect += areas[0]
        self.area_pred += areas[1]
        self.area_label += areas[2]

    def summary(self):
        """{"mIoU", "mAcc", "aAcc"} in percent, plus per-class "IoU" and "Acc" lists (NaN where a
        class never occurs)."""
        union = self.area_pred + self.area_label - self.intersect
        with np.errstate(divide="ignore", invalid="ignore"):
            iou = np.where(union > 0, self.intersect / union, np.nan)
            acc = np.where(self.area_label > 0, self.intersect / self.area_label, np.nan)
        labelled = self.area_label.sum()
        return {
            "mIoU": float(np.nanmean(iou) * 100) if np.isfinite(iou).any() else float("nan"),
            "mAcc": float(np.nanmean(acc) * 100) if np.isfinite(acc).any() else float("nan"),
            "aAcc": float(self.intersect.sum() / labelled * 100) if labelled else float("nan"),
            "IoU": [float(v * 100) for v in iou],
            "Acc": [float(v * 100) for v in acc],
        }


__all__ = ["SegmentationMeter"]
