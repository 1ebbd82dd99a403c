"""The flags of ``main_segment.py``, the segmentation config saved in its checkpoints, and the
network built from that config.

Flag names: the run-level flags are the pretraining/fine-tuning ones (``--batch_size``,
``--output_dir``, ``--seed``, ``--no_auto_resume``, ``--resume``, ``--eval``, ``--amp``, ...);
the model flags are ``main_finetune.py``'s (``--model``, ``--model_args``, ``--finetune``,
``--model_key``, ``--drop_path``, ``--layer_decay``, ``--rel_pos_bias``,
``--layer_scale_init_value``); the segmentation ones carry mmseg's names where the official
configs have them (``crop_size``, ``num_classes``, ``out_indices``, ``channels``,
``dropout_ratio``, ``warmup_iters``, ``warmup_ratio``, ``power``, ``img_scale``,
``ratio_range``, ``cat_max_ratio``, ``stride``).
"""
from dataclasses import replace

from ..cli.finetune_args import COMMON_ARGS, FINETUNE_ONLY_ARGS
from ..cli.pretrain_args import PRETRAIN_ARGS
from ..methods import classifier_method, classifier_name
from ..runtime.config import Arg, ArgTable, default_config_dir, parse_args

G_RUN, G_MODEL, G_OPT, G_DATA, G_EVAL, G_DIST = (
    "run", "model", "optimisation", "data", "evaluation", "distributed")

_PRETRAIN = {a.name: a for a in PRETRAIN_ARGS}
_FINETUNE = {a.name: a for a in COMMON_ARGS + FINETUNE_ONLY_ARGS}


def _from(table, name, **changes):
    return replace(table[name], **changes)


