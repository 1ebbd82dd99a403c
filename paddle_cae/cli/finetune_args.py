"""The fine-tuning and linear-probing argument tables, under the official flag names.

The flags are those of MAE's ``main_finetune.py`` / ``main_linprobe.py``, BEiT-style
``run_class_finetuning.py`` (CAE, BootMAE) and the Paddle CAE port, so the seed command lines
run unchanged. Flags whose official default differs between the three methods default to None
and are filled from the ``finetune_defaults`` / ``linprobe_defaults`` of the method of ``--model``
(:mod:`paddle_cae.methods`; ``vit_*`` classifiers follow MAE).

Names with the same meaning in another repository are aliases: ``--update_freq`` =
``--accum_iter``; ``--use_mean_pooling`` = ``--global_pool``, whose negatives are MAE's
``--cls_token`` and BEiT's ``--use_cls``; ``--save_freq`` = ``--save_ckpt_freq``.
Run-level flags (output, seeds, resume, devices, workers, distributed) are shared with the
pretraining table and taken from it.
"""
from dataclasses import replace

from ..runtime.config import Arg, ArgTable, default_config_dir, parse_args
from .pretrain_args import PRETRAIN_ARGS

G_RUN, G_MODEL, G_OPT, G_AUG, G_DATA, G_PROBE, G_DIST = (
    "run", "model", "optimisation", "augmentation", "data", "linear probe", "distributed")

_PRETRAIN = {arg.name: arg for arg in PRETRAIN_ARGS}


def _shared(name, **changes):
    """A pretraining flag reused here, optionally with another default or help text."""
    return replace(_PRETRAIN[name], **changes)


