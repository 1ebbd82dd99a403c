"""The Method contract: everything a pretraining method's recipe adds to the generic engine.

A method is a :class:`Method` subclass in one file of this package, registered with
:func:`register_method`. The model files name the method of each model they register
(``register_model(task, method=..., classifier=...)``); a method names only other
repositories' aliases of its classifiers, and holds:

* its own flags: ``flags`` (:class:`paddle_cae.runtime.config.Arg`; the pretraining argument
  table adds them under the method's title);
* recipe defaults: ``pretrain_defaults`` / ``finetune_defaults`` / ``linprobe_defaults`` (the
  official values of the flags whose default differs between the methods);
* ``model_flags``: command-line flag -> constructor argument of its pretraining models, and
  :meth:`Method.model_kwargs` for anything a flag maps less directly;
* the data pipeline: :meth:`Method.pretrain_transform` (per image),
  :meth:`Method.mask_generator` and :meth:`Method.finish_batch` (per global batch);
* optimisation: ``group_rule`` (layer-wise decay rule) and :meth:`Method.group_options`
  (which parameters skip weight decay, asking the model where the official recipe does), the
  learning-rate rule (``lr_scaled_by_batch``) and the pretraining schedule;
* loading pretrained weights into its classifiers: ``pretrain_only_prefixes`` (keys a
  classifier never uses) and ``norm_seeds_fc_norm``;
* the classifier: :meth:`Method.classifier_kwargs` (constructor arguments from the run's config)
  and the evaluation rules (``beit_eval_rules``);
* visualisation: :meth:`Method.reconstruct`, and :meth:`Method.inference_kwargs` /
  :meth:`Method.pretrain_mean_std` to rebuild a pretraining model from its checkpoint.

:func:`method_for` looks a model name up once; nothing outside this package branches on a
method's name.
"""

import numpy as np
from PIL import Image

from ..data.transforms import _get, mean_std, window_size_of
from ..optim.schedules import peak_lr

# the method of classifier names no method claims (a plain ViT follows MAE's rules)
DEFAULT_CLASSIFIER_METHOD = "mae"

PER_PATCH_NOTE = ("the model predicts per-patch normalised pixels: the picture is de-normalised with "
                  "each patch's true mean and std")

_METHODS = {}    # method name -> Method instance
_BY_MODEL = {}   # alias (another repository's model name) -> method name


