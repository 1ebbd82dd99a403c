"""What the engine may ask of a model: explicit base classes whose hooks do nothing unless a
model overrides them, so the training loops call them unconditionally (no ``hasattr`` probes).

PretrainingModel
    ``forward(batch)`` returns ``{"loss": total, "<part>": value, ...}`` (DESIGN.md);
    ``input_keys``: the batch entries it takes (the engine hands over these). Hooks:
    ``set_tokenizer`` (models whose targets come from a frozen tokenizer: the method's
    ``needs_tokenizer``),
    ``extra_state()`` / ``load_extra_state(state)`` (what a training checkpoint carries beside the
    trainable weights), ``reconstruction_image(batch, outputs)`` (a picture for the logs, or None),
    ``predicted_pixels(images, prediction)`` (a pixel prediction back in the input's normalised
    space, for reconstructions),
    ``encoder_state_dict()`` (the weights a classifier is fine-tuned from),
    ``input_patch_size()`` (the patch side the data pipeline's masks are laid out on),
    ``unused_parameter_names()`` (trainable parameters the current flags leave out of the loss:
    data-parallel training freezes them), ``stale_checkpoint_prefixes`` (keys older checkpoints
    hold that are no longer part of the model) and ``no_weight_decay()``.

Classifier
    ``trainable_prefixes()``: the parameters a run trains (None: all; a linear or attentive
    probe: its head), ``unused_parameter_names()``, ``no_weight_decay()``.
"""
import paddle.nn as nn


class _Model(nn.Layer):
    """The hooks both kinds of model answer."""

    stale_checkpoint_prefixes = ()

    def unused_parameter_names(self):
        return []

    def no_weight_decay(self):
        return set()


class PretrainingModel(_Model):

    input_keys = ("images",)   # the batch entries forward takes

    def set_tokenizer(self, tokenizer):
        raise TypeError(f"{type(self).__name__} takes no tokenizer")

    def extra_state(self):
        return {}

    def load_extra_state(self, state):
        pass

    def reconstruction_image(self, batch, outputs):
        return None

    def predicted_pixels(self, images, prediction):
        raise NotImplementedError(f"{type(self).__name__} does not predict pixels")

    def encoder_state_dict(self):
        raise NotImplementedError(f"{type(self).__name__} does not export an encoder")

    def input_patch_size(self):
        """Side of the square patches the model cuts its input into (its first patch
        embedding, which every pretraining model of this package has)."""
        from .layers import PatchEmbed

        for layer in self.sublayers(include_self=True):
            if isinstance(layer, PatchEmbed):
                return int(layer.patch_size[0])
        raise NotImplementedError(f"{type(self).__name__} has no patch embedding: override "
                                  "input_patch_size()")


class Classifier(_Model):
    def trainable_prefixes(self):
        """Name prefixes of the parameters a run trains; None trains every parameter."""
        return None
