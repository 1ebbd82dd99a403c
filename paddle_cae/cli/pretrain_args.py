"""The pretraining argument table: every flag of the official MAE, CAE (Atten4Vis and the Paddle
CAE port) and BootMAE pretraining scripts, under the official names.

:data:`PRETRAIN_ARGS` holds the flags every method reads; a method's own flags are its
``Method.flags`` (:mod:`paddle_cae.methods`), which :func:`pretrain_table` adds under the
method's title. Flags whose official default differs between the methods default to None here
and are filled by :func:`apply_method_defaults` from the ``pretrain_defaults`` of the method of
``--model``; the help text names those defaults from the same tables. So each seed command
line means what it means in its own repository.

Aliases (same meaning, other repository's name):
``--update_freq`` (BEiT/BootMAE) = ``--accum_iter`` (MAE); ``--dual_loss_weight`` (Paddle CAE) =
``--align_loss_weight``; ``--num_decoder_self_attention`` (Paddle CAE) = ``--decoder_depth``;
``--rescale_init`` (Paddle CAE) = ``--fix_init_weight``; ``--resize_scale`` (BootMAE) =
``--crop_min_size`` (CAE).
"""
from dataclasses import replace

from ..runtime.config import Arg, ArgTable, default_config_dir, parse_args

PRETRAIN_DEFAULT_MODEL = "mae_vit_base_patch16"

G_RUN, G_MODEL, G_OPT, G_DATA, G_MASK, G_DIST = (
    "run", "model", "optimisation", "data and augmentation", "masking", "distributed")

