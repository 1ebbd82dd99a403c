"""What ``main_finetune.py`` and ``main_linprobe.py`` do, importable (notebooks call these too).

Fine-tuning: every parameter trains, with layer-wise lr decay and AdamW. Linear probing: the
encoder is frozen (``stop_gradient``) and only the probe trains - BatchNorm (no affine) +
Linear with LARS, or CAE's attentive probe with SGD; the whole model stays in train mode while
training, as MAE's probe does (its BatchNorm uses batch statistics), and in eval mode for testing.
"""
import logging
import os
import sys


from ..data.datasets import build_dataset, default_data_path
from ..data.transforms import (RandomErasing, build_eval_transform, build_finetune_transform,
                               build_linprobe_transform, mean_std)
from ..engine.evaluate import build_eval_loader, evaluate
from ..engine.finetune import ClassificationLoss, ClassifierRun
from ..engine.pretrain import write_config_snapshot
from ..engine.stepper import NonFiniteLossError
from ..fast import accelerate, accelerate_optimizer
from ..fast.data import accelerate_dataset
from ..loading.classifier import build_classifier, classifier_config, encoder_of, transform_method
from ..loading.pretrained import PretrainedLoadError, load_pretrained, strict_load
from ..optim import build_optimizer, param_groups
from ..optim.schedules import peak_lr
from ..runtime.amp import Precision, amp_dtype_from_args
from ..runtime.checkpoint import CheckpointError, load_checkpoint
from ..runtime.config import ConfigError, default_config_dir, flag_value, given_flags
from ..runtime.logging import resolve_log_dir
from ..resources import with_config_found
from ..startup import report_error
from .finetune_args import classifier_method, parse_finetune_args, parse_linprobe_args
from .pretrain import model_label
from .start import start_process

logger = logging.getLogger("paddle_cae")


# ---------------------------------------------------------------------------------- setup
def demo_argv(argv, phase):
    """Without --config and --data_path the run is the CPU demo on the bundled digits:
    ``configs/demo/<phase>_<family>.yaml`` for the family of --model is put in front."""
    argv = with_config_found(sys.argv[1:] if argv is None else argv, phase)
    if given_flags(argv) & {"--config", "-c", "--data_path", "-h", "--help"}:
        return argv, None
    model = flag_value(argv, "model", "vit_base_patch16")
    config = os.path.join(default_config_dir(), "demo", f"{phase}_{classifier_method(model).name}.yaml")
    return (["--config", config] + argv, config) if os.path.isfile(config) else (argv, None)


def prepare_args(args, env):
    args.data_path = args.data_path or default_data_path()
    eff = args.batch_size * args.accum_iter * env.world_size
    args.abs_lr, args.lr_rule = peak_lr(args.lr, args.blr, eff)  # every fine-tune script's rule
    args.eff_batch_size = eff
    args.log_dir = resolve_log_dir(args.output_dir, args.log_dir)
    return args


def train_transform(args):
    mean, std = mean_std(args.imagenet_default_mean_and_std)
    if args.phase == "linprobe":
        if getattr(args, "probe_augment", "recipe") == "none":
            return eval_transform(args)
        if args.linear_type == "attentive":  # timm's train transform without RandAugment/erasing
            return build_finetune_transform(args.input_size, mean, std, auto_augment=None, reprob=0,
                                            interpolation=args.train_interpolation,
                                            method=transform_method(args))
        return build_linprobe_transform(args.input_size, mean, std)
    transform = build_finetune_transform(args.input_size, mean, std, auto_augment=args.aa,
                                         reprob=args.reprob, scale=(args.crop_min_size, 1.0),
                                         interpolation=args.train_interpolation,
                                         method=transform_method(args))
    if args.reprob and args.remode != "pixel":
        transform.transforms[-1] = RandomErasing(p=args.reprob, mode=args.remode)
    return transform


def eval_transform(args):
    mean, std = mean_std(args.imagenet_default_mean_and_std)
    return build_eval_transform(args.input_size, mean, std, crop_pct=args.crop_pct,
                                method=transform_method(args))


def resolve_num_classes(args, dataset):
    found = len(dataset.classes)
    if args.nb_classes is None:
        return found
    if args.nb_classes < found:
        raise ValueError(f"--nb_classes {args.nb_classes} is smaller than the {found} class folders "
                         f"of {dataset.root}")
    if args.nb_classes > found:
        logger.warning("--nb_classes %d but %s has %d class folders: the extra outputs are never "
                       "trained", args.nb_classes, dataset.root, found)
    return args.nb_classes


