"""Official PyTorch checkpoints (``.pth``) and the DALL-E ``encoder.pkl`` -> Paddle, without torch.

Reading is :func:`paddle_cae.io.read_weights` (the restricted torch unpickler lives in
:mod:`paddle_cae.io.torch_pickle`): nothing named in the file is imported or run.

Converting
    :func:`convert_state_dict` maps official keys onto a Paddle model's ``state_dict`` names and
    layouts (Linear weights transposed, decided from the model's layer types), and reports what
    was loaded, missing, unused and shape-mismatched.

Command line: ``python -m paddle_cae.convert SRC.pth DST.pd --model NAME``.
"""
import argparse
import collections
import hashlib
import os
import sys

import numpy as np

# CheckpointError and read_torch_checkpoint are also imported from here (api.py, tests/parity)
from paddle_cae.io import CheckpointError, read_torch_checkpoint, save_checkpoint, select_state_dict

__all__ = [
    "linear_weight_names",
    "convert_state_dict",
    "run",
    "main",
]


def linear_weight_names(model):
    """Structured names (as in ``model.state_dict()``) of every ``paddle.nn.Linear`` weight.

    Paddle stores Linear weights as [in, out], PyTorch as [out, in], so exactly these are
    transposed on conversion; conv / conv-transpose weights share PyTorch's layout."""
    import paddle

    names = set()
    for prefix, layer in model.named_sublayers(include_self=True):
        if isinstance(layer, paddle.nn.Linear):
            names.add(f"{prefix}.weight" if prefix else "weight")
    return names


# buffers a model recomputes from its configuration instead of loading them
_RECOMPUTED_SUFFIXES = ("relative_position_index",)
_DROPPED_SUFFIXES = ("relative_position_index", "num_batches_tracked")
_BATCHNORM_RENAMES = (("running_mean", "_mean"), ("running_var", "_variance"))


def _apply_rename(rename, key):
    if rename is None:
        return key
    if callable(rename):
        return rename(key)
    if isinstance(rename, dict):
        return rename.get(key, key)
    raise TypeError(f"rename must be a callable or a dict, got {type(rename).__name__}")


def convert_state_dict(official_sd, model, rename=None, transpose_linear=True):
    """Map an official PyTorch state_dict onto ``model`` (a paddle Layer).

    ``rename`` (callable ``key -> new key or None`` or a dict) turns official names into the
    model's; by default ``model.official_key_map`` is used if the model defines it. Keys mapped
    to None are dropped. ``relative_position_index`` and ``num_batches_tracked`` are dropped,
    BatchNorm ``running_mean``/``running_var`` become ``_mean``/``_variance``, every weight of a
    ``paddle.nn.Linear`` is transposed, floats become float32.

    Returns ``(paddle_state, report)``: ``paddle_state`` maps model keys to numpy arrays ready for
    ``model.set_state_dict``; ``report`` has ``loaded``, ``missing`` (model keys with no source),
    ``unused`` (source keys not used), ``mismatched`` (``(key, source_shape, model_shape)``, not
    put in ``paddle_state``) and ``dropped`` (source keys dropped on purpose).

    ``transpose_linear=False`` is for sources already in Paddle's layout (``.pd`` files), which
    only need the renaming and the checks."""
    if rename is None:
        rename = getattr(model, "official_key_map", None)
    model_state = model.state_dict()
    model_shapes = {k: tuple(int(d) for d in v.shape) for k, v in model_state.items()}
    linear = linear_weight_names(model)

    paddle_state = collections.OrderedDict()
    report = {"loaded": [], "missing": [], "unused": [], "mismatched": [], "dropped": []}
    used_targets = {}
    for src_key, value in official_sd.items():
        if str(src_key).endswith(_DROPPED_SUFFIXES):
            report["dropped"].append(src_key)
            continue
        key = _apply_rename(rename, src_key)
        if key is None:
            report["dropped"].append(src_key)
            continue
        for old, new in _BATCHNORM_RENAMES:
            if key.endswith("." + old) and key not in model_shapes:
                key = key[: -len(old)] + new
        if key not in model_shapes:
            report["unused"].append(src_key)
            continue
        if key in used_targets:
            raise ValueError(f"official keys {used_targets[key]!r} and {src_key!r} both map to model key {key!r}")
        used_targets[key] = src_key
        array = np.asarray(value)
        source_shape = tuple(array.shape)
        if transpose_linear and key in linear and array.ndim == 2:
            array = array.T
        if tuple(array.shape) != model_shapes[key]:
            report["mismatched"].append((key, source_shape, model_shapes[key]))
            continue
        if array.dtype.kind == "f" and array.dtype != np.float32:
            array = array.astype(np.float32)
        paddle_state[key] = np.array(array, order="C", copy=True)
        report["loaded"].append(key)
    mismatched_keys = {m[0] for m in report["mismatched"]}
    report["missing"] = [
        k for k in model_state
        if k not in paddle_state and k not in mismatched_keys and not k.endswith(_RECOMPUTED_SUFFIXES)
    ]
    return paddle_state, report