COMMON_ARGS = (
    # --- run
    _shared("batch_size", help="batch size per process; effective batch = batch_size x accum_iter x "
            "processes (default: fine-tune 64, linear probe 512)"),
    _shared("epochs", help="training epochs (default: fine-tune 50, linear probe 90)"),
    _shared("accum_iter"),
    _shared("save_ckpt_freq", default=None, aliases=("save_freq",),
            help="also keep checkpoint-<epoch>.pd every N epochs (default: only latest, best and last)"),
    _shared("keep_last"),
    _shared("output_dir", default="./output_dir"),
    _shared("log_dir"),
    _shared("exp_name"),
    _shared("seed"),
    Arg("resume", "str", "", "training checkpoint to continue from (weights, optimizer, scaler, epoch, "
        "EMA); with --eval, the fine-tuned checkpoint to evaluate", group=G_RUN),
    _shared("auto_resume"),
    _shared("start_epoch"),
    _shared("device"),
    _shared("amp"),
    _shared("amp_dtype"),
    _shared("print_freq"),
    _shared("max_train_step"),
    _shared("enable_multi_print"),
    Arg("eval", "bool", False, "only evaluate the --resume (or --finetune) weights on the validation set",
        group=G_RUN),
    Arg("dist_eval", "bool", False, "split evaluation over the processes (each validation image is still "
        "counted exactly once); without it every process evaluates the whole set", group=G_RUN),
    # --- model
    Arg("model", "str", "vit_base_patch16", "classifier name: vit_{base,large}_patch16, vit_huge_patch14 "
        "(MAE), cae_{tiny,small,base,large}_patch16_224, cae_base_patch16_384, "
        "bootmae_{base,large}_patch16_224; pretraining names (mae_vit_base_patch16, "
        "cae_base_patch16_224_8k_vocab, bootmae_base, base_patch16_224) are mapped to the classifier",
        group=G_MODEL),
    _shared("model_args", help="extra constructor arguments of the classifier, JSON or inline YAML, "
            "e.g. '{\"embed_dim\": 64, \"depth\": 2}' (must match the pretrained encoder). A key that "
            "a named flag also sets (num_classes, global_pool, img_size, drop_path_rate, init_scale; "
            "CAE: use_rel_pos_bias, pos_embed_type, init_values) must agree with that flag "
            "(--nb_classes, --global_pool/--cls_token, --input_size, --drop_path, --init_scale, "
            "--rel_pos_bias, --sin_pos_emb, --layer_scale_init_value; the flag's default counts when "
            "it is not given), otherwise the run stops naming both; a probe's --depth keeps the first "
            "blocks of the encoder 'depth' describes"),
    Arg("finetune", "str", "", "pretrained weights: a pretraining checkpoint or encoder export of this "
        "package (.pd), or an official PyTorch file (.pth: MAE, CAE, BootMAE)", group=G_MODEL),
    Arg("model_key", "str", "model|module", "entries of the --finetune file to look for the weights in, "
        "first found wins", group=G_MODEL),
    _shared("input_size"),
    Arg("nb_classes", "int", None, "number of classes (default: the number of class folders of the "
        "training set)", minimum=1, group=G_MODEL),
    Arg("global_pool", "bool", None, "mean of the patch tokens + fc_norm (default for fine-tuning); off "
        "= final norm + cls token", aliases=("use_mean_pooling",), negative=("cls_token", "use_cls"),
        group=G_MODEL),
    Arg("sin_pos_emb", "bool", True, "CAE: fixed 2-D sin-cos position table in the classifier",
        group=G_MODEL),
    _shared("rel_pos_bias", help="CAE: relative position bias in every block (default: on for "
            "fine-tuning, off for linear probing)"),
    _shared("abs_pos_emb", help="accepted for compatibility (BootMAE scripts); the classifiers use the "
            "position table of their method"),
    _shared("layer_scale_init_value", help="CAE: layer-scale init of the blocks (loaded from the "
            "checkpoint anyway; default 0.1, 1e-5 for large)"),
    # --- optimisation
    Arg("lr", "float", None, "absolute learning rate (CAE/BootMAE recipes); unset: blr x effective batch "
        "/ 256", minimum=0.0, open_min=True, group=G_OPT),
    Arg("blr", "float", None, "base learning rate: lr = blr x effective batch / 256 "
        "(default: fine-tune 1e-3, linear probe 0.1)", minimum=0.0, open_min=True, group=G_OPT),
    Arg("min_lr", "float", None, "floor of the cosine schedule (default: fine-tune 1e-6, probe 0)",
        minimum=0.0, group=G_OPT),
    Arg("warmup_epochs", "int", None, "linear warmup epochs (default: fine-tune 5, probe 10)", minimum=0,
        group=G_OPT),
    _shared("warmup_steps"),
    Arg("lr_schedule", "str", None, "'mae' (cosine at a fractional epoch) or 'beit' (per-iteration array); "
        "default: the method's", choices=("mae", "beit"), group=G_OPT),
    Arg("weight_decay", "float", None, "weight decay (default: fine-tune 0.05, probe 0)", minimum=0.0,
        group=G_OPT),
    _shared("weight_decay_end"),
    _shared("opt_eps"),
    Arg("opt_betas", "floats", [0.9, 0.999], "AdamW betas", metavar="BETA", group=G_OPT),
    _shared("momentum", help="LARS / SGD momentum"),
    _shared("clip_grad", help="clip the global gradient norm (no recipe uses it)"),
    # --- data
    _shared("data_path", help="dataset root holding train/<class>/ and val/<class>/ (default: the "
            "bundled demo digits)"),
    _shared("num_workers", default=4),
    _shared("pin_mem"),
    _shared("imagenet_default_mean_and_std", help="normalise with the ImageNet mean/std instead of "
            "0.5/0.5 (default: MAE and CAE yes, BootMAE no)"),
    Arg("crop_pct", "float", None, "evaluation centre-crop fraction (default 0.875, 1.0 from 225 px for "
        "MAE and the linear probe, from 384 px for CAE/BootMAE fine-tuning; CAE/BootMAE at 32 px or "
        "less neither resize nor crop)", minimum=0.0, maximum=1.0, open_min=True, group=G_DATA),
    Arg("train_interpolation", "str", "bicubic", "resize filter of the training crop",
        choices=("bicubic", "bilinear", "lanczos", "nearest", "random"), group=G_AUG),
    # --- distributed
    _shared("world_size"),
    _shared("local_rank"),
    _shared("dist_on_itp"),
    _shared("dist_url"),
)

