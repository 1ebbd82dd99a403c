"""Everything ``main_pretrain.py`` does, importable (notebooks call :func:`main` too)."""
import argparse
import logging
import os
import sys
from pathlib import Path

import paddle

from ..data.datasets import build_dataset, default_data_path
from ..engine.pretrain import NonFiniteLossError, PretrainRun, describe_start, write_config_snapshot
from ..fast import accelerate, accelerate_optimizer
from ..fast.data import accelerate_dataset
from ..methods import get_method, method_for
from ..models import create_model
from ..optim import build_optimizer, param_groups
from ..runtime.amp import Precision, amp_dtype_from_args
from ..runtime.config import flag_value, given_flags
from ..runtime.logging import resolve_log_dir
from ..runtime.pretrain_args import (PRETRAIN_TABLE, absolute_lr, default_config_dir,
                                     effective_batch_size, parse_pretrain_args)
from ..startup import report_error
from .start import start_process

logger = logging.getLogger("paddle_cae")

def model_kwargs(args):
    """Constructor arguments of the pretraining model: the method's flag mapping, then
    --model_args."""
    return get_method(args.method).model_kwargs(args)


def build_model(args):
    kwargs = model_kwargs(args)
    with paddle.utils.unique_name.guard():
        model = create_model(args.model, **kwargs)
    return model


def find_tokenizer_file(path):
    """``--discrete_vae_weight_path`` may be a file or a folder holding encoder.pkl (the
    official release) or a converted .pd. A relative path that does not exist from the
    working directory is also looked up from the repository root (the demo configs)."""
    if not os.path.exists(path) and not os.path.isabs(path):
        from_root = os.path.join(os.path.dirname(default_config_dir()), path)
        if os.path.exists(from_root):
            path = from_root
    if os.path.isfile(path):
        return path
    if os.path.isdir(path):
        for name in ("encoder.pd", "encoder_weight.pd", "encoder.pkl", "encoder.pth",
                     "encoder.npz"):
            candidate = os.path.join(path, name)
            if os.path.isfile(candidate):
                return candidate
        raise FileNotFoundError(
            f"--discrete_vae_weight_path {path}: no encoder.pkl (the DALL-E release) or "
            "encoder.pd in this folder")
    raise FileNotFoundError(f"--discrete_vae_weight_path {path} does not exist")


def load_tokenizer(args):
    """The DALL-E tokenizer of a run whose method needs one (None otherwise): (tokenizer, path)."""
    if not getattr(args, "method", None) or not get_method(args.method).needs_tokenizer:
        return None, None
    from ..models.dalle import infer_dalle_arch, load_dalle_encoder, _read_state

    if not args.discrete_vae_weight_path:
        raise ValueError("CAE needs the DALL-E tokenizer: pass --discrete_vae_weight_path "
                         "(a folder with encoder.pkl, or a tokenizer .pd file)")
    path = find_tokenizer_file(args.discrete_vae_weight_path)
    arch = dict(getattr(args, "tokenizer_args", None) or {})
    if not arch and not path.endswith(".pkl"):
        arch = infer_dalle_arch(_read_state(Path(path))) or {}
    return load_dalle_encoder(path, **arch), path


def decoder_classes_given(argv, args):
    """Whether the user chose --decoder_num_classes (flag, config file, or model_args)."""
    flags = {a.split("=")[0] for a in (argv or []) if a.startswith("--")}
    if "--decoder_num_classes" in flags or "vocab_size" in (getattr(args, "model_args", None) or {}):
        return True
    if getattr(args, "config", None):
        from ..runtime.config import load_config

        try:
            return "decoder_num_classes" in load_config(args.config, PRETRAIN_TABLE)
        except (OSError, ValueError):
            return False
    return False


def vocabulary_from_tokenizer(args, tokenizer, path, given):
    """Unless the user set it, --decoder_num_classes becomes the tokenizer's vocabulary."""
    vocab = getattr(tokenizer, "vocab_size", None)
    if tokenizer is None or vocab is None or given or args.decoder_num_classes == vocab:
        return args.decoder_num_classes
    logger.info("--decoder_num_classes %d: the vocabulary of the tokenizer %s (default %d)", vocab,
                path, args.decoder_num_classes)
    args.decoder_num_classes = int(vocab)
    return args.decoder_num_classes


