"""What ``main_segment.py`` does, importable: semantic-segmentation fine-tuning (UperNet on a
pretrained encoder), evaluation (``--eval --resume CKPT``) and prediction of one image's colour
mask (``--predict IMAGE --resume CKPT``). See :mod:`paddle_cae.downstream`.
"""
import logging
import os
import sys

import numpy as np

from ..downstream.seg_args import SEGMENT_TABLE, build_network, parse_segment_args, seg_config
from ..downstream.seg_data import (DEMO_NUM_CLASSES, DemoSegmentation, EvalTransform,
                                   SegmentationFolder, TrainTransform, read_image)
from ..engine.stepper import NonFiniteLossError
from ..fast import accelerate, accelerate_optimizer
from ..loading.pretrained import (PretrainedLoadError, is_encoder_key, load_pretrained,
                                  map_to_classifier, read_weights_file, strict_load)
from ..models.pos_embed import resize_pos_embed
from ..runtime.amp import Precision, amp_dtype_from_args
from ..runtime.checkpoint import CheckpointError, load_checkpoint
from ..runtime.config import ConfigError, default_config_dir, given_flags, to_yaml
from ..runtime.logging import resolve_log_dir
from ..startup import report_error
from .start import start_process

logger = logging.getLogger("paddle_cae")
LAYER_SCALE_SUFFIXES = (".gamma_1", ".gamma_2")


# ---------------------------------------------------------------------------------- setup
def demo_argv(argv):
    """Without --config and --data_path (and not only evaluating or predicting from a
    checkpoint) the run is the CPU demo: ``configs/segmentation/demo_<family>.yaml`` for the
    family of --model (MAE's for vit_*) is put in front."""
    from ..runtime.config import flag_value
    from .finetune_args import classifier_family

    argv = list(sys.argv[1:] if argv is None else argv)
    if given_flags(argv) & {"--config", "-c", "--data_path", "-h", "--help", "--predict"}:
        return argv, None
    try:
        family = classifier_family(flag_value(argv, "model", "vit_base_patch16"))
    except (KeyError, ValueError):
        return argv, None  # the parser reports the unknown model
    config = os.path.join(default_config_dir(), "segmentation", f"demo_{family}.yaml")
    return (["--config", config] + argv, config) if os.path.isfile(config) else (argv, None)


def prepare_args(args, env):
    args.log_dir = resolve_log_dir(args.output_dir, args.log_dir)
    if args.data_path and args.num_classes is None and not (args.eval or args.predict):
        raise ValueError("--num_classes is needed with --data_path (ADE20K: 150; labels 1..N, 0 "
                         "ignored)")
    if not args.data_path:
        if args.num_classes is None:
            args.num_classes = DEMO_NUM_CLASSES
        elif args.num_classes < DEMO_NUM_CLASSES:
            raise ValueError(f"--num_classes {args.num_classes}: the demo set has {DEMO_NUM_CLASSES} "
                             "classes (canvas + 10 digits)")
    return args


def build_datasets(args, config, splits=("train", "val")):
    mean, std = config["mean"], config["std"]
    train_tf = TrainTransform(config["crop_size"], args.img_scale, args.ratio_range,
                              args.cat_max_ratio, mean, std)
    eval_tf = EvalTransform(config["img_scale"], mean, std)
    out = {}
    for split in splits:
        tf = train_tf if split == "train" else eval_tf
        if args.data_path:
            out[split] = SegmentationFolder(args.data_path, split, config["num_classes"], tf)
        else:
            out[split] = DemoSegmentation(split, tf)
    return out


def load_encoder_weights(encoder, path, model_key="model|module"):
    """``--finetune`` into the segmentation encoder (everything ``main_finetune.py --finetune``
    reads). New for the recipe and allowed to start fresh: layer-scale gammas and relative
    position tables the checkpoint lacks (MAE, BootMAE); every other encoder weight must be there.
    As the official loaders do, the checkpoint's position table is resized (bicubic) to the crop's
    grid also when it is a fixed sin-cos table."""
    report = load_pretrained(encoder, path, model_key, allow_missing_encoder=True)
    bad = [k for k in report.initialised if is_encoder_key(k) and not k.endswith(LAYER_SCALE_SUFFIXES)]
    bad += [k for k, _, _ in report.shape_skipped if is_encoder_key(k)]
    if bad:
        raise PretrainedLoadError(f"{report.source} ({report.kind}) does not fit this encoder: "
                                  f"{len(bad)} encoder weights are missing or of another shape "
                                  f"({', '.join(bad[:3])}). Check --model/--model_args against the "
                                  "checkpoint")
    if getattr(encoder, "pos_embed_type", "learned") == "sincos" and encoder.pos_embed is not None:
        weights = read_weights_file(path, model_key)
        state, _, _ = map_to_classifier(weights.state, encoder)
        table = state.get("pos_embed")
        if table is not None and np.asarray(table).shape[-1] == encoder.pos_embed.shape[-1]:
            resized = resize_pos_embed(np.asarray(table, np.float32), encoder.patch_embed.grid_size)
            encoder.pos_embed.set_value(resized.astype(np.float32))
            report.ignored = [(k, r) for k, r in report.ignored if k != "pos_embed"]
            report.adapted.append(("pos_embed", f"the checkpoint's table {list(np.shape(table))} "
                                                f"resized to {list(resized.shape)} (bicubic)"))
    report.log()
    return report


