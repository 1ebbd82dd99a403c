"""Everything ``main_pretrain.py`` does, importable (notebooks call :func:`main` too)."""
import argparse
import logging
import os
import sys

import paddle

from ..data.datasets import build_dataset, default_data_path
from ..engine.pretrain import NonFiniteLossError, PretrainRun, describe_start, write_config_snapshot
from ..fast import accelerate, accelerate_optimizer
from ..fast.data import accelerate_dataset
from ..methods import get_method, method_for
from ..models import create_model
from ..optim import build_optimizer, param_groups
from ..runtime.amp import Precision, amp_dtype_from_args
from ..runtime.config import default_config_dir, flag_value, given_flags
from ..runtime.logging import resolve_log_dir
from ..resources import with_config_found
from ..startup import report_error
from .pretrain_args import (PRETRAIN_DEFAULT_MODEL, absolute_lr, effective_batch_size,
                            parse_pretrain_args)
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
    argv = with_config_found(sys.argv[1:] if argv is None else argv, "pretrain")
    if given_flags(argv) & {"--config", "-c", "--data_path", "-h", "--help"}:
        return argv, None
    method = method_for(flag_value(argv, "model", PRETRAIN_DEFAULT_MODEL))
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


def build_pretrain_dataset(args, method, patch_size):
    """The training set of a pretraining run: the method's pipeline with its masks laid out on
    the model's patch grid (``patch_size``), over ``args.data_path``/train, the exact resampler
    swapped in."""
    transform = method.pretrain_transform(argparse.Namespace(**{**vars(args), "patch_size": patch_size}))
    return accelerate_dataset(build_dataset("train", args.data_path, transform, options=args))


def run(argv=None):
    env, argv, args = start_process(argv, demo_argv, parse_pretrain_args, prepare_args)
    method = get_method(args.method)
    prepared = method.prepare_run(args)  # CAE: its tokenizer
    if prepared is not None:
        paddle.seed(args.seed)  # the model starts from the same draws as without a tokenizer
    model = build_model(args)
    method.attach(model, prepared)
    accelerate(model)  # (with its tokenizer)
    dataset = build_pretrain_dataset(args, method, model.input_patch_size())
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
