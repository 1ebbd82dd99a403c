"""The frozen tokenizer of a pretraining run (CAE's DALL-E encoder): finding its file, reading
it, and its vocabulary as the run's default class count.

``--discrete_vae_weight_path`` may be a file or a folder holding ``encoder.pkl`` (the official
release) or a converted ``.pd``; a relative path that does not exist from the working
directory is also looked up from the repository root (the demo configs). Reading (and the
``.pkl`` -> ``.pd`` conversion cache) is :func:`paddle_cae.models.dalle.load_dalle_encoder`;
the architecture comes from ``--tokenizer_args`` or, for a converted file, from its shapes.
"""
import logging
import os
from pathlib import Path

from ..runtime.config import default_config_dir

logger = logging.getLogger("paddle_cae")

FILE_NAMES = ("encoder.pd", "encoder_weight.pd", "encoder.pkl", "encoder.pth", "encoder.npz")


def find_tokenizer_file(path):
    """The tokenizer weights file ``--discrete_vae_weight_path`` names (a file, or a folder
    holding one of :data:`FILE_NAMES`)."""
    if not os.path.exists(path) and not os.path.isabs(path):
        from_root = os.path.join(os.path.dirname(default_config_dir()), path)
        if os.path.exists(from_root):
            path = from_root
    if os.path.isfile(path):
        return path
    if os.path.isdir(path):
        for name in FILE_NAMES:
            candidate = os.path.join(path, name)
            if os.path.isfile(candidate):
                return candidate
        raise FileNotFoundError(
            f"--discrete_vae_weight_path {path}: no encoder.pkl (the DALL-E release) or "
            "encoder.pd in this folder")
    raise FileNotFoundError(f"--discrete_vae_weight_path {path} does not exist")


def load_tokenizer(args):
    """(tokenizer, path): the DALL-E encoder ``args`` name, its weights loaded and checked."""
    from ..models.dalle import _read_state, infer_dalle_arch, load_dalle_encoder

    if not getattr(args, "discrete_vae_weight_path", None):
        raise ValueError("CAE needs the DALL-E tokenizer: pass --discrete_vae_weight_path "
                         "(a folder with encoder.pkl, or a tokenizer .pd file)")
    path = find_tokenizer_file(args.discrete_vae_weight_path)
    arch = dict(getattr(args, "tokenizer_args", None) or {})
    if not arch and not path.endswith(".pkl"):
        arch = infer_dalle_arch(_read_state(Path(path))) or {}
    return load_dalle_encoder(path, **arch), path


def class_count_given(args):
    """Whether the run chose ``--decoder_num_classes`` (flag or config file, as the parsed
    arguments record, or ``vocab_size`` in ``--model_args``)."""
    return "decoder_num_classes" in (getattr(args, "given_keys", None) or ()) or \
        "vocab_size" in (getattr(args, "model_args", None) or {})


def vocabulary_as_class_count(args, tokenizer, path):
    """Unless the run set it, ``--decoder_num_classes`` becomes the tokenizer's vocabulary."""
    vocab = getattr(tokenizer, "vocab_size", None)
    if vocab is None or class_count_given(args) or args.decoder_num_classes == vocab:
        return args.decoder_num_classes
    logger.info("--decoder_num_classes %d: the vocabulary of the tokenizer %s (default %d)", vocab,
                path, args.decoder_num_classes)
    args.decoder_num_classes = int(vocab)
    return args.decoder_num_classes


def attach_tokenizer(model, tokenizer, path):
    """Give ``model`` its tokenizer (a mismatch names the file)."""
    try:
        model.set_tokenizer(tokenizer)
    except ValueError as err:
        raise ValueError(f"tokenizer {path}: {err}") from None
    logger.info("tokenizer: DALL-E encoder from %s", path)
    return tokenizer


__all__ = ["attach_tokenizer", "class_count_given", "find_tokenizer_file", "load_tokenizer",
           "vocabulary_as_class_count"]
