"""Classification losses of the fine-tuning recipes (timm's definitions)."""
import paddle
import paddle.nn.functional as F


def label_smoothing_cross_entropy(logits, labels, smoothing=0.1):
    """(1 - s) * NLL + s * mean over classes of -log p; mean over the batch."""
    logp = F.log_softmax(logits.astype("float32"), axis=-1)
    nll = -paddle.take_along_axis(logp, labels.reshape([-1, 1]).astype("int64"), axis=-1)[:, 0]
    smooth = -logp.mean(axis=-1)
    return ((1.0 - smoothing) * nll + smoothing * smooth).mean()


def soft_target_cross_entropy(logits, soft_targets):
    """Cross-entropy against a distribution per sample (Mixup/CutMix targets)."""
    logp = F.log_softmax(logits.astype("float32"), axis=-1)
    return (-soft_targets * logp).sum(axis=-1).mean()
