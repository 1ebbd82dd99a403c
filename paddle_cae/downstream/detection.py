"""Detection through PaddleDetection: the package's encoders exported in the key layout of
``ppdet.modeling.backbones.vision_transformer.VisionTransformer``, which loads the file given
as its ``pretrained:`` path (``paddle.load`` of a flat state dict, then ``set_state_dict``; a
position table of another grid is resized there, bicubic).

    python -m paddle_cae.downstream.detection --model cae_base_patch16_224 \\
        --finetune output/cae_b/checkpoint-799.pd --out vit_b_cae_ppdet.pdparams
    # then in configs/detection/*.yaml:  VisionTransformer: {pretrained: vit_b_cae_ppdet.pdparams}

Any file ``main_finetune.py --finetune`` reads works (this package's pretraining checkpoints and
encoder exports, official MAE / CAE / BootMAE ``.pth``): the encoder is loaded exactly as for
fine-tuning, then renamed:

* the layouts agree on ``patch_embed.proj``, ``cls_token``, ``pos_embed``, ``blocks.<i>.norm1/2``,
  ``attn.qkv.weight`` ([in, out] in both), ``attn.q_bias/v_bias``, ``attn.proj``, ``mlp.fc1/fc2``,
  ``gamma_1/2`` and ``attn.relative_position_bias_table``;
* MAE's full ``qkv.bias`` becomes ``q_bias`` and ``v_bias``: PaddleDetection's attention has no
  key bias, and a key bias adds the same number to every logit of a query's row, which the
  softmax removes, so the features are unchanged;
* an encoder without layer scale (MAE, BootMAE) is given gammas of 1, so one YAML with
  ``init_values`` set serves all three methods;
* the final norm / fc_norm / head are left out (the detector's backbone has ``final_norm: False``).

The relative-position tables are written at the encoder's grid (``--img_size`` resamples them);
PaddleDetection's ViT configs for CAE run without them (``use_rel_pos_bias: False``).
"""
import argparse
import logging
import os
import sys

import numpy as np

logger = logging.getLogger("paddle_cae")

SKIPPED_PREFIXES = ("norm.", "fc_norm.", "head.")


def ppdet_state_dict(encoder):
    """{ppdet VisionTransformer key: float32 array} for ``encoder`` (a classifier of this package)."""
    dim = encoder.embed_dim
    out = {}
    for key, value in encoder.state_dict().items():
        if key.startswith(SKIPPED_PREFIXES) or key.endswith("relative_position_index"):
            continue
        value = np.asarray(value.numpy(), dtype=np.float32)
        if key.endswith(".attn.qkv.bias"):  # timm attention (MAE): q and v biases; k's drops out
            prefix = key[: -len("qkv.bias")]
            out[prefix + "q_bias"] = value[:dim].copy()
            out[prefix + "v_bias"] = value[2 * dim:].copy()
            continue
        out[key] = value
    for i, blk in enumerate(encoder.blocks):
        if getattr(blk, "gamma_1", None) is None:
            out[f"blocks.{i}.gamma_1"] = np.ones([dim], np.float32)
            out[f"blocks.{i}.gamma_2"] = np.ones([dim], np.float32)
    return out


def build_export_encoder(model, model_args=None, img_size=None):
    """The classifier encoder of ``model`` (no head), with relative-position tables, built for
    ``img_size`` (default: its pretraining size)."""
    import paddle

    from ..models import create_model
    from ..methods import classifier_name

    kwargs = dict(model_args or {})
    kwargs.update(num_classes=0, drop_path_rate=0.0, use_rel_pos_bias=True)
    if img_size:
        kwargs["img_size"] = int(img_size)
    with paddle.utils.unique_name.guard():
        return create_model(classifier_name(model), **kwargs)


def export_for_ppdet(weights, out_path, model="cae_base_patch16_224", model_args=None, img_size=None,
                     model_key="model|module"):
    """Write ``weights`` (anything --finetune reads) as a PaddleDetection ViT state dict at
    ``out_path`` (``paddle.save``, written to a temporary file then renamed). Returns the dict."""
    import paddle

    from ..cli.segment import load_encoder_weights

    encoder = build_export_encoder(model, model_args, img_size)
    load_encoder_weights(encoder, weights, model_key)
    state = ppdet_state_dict(encoder)
    os.makedirs(os.path.dirname(os.path.abspath(out_path)) or ".", exist_ok=True)
    tmp = f"{out_path}.tmp"
    paddle.save(state, tmp)
    os.replace(tmp, out_path)
    logger.info("wrote %s: %d tensors in PaddleDetection's VisionTransformer layout (embed_dim %d, "
                "depth %d)", out_path, len(state), encoder.embed_dim, len(encoder.blocks))
    return state


def main(argv=None):
    from ..runtime.logging import setup_console_logging
    from ..startup import report_error

    parser = argparse.ArgumentParser(prog="python -m paddle_cae.downstream.detection",
                                     description="Export an encoder for PaddleDetection's ViT backbone")
    parser.add_argument("--model", default="cae_base_patch16_224",
                        help="classifier name of the encoder (main_finetune.py's names)")
    parser.add_argument("--model_args", default="{}", help="extra constructor arguments (JSON / YAML)")
    parser.add_argument("--finetune", required=True, help="pretraining checkpoint, encoder export or "
                        "official .pth")
    parser.add_argument("--model_key", default="model|module")
    parser.add_argument("--img_size", type=int, default=None,
                        help="square input size to resample the relative-position tables to")
    parser.add_argument("--out", required=True, help="output .pdparams")
    args = parser.parse_args(argv)
    setup_console_logging(0)
    try:
        import yaml

        model_args = yaml.safe_load(args.model_args) or {}
        if not isinstance(model_args, dict):
            raise ValueError(f"--model_args must be a mapping, got {args.model_args!r}")
        export_for_ppdet(args.finetune, args.out, args.model, model_args, args.img_size, args.model_key)
    except (FileNotFoundError, ValueError, KeyError) as err:
        return report_error(err)
    return 0


if __name__ == "__main__":
    from ..startup import prepare_process

    prepare_process()
    sys.exit(main())