# ----------------------------------------------------------------------------------------------
# command line
# ----------------------------------------------------------------------------------------------
def _build_parser():
    parser = argparse.ArgumentParser(
        prog="python -m paddle_cae.convert",
        description=(
            "Convert an official PyTorch checkpoint (MAE/CAE/BootMAE .pth, or DALL-E encoder.pkl) "
            "into a paddle-cae .pd file, without PyTorch. Nothing in the source file is executed: "
            "only tensors, plain containers and known module classes are accepted."
        ),
        epilog=(
            "Examples:\n"
            "  python -m paddle_cae.convert mae_pretrain_vit_base.pth mae_vit_b.pd --model vit_base_patch16\n"
            "  python -m paddle_cae.convert BootMAE_Base_800_PT.pth ema.pd --model bootmae_base --key model_ema\n"
            "  python -m paddle_cae.convert encoder.pkl dalle_encoder.pd --model dalle_encoder\n"
            "The .pd holds {'model': state_dict, 'converted_from': {...}} and is read by\n"
            "paddle_cae.io.read_weights (or paddle.load)."
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("src", help="PyTorch checkpoint to read (.pth zip or legacy pickle, or a pickled module)")
    parser.add_argument("dst", help="output .pd file (written atomically; not created on error)")
    parser.add_argument("--model", required=True,
                        help="registered paddle-cae model name the weights are for (e.g. vit_base_patch16)")
    parser.add_argument("--model_args", default=None, metavar="JSON",
                        help="constructor arguments of --model as JSON, for small variants and the "
                             "test fixtures, e.g. '{\"embed_dim\": 64, \"depth\": 2, \"num_heads\": 4}'")
    parser.add_argument("--key", default=None,
                        help="entry of the checkpoint holding the weights: model, model_ema, module, "
                             "state_dict, teacher ... (default: the first of model/module/state_dict/model_ema)")
    parser.add_argument("--encoder_only", action="store_true",
                        help="keep only the encoder of a pretraining checkpoint: an 'encoder.' prefix is "
                             "stripped, other source keys are dropped, missing head keys are expected")
    parser.add_argument("--strict", action="store_true",
                        help="fail (write nothing) if any model key is missing or any shape mismatches")
    return parser


def _encoder_only_rename(state, base_rename):
    has_encoder_prefix = any(k.startswith("encoder.") for k in state)

    def rename(key):
        if has_encoder_prefix:
            if not key.startswith("encoder."):
                return None
            key = key[len("encoder."):]
        return _apply_rename(base_rename, key) if base_rename is not None else key

    return rename


def _sha256(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _print_report(report, out):
    print(f"loaded {len(report['loaded'])}, missing {len(report['missing'])}, "
          f"unused {len(report['unused'])}, mismatched {len(report['mismatched'])}, "
          f"dropped {len(report['dropped'])}", file=out)
    for title in ("missing", "unused"):
        if report[title]:
            print(f"{title} keys:", file=out)
            for k in report[title]:
                print(f"  {k}", file=out)
    if report["mismatched"]:
        print("shape mismatches (source -> model):", file=out)
        for k, src, dst in report["mismatched"]:
            print(f"  {k}: {list(src)} -> {list(dst)}", file=out)


def run(args, out=None):
    """Convert as the command line asks; prints the report to ``out`` (default stdout)."""
    from paddle_cae.models import create_model

    out = sys.stdout if out is None else out
    src = os.fspath(args.src)
    obj = read_torch_checkpoint(src, allow_modules=True)
    state = select_state_dict(obj, args.key, source=src)
    model_args = getattr(args, "model_args", None) or {}
    if isinstance(model_args, str):
        import json

        try:
            model_args = json.loads(model_args)
        except json.JSONDecodeError as err:
            raise ValueError(f"--model_args is not valid JSON ({err.msg}): {model_args}") from None
        if not isinstance(model_args, dict):
            raise ValueError(f"--model_args must be a JSON object of constructor arguments, got {args.model_args}")
    try:
        model = create_model(args.model, **model_args)
    except KeyError as err:
        raise CheckpointError(f"--model {args.model}: {err.args[0]}") from None
    except TypeError as err:
        raise ValueError(f"--model_args for {args.model}: {str(err).splitlines()[0]}") from None
    base_rename = getattr(model, "official_key_map", None)
    rename = _encoder_only_rename(state, base_rename) if args.encoder_only else base_rename
    paddle_state, report = convert_state_dict(state, model, rename=rename)
    if args.encoder_only:
        # a backbone export from a pretraining checkpoint has no classifier head to load
        report["missing"] = [k for k in report["missing"] if not k.split(".")[0] in ("head", "fc_norm")]
    _print_report(report, out)
    if args.strict and (report["missing"] or report["mismatched"]):
        raise CheckpointError(
            f"{src}: --strict: {len(report['missing'])} missing and {len(report['mismatched'])} "
            f"mismatched keys for model {args.model}; nothing written"
        )
    if not paddle_state:
        raise CheckpointError(
            f"{src}: no tensor could be loaded into model {args.model} ({len(report['unused'])} unused, "
            f"{len(report['mismatched'])} shape-mismatched keys); nothing written"
        )
    meta = {
        "source": os.path.basename(src),
        "sha256": _sha256(src),
        "model": args.model,
        "model_args": dict(model_args),
        "key": args.key,
        "encoder_only": bool(args.encoder_only),
        "unused": list(report["unused"]),
        "missing": list(report["missing"]),
    }
    save_checkpoint({"model": paddle_state, "converted_from": meta}, args.dst)
    print(f"wrote {args.dst} ({len(paddle_state)} tensors)", file=out)
    return 0


def main(argv=None):
    args = _build_parser().parse_args(argv)
    try:
        return run(args)
    except CheckpointError as err:  # already one line naming the file
        print(f"error: {err}", file=sys.stderr)
        return 1
    except (ValueError, TypeError, OSError) as err:
        detail = str(err).splitlines()[0] if str(err) else type(err).__name__
        print(f"error: converting {args.src} -> {args.dst}: {detail}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