def freeze_for_probe(model):
    """Only the probe trains: the BN+Linear head, or the attentive probe's query token, block
    and head. Returns the names of the trainable parameters."""
    prefixes = model.trainable_prefixes()
    if prefixes is None:
        raise ValueError(f"{type(model).__name__} is not a probe: it trains every parameter")
    trainable = []
    for name, p in model.named_parameters():
        p.stop_gradient = not name.startswith(prefixes)
        if not p.stop_gradient:
            trainable.append(name)
    return trainable


def build_run_optimizer(args, model):
    if args.phase == "finetune":
        options = classifier_method(args.model).group_options("finetune", model)
        groups = param_groups(model, args.weight_decay, layer_decay=args.layer_decay,
                              backbone_decay=args.backbone_decay, **options)
        return build_optimizer("adamw", groups, lr=args.abs_lr, betas=tuple(args.opt_betas),
                               eps=args.opt_eps, weight_decay=args.weight_decay)
    params = [p for p in model.parameters() if not p.stop_gradient]
    return build_optimizer(args.opt, [{"params": params, "weight_decay": args.weight_decay}],
                           lr=args.abs_lr, weight_decay=args.weight_decay, momentum=args.momentum,
                           nesterov=bool(args.nesterov) and args.opt == "sgd")


def probe_train_mode(model):
    """MAE's probe trains with the whole model in train mode (BatchNorm on batch statistics);
    the frozen encoder has no dropout or drop path, so nothing else changes."""
    model.train()


def load_initial_weights(args, model):
    if not args.finetune:
        if args.phase == "linprobe" and not args.eval:
            raise ValueError("linear probing needs pretrained weights: pass --finetune CKPT (a "
                             "pretraining checkpoint or encoder export; for the demo: python "
                             "main_pretrain.py, then --finetune output/demo_mae/encoder.pd)")
        logger.warning("no --finetune weights: training from random initialisation")
        return None
    report = load_pretrained(encoder_of(model), args.finetune, args.model_key)
    report.log()
    return report


def evaluate_only(args, env, model, precision, val_set):
    source = args.resume or args.finetune
    if not source:
        raise ValueError("--eval needs --resume CKPT (a fine-tuned checkpoint) or --finetune CKPT")
    state = None
    if args.resume:
        try:
            state = load_checkpoint(args.resume)
        except CheckpointError:
            state = None  # maybe an official .pth: read through the converter below
    if isinstance(state, dict) and isinstance(state.get("classifier"), dict):
        strict_load(model, state["model"], args.resume)
    else:
        report = load_pretrained(encoder_of(model), source, args.model_key)
        report.log()
        check_head_loaded(report, model, source)
    loader = build_eval_loader(val_set, args.batch_size, env, args.dist_eval, args.num_workers)
    stats = evaluate(model, loader, precision, args.print_freq)
    logger.info("Accuracy of the network on the %d test images: top-1 %.2f%% top-5 %.2f%% loss %.4f",
                stats["images"], stats["acc1"], stats["acc5"], stats["loss"])
    return stats


def check_head_loaded(report, model, source):
    """Evaluating needs the file's own classifier head: a head left freshly initialised
    (a pretraining checkpoint, another class count, a probe) fails with one line."""
    if encoder_of(model) is not model:
        raise ValueError(f"{source} ({report.kind}) holds no probe head for --eval: evaluate a "
                         "linear-probe checkpoint of this package (--resume)")
    fresh = [k for k in report.initialised if k.startswith("head.")]
    if not fresh:
        return
    own = list(model.state_dict()["head.weight"].shape)
    other = [(k, why) for k, why in report.ignored if k.startswith("head.") and "another shape" in why]
    other += [(k, f"{list(s)} in the file") for k, s, _ in report.shape_skipped if k.startswith("head.")]
    if other:
        key, why = other[0]
        detail = f"its {key} ({why.replace('head of another shape ', '').replace(' (re-initialised)', '')}) " \
                 f"does not fit the model's head {own} ({own[-1]} classes)"
    else:
        detail = f"it has no classifier head for the model's head {own} ({own[-1]} classes)"
    raise ValueError(f"--eval: {source} ({report.kind}): {detail}; evaluating would score a "
                     "randomly initialised head. Check --nb_classes/--model, or fine-tune first")