class Method:
    name = ""
    aliases = {}              # another repository's model name -> the classifier it is
    pretrain_defaults = {}
    # the values the three official fine-tune / linear-probe recipes share; a method's own
    # tables start from these (``dict(Method.finetune_defaults, ...)``)
    finetune_defaults = dict(batch_size=64, epochs=100, blr=1e-3, min_lr=1e-6, warmup_epochs=5,
                             weight_decay=0.05, drop_path=0.1, global_pool=True, rel_pos_bias=False,
                             lr_schedule="beit", imagenet_default_mean_and_std=False)
    linprobe_defaults = dict(batch_size=512, epochs=90, blr=0.1, min_lr=0.0, warmup_epochs=10,
                             weight_decay=0.0, global_pool=False, rel_pos_bias=False, lr_schedule="mae",
                             imagenet_default_mean_and_std=False)
    flags = ()                # its own pretraining flags (runtime.config.Arg), default stated once
    model_flags = {}          # command-line flag -> pretraining constructor argument
    needs_tokenizer = False   # targets from a frozen tokenizer (the DALL-E encoder)
    masks_in_model = False    # the model draws its own mask (no mask generator in the pipeline)
    imagenet_stats_only = False   # the pipeline always normalises with ImageNet mean/std
    lr_scaled_by_batch = False    # an absolute --lr is also scaled by effective batch / 256
    pretrain_lr_schedule = "beit"
    group_rule = "beit"           # layer-wise decay rule (optim.param_groups)
    pretrain_asks_no_weight_decay = True   # the official optimiser asks model.no_weight_decay()
    beit_eval_rules = False       # BEiT's build_transform: small-image branch, crop_pct < 384 px
    pretrain_only_prefixes = ()
    norm_seeds_fc_norm = False    # the encoder's final norm starts the classifier's fc_norm

    # ------------------------------------------------------------------ configuration
    def apply_pretrain_defaults(self, args):
        """Fill the unset method-dependent keys (in place)."""
        for key, value in self.pretrain_defaults.items():
            if getattr(args, key, None) is None:
                setattr(args, key, list(value) if isinstance(value, list) else value)
        if self.imagenet_stats_only:
            args.imagenet_default_mean_and_std = True
        return args

    def absolute_lr(self, lr, blr, effective_batch):
        """The pretraining peak lr (:func:`paddle_cae.optim.schedules.peak_lr`)."""
        return peak_lr(lr, blr, effective_batch, self.lr_scaled_by_batch, self.title)[0]

    def lr_rule(self, lr, blr, effective_batch):
        return peak_lr(lr, blr, effective_batch, self.lr_scaled_by_batch, self.title)[1]

    @property
    def default_mask_patches(self):
        """The block-mask size when ``--num_mask_patches`` is unset (its recipe default)."""
        return int(self.pretrain_defaults.get("num_mask_patches", 98))

    @property
    def title(self):
        return type(self).__name__.replace("Method", "") or self.name

    # ---------------------------------------------------------------- pretraining model
    def prepare_run(self, args):
        """Before the pretraining model is built: what the run needs beside it (CAE: its
        tokenizer, whose vocabulary may set the class count); handed to :meth:`attach`.
        None: nothing."""
        return None

    def attach(self, model, prepared):
        """After the model is built: give it what :meth:`prepare_run` made."""

    def model_kwargs(self, args):
        """Constructor arguments of the pretraining model from the flags (``--model_args`` last)."""
        kwargs = {}
        for flag, name in self.model_flags.items():
            value = getattr(args, flag, None)
            if value is not None:
                kwargs[name] = value
        kwargs.update(getattr(args, "model_args", None) or {})
        return kwargs

    def inference_kwargs(self, args):
        """Constructor arguments to rebuild a pretraining model from its checkpoint's args (dict)."""
        return dict(args.get("model_args") or {})

    def pretrain_mean_std(self, args):
        """The normalisation of the pretraining pipeline for a checkpoint's args (dict)."""
        if self.imagenet_stats_only:
            return mean_std(True)
        return mean_std(args.get("imagenet_default_mean_and_std") is not False)

    # ----------------------------------------------------------------------- data
    def pipeline_basics(self, args, mask_generator=None, imagenet_stats=False):
        """(input_size, mean, std, mask generator) of a pretraining pipeline: what every
        method's :meth:`pretrain_transform` reads first (``imagenet_stats``: the default of
        ``--imagenet_default_mean_and_std``)."""
        input_size = int(_get(args, "input_size", 224))
        mean, std = mean_std(bool(_get(args, "imagenet_default_mean_and_std", imagenet_stats)))
        if mask_generator is None:
            mask_generator = self.mask_generator(args)
        return input_size, mean, std, mask_generator

    def mask_generator(self, args):
        """The block or random mask generator the config describes (None: masks in the model)."""
        from ..data import masking

        if self.masks_in_model:
            return None
        window = window_size_of(args)
        num_patches = window[0] * window[1]
        kind = str(_get(args, "mask_generator", "block")).lower()
        if kind == "random":
            ratio = _get(args, "ratio_mask_patches", _get(args, "mask_ratio"))
            if ratio is not None:
                return masking.RandomMaskGenerator(window, mask_ratio=float(ratio))
            return masking.RandomMaskGenerator(window, num_masking_patches=int(_get(args, "num_mask_patches")))
        if kind != "block":
            raise ValueError(f"--mask_generator must be 'block' or 'random', got '{kind}'")
        count = int(_get(args, "num_mask_patches", self.default_mask_patches))
        if count > num_patches:
            raise ValueError(f"--num_mask_patches {count} exceeds the {num_patches} patches of a "
                             f"{window[0]}x{window[1]} grid")
        return self.block_mask_generator(window, count, int(_get(args, "min_mask_patches_per_block", 16)),
                                         _get(args, "max_mask_patches_per_block"))

    def block_mask_generator(self, window, count, min_block, max_block):
        from ..data import masking

        return masking.BlockMaskGenerator(window, count, min_num_patches=min_block,
                                          max_num_patches=max_block)

    def pretrain_transform(self, args, mask_generator=None):
        """image (PIL RGB) -> dict of arrays the pretraining model's forward takes."""
        raise NotImplementedError(f"method {self.name!r} defines no pretraining pipeline")

    def synthetic_batch(self, args, batch_size, seed=0):
        """(batch, conversions): ``batch_size`` samples of this method's pipeline
        (:meth:`pretrain_transform` of ``args``) from random pictures, collated as the loader
        does (numpy; uint8 images), and the pipeline's float conversions. What a benchmark
        times the real training step on."""
        from ..data.loader import collate_samples, derive_seed
        from ..data.transforms import sample_rng

        pipeline = self.pretrain_transform(args)
        side = int(_get(args, "input_size", 224)) * 5 // 4
        rng = np.random.RandomState(seed)
        samples = []
        for i in range(batch_size):
            picture = Image.fromarray(rng.randint(0, 256, (side, side, 3), dtype=np.uint8))
            with sample_rng(derive_seed(seed, i)):
                samples.append(pipeline(picture))
        return collate_samples(samples), dict(getattr(pipeline, "conversions", {}))

    def finish_batch(self, batch, batch_seed):
        """The data pipeline's last step, on a whole batch (dict of arrays or tensors), for
        draws made once per global batch; ``batch_seed`` is the same on every rank for one
        global batch. Returns the batch the model takes."""
        return batch

    # --------------------------------------------------------------- epoch schedules
    def forward_kwargs(self, model, epoch):
        """Arguments of the training forward at ``epoch`` (schedules the recipe varies per
        epoch), computed here and passed in: the model holds no epoch counter."""
        return {}

    def teacher_momentum(self, model, epoch):
        """The momentum of the EMA teacher update after each optimizer step at ``epoch``
        (the loop calls ``model.update_teacher(m)``), or None: no teacher."""
        return None

    # ------------------------------------------------------------------ optimisation
    def group_options(self, phase, model=None):
        """``rule`` and ``no_weight_decay_list`` as the official recipe builds its groups."""
        from ..optim.param_groups import model_no_weight_decay

        if phase == "pretrain":
            skip = model_no_weight_decay(model) if self.pretrain_asks_no_weight_decay else set()
        elif phase in ("finetune", "linprobe"):
            skip = model_no_weight_decay(model) if model is not None else {"pos_embed", "cls_token"}
        else:
            raise ValueError(f"unknown phase {phase!r}; expected pretrain, finetune or linprobe")
        return {"rule": self.group_rule, "no_weight_decay_list": skip}

    # -------------------------------------------------------------------- classifier
    def classifier_kwargs(self, config, kwargs, merge):
        """Add the method's constructor arguments of its classifier from ``config`` to
        ``kwargs``; ``merge(kwargs, key, value, flag)`` applies the --model_args rule."""

    def head_init_std(self, args, probe):
        """The classifier head's init std a run asks for (None: the constructor's)."""
        return None

    # ---------------------------------------------------------------- visualisation
    def reconstruct(self, model, images, seed=0):
        """(masked input, reconstruction, mask), each [B, 3, H, W] in the model's normalised
        space (mask 1 = hidden). Called in eval mode, without gradients, after
        ``paddle.seed(seed)`` (:func:`paddle_cae.inference.predict.reconstruct`); ``seed`` also seeds
        any draw the method makes itself."""
        raise ValueError(f"{type(model).__name__} cannot reconstruct pixels (method {self.name!r} "
                         "has no pixel reconstruction)")

    def reconstruction_note(self, model):
        """A sentence on how the picture was made, or ''."""
        return ""

    def __repr__(self):
        return f"<method {self.name}>"


