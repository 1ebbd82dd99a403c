"""Parameter groups: weight-decay exclusions and layer-wise learning-rate decay.

Two official rules exist and give the same numbers for a plain ViT:

* MAE (``util/lr_decay.param_groups_lrd``): layer ids 0 .. depth+1, ``mask_token`` lands in
  the last layer.
* BEiT/CAE/BootMAE (``LayerDecayValueAssigner`` + ``get_parameter_groups``): the same ids,
  but ``mask_token`` is layer 0.

Weight decay is skipped for 1-D tensors, names ending in ``.bias`` and the skip list.

In both, ``scale(id) = layer_decay ** (depth + 1 - id)``. BootMAE's ``--backbone_decay``
multiplies every scale except the last one (the head keeps 1.0).

A model may describe itself instead of relying on the ViT naming rules:

* ``layer_id(name) -> int`` in ``0 .. num_layers_for_decay()``;
* ``num_layers_for_decay() -> int``: the id of the last layer, i.e. ``depth + 1`` (MAE's
  ``num_layers``; BEiT's ``get_num_layers() == depth`` and a ``blocks`` list are accepted too);
* ``no_weight_decay() -> set of names`` (used when ``no_weight_decay_list`` is None).
"""
from collections import OrderedDict, namedtuple

# The two official layer-decay rules, by the name the methods give them:
#   mask_token_first: ``mask_token`` sits in layer 0 (BEiT's code) rather than the last layer
#                     (MAE's rule lists only cls_token and pos_embed by name);
#   always_by_layer:  layer groups are built whenever a layer decay is given (MAE), not only
#                     for layer_decay < 1 (BEiT's code; the values are the same).
GroupRule = namedtuple("GroupRule", "mask_token_first always_by_layer")
RULES = {"mae": GroupRule(mask_token_first=False, always_by_layer=True),
         "beit": GroupRule(mask_token_first=True, always_by_layer=False)}


def _rule(rule):
    if rule not in RULES:
        raise ValueError(f"rule must be one of {tuple(RULES)}, got {rule!r}")
    return RULES[rule]


def layer_id_for_vit(name, num_layers, rule="beit"):
    """Layer id of parameter ``name`` in a ViT with ``num_layers`` blocks.

    Ids run from 0 (embeddings) to ``num_layers + 1`` (final norm, head and anything else).
    ``rule`` only matters for ``mask_token``: layer 0 for BEiT-style code, the last layer for
    MAE (whose rule lists only ``cls_token`` and ``pos_embed`` by exact name).
    """
    mask_token_first = _rule(rule).mask_token_first
    last = num_layers + 1
    if name in ("cls_token", "pos_embed"):
        return 0
    if name == "mask_token":
        return 0 if mask_token_first else last
    if name.startswith("patch_embed"):
        return 0
    if name.startswith("rel_pos_bias"):
        return last
    if name.startswith("blocks"):
        return int(name.split(".")[1]) + 1
    return last


def layer_scales(num_layers, layer_decay, backbone_decay=1.0):
    """The ``num_layers + 2`` lr multipliers, index = layer id (BootMAE's backbone factor
    applies to every entry but the last, so the head keeps exactly 1.0)."""
    scales = [backbone_decay * layer_decay ** (num_layers + 1 - i) for i in range(num_layers + 2)]
    scales[-1] /= backbone_decay
    return scales


def decay_depth(model):
    """Depth (number of transformer blocks) the layer-decay rule counts for ``model``.

    A model's ``num_layers_for_decay()`` gives the id of its last layer, ``depth + 1`` (MAE's
    ``num_layers``); BEiT's ``get_num_layers()`` gives ``depth``; else ``len(model.blocks)``.
    """
    fn = getattr(model, "num_layers_for_decay", None)
    if callable(fn):
        return int(fn()) - 1
    fn = getattr(model, "get_num_layers", None)
    if callable(fn):
        return int(fn())
    blocks = getattr(model, "blocks", None)
    if blocks is not None:
        return len(blocks)
    raise ValueError(
        f"{type(model).__name__}: cannot tell its depth for layer decay; define "
        "num_layers_for_decay() or a `blocks` list"
    )


def model_no_weight_decay(model):
    fn = getattr(model, "no_weight_decay", None)
    return set(fn()) if callable(fn) else set()