SEGMENT_ARGS = (
    # --- run
    _from(_PRETRAIN, "batch_size", default=2, help="crops per process per iteration (recipes: 2 per "
          "GPU on 8 GPUs = 16)"),
    Arg("iters", "int", 160000, "training iterations (optimizer updates)", minimum=1, group=G_RUN),
    _from(_PRETRAIN, "output_dir", default="./output_segment"),
    _from(_PRETRAIN, "log_dir"),
    _from(_PRETRAIN, "exp_name"),
    _from(_PRETRAIN, "seed"),
    _from(_FINETUNE, "resume", help="training checkpoint to continue from; with --eval or "
          "--predict, the segmentation checkpoint to use"),
    _from(_PRETRAIN, "auto_resume"),
    _from(_PRETRAIN, "device"),
    _from(_PRETRAIN, "amp"),
    _from(_PRETRAIN, "amp_dtype"),
    _from(_PRETRAIN, "print_freq", default=50),
    _from(_PRETRAIN, "keep_last"),
    Arg("save_interval", "int", 16000, "write checkpoint-<iteration>.pd every N iterations (and "
        "checkpoint-latest.pd; official: 16000, CAE's 8000)", minimum=1, group=G_RUN),
    Arg("eval_interval", "int", 16000, "evaluate every N iterations and at the end (official 16000)",
        minimum=1, group=G_RUN),
    Arg("eval", "bool", False, "only evaluate --resume (a segmentation checkpoint) on the "
        "validation split", group=G_RUN),
    Arg("predict", "str", "", "write the colour mask of this image (PNG) with the --resume "
        "checkpoint, then stop", group=G_RUN),
    Arg("predict_out", "str", "", "where --predict writes the mask (default: <image name>_mask.png "
        "beside --output_dir's other files)", group=G_RUN),
    Arg("vis_count", "int", 4, "predicted masks of the first validation images logged to VisualDL "
        "at each evaluation", minimum=0, group=G_RUN),
    # --- model
    _from(_FINETUNE, "model", help="classifier whose encoder is the backbone (main_finetune.py's "
          "names: vit_{base,large}_patch16, cae_{base,large}_patch16_224, "
          "bootmae_{base,large}_patch16_224, ...; pretraining names are mapped)"),
    _from(_FINETUNE, "model_args"),
    _from(_FINETUNE, "finetune"),
    _from(_FINETUNE, "model_key"),
    Arg("num_classes", "int", None, "classes of the labels 1..N (label 0 is unlabelled and ignored); "
        "ADE20K 150; default: the demo's 11", minimum=1, group=G_MODEL),
    Arg("crop_size", "int", 512, "training crop and sliding-window size; the encoder's position and "
        "relative-position tables are resized to this grid", minimum=1, group=G_MODEL),
    Arg("out_indices", "floats", None, "the four blocks whose outputs feed the neck (default 3 5 7 11 "
        "for 12 blocks, 7 11 15 23 for 24)", metavar="BLOCK", group=G_MODEL),
    Arg("channels", "int", 768, "width of the UperNet head (official ViT-B configs: 768)", minimum=1,
        group=G_MODEL),
    Arg("dropout_ratio", "float", 0.1, "dropout before the classifiers of both heads", minimum=0.0,
        maximum=1.0, group=G_MODEL),
    Arg("aux_weight", "float", 0.4, "weight of the auxiliary FCN head's loss", minimum=0.0,
        group=G_MODEL),
    _from(_FINETUNE, "drop_path", default=0.1, help="stochastic depth rate of the encoder"),
    Arg("rel_pos_bias", "bool", True, "relative position bias in every block (resampled from the "
        "checkpoint when it has one, else starting at zero, as the official backbones do)",
        negative=("disable_rel_pos_bias",), group=G_MODEL),
    Arg("layer_scale_init_value", "float", None, "layer-scale gammas (CAE: loaded from the checkpoint; "
        "MAE/BootMAE recipes: 1.0, new); 0 disables; default: the classifier's", minimum=0.0,
        group=G_MODEL),
    Arg("pos_embed_trainable", "bool", False, "train the position table (official: BootMAE yes, "
        "CAE and MAE no)", group=G_MODEL),
    _from(_FINETUNE, "imagenet_default_mean_and_std", default=True,
          help="normalise with the ImageNet mean/std (CAE, MAE recipes) instead of 0.5/0.5 (BootMAE)"),
    # --- optimisation
    Arg("lr", "float", 1e-4, "peak learning rate of AdamW (absolute)", minimum=0.0, open_min=True,
        group=G_OPT),
    _from(_FINETUNE, "layer_decay", default=0.65, help="layer-wise lr decay"),
    Arg("weight_decay", "float", 0.05, "AdamW weight decay (1-D tensors and biases excluded)",
        minimum=0.0, group=G_OPT),
    Arg("opt_betas", "floats", [0.9, 0.999], "AdamW betas", metavar="BETA", group=G_OPT),
    _from(_PRETRAIN, "opt_eps"),
    Arg("warmup_iters", "int", 1500, "linear warm-up iterations", minimum=0, group=G_OPT),
    Arg("warmup_ratio", "float", 1e-6, "warm-up starts at this fraction of the schedule's lr",
        minimum=0.0, maximum=1.0, group=G_OPT),
    Arg("power", "float", 1.0, "poly schedule power", minimum=0.0, group=G_OPT),
    Arg("min_lr", "float", 0.0, "poly schedule floor", minimum=0.0, group=G_OPT),
    _from(_PRETRAIN, "clip_grad", help="clip the global gradient norm (BootMAE recipe: 3.0)"),
    # --- data
    _from(_PRETRAIN, "data_path", help="ADE20K-style root: images/{training,validation}/*.jpg and "
          "annotations/{training,validation}/*.png (default: the demo set made from the bundled digits)"),
    _from(_PRETRAIN, "num_workers", default=4),
    Arg("img_scale", "floats", [2048, 512], "resize target (long, short) before cropping; training "
        "scales it by a ratio drawn from --ratio_range", metavar="PX", group=G_DATA),
    Arg("ratio_range", "floats", [0.5, 2.0], "training scale ratio range", metavar="R", group=G_DATA),
    Arg("cat_max_ratio", "float", 0.75, "a training crop is redrawn (up to 10 times) while one class "
        "covers more than this fraction of it", minimum=0.0, maximum=1.0, open_min=True, group=G_DATA),
    # --- evaluation
    Arg("stride", "int", 341, "sliding-window stride of the evaluation (official 341 for 512 crops)",
        minimum=1, group=G_EVAL),
    # --- distributed (accepted as in the other entrypoints; paddle.distributed.launch sets them)
    _from(_PRETRAIN, "world_size"),
    _from(_PRETRAIN, "local_rank"),
    _from(_PRETRAIN, "dist_on_itp"),
    _from(_PRETRAIN, "dist_url"),
)

