"""The export for PaddleDetection: the layout rules (no ppdet needed) and, with paddledet installed,
the same multi-level features from ppdet's VisionTransformer as from the package's encoder."""
import numpy as np
import paddle
import pytest

from paddle_cae.downstream.detection import build_export_encoder, export_for_ppdet, ppdet_state_dict
from paddle_cae.downstream.segmentor import MultiScaleNeck, encoder_feature_maps
from paddle_cae.models import create_model
from paddle_cae.runtime.checkpoint import save_checkpoint

SMALL = {"embed_dim": 64, "depth": 4, "num_heads": 4}
FAMILIES = ["vit_base_patch16", "cae_base_patch16_224", "bootmae_base_patch16_224"]


def _random_export(tmp_path, model, img_size=64):
    """An encoder export of ``model`` with every tensor random (rel-pos tables and gammas too)."""
    paddle.seed(3)
    kwargs = dict(SMALL, img_size=img_size, num_classes=0)
    if model.startswith("cae"):
        kwargs["use_rel_pos_bias"] = True
    source = create_model(model, **kwargs)
    state = {}
    rng = np.random.RandomState(0)
    for k, v in source.state_dict().items():
        arr = v.numpy()
        if arr.dtype == np.float32 and not k.endswith("pos_embed"):
            arr = (rng.randn(*arr.shape) * (0.02 if arr.ndim > 1 else 0.1) + (1.0 if "norm" in k and k.endswith("weight") else 0.0)).astype(np.float32)
        state[k] = arr
    path = str(tmp_path / f"{model}.pd")
    save_checkpoint({"kind": "encoder", "model_name": model, "model": state}, path)
    return path, state


def test_mae_qkv_bias_splits_into_q_and_v_and_missing_gammas_become_one(tmp_path):
    path, state = _random_export(tmp_path, "vit_base_patch16")
    encoder = build_export_encoder("vit_base_patch16", SMALL, 64)
    from paddle_cae.cli.segment import load_encoder_weights

    load_encoder_weights(encoder, path)
    out = ppdet_state_dict(encoder)
    bias = state["blocks.1.attn.qkv.bias"]
    np.testing.assert_array_equal(out["blocks.1.attn.q_bias"], bias[:64])
    np.testing.assert_array_equal(out["blocks.1.attn.v_bias"], bias[128:])
    assert "blocks.1.attn.qkv.bias" not in out
    np.testing.assert_array_equal(out["blocks.3.gamma_2"], np.ones(64, np.float32))
    assert not any(k.startswith(("norm.", "fc_norm.", "head.")) for k in out)
    np.testing.assert_array_equal(out["pos_embed"], state["pos_embed"])


def test_key_bias_leaves_attention_unchanged():
    """Why dropping MAE's key bias is exact: softmax(q (k + b)^T) = softmax(q k^T)."""
    rng = np.random.RandomState(0)
    q, k, b = rng.randn(5, 8), rng.randn(7, 8), rng.randn(8)

    def softmax(x):
        e = np.exp(x - x.max(axis=1, keepdims=True))
        return e / e.sum(axis=1, keepdims=True)

    np.testing.assert_allclose(softmax(q @ (k + b).T), softmax(q @ k.T), rtol=1e-12)


@pytest.mark.parametrize("model", FAMILIES)
def test_ppdet_vision_transformer_gives_the_encoders_features(tmp_path, model):
    vt = pytest.importorskip("ppdet.modeling.backbones.vision_transformer",
                             reason="paddledet is not installed (pip install -r "
                                    "requirements-downstream.txt in its own environment)")
    path, _ = _random_export(tmp_path, model)
    out = str(tmp_path / "vit_ppdet.pdparams")
    export_for_ppdet(path, out, model, SMALL, img_size=64)

    ours = build_export_encoder(model, SMALL, 64)
    from paddle_cae.cli.segment import load_encoder_weights

    load_encoder_weights(ours, path)
    ours.eval()
    neck = MultiScaleNeck(64, 16)
    neck.eval()
    paddle.seed(0)
    image = paddle.randn([2, 3, 64, 64])
    with paddle.no_grad():
        maps = encoder_feature_maps(ours, image, [0, 1, 2, 3])
        levels = neck(maps)

    def ppdet_backbone(with_fpn):
        with paddle.utils.unique_name.guard():
            net = vt.VisionTransformer(img_size=[64, 64], patch_size=16, qkv_bias=True, init_values=0.1,
                                       use_rel_pos_bias=True, epsilon=1e-6, out_indices=[0, 1, 2, 3],
                                       with_fpn=with_fpn, pretrained=out, **SMALL)
        net.eval()
        return net

    theirs = ppdet_backbone(False)
    with paddle.no_grad():
        got = theirs(image)
    assert len(got) == 4
    for a, b in zip(got, maps):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-4, atol=1e-5)

    theirs = ppdet_backbone(True)  # the same neck weights -> the same four FPN levels
    theirs.set_state_dict({k: v for k, v in neck.state_dict().items()})
    with paddle.no_grad():
        got = theirs({"image": image})
    assert [list(t.shape) for t in got] == [list(t.shape) for t in levels]
    for a, b in zip(got, levels):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-4, atol=1e-5)