def assign_param_groups(named_params, weight_decay, layer_decay=None, no_weight_decay_list=(),
                        rule="mae", backbone_decay=1.0, skip_bias_and_1d=True,
                        num_layers=None, layer_id_fn=None):
    """Per-parameter decisions for a list of ``(name, shape, trainable)``.

    Returns an ordered ``{name: {"layer_id", "lr_scale", "weight_decay", "group_name"}}`` for
    every trainable parameter. This is the shape-only core of :func:`param_groups`; it needs no
    model, so the assignment can be checked against names and shapes alone.
    """
    always_by_layer = _rule(rule).always_by_layer
    skip = set(no_weight_decay_list or ())
    # BEiT-style code only builds an assigner for layer_decay < 1; MAE always does (same values).
    use_layers = layer_decay is not None and (always_by_layer or layer_decay < 1.0)
    if use_layers:
        if num_layers is None:
            raise ValueError("layer decay needs num_layers (the number of blocks)")
        scales = layer_scales(num_layers, layer_decay, backbone_decay)
        if layer_id_fn is None:
            layer_id_fn = lambda n: layer_id_for_vit(n, num_layers, rule)  # noqa: E731
    out = OrderedDict()
    for name, shape, trainable in named_params:
        if not trainable:
            continue
        ndim = len(shape)
        no_decay = name in skip
        if skip_bias_and_1d:
            # MAE's fine-tune rule tests only ndim == 1; its pretraining helper (timm
            # add_weight_decay) and BEiT also test ".bias" by name. Biases are 1-D anyway.
            no_decay = no_decay or ndim == 1 or name.endswith(".bias")
        wd = 0.0 if no_decay else float(weight_decay)
        tag = "no_decay" if no_decay else "decay"
        if use_layers:
            layer_id = int(layer_id_fn(name))
            if not 0 <= layer_id < len(scales):
                raise ValueError(
                    f"layer id {layer_id} of parameter {name!r} is outside 0..{len(scales) - 1}"
                )
            lr_scale = scales[layer_id]
            group_name = f"layer_{layer_id}_{tag}"
        else:
            layer_id = None
            lr_scale = 1.0
            group_name = tag
        out[name] = {"layer_id": layer_id, "lr_scale": lr_scale, "weight_decay": wd,
                     "group_name": group_name}
    return out


def _model_assignment(model, weight_decay, layer_decay, no_weight_decay_list, rule,
                      backbone_decay, skip_bias_and_1d):
    params = list(model.named_parameters())
    if no_weight_decay_list is None:
        no_weight_decay_list = model_no_weight_decay(model)
    num_layers = None
    layer_id_fn = None
    if layer_decay is not None:
        num_layers = decay_depth(model)
        if callable(getattr(model, "layer_id", None)):
            layer_id_fn = model.layer_id
    spec = [(n, list(p.shape), not p.stop_gradient) for n, p in params]
    assignment = assign_param_groups(
        spec, weight_decay, layer_decay, no_weight_decay_list, rule, backbone_decay,
        skip_bias_and_1d, num_layers, layer_id_fn,
    )
    return params, assignment


def param_groups(model, weight_decay, layer_decay=None, no_weight_decay_list=None, rule="mae",
                 backbone_decay=1.0, skip_bias_and_1d=True):
    """Optimizer parameter groups for ``model``.

    Args:
        model: the bare model; the groups are built before a run wraps it for data
            parallelism (a ``paddle.DataParallel`` would prefix every name with ``_layers.``).
        weight_decay: the decay of parameters that are decayed.
        layer_decay: layer-wise lr decay factor, or None for one lr scale of 1.0.
        no_weight_decay_list: names never decayed. None asks ``model.no_weight_decay()``
            (empty when the model has none); pass ``()`` for the pretraining recipes that
            use no list (MAE and CAE pretraining).
        rule: ``"mae"`` or ``"beit"`` (CAE, BootMAE); see the module docstring.
        backbone_decay: BootMAE's extra factor on every layer but the last.
        skip_bias_and_1d: exempt 1-D tensors and ``.bias`` names from decay.

    Returns a list of dicts in first-seen order, each with ``params``, ``param_names``,
    ``weight_decay``, ``lr_scale``, ``group_name`` and ``learning_rate`` (= ``lr_scale``: Paddle's
    own optimizers read it as a multiplier of their lr). Frozen parameters
    (``stop_gradient=True``) are left out.
    """
    params, assignment = _model_assignment(model, weight_decay, layer_decay, no_weight_decay_list,
                                           rule, backbone_decay, skip_bias_and_1d)
    groups = OrderedDict()
    for name, p in params:
        info = assignment.get(name)
        if info is None:
            continue
        group = groups.get(info["group_name"])
        if group is None:
            group = groups[info["group_name"]] = {
                "params": [], "param_names": [], "weight_decay": info["weight_decay"],
                "lr_scale": info["lr_scale"], "learning_rate": info["lr_scale"],
                "group_name": info["group_name"],
            }
        group["params"].append(p)
        group["param_names"].append(name)
    return list(groups.values())


def describe_param_groups(model, weight_decay, layer_decay=None, no_weight_decay_list=None,
                          rule="mae", backbone_decay=1.0, skip_bias_and_1d=True):
    """``{param name: {"lr_scale", "weight_decay", "layer_id", "group_name"}}`` for every
    trainable parameter, with the same arguments as :func:`param_groups`."""
    _, assignment = _model_assignment(model, weight_decay, layer_decay, no_weight_decay_list,
                                      rule, backbone_decay, skip_bias_and_1d)
    return dict(assignment)