PRETRAIN_ARGS = (
    # --- run
    Arg("batch_size", "int", None, "batch size per GPU; effective batch = batch_size x accum_iter x GPUs", minimum=1, group=G_RUN),
    Arg("epochs", "int", None, "total pretraining epochs",
        minimum=1, group=G_RUN),
    Arg("accum_iter", "int", 1, "gradient accumulation steps per optimizer step", minimum=1,
        aliases=("update_freq",), group=G_RUN),
    Arg("save_ckpt_freq", "int", None, "save a checkpoint every N epochs (and at the last one)", minimum=1, group=G_RUN),
    Arg("keep_last", "int", None, "keep only the newest N numbered checkpoint-<epoch>.pd files (latest "
        "and best are always kept); default: keep all", minimum=1, group=G_RUN),
    Arg("output_dir", "str", "./output_dir", "where checkpoints and logs go; empty for no saving", group=G_RUN),
    Arg("log_dir", "str", None, "VisualDL log directory (default: <output_dir>/vdl; relative paths are "
        "taken under output_dir)", group=G_RUN),
    Arg("exp_name", "str", "", "experiment name, used in checkpoint and log names", group=G_RUN),
    Arg("seed", "int", 0, "random seed (each rank adds its rank)", minimum=0, group=G_RUN),
    Arg("resume", "str", "", "checkpoint to resume from (weights, optimizer, scaler, epoch)", group=G_RUN),
    Arg("auto_resume", "bool", True, "resume from the newest checkpoint in output_dir if there is one",
        negative=("no_auto_resume",), group=G_RUN),
    Arg("start_epoch", "int", 0, "first epoch (overridden by a resumed checkpoint)", minimum=0, group=G_RUN),
    Arg("device", "str", None, "gpu or cpu (default: gpu when Paddle is compiled with CUDA)", group=G_RUN),
    Arg("amp", "bool", True, "mixed precision (fp16 autocast O1 + loss scaling) on GPU; a no-op on CPU; "
        "--amp false runs fp32", group=G_RUN),
    Arg("amp_dtype", "str", "float16", "autocast dtype of --amp: float16 (fp16 O1 with dynamic loss "
        "scaling, the recipes' setting) or bfloat16 (bf16 O1, no loss scaling; A100/H100); also "
        "fp16 / bf16", choices=("float16", "bfloat16", "fp16", "bf16"), group=G_RUN),
    Arg("print_freq", "int", 10, "log every N iterations", minimum=1, group=G_RUN),
    Arg("save_latest_freq", "int", 0, "also write <exp_name>_checkpoint-latest.pd every N optimizer updates "
        "inside an epoch, so a killed run resumes mid-epoch (0: only at epoch ends)", minimum=0, group=G_RUN),
    Arg("vis_freq", "int", 200, "MAE/BootMAE: log a reconstruction image to VisualDL every N iterations "
        "(0: never)", minimum=0, group=G_RUN),
    Arg("max_train_step", "int", None, "stop each epoch after N iterations (debugging)", minimum=1, group=G_RUN),
    Arg("debug", "bool", False, "debug mode of the Paddle CAE port (accepted, no effect)", group=G_RUN),
    Arg("enable_multi_print", "bool", False, "let every rank print, not only rank 0", group=G_RUN),
    # --- model
    Arg("model", "str", PRETRAIN_DEFAULT_MODEL, "name of the pretraining model (mae_vit_{base,large}_patch16, "
        "mae_vit_huge_patch14, cae_{tiny,small,base,large}_patch16_224_8k_vocab, bootmae_{base,large})",
        group=G_MODEL),
    Arg("model_args", "dict", {}, "extra constructor arguments for the model, JSON or inline YAML, "
        "e.g. '{\"embed_dim\": 64, \"depth\": 2}'", group=G_MODEL),
    Arg("input_size", "int", 224, "image size for the encoder", minimum=1, group=G_MODEL),
    Arg("drop_path", "float", None, "stochastic depth rate",
        minimum=0.0, maximum=1.0, group=G_MODEL),
    Arg("layer_scale_init_value", "float", None, "layer-scale init (0 disables)",
        minimum=0.0, group=G_MODEL),
    Arg("rel_pos_bias", "bool", None, "relative position bias in the encoder", negative=("disable_rel_pos_bias",),
        group=G_MODEL),
    Arg("abs_pos_emb", "bool", False, "learned absolute position embedding", group=G_MODEL),
    Arg("sincos_pos_emb", "bool", False, "fixed 2-D sin-cos position embedding in the encoder (Paddle CAE)",
        group=G_MODEL),
    Arg("fix_init_weight", "bool", False, "rescale block output weights by depth (BEiT's fix_init_weight)",
        aliases=("rescale_init",), group=G_MODEL),
    # --- optimisation
    Arg("lr", "float", None, "learning rate. MAE and CAE: absolute (MAE computes it from --blr when unset); "
        "BootMAE: as in its scripts, multiplied by effective batch / 256", minimum=0.0, open_min=True, group=G_OPT),
    Arg("blr", "float", 1e-3, "base learning rate: lr = blr x effective batch / 256 when --lr is unset",
        minimum=0.0, open_min=True, group=G_OPT),
    Arg("min_lr", "float", None, "floor of the cosine schedule",
        minimum=0.0, group=G_OPT),
    Arg("warmup_epochs", "int", None, "linear warmup epochs",
        minimum=0, group=G_OPT),
    Arg("warmup_steps", "int", -1, "warmup iterations; overrides warmup_epochs when > 0", minimum=-1, group=G_OPT),
    Arg("warmup_lr", "float", 1e-6, "accepted for compatibility; the official schedules warm up from 0",
        minimum=0.0, group=G_OPT),
    Arg("lr_scheduler", "str", "cos", "learning-rate schedule", choices=("cos",), group=G_OPT),
    Arg("weight_decay", "float", 0.05, "weight decay", minimum=0.0, group=G_OPT),
    Arg("weight_decay_end", "float", None, "final weight decay of a cosine weight-decay schedule "
        "(unset: constant)", minimum=0.0, group=G_OPT),
    Arg("opt", "str", "adamw", "optimizer", choices=("adamw",), group=G_OPT),
    Arg("opt_eps", "float", 1e-8, "optimizer epsilon", minimum=0.0, open_min=True, group=G_OPT),
    Arg("opt_betas", "floats", None, "optimizer betas",
        metavar="BETA", group=G_OPT),
    Arg("momentum", "float", 0.9, "SGD momentum (unused by AdamW)", minimum=0.0, group=G_OPT),
    Arg("clip_grad", "float", None, "clip the global gradient norm (CAE recipes: 3.0)", minimum=0.0,
        open_min=True, group=G_OPT),
    # --- data
    Arg("data_path", "str", None, "dataset root holding train/<class>/<image> (default: the bundled "
        "demo digits)", group=G_DATA),
    Arg("num_workers", "int", 10, "data loader worker processes per rank", minimum=0, group=G_DATA),
    Arg("data_handover", "str", "uint8", "how pretraining batches travel from the loader: uint8 "
        "(converted to the same float32 images in the training step) or float32",
        choices=("uint8", "float32"), group=G_DATA),
    Arg("fast_decode", "float", 0.0, "reduced JPEG decoding (changes pixels): 0 off; 1 only where "
        "the crop stays at least the output size; 0.5 also for crops of 1-2x the output (faster, "
        "softer images)", minimum=0.0, maximum=1.0, group=G_DATA),
    Arg("pin_mem", "bool", True, "pin host memory for faster host-to-GPU copies", negative=("no_pin_mem",),
        group=G_DATA),
    Arg("imagenet_default_mean_and_std", "bool", None, "normalise with the ImageNet mean/std instead of "
        "0.5/0.5 (CAE/BootMAE; MAE always uses ImageNet statistics)", group=G_DATA),
    Arg("second_input_size", "int", None, "CAE: size of the tokenizer view (default: input_size / 2, "
        "112 at 224)", minimum=1, group=G_DATA),
    Arg("train_interpolation", "str", "bicubic", "resize filter of the encoder view",
        choices=("bicubic", "bilinear", "lanczos", "nearest", "random"), group=G_DATA),
    Arg("second_interpolation", "str", "lanczos", "CAE: resize filter of the tokenizer view",
        choices=("bicubic", "bilinear", "lanczos", "nearest", "random"), group=G_DATA),
    Arg("crop_min_size", "float", None, "smallest crop area fraction", minimum=0.0, maximum=1.0, open_min=True, aliases=("resize_scale",), group=G_DATA),
    Arg("crop_max_size", "float", 1.0, "largest crop area fraction", minimum=0.0, maximum=1.0,
        open_min=True, group=G_DATA),
    Arg("color_jitter", "float", 0.0, "colour jitter strength (every pretraining recipe uses 0)",
        minimum=0.0, group=G_DATA),
    # --- masking
    Arg("mask_generator", "str", "block", "CAE: block-wise or random masking", choices=("block", "random"),
        group=G_MASK),
    Arg("num_mask_patches", "int", None, "number of block-masked patches", minimum=0, group=G_MASK),
    Arg("max_mask_patches_per_block", "int", None, "largest block (unset: no limit)",
        minimum=1, group=G_MASK),
    Arg("min_mask_patches_per_block", "int", 16, "smallest block", minimum=1, group=G_MASK),
    Arg("ratio_mask_patches", "float", None, "CAE random masking: fraction of patches masked",
        minimum=0.0, maximum=1.0, group=G_MASK),
    # --- distributed (set by paddle.distributed.launch; accepted for compatibility)
    Arg("world_size", "int", 1, "number of processes (set by the launcher)", minimum=1, group=G_DIST),
    Arg("local_rank", "int", -1, "set by the launcher", minimum=-1, group=G_DIST),
    Arg("dist_on_itp", "bool", False, "accepted for compatibility", group=G_DIST),
    Arg("dist_url", "str", "env://", "accepted for compatibility", group=G_DIST),
)