def checkpoint_config(path):
    """(state, segmentation config) of a checkpoint written by main_segment.py; one line otherwise."""
    try:
        state = load_checkpoint(path)
    except CheckpointError as err:
        raise ValueError(f"--resume {path}: {err}") from None
    if not isinstance(state, dict) or state.get("kind") != "segment" or not isinstance(
            state.get("segmentor"), dict):
        kind = state.get("kind") if isinstance(state, dict) else None
        raise ValueError(f"--resume {path} is not a segmentation checkpoint of main_segment.py"
                         + (f" (it is a {kind} checkpoint)" if kind else ""))
    return state, dict(state["segmentor"])


def network_from_checkpoint(path):
    state, config = checkpoint_config(path)
    model = accelerate(build_network(config, for_training=False))
    strict_load(model, state["model"], path)
    model.eval()
    return model, config, state


# -------------------------------------------------------------------------- predict / eval
def predict(args, precision):
    from ..downstream.inference import predict_mask, save_colour_mask

    if not args.resume:
        raise ValueError("--predict needs --resume CKPT (a checkpoint of main_segment.py)")
    if not os.path.isfile(args.predict):
        raise FileNotFoundError(f"--predict {args.predict}: no such file")
    image = read_image(args.predict)
    model, config, _ = network_from_checkpoint(args.resume)
    x = EvalTransform(config["img_scale"], config["mean"], config["std"]).image(image)
    mask = predict_mask(model, x, config["num_classes"], config["crop_size"], config["stride"],
                        image.shape[:2], precision)
    out = args.predict_out or os.path.join(
        args.output_dir or ".", os.path.splitext(os.path.basename(args.predict))[0] + "_mask.png")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    save_colour_mask(mask, config["num_classes"], out)
    classes, counts = np.unique(mask, return_counts=True)
    top = ", ".join(f"{c + 1}: {100 * n / mask.size:.1f}%" for c, n in
                    sorted(zip(classes, counts), key=lambda t: -t[1])[:5])
    logger.info("wrote %s (%dx%d colour mask; label values as in the annotations: %s)", out,
                mask.shape[1], mask.shape[0], top)
    return out


def evaluate_only(args, env, precision):
    from ..downstream.seg_engine import evaluate_segmentation

    if not args.resume:
        raise ValueError("--eval needs --resume CKPT (a checkpoint of main_segment.py)")
    model, config, _ = network_from_checkpoint(args.resume)
    val_set = build_datasets(args, config, ("val",))["val"]
    stats, _ = evaluate_segmentation(model, val_set, config, precision, env)
    logger.info("%s on %d validation images: mIoU %.2f  mAcc %.2f  aAcc %.2f", args.resume,
                stats["images"], stats["mIoU"], stats["mAcc"], stats["aAcc"])
    return stats


# ------------------------------------------------------------------------------------ run
def run(argv=None):
    from ..downstream.optim import build_segmentation_optimizer
    from ..downstream.seg_engine import SegmentationRun
    from ..runtime.amp import on_gpu

    env, argv, args = start_process(argv, demo_argv, parse_segment_args, prepare_args)
    precision = Precision(amp_dtype_from_args(args))
    if precision.notice:
        logger.info(precision.notice)
    if args.predict:
        return predict(args, precision)
    if args.eval:
        return evaluate_only(args, env, precision)

    config = seg_config(args, args.num_classes)
    data = build_datasets(args, config)  # every label checked before anything is written
    model = accelerate(build_network(config))
    if args.finetune:
        load_encoder_weights(model.backbone, args.finetune, args.model_key)
    else:
        logger.warning("no --finetune weights: the encoder starts from random initialisation")
    if env.distributed and on_gpu():
        import paddle

        model = paddle.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    optimizer = accelerate_optimizer(build_segmentation_optimizer(model, args))
    runner = SegmentationRun(args, model, config, data["train"], data["val"], optimizer, precision, env)
    runner.config_text = to_yaml(args, SEGMENT_TABLE)
    describe(args, env, model, config, data)
    runner.fit()
    return runner


def describe(args, env, model, config, data):
    n_train = sum(int(p.size) for p in model.parameters() if not p.stop_gradient)
    logger.info("segmentation: UperNet on %s (%s) encoder, blocks %s -> neck; %.3fM trainable "
                "parameters; %d classes; crop %d", args.model, args.family, config["out_indices"],
                n_train / 1e6, config["num_classes"], config["crop_size"])
    logger.info("data: %d training / %d validation images from %s", len(data["train"]),
                len(data["val"]), args.data_path or "the demo set (bundled digits on canvases)")
    logger.info("AdamW lr %.3e, layer decay %s, weight decay %s, poly (power %s) with %d warm-up "
                "iterations; %d iterations of %d x %d process(es)", args.lr, args.layer_decay,
                args.weight_decay, args.power, args.warmup_iters, args.iters, args.batch_size,
                env.world_size)


def main(argv=None):
    try:
        run(argv)
    except NonFiniteLossError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except (FileNotFoundError, ValueError, KeyError, ConfigError, PretrainedLoadError, ImportError) as err:
        return report_error(err)
    return 0


__all__ = ["main", "run", "demo_argv", "load_encoder_weights", "predict"]