FINETUNE_ONLY_ARGS = (
    _shared("drop_path", default=None, help="stochastic depth rate (default 0.1; recipes: 0.1 B, 0.2 L, "
            "0.3 H)"),
    Arg("layer_decay", "float", 0.75, "layer-wise learning-rate decay", minimum=0.0, maximum=1.0,
        open_min=True, group=G_OPT),
    Arg("backbone_decay", "float", 1.0, "BootMAE: extra lr factor on every layer but the head",
        minimum=0.0, open_min=True, group=G_OPT),
    Arg("opt", "str", "adamw", "optimizer", choices=("adamw",), group=G_OPT),
    Arg("init_scale", "float", 0.001, "CAE/BootMAE: the new head's initial weights are multiplied by this",
        minimum=0.0, group=G_MODEL),
    Arg("model_ema", "bool", False, "keep an exponential moving average of the weights and evaluate it "
        "too (BootMAE recipe)", group=G_MODEL),
    Arg("model_ema_decay", "float", 0.9999, "EMA decay per optimizer step", minimum=0.0, maximum=1.0,
        group=G_MODEL),
    Arg("enable_deepspeed", "bool", False, "accepted for compatibility (BootMAE/CAE scripts); training "
        "runs on Paddle's own optimizer and loss scaling", group=G_RUN),
    Arg("model_ema_force_cpu", "bool", False, "accepted for compatibility (the EMA lives with the model)",
        group=G_MODEL),
    Arg("smoothing", "float", 0.1, "label smoothing", minimum=0.0, maximum=1.0, group=G_AUG),
    Arg("aa", "str", "rand-m9-mstd0.5-inc1", "RandAugment policy ('none' or empty turns it off)",
        group=G_AUG),
    Arg("color_jitter", "float", 0.4, "colour jitter (ignored while RandAugment is on, as in timm)",
        minimum=0.0, group=G_AUG),
    Arg("crop_min_size", "float", 0.08, "smallest area fraction of the random resized crop",
        minimum=0.0, maximum=1.0, open_min=True, group=G_AUG),
    Arg("reprob", "float", 0.25, "random erasing probability", minimum=0.0, maximum=1.0, group=G_AUG),
    Arg("remode", "str", "pixel", "random erasing fill", choices=("pixel", "const"), group=G_AUG),
    Arg("recount", "int", 1, "random erasing boxes (only 1 is implemented)", minimum=1, maximum=1,
        group=G_AUG),
    Arg("resplit", "bool", False, "accepted for compatibility (no augmentation split)", group=G_AUG),
    Arg("mixup", "float", 0.0, "mixup alpha (recipes 0.8); 0 disables", minimum=0.0, group=G_AUG),
    Arg("cutmix", "float", 0.0, "cutmix alpha (recipes 1.0); 0 disables", minimum=0.0, group=G_AUG),
    Arg("cutmix_minmax", "floats", None, "not implemented (must stay unset)", group=G_AUG),
    Arg("mixup_prob", "float", 1.0, "probability of mixing a batch", minimum=0.0, maximum=1.0, group=G_AUG),
    Arg("mixup_switch_prob", "float", 0.5, "probability of cutmix instead of mixup when both are on",
        minimum=0.0, maximum=1.0, group=G_AUG),
    Arg("mixup_mode", "str", "batch", "how mixing parameters are drawn", choices=("batch",), group=G_AUG),
)

