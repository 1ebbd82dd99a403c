"""Loading pretrained weights into a classifier (``--finetune``): any kind of checkpoint in,
a grouped report out.

Accepted files:

* this package's ``.pd`` checkpoints: pretraining (``kind: pretrain``, the whole pretraining
  model), encoder exports (``kind: encoder``), fine-tuned and probe checkpoints, and the
  ``python -m paddle_cae.convert`` output; Paddle layout;
* official PyTorch files read by :mod:`paddle_cae.io` without torch: MAE (``model``:
  encoder-only release, ``_full``/visualize releases, fine-tuned), CAE (``encoder.*`` with
  ``teacher.*``/``alignment_encoder.*``/regressor/decoder), BootMAE (``model``; the online
  weights, not ``model_ema``); PyTorch layout (Linear weights transposed on the way in);
* other Paddle ports' ``.pd``/``.pdparams`` state dicts (PASSL CAE uses ``encoder.*`` too).

What happens to the source keys:

* a leading ``module.`` is stripped; when the keys carry an ``encoder.`` prefix (CAE
  pretraining) only those are kept, prefix removed;
* pretraining-only parts (decoders, regressor, mask tokens, target/teacher encoders, decoder
  position tables) are ignored and listed as such;
* the final ``norm`` becomes ``fc_norm`` for CAE classifiers with mean pooling (CAE starts its
  fc_norm from the pretrained LN); MAE and BootMAE start ``fc_norm`` fresh, so there ``norm`` is
  ignored; with the cls token the ``norm`` is loaded as is;
* learned position tables are resized bicubically to the model's grid; fixed sin-cos tables
  are not loaded: the classifier builds its own for its grid; relative-position tables are
  resampled with BEiT's geometric-progression rule and a shared table is copied to every block;
* a head of another shape is dropped (the model's freshly initialised head stays).

Loading fails (``PretrainedLoadError``, one line) only when encoder weights are missing or of
another shape; every other difference is reported and tolerated.
"""
import logging
import os
import warnings
from dataclasses import dataclass, field

import numpy as np

from ..convert import convert_state_dict
from ..io import CheckpointError, read_weights_with_format, select_state_dict
from ..io.weights import PD, TORCH_FORMATS, key_mismatch
from ..methods import method_of_classifier, pretrain_only_prefixes
from ..models.pos_embed import resize_pos_embed

logger = logging.getLogger("paddle_cae")


class PretrainedLoadError(ValueError):
    """Pretrained weights do not fit the model (one line naming the file and the keys)."""


# parts of the pretraining models that a classifier never uses (every method's, see
# ``Method.pretrain_only_prefixes``)
PRETRAIN_ONLY_PREFIXES = pretrain_only_prefixes()
REL_POS_TABLE = "relative_position_bias_table"
SHARED_REL_POS_TABLE = "rel_pos_bias.relative_position_bias_table"
ENCODER_PREFIXES = ("patch_embed.", "blocks.", "cls_token", "pos_embed")


# what --finetune reads: a .npz says nothing about its layout (torch or paddle), so it is refused
FINETUNE_FORMATS = TORCH_FORMATS + (PD,)


@dataclass
class WeightsFile:
    """Weights read from a file: ``state`` (name -> array), ``layout`` ('paddle' or 'torch'),
    ``kind`` (what the file is, in words), ``model_name`` (when the file says) and the raw object."""
    path: str
    state: dict
    layout: str
    kind: str
    model_name: str = None
    raw: object = None


@dataclass
class LoadReport:
    source: str
    kind: str
    loaded: list = field(default_factory=list)
    initialised: list = field(default_factory=list)
    ignored: list = field(default_factory=list)        # (key, reason)
    shape_skipped: list = field(default_factory=list)  # (key, source shape, model shape)
    adapted: list = field(default_factory=list)        # (key, what was done)

    def lines(self):
        """The grouped report, one group per line plus details."""
        out = [f"pretrained weights: {self.source} ({self.kind})",
               f"  loaded {len(self.loaded)} tensors"]
        for key, what in self.adapted:
            out.append(f"  adapted {key}: {what}")
        if self.initialised:
            out.append(f"  newly initialised ({len(self.initialised)}): {_short(self.initialised)}")
        if self.shape_skipped:
            items = [f"{k} {list(s)} -> {list(d)}" for k, s, d in self.shape_skipped]
            out.append(f"  shape-skipped ({len(items)}): {_short(items)}")
        by_reason = {}
        for key, reason in self.ignored:
            by_reason.setdefault(reason, []).append(key)
        for reason, keys in by_reason.items():
            out.append(f"  ignored, {reason} ({len(keys)}): {_short(keys)}")
        return out

    def log(self):
        for line in self.lines():
            logger.info(line)