SEGMENT_TABLE = ArgTable(SEGMENT_ARGS)


def parse_segment_args(argv=None, config_dir=None):
    args = parse_args(argv, SEGMENT_TABLE, config_dir=config_dir or default_config_dir(),
                      description="Semantic segmentation (UperNet) on a pretrained ViT encoder",
                      prog="main_segment.py")
    args.requested_model = args.model
    args.model = classifier_name(args.model)
    args.family = classifier_method(args.model).name
    args.phase = "segment"
    if args.out_indices is not None:
        if len(args.out_indices) != 4 or any(float(i) != int(i) for i in args.out_indices):
            from ..runtime.config import ConfigError

            raise ConfigError(f"--out_indices must be 4 block numbers, got {args.out_indices}")
        args.out_indices = [int(i) for i in args.out_indices]
    for name, count in (("img_scale", 2), ("ratio_range", 2), ("opt_betas", 2)):
        if len(getattr(args, name)) != count:
            from ..runtime.config import ConfigError

            raise ConfigError(f"--{name} takes {count} numbers, got {getattr(args, name)}")
    return args


def seg_config(args, num_classes):
    """The config saved in every segmentation checkpoint: enough to rebuild the network and its
    evaluation preprocessing with nothing else."""
    from ..data.transforms import mean_std

    mean, std = mean_std(args.imagenet_default_mean_and_std)
    return {
        "model": classifier_name(args.model),
        "model_args": dict(args.model_args or {}),
        "num_classes": int(num_classes),
        "crop_size": int(args.crop_size),
        "out_indices": list(args.out_indices) if args.out_indices else None,
        "channels": int(args.channels),
        "dropout_ratio": float(args.dropout_ratio),
        "drop_path": float(args.drop_path or 0.0),
        "rel_pos_bias": bool(args.rel_pos_bias),
        "layer_scale_init_value": args.layer_scale_init_value,
        "pos_embed_trainable": bool(args.pos_embed_trainable),
        "mean": [float(v) for v in mean],
        "std": [float(v) for v in std],
        "img_scale": [int(v) for v in args.img_scale],
        "stride": int(args.stride),
    }


def encoder_kwargs(config, for_training=True):
    """Constructor arguments of the encoder (the classifier of ``config["model"]``, no head,
    built for the crop). A ``model_args`` key the segmentation flags also set must agree."""
    from ..loading.classifier import ModelArgsConflict

    kwargs = dict(config.get("model_args") or {})

    def merge(key, value, flag):
        if key in kwargs and kwargs[key] != value:
            raise ModelArgsConflict(f"--model_args sets '{key}': {kwargs[key]!r} but {flag} gives "
                                    f"{value!r}; remove '{key}' from --model_args or change {flag}")
        kwargs[key] = value

    merge("img_size", int(config["crop_size"]), "--crop_size")
    merge("num_classes", 0, "segmentation (no classifier head)")
    kwargs["drop_path_rate"] = float(config.get("drop_path", 0.0)) if for_training else 0.0
    merge("use_rel_pos_bias", bool(config.get("rel_pos_bias", True)), "--rel_pos_bias")
    if config.get("layer_scale_init_value") is not None:
        merge("init_values", float(config["layer_scale_init_value"]) or None, "--layer_scale_init_value")
    kwargs.setdefault("global_pool", True)
    return kwargs


def build_encoder(config, for_training=True):
    import paddle

    from ..models import create_model

    with paddle.utils.unique_name.guard():
        return create_model(config["model"], **encoder_kwargs(config, for_training))


def build_network(config, for_training=True, decode_head=None):
    """Encoder + neck + UperNet for ``config`` (fresh weights)."""
    import paddle

    from .segmentor import build_segmentor, default_out_indices

    encoder = build_encoder(config, for_training)
    if not config.get("out_indices"):
        config["out_indices"] = default_out_indices(len(encoder.blocks))
    with paddle.utils.unique_name.guard():
        return build_segmentor(encoder, config, decode_head=decode_head)


__all__ = ["SEGMENT_TABLE", "build_encoder", "build_network", "encoder_kwargs",
           "parse_segment_args", "seg_config"]