def register_method(cls):
    """Class decorator (or call): register a :class:`Method` and its aliases."""
    method = cls() if isinstance(cls, type) else cls
    if not method.name:
        raise ValueError(f"{type(method).__name__}: a method needs a name")
    _METHODS[method.name] = method
    for model in method.aliases:
        owner = _BY_MODEL.get(model)
        if owner is not None and owner != method.name:
            raise ValueError(f"model {model!r} claimed by methods {owner!r} and {method.name!r}")
        _BY_MODEL[model] = method.name
    return cls


def _load_all():
    from ..models.registry import import_modules_of

    import_modules_of(__name__.rsplit(".", 1)[0], skip=("base",))


def method_names():
    _load_all()
    return sorted(_METHODS)


def get_method(name):
    """A method by its own name ('mae', 'cae', ...)."""
    _load_all()
    if isinstance(name, Method):
        return name
    if name not in _METHODS:
        raise ValueError(f"unknown method {name!r}; expected one of {method_names()}")
    return _METHODS[name]


def method_for(model_name, classifier=False):
    """The method of a model name: a registered pretraining model or classifier (the method
    its ``register_model`` names) or another repository's alias (``base_patch16_224``). With
    ``classifier=True`` a name no method claims gets the plain ViT's rules (MAE's)."""
    from ..models.registry import model_method

    _load_all()
    name = str(model_name)
    owner = _BY_MODEL.get(name) or model_method(name)
    if owner is None and classifier:
        owner = DEFAULT_CLASSIFIER_METHOD
    if owner is None:
        raise ValueError(f"cannot tell the pretraining method of model '{model_name}' "
                         f"(expected one of {', '.join(pretraining_model_names())})")
    return get_method(owner)


def pretraining_model_names():
    """The registered pretraining models that belong to a method."""
    from ..models.registry import list_models, model_method

    return [n for n in list_models("pretrain") if model_method(n) is not None]


def method_of_classifier(model):
    """The method of a built classifier (its ``family``; a plain ViT follows MAE's rules)."""
    return get_method(getattr(model, "family", None) or DEFAULT_CLASSIFIER_METHOD)


def classifier_name(model_name):
    """The classifier a (pretraining or other repository's) model name is fine-tuned as."""
    from ..models.registry import model_classifier

    _load_all()
    for method in _METHODS.values():
        if model_name in method.aliases:
            return method.aliases[model_name]
    return model_classifier(model_name) or model_name


def classifier_method(model_name):
    """The method of a classifier (or aliased) name; a plain ViT follows MAE's rules."""
    return method_for(classifier_name(model_name), classifier=True)


def pretrain_only_prefixes():
    """Key prefixes of every method's pretraining-only parts (a classifier never uses them)."""
    _load_all()
    seen = []
    for name in sorted(_METHODS):
        for prefix in _METHODS[name].pretrain_only_prefixes:
            if prefix not in seen:
                seen.append(prefix)
    return tuple(seen)