def _short(items, limit=8):
    items = list(items)
    text = ", ".join(items[:limit])
    return text + (f", ... (+{len(items) - limit})" if len(items) > limit else "")


# ---------------------------------------------------------------------------------- reading
def _describe_keys(state):
    keys = list(state)
    if any(k.startswith("encoder.") for k in keys):
        return "CAE pretraining checkpoint (encoder.* kept)"
    if any(k.startswith(PRETRAIN_ONLY_PREFIXES) for k in keys):
        return "pretraining checkpoint with decoder"
    if any(k.startswith("head.") for k in keys):
        return "classifier checkpoint"
    return "encoder-only checkpoint"


def _pick_state(obj, model_key, source):
    keys = [k for k in str(model_key or "").split("|") if k]
    if isinstance(obj, dict):
        for key in keys:
            if key in obj and isinstance(obj[key], dict):
                return select_state_dict(obj, key, source=source)
    return select_state_dict(obj, source=source)


def read_weights_file(path, model_key="model|module"):
    """Read any supported checkpoint file (PyTorch .pth, .pd/.pdparams, decided from the
    content by :func:`paddle_cae.io.read_weights`). Raises CheckpointError (one line) when it cannot."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: no such checkpoint file")
    obj, fmt = read_weights_with_format(path, formats=FINETUNE_FORMATS)
    layout = "torch" if fmt in TORCH_FORMATS else "paddle"
    if isinstance(obj, dict) and isinstance(obj.get("kind"), str) and isinstance(obj.get("model"), dict):
        kind = {"pretrain": "pretraining checkpoint", "encoder": "encoder export",
                "finetune": "fine-tuned checkpoint", "linprobe": "linear-probe checkpoint"
                }.get(obj["kind"], obj["kind"])
        return WeightsFile(path, dict(obj["model"]), layout, f"{kind} of {obj.get('model_name', '?')}",
                           obj.get("model_name"), obj)
    state = _pick_state(obj, model_key, path)
    if not state or not all(hasattr(v, "shape") for v in state.values()):
        raise CheckpointError(f"{path}: holds no weights (expected a state_dict of arrays)")
    kind = _describe_keys(state)
    if isinstance(obj, dict) and "converted_from" in obj:
        kind = f"converted {kind}"
    return WeightsFile(path, dict(state), layout, f"{kind}, {layout} layout", None, obj)


# ---------------------------------------------------------------------------- adaptation
def cubic_spline_matrix(nodes, targets):
    """Linear map [len(targets), len(nodes)] that evaluates, at ``targets``, the interpolating
    cubic spline through values given at ``nodes`` (increasing), with not-a-knot ends.

    This is the spline FITPACK builds for an interpolation (``s=0``, degree 3: knots at the data
    points except the second and the second-last), i.e. what SciPy's ``interp2d(kind='cubic')``
    and ``RectBivariateSpline`` compute along each axis of a rectangular grid. Like FITPACK's
    evaluator, targets outside the nodes take the value at the nearest end."""
    x = np.asarray(nodes, dtype=np.float64)
    t = np.clip(np.asarray(targets, dtype=np.float64), x[0], x[-1])
    n = len(x)
    if n < 4:
        raise ValueError(f"a cubic spline needs at least 4 nodes, got {n}")
    h = np.diff(x)
    # second derivatives m solve a @ m = b @ y
    a = np.zeros((n, n))
    b = np.zeros((n, n))
    for i in range(1, n - 1):  # first derivative continuous at the interior nodes
        a[i, i - 1], a[i, i], a[i, i + 1] = h[i - 1], 2.0 * (h[i - 1] + h[i]), h[i]
        b[i, i - 1], b[i, i], b[i, i + 1] = 6.0 / h[i - 1], -6.0 / h[i - 1] - 6.0 / h[i], 6.0 / h[i]
    # not-a-knot: the third derivative is continuous at the second and the second-last node
    a[0, :3] = h[1], -(h[0] + h[1]), h[0]
    a[-1, -3:] = h[-1], -(h[-2] + h[-1]), h[-2]
    moments = np.linalg.solve(a, b)  # [n, n]: second derivatives as a function of the values
    index = np.clip(np.searchsorted(x, t, side="right") - 1, 0, n - 2)
    left, right = x[index], x[index + 1]
    width = right - left
    to_right, from_left = right - t, t - left
    out = np.zeros((len(t), n))
    rows = np.arange(len(t))
    out[rows, index] += to_right / width
    out[rows, index + 1] += from_left / width
    out += ((to_right ** 3 / (6 * width) - width * to_right / 6.0)[:, None] * moments[index]
            + (from_left ** 3 / (6 * width) - width * from_left / 6.0)[:, None] * moments[index + 1])
    return out


def geometric_offsets(src_offsets, dst_offsets):
    """BEiT's source offsets for resampling: 0 and +-(1, 1+q, 1+q+q^2, ...), the ratio q found
    by bisection so that the outermost offset reaches the target's extent."""
    half_src, half_dst = src_offsets // 2, dst_offsets // 2
    lo, hi = 1.01, 1.5
    while hi - lo > 1e-6:  # ratio q with 1 + q + ... + q^(half_src-1) == half_dst
        q = (lo + hi) / 2.0
        total = (1.0 - q ** half_src) / (1.0 - q)
        if total > half_dst:
            hi = q
        else:
            lo = q
    steps = np.cumsum([q ** i for i in range(half_src)])  # 1, 1+q, 1+q+q^2 ...
    return np.concatenate([-steps[::-1], [0.0], steps])