def config_from_resume(args):
    """With --eval --resume, the network is the one stored in the checkpoint."""
    if not (args.eval and args.resume and os.path.isfile(args.resume)):
        return None
    try:
        state = load_checkpoint(args.resume)
    except CheckpointError:
        return None
    config = state.get("classifier") if isinstance(state, dict) else None
    if isinstance(config, dict) and config.get("model") != args.model:
        raise ValueError(f"--resume {args.resume} holds a {config.get('model')} classifier, not "
                         f"--model {args.model}")
    return config


# ------------------------------------------------------------------------------------ run
def run(argv=None, phase="finetune"):
    parse = parse_finetune_args if phase == "finetune" else parse_linprobe_args
    env, argv, args = start_process(argv, lambda a: demo_argv(a, phase), parse, prepare_args)
    precision = Precision(amp_dtype_from_args(args))
    val_set = build_dataset("val", args.data_path, eval_transform(args))

    if args.eval:
        config = config_from_resume(args) or classifier_config(args, args.nb_classes or len(val_set.classes))
        model = accelerate(build_classifier(config, for_training=False))
        return evaluate_only(args, env, model, precision, val_set)

    train_set = accelerate_dataset(build_dataset("train", args.data_path, train_transform(args)))
    if train_set.classes != val_set.classes:
        raise ValueError(f"{train_set.root} and {val_set.root} have different class folders")
    config = classifier_config(args, resolve_num_classes(args, train_set))
    model = accelerate(build_classifier(config))
    load_initial_weights(args, model)
    if phase == "linprobe":
        trainable = freeze_for_probe(model)
        logger.info("linear probe: %d trainable tensors (%s), encoder frozen", len(trainable),
                    ", ".join(trainable))
    optimizer = accelerate_optimizer(build_run_optimizer(args, model))
    loss_fn = ClassificationLoss(config["num_classes"], getattr(args, "smoothing", 0.0),
                                 getattr(args, "mixup", 0.0), getattr(args, "cutmix", 0.0),
                                 getattr(args, "mixup_prob", 1.0), getattr(args, "mixup_switch_prob", 0.5))
    val_loader = build_eval_loader(val_set, args.batch_size, env, args.dist_eval, args.num_workers)
    ema_decay = args.model_ema_decay if getattr(args, "model_ema", False) else None
    runner = ClassifierRun(args, model, config, train_set, val_loader, optimizer, precision, env,
                           loss_fn, kind=phase, ema_decay=ema_decay,
                           train_mode_fn=probe_train_mode if phase == "linprobe" else None)
    if env.is_main:
        write_config_snapshot(args, args.output_dir)
    describe(args, env, model, train_set, val_set, runner)
    runner.fit()
    return runner


def describe(args, env, model, train_set, val_set, runner):
    n_train = sum(int(p.size) for p in model.parameters() if not p.stop_gradient)
    lines = [
        f"{args.phase} {model_label(args.model, args.model_args)} ({args.family}): "
        f"{n_train / 1e6:.3f}M trainable parameters, "
        f"{runner.config['num_classes']} classes",
        f"data: {len(train_set)} training / {len(val_set)} validation images from {args.data_path}",
        f"effective batch size {args.eff_batch_size} = {args.batch_size} per process x "
        f"{args.accum_iter} accumulation x {env.world_size} process(es); "
        f"{runner.updates_per_epoch} updates per epoch",
        f"learning rate {args.abs_lr:.3e} ({args.lr_rule}), min {args.min_lr:g}, warmup "
        f"{args.warmup_epochs} epoch(s), schedule '{args.lr_schedule}'"
        + (f", layer decay {args.layer_decay}" if args.phase == "finetune" else f", {args.opt}"),
        f"loss: {runner.loss_fn!r}",
    ]
    if runner.precision.notice:
        lines.append(runner.precision.notice)
    for line in lines:
        logger.info(line)


def main(argv=None, phase="finetune"):
    try:
        run(argv, phase)
    except NonFiniteLossError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except (FileNotFoundError, ValueError, KeyError, ConfigError, PretrainedLoadError) as err:
        return report_error(err)
    return 0


__all__ = ["main", "run", "demo_argv", "freeze_for_probe", "prepare_args"]