def attach_tokenizer(model, args, loaded=None):
    """Give the model of a method that needs one its tokenizer (``loaded``: a
    :func:`load_tokenizer` result already at hand)."""
    if not get_method(args.method).needs_tokenizer:
        return None
    tokenizer, path = loaded if loaded is not None else load_tokenizer(args)
    try:
        model.set_tokenizer(tokenizer)
    except ValueError as err:
        raise ValueError(f"tokenizer {path}: {err}") from None
    logger.info("tokenizer: DALL-E encoder from %s", path)
    return tokenizer


def prepare_args(args, env):
    args.data_path = args.data_path or default_data_path()
    method = get_method(args.method)
    args.lr_schedule = getattr(args, "lr_schedule", None) or method.pretrain_lr_schedule
    args.abs_lr = absolute_lr(args, env.world_size)
    args.lr_rule = method.lr_rule(args.lr, args.blr, effective_batch_size(args, env.world_size))
    args.log_dir = resolve_log_dir(args.output_dir, args.log_dir)
    warn_peak_below_min_lr(args)
    return args


def warn_peak_below_min_lr(args):
    """BootMAE multiplies --lr by effective batch / 256: a small batch can put the peak below
    --min_lr, and the cosine schedule then rises towards min_lr instead of decaying."""
    if args.abs_lr < args.min_lr:
        logger.warning("peak learning rate %.3e (%s) is below --min_lr %g: the schedule would rise "
                       "from the peak to min_lr instead of decaying; lower --min_lr or raise --lr",
                       args.abs_lr, args.lr_rule, args.min_lr)
        return True
    return False


def demo_argv(argv):
    """Without --config and --data_path the run is the CPU-sized demo on the bundled digits:
    the demo config of the method of --model (MAE by default) is put in front."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if given_flags(argv) & {"--config", "-c", "--data_path", "-h", "--help"}:
        return argv, None
    method = method_for(flag_value(argv, "model", PRETRAIN_TABLE.by_name["model"].default))
    config = os.path.join(default_config_dir(), "demo", f"{method.name}.yaml")
    return ["--config", config] + argv, config


def model_label(name, model_args):
    """``name``, or ``name`` marked as a variant when ``model_args`` change its constructor
    (the demo's 2-block width-64 network is not the model the name describes)."""
    if not model_args:
        return name
    shown = ", ".join(f"{k}={v}" for k, v in model_args.items())
    return f"{name}, small variant ({shown})"


def describe_run(args, env, model, dataset, runner):
    """The start-up summary (:func:`describe_start`), the model named as the variant it is
    when --model_args change it."""
    label = model_label(args.model, args.model_args)
    if args.model_args and demo_config_used(args):
        label = label.replace("small variant", "the demo's small variant", 1)
    shown = argparse.Namespace(**{**vars(args), "model": label})
    describe_start(shown, env, model, dataset, runner)


def demo_config_used(args):
    config = getattr(args, "config", None)
    return bool(config) and os.path.abspath(os.path.dirname(config)) == \
        os.path.abspath(os.path.join(default_config_dir(), "demo"))


def run(argv=None):
    env, argv, args = start_process(argv, demo_argv, parse_pretrain_args, prepare_args)
    loaded = load_tokenizer(args)
    if loaded[0] is not None:
        vocabulary_from_tokenizer(args, *loaded, given=decoder_classes_given(argv, args))
        paddle.seed(args.seed)  # the model starts from the same draws as without a tokenizer
    model = build_model(args)
    attach_tokenizer(model, args, loaded if loaded[0] is not None else None)
    accelerate(model)  # (with its tokenizer)
    method = get_method(args.method)
    # the masks are laid out on the built model's patch grid
    transform = method.pretrain_transform(
        argparse.Namespace(**{**vars(args), "patch_size": model.input_patch_size()}))
    dataset = accelerate_dataset(build_dataset("train", args.data_path, transform, options=args))
    options = method.group_options("pretrain", model)
    groups = param_groups(model, args.weight_decay, **options)
    optimizer = build_optimizer(getattr(args, "opt", "adamw"), groups, lr=args.abs_lr,
                                betas=tuple(args.opt_betas), eps=args.opt_eps,
                                weight_decay=args.weight_decay)
    accelerate_optimizer(optimizer)
    precision = Precision(amp_dtype_from_args(args))
    runner = PretrainRun(args, model, dataset, optimizer, precision, env)
    if env.is_main:
        write_config_snapshot(args, args.output_dir)
    describe_run(args, env, model, dataset, runner)
    runner.fit()
    return runner


def main(argv=None):
    try:
        run(argv)
    except NonFiniteLossError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except (FileNotFoundError, ValueError, KeyError) as err:
        return report_error(err, details=True)
    return 0


__all__ = ["main", "run", "build_model", "model_kwargs"]