def resample_rel_pos_table(table, dst_grid):
    """BEiT's resampling of a relative-position bias table [(2H-1)(2W-1)+3, heads] to another
    grid: the source offsets are spread on a geometric progression chosen so the outermost
    reaches the new extent, then every head is interpolated with a bicubic spline (SciPy's
    ``interp2d(kind='cubic')`` of the official code, computed here with numpy) onto the integer
    offsets of the new grid. The 3 cls entries are kept."""
    table = np.asarray(table, dtype=np.float32)
    extra = 3
    src = int(round(np.sqrt(max(table.shape[0] - extra, 0))))
    dst_h, dst_w = dst_grid
    dst = 2 * dst_h - 1
    if src * src != table.shape[0] - extra or dst_h != dst_w:
        raise ValueError(f"relative position table of {table.shape[0]} rows does not belong to a square grid")
    if src == dst:
        return table
    if src < 4:
        raise ValueError(f"relative position table of a {(src + 1) // 2}x{(src + 1) // 2} grid is too "
                         "small to resample with a cubic spline")
    coords = geometric_offsets(src, dst)
    targets = np.arange(-(dst // 2), dst // 2 + 0.1, 1.0)
    weights = cubic_spline_matrix(coords, targets)  # [dst, src]
    grids = table[:-extra].astype(np.float64).T.reshape(-1, src, src)  # [heads, src, src]
    resampled = np.einsum("ij,hjk,lk->hil", weights, grids, weights)
    resampled = resampled.reshape(table.shape[1], -1).T.astype(np.float32)
    return np.concatenate([resampled, table[-extra:]], axis=0)


def _model_grid(model):
    return tuple(model.patch_embed.grid_size)


def map_to_classifier(state, model):
    """Source state -> (state under the model's names, ignored [(key, reason)], adapted
    [(key, what)]). Arrays keep the source layout."""
    keys = list(state)
    if keys and all(k.startswith("module.") for k in keys):
        state = {k[len("module."):]: v for k, v in state.items()}
    ignored, adapted = [], []
    if any(k.startswith("encoder.") for k in state):
        kept = {}
        for key, value in state.items():
            if key.startswith("encoder."):
                kept[key[len("encoder."):]] = value
            else:
                ignored.append((key, "pretraining-only"))
        state = kept
    own = model.state_dict()
    method = method_of_classifier(model)
    mean_pool = getattr(model, "fc_norm", None) is not None and getattr(model, "norm", None) is None
    has_fc_norm = any(k.startswith("fc_norm.") for k in state)
    blocks_with_tables = [k for k in own if k.endswith(REL_POS_TABLE)]
    out = {}
    pretrain_only = pretrain_only_prefixes()
    for key, value in state.items():
        if key.startswith(pretrain_only):
            ignored.append((key, "pretraining-only"))
            continue
        if key.startswith("norm.") and mean_pool:
            if method.norm_seeds_fc_norm and not has_fc_norm:
                out["fc_norm." + key[len("norm."):]] = value
                adapted.append((key, f"loaded as fc_norm ({method.title} starts fc_norm from the "
                                     "encoder's final norm)"))
            else:
                ignored.append((key, "final norm unused with mean pooling (fc_norm starts fresh)"))
            continue
        if key == SHARED_REL_POS_TABLE:
            for target in blocks_with_tables:
                out[target] = value
            if blocks_with_tables:
                adapted.append((key, f"shared table copied to {len(blocks_with_tables)} blocks"))
            else:
                ignored.append((key, "the model has no relative position bias"))
            continue
        out[key] = value
    return out, ignored, adapted


def adapt_shapes(state, model, ignored, adapted, layout="paddle"):
    """Resize position tables to the model's grid; drop a head of another shape (in place)."""
    own = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    grid = _model_grid(model)
    for key in list(state):
        value = np.asarray(state[key])
        if key == "pos_embed":
            if getattr(model, "pos_embed_type", "learned") != "learned":
                del state[key]
                ignored.append((key, "fixed sin-cos table rebuilt for the model's grid"))
            elif key in own and tuple(value.shape) != own[key]:
                state[key] = resize_pos_embed(value, grid)
                adapted.append((key, f"resized {list(value.shape)} -> {list(own[key])} (bicubic)"))
        elif key.endswith(REL_POS_TABLE) and key in own and tuple(value.shape) != own[key] \
                and value.shape[1:] == own[key][1:]:
            state[key] = resample_rel_pos_table(value, grid)
            adapted.append((key, f"resampled {list(value.shape)} -> {list(own[key])}"))
        elif key.startswith("head.") and key in own:
            found = tuple(value.shape[::-1]) if layout == "torch" else tuple(value.shape)
            if found != own[key]:
                del state[key]
                ignored.append((key, f"head of another shape {list(value.shape)} (re-initialised)"))
    return state


def is_encoder_key(key):
    return key.startswith(ENCODER_PREFIXES) and REL_POS_TABLE not in key


def load_pretrained(model, path, model_key="model|module", allow_missing_encoder=False):
    """Load the weights of ``path`` into ``model`` (a ViT classifier) and return the
    :class:`LoadReport`. Raises CheckpointError for unreadable files and PretrainedLoadError
    when encoder weights are missing or of another shape."""
    weights = read_weights_file(path, model_key)
    state, ignored, adapted = map_to_classifier(weights.state, model)
    state = adapt_shapes(state, model, ignored, adapted, weights.layout)
    converted, raw = convert_state_dict(state, model, rename=lambda k: k,
                                        transpose_linear=weights.layout == "torch")
    report = LoadReport(weights.path, weights.kind, loaded=list(raw["loaded"]), ignored=ignored,
                        adapted=adapted)
    report.ignored += [(k, "not in the model") for k in raw["unused"]]
    report.ignored += [(k, "recomputed by the model") for k in raw["dropped"]]
    report.shape_skipped = list(raw["mismatched"])
    fixed_tables = {"pos_embed"} if getattr(model, "pos_embed_type", "learned") != "learned" else set()
    report.initialised = [k for k in raw["missing"] if k not in fixed_tables]
    bad = [k for k in report.initialised if is_encoder_key(k)]
    bad += [k for k, _, _ in report.shape_skipped if is_encoder_key(k)]
    if bad and not allow_missing_encoder:
        detail = ""
        if report.shape_skipped:
            k, s, d = report.shape_skipped[0]
            detail = f"; e.g. {k} is {list(s)} in the file, {list(d)} in the model"
        raise PretrainedLoadError(
            f"{weights.path} ({weights.kind}) does not fit this model: {len(bad)} encoder weights are "
            f"missing or of another shape ({_short(bad, 3)}){detail}. Check --model/--model_args "
            "against the checkpoint")
    with warnings.catch_warnings():  # paddle warns for every key left out; the report lists them
        warnings.simplefilter("ignore")
        model.set_state_dict(converted)
    return report


def strict_load(model, state, source):
    """Load a checkpoint of this package into the exact same network; one-line error otherwise."""
    own = model.state_dict()
    stale = tuple(model.stale_checkpoint_prefixes)
    if stale:
        state = {k: v for k, v in state.items() if not k.startswith(stale)}
    problems = key_mismatch({k: v.shape for k, v in own.items()}, state)
    if problems:
        raise ValueError(f"{source} does not fit this model: {'; '.join(problems)}")
    model.set_state_dict({k: state[k] for k in own})


__all__ = ["LoadReport", "PretrainedLoadError", "WeightsFile", "adapt_shapes", "is_encoder_key",
           "load_pretrained", "map_to_classifier", "read_weights_file", "resample_rel_pos_table",
           "cubic_spline_matrix", "geometric_offsets", "strict_load"]