_TABLES = {}  # registered method names -> their table


def _shown(value):
    return " ".join(str(v) for v in value) if isinstance(value, (list, tuple)) else str(value)


def pretrain_table():
    """The pretraining flags: :data:`PRETRAIN_ARGS` (the help of a flag whose default is the
    method's lists the methods' defaults) and every registered method's own ``flags``."""
    from ..methods import get_method, method_names

    names = tuple(method_names())
    if names not in _TABLES:
        methods = [get_method(name) for name in names]
        args = []
        for arg in PRETRAIN_ARGS:
            per_method = [f"{m.name} {_shown(m.pretrain_defaults[arg.name])}" for m in methods
                          if arg.name in m.pretrain_defaults]
            if per_method:
                arg = replace(arg, help=f"{arg.help} (method default: {', '.join(per_method)})")
            args.append(arg)
        for method in methods:
            args.extend(replace(arg, group=method.title) for arg in method.flags)
        _TABLES[names] = ArgTable(args)
    return _TABLES[names]


def apply_method_defaults(args):
    """Fill the unset method-dependent keys from the method of ``--model`` (in place); sets
    ``args.method`` (its name)."""
    from ..methods import method_for

    method = method_for(args.model)
    method.apply_pretrain_defaults(args)
    if args.second_input_size is None:
        args.second_input_size = args.input_size // 2
    args.method = method.name
    return args


def effective_batch_size(args, world_size=1):
    return args.batch_size * args.accum_iter * world_size


def absolute_lr(args, world_size=1):
    """The peak learning rate each official script would use for these arguments."""
    from ..methods import get_method, method_for

    method = get_method(args.method) if getattr(args, "method", None) else method_for(args.model)
    return method.absolute_lr(args.lr, args.blr, effective_batch_size(args, world_size))


def parse_pretrain_args(argv=None, config_dir=None, method_defaults=True):
    """Parse a pretraining command line (``--config`` files are looked up as given, then under
    ``configs/``) and fill the method defaults."""
    args = parse_args(argv, pretrain_table(), config_dir=config_dir or default_config_dir(),
                      description="Masked-image-modeling pretraining (MAE, CAE, BootMAE)")
    return apply_method_defaults(args) if method_defaults else args
