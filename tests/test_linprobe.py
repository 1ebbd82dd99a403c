"""Linear probing: only the probe trains (checked parameter by parameter after real steps), the
attentive probe evaluates with running BatchNorm statistics, BootMAE probes a truncated encoder."""
import numpy as np
import paddle

from paddle_cae.cli import classify as classify_cli
from paddle_cae.loading.classifier import build_classifier
from paddle_cae.loading.pretrained import load_pretrained
from paddle_cae.runtime.checkpoint import load_checkpoint
from tests.test_finetune import DEMO_CLASSIFIER, demo_runs


def probe_run(tmp_path, *extra):
    runs = demo_runs()
    runner = classify_cli.run(["--finetune", runs["pretrain"], "--output_dir", str(tmp_path),
                                "--epochs", "1", "--max_train_step", "3", "--batch_size", "64",
                                "--num_workers", "0", *extra], phase="linprobe")
    return runner, load_checkpoint(tmp_path / "checkpoint-latest.pd")


def changed_tensors(before, after):
    return {k for k in after if not np.array_equal(np.asarray(before[k]), np.asarray(after[k]))}


def loaded_probe(config, pretrain):
    model = build_classifier(config)
    load_pretrained(getattr(model, "backbone", model), pretrain)
    return {k: v.numpy() for k, v in model.state_dict().items()}


def test_standard_linear_probe_trains_only_the_head(tmp_path):
    runner, ckpt = probe_run(tmp_path)
    trainable = {n for n, p in runner.model_core.named_parameters() if not p.stop_gradient}
    assert trainable == {"head.1.weight", "head.1.bias"}
    start = loaded_probe(ckpt["classifier"], demo_runs()["pretrain"])
    changed = changed_tensors(start, ckpt["model"])
    # the Linear learns; the affine-free BatchNorm only updates its running statistics
    assert changed == {"head.1.weight", "head.1.bias", "head.0._mean", "head.0._variance"}
    assert ckpt["kind"] == "linprobe" and ckpt["classifier"]["global_pool"] is False


def test_attentive_probe_trains_query_block_and_head_and_tests_with_running_statistics(tmp_path):
    runner, ckpt = probe_run(tmp_path, "--linear_type", "attentive", "--lr", "0.05")
    start = loaded_probe(ckpt["classifier"], demo_runs()["pretrain"])
    changed = changed_tensors(start, ckpt["model"])
    assert not any(k.startswith("backbone.") for k in changed)
    assert "query_token" in changed and "head.1.weight" in changed
    assert any(k.startswith("attentive_block.cross_attn.") for k in changed)
    model = runner.model_core
    model.eval()
    images = paddle.to_tensor(np.random.RandomState(0).standard_normal((6, 3, 32, 32)).astype("float32"))
    with paddle.no_grad():
        alone = model(images[:1]).numpy()
        in_batch = model(images).numpy()[:1]
    np.testing.assert_allclose(alone, in_batch, rtol=1e-5, atol=1e-6)  # no batch statistics at test


def test_probe_depth_keeps_only_the_first_blocks():
    config = {"model": "vit_base_patch16", "num_classes": 10, "input_size": 32,
              "model_args": DEMO_CLASSIFIER, "global_pool": True, "probe": "standard", "depth": 1}
    model = build_classifier(config)
    assert len(model.blocks) == 1
    report = load_pretrained(model, demo_runs()["pretrain"])
    assert any(k.startswith("blocks.1.") for k, _ in report.ignored)
    assert not any(k.startswith("blocks.0.") for k in report.initialised)


def test_probe_heads_are_drawn_untruncated_as_the_official_scripts_do():
    """MAE/CAE/BootMAE linear probes: timm trunc_normal_(std=0.01), bounds +-2 absolute; CAE's
    attentive probe: head N(0, 0.01), attentive-block Linears timm trunc_normal_(std=0.02). A
    draw truncated at +-2 std would have std 0.88x and no value beyond 2 std."""
    paddle.seed(0)
    base = {"model": "cae_base_patch16_224", "num_classes": 1000, "input_size": 32, "global_pool": False,
            "model_args": {"patch_size": 8, "embed_dim": 256, "depth": 1, "num_heads": 4}}
    heads = {"standard": build_classifier(dict(base, probe="standard")).head.linear.weight.numpy(),
             "attentive": build_classifier(dict(base, probe="attentive")).head.linear.weight.numpy()}
    for kind, w in heads.items():
        np.testing.assert_allclose(w.std(), 0.01, rtol=0.02, err_msg=kind)
        assert np.abs(w).max() > 3 * 0.01, kind
    block = build_classifier(dict(base, probe="attentive")).attentive_block
    linears = np.concatenate([l.weight.numpy().ravel() for l in block.sublayers()
                              if isinstance(l, paddle.nn.Linear)])
    np.testing.assert_allclose(linears.std(), 0.02, rtol=0.02)