LINPROBE_ONLY_ARGS = (
    Arg("depth", "int", None, "probe the output of this many blocks (BootMAE: 9-10 of 12, 18 of 24); "
        "default: all", minimum=1, group=G_PROBE),
    Arg("linear_type", "str", "standard", "standard = BatchNorm (no affine) + Linear on the pooled "
        "feature; attentive = CAE's attentive probe (query token + cross-attention block)",
        choices=("standard", "attentive"), group=G_PROBE),
    Arg("probe_augment", "str", "recipe", "training images of the probe: recipe = the recipe's "
        "augmentation (standard: MAE's random resized crop + flip; attentive: timm's crop + flip); "
        "none = the evaluation transform, i.e. a probe on fixed features (tiny images such as the "
        "32-px demo digits, where any crop destroys the digit)", choices=("recipe", "none"),
        group=G_PROBE),
    Arg("enable_linear_eval", "bool", False, "accepted for compatibility (Paddle CAE)", group=G_PROBE),
    Arg("opt", "str", None, "optimizer (default: lars for standard, sgd (Nesterov) for attentive)",
        choices=("lars", "sgd"), group=G_OPT),
    Arg("nesterov", "bool", None, "Nesterov momentum for --opt sgd (default on)", group=G_OPT),
)

FINETUNE_TABLE = ArgTable(COMMON_ARGS + FINETUNE_ONLY_ARGS)
LINPROBE_TABLE = ArgTable(COMMON_ARGS + LINPROBE_ONLY_ARGS)

# the attentive probe (CAE) trains with SGD on BEiT's schedule
ATTENTIVE_DEFAULTS = dict(opt="sgd", nesterov=True, lr_schedule="beit", min_lr=1e-6)


def classifier_name(model):
    """The classifier a pretraining (or other repository's) model name is fine-tuned as."""
    from ..methods import classifier_name as resolve

    return resolve(model)


def classifier_method(model):
    """The :class:`paddle_cae.methods.Method` of a classifier (or aliased) name."""
    from ..methods import classifier_method as resolve

    return resolve(model)


def classifier_family(model):
    """The method name ('mae', 'cae', 'bootmae', ...) of a classifier (or aliased) name."""
    return classifier_method(model).name


def apply_classifier_defaults(args, phase):
    """Fill unset method-dependent values (in place); sets ``args.model`` to the classifier name,
    ``args.family`` and ``args.phase``."""
    args.requested_model = args.model
    args.model = classifier_name(args.model)
    method = classifier_method(args.model)
    args.family = method.name
    table = method.finetune_defaults if phase == "finetune" else method.linprobe_defaults
    if phase == "linprobe":
        table = dict(table, opt="lars", nesterov=True)
        if args.linear_type == "attentive":
            table.update(ATTENTIVE_DEFAULTS)
    for key, value in table.items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    if phase == "finetune":
        if args.aa and args.aa.lower() in ("none", "null", "off"):
            args.aa = None
        if args.cutmix_minmax:
            raise ValueError("--cutmix_minmax is not implemented; leave it unset")
    args.phase = phase
    return args


_PHASES = {
    "finetune": (FINETUNE_TABLE, "main_finetune.py",
                 "Fine-tune a pretrained ViT (MAE, CAE, BootMAE) for classification"),
    "linprobe": (LINPROBE_TABLE, "main_linprobe.py",
                 "Linear (or attentive) probing of a frozen pretrained ViT encoder"),
}


def parse_classifier_args(phase, argv=None, config_dir=None):
    table, prog, description = _PHASES[phase]
    args = parse_args(argv, table, config_dir=config_dir or default_config_dir(),
                      description=description, prog=prog)
    return apply_classifier_defaults(args, phase)


def parse_finetune_args(argv=None, config_dir=None):
    return parse_classifier_args("finetune", argv, config_dir)


def parse_linprobe_args(argv=None, config_dir=None):
    return parse_classifier_args("linprobe", argv, config_dir)
