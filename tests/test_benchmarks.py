"""The FLOP counter against a hand count, the throughput script on a tiny model, and the
inference helper's CPU-feature logic. Nothing here is timed."""
import json
import os
import subprocess
import tempfile
import sys

import paddle
import pytest

from paddle_cae.models.registry import create_model
from paddle_cae.inference import predictor as inference
from paddle_cae.fast.flops import count_flops

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def vit_forward_flops(img, patch, dim, depth, mlp_ratio, classes, batch):
    n = (img // patch) ** 2
    tokens = n + 1
    per_block = tokens * (3 * dim * dim + dim * dim + 2 * mlp_ratio * dim * dim) \
        + 2 * tokens * tokens * dim  # q k^T and attn v
    macs = depth * per_block + n * dim * 3 * patch * patch + dim * classes
    return 2 * batch * macs


@pytest.mark.parametrize("attention", ["fused", "explicit"])
def test_flop_count_matches_hand_count(monkeypatch, attention):
    monkeypatch.setenv("PADDLE_CAE_ATTENTION", attention)
    model = create_model("vit_base_patch16", img_size=32, embed_dim=24, depth=2, num_heads=3,
                         num_classes=7)
    with count_flops() as c:
        model(paddle.randn([2, 3, 32, 32]))
    assert c.trainable == vit_forward_flops(32, 16, 24, 2, 4, 7, 2)
    assert c.frozen == 0
    assert c.train_step() == 3 * c.trainable


def test_flop_count_frozen_parts_count_once():
    before = paddle.matmul
    model = create_model("vit_base_patch16", img_size=32, embed_dim=24, depth=1, num_heads=3,
                         num_classes=7)
    x = paddle.randn([1, 3, 32, 32])
    with paddle.no_grad(), count_flops() as c:
        model(x)
    assert c.trainable == 0 and c.frozen == vit_forward_flops(32, 16, 24, 1, 4, 7, 1)
    assert c.train_step() == c.frozen
    # the counter restores what it wrapped
    assert paddle.matmul is before


def test_flop_count_of_functional_convolutions():
    """The DALL-E tokenizer calls F.conv2d (which runs its kernel directly in dygraph): every
    convolution counts once, frozen, as output size x (in channels x kernel area)."""
    import paddle.nn.functional as F

    from paddle_cae.models.dalle import DalleEncoder

    before = F.conv2d
    enc = DalleEncoder(group_count=2, n_hid=8, n_blk_per_group=1, vocab_size=16)
    img = 16
    with count_flops() as c:
        enc.get_codebook_indices(paddle.rand([2, 3, img, img]))

    def conv(hw, c_in, c_out, k):
        return hw * hw * c_out * c_in * k * k

    macs = conv(16, 3, 8, 7)  # input conv, 8 channels
    macs += conv(16, 8, 2, 3) + 2 * conv(16, 2, 2, 3) + conv(16, 2, 8, 1)  # group 1, width 8
    macs += conv(8, 8, 16, 1)  # group 2 id path 8 -> 16 (after the 2x2 pool)
    macs += conv(8, 8, 4, 3) + 2 * conv(8, 4, 4, 3) + conv(8, 4, 16, 1)  # its res path
    macs += conv(8, 16, 16, 1)  # head: 1x1 to the vocabulary
    assert c.trainable == 0 and c.frozen == 2 * 2 * macs
    assert F.conv2d is before  # restored


def run_script(*extra):
    cmd = [sys.executable, os.path.join(ROOT, "benchmarks", "throughput.py"), "--steps", "2",
           "--warmup", "1", "--peak_size", "256", "--json", "--batch_size", "2",
           "--input_size", "32", "--threads", "1"] + list(extra)
    # run as README runs it (no PYTHONPATH, from another folder): the script finds the package
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tempfile.gettempdir())
    assert out.returncode == 0, out.stderr[-3000:]
    line = [l for l in out.stdout.splitlines() if l.startswith("{")][-1]
    assert "| img/s |" in out.stdout
    return json.loads(line)


@pytest.mark.slow
def test_throughput_script_tiny_finetune():
    r = run_script("--model", "vit_base_patch16", "--phase", "finetune", "--model_kwargs",
                   json.dumps({"embed_dim": 24, "depth": 1, "num_heads": 3}))
    assert r["images_per_s"] > 0 and r["peak_mem_mb"] > 0 and 0 < r["mfu"] < 5
    assert r["forward_gflops_frozen"] == 0
    expected = 3 * vit_forward_flops(32, 16, 24, 1, 4, 1000, 2)
    assert abs(r["model_tflops_per_step"] * 1e12 - expected) < 1e3


@pytest.mark.slow
def test_throughput_script_tiny_pretrain():
    r = run_script("--model", "mae_vit_base_patch16", "--model_kwargs", json.dumps(
        {"embed_dim": 24, "depth": 1, "num_heads": 3, "decoder_embed_dim": 16,
         "decoder_depth": 1, "decoder_num_heads": 2}))
    assert r["phase"] == "pretrain" and r["images_per_s"] > 0


@pytest.mark.slow
def test_throughput_script_two_processes():
    """--nproc 2: two data-parallel workers (gloo); the whole batch's FLOPs per step and the
    MFU restated against the peak the parent measured before and after the run."""
    kwargs = json.dumps({"embed_dim": 24, "depth": 1, "num_heads": 3})
    r = run_script("--model", "vit_base_patch16", "--phase", "finetune", "--nproc", "2",
                   "--threads", "2", "--model_kwargs", kwargs)
    assert r["nproc"] == 2 and r["threads_per_proc"] == 1
    assert r["mfu"] == pytest.approx(r["achieved_gflops"] / r["peak_gflops"])
    expected = 3 * vit_forward_flops(32, 16, 24, 1, 4, 1000, 2)
    assert abs(r["model_tflops_per_step"] * 1e12 - expected) < 1e3


def test_cpu_bf16_detection(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor : 0\nflags : fpu sse avx2 avx512f\n")
    assert inference.cpu_flags(str(info)) == {"fpu", "sse", "avx2", "avx512f"}
    assert not inference.cpu_has_bf16({"avx512f"})
    assert inference.cpu_has_bf16({"avx512f", "avx512_bf16"})
    assert inference.cpu_has_bf16({"amx_bf16"})
    assert inference.resolve_bf16(None, flags={"avx2"}) is False
    assert inference.resolve_bf16(False, flags={"amx_bf16"}) is False
    with pytest.raises(RuntimeError):
        inference.resolve_bf16(True, flags={"avx2"})


def test_resolve_bf16_auto_and_env(monkeypatch):
    from paddle_cae.fast import switches

    monkeypatch.delenv("PADDLE_CAE_INFER_BF16", raising=False)
    assert inference.resolve_bf16(None, flags={"amx_bf16"}, auto=switches.infer_bf16()) is True
    monkeypatch.setenv("PADDLE_CAE_INFER_BF16", "0")
    assert inference.resolve_bf16(None, flags={"amx_bf16"}, auto=switches.infer_bf16()) is False


def test_create_predictor_fp32_matches_dynamic(tmp_path):
    import numpy as np

    from paddle_cae.inference.predict import export_inference_model

    paddle.seed(0)
    model = create_model("vit_base_patch16", img_size=32, embed_dim=24, depth=1, num_heads=3,
                         num_classes=5)
    model.eval()
    x = np.random.default_rng(0).standard_normal((2, 3, 32, 32)).astype("float32")
    with paddle.no_grad():
        ref = model(paddle.to_tensor(x)).numpy()
    export_inference_model(model, str(tmp_path), 32)
    with pytest.raises(FileNotFoundError):
        inference.model_files(str(tmp_path / "missing"))
    predictor = inference.create_predictor(str(tmp_path), bf16=False, threads=1)
    out = inference.run_predictor(predictor, x)
    np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-4)


def _throughput_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "throughput_bench", os.path.join(ROOT, "benchmarks", "throughput.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_throughput_steps_follow_the_recipes():
    """The timed steps take the official recipes' settings: CAE masks 98 patches with drop path
    0.1, layer scale 0.1 and clipping at 3.0; MAE's loss is on normalised pixels; fine-tuning
    uses drop path 0.1 and Mixup 0.8 / CutMix 1.0 with label smoothing 0.1."""
    tp = _throughput_module()

    def settings(phase, model):
        return tp.recipe_settings(tp.recipe_path("auto", phase, model))

    cae = settings("pretrain", "cae_base_patch16_224_8k_vocab")
    assert (cae["num_mask_patches"], cae["drop_path"], cae["clip_grad"]) == (98, 0.1, 3.0)
    mae = settings("pretrain", "mae_vit_base_patch16")
    assert "clip_grad" not in mae
    ft = settings("finetune", "vit_base_patch16")
    assert (ft["mixup"], ft["cutmix"], ft["smoothing"]) == (0.8, 1.0, 0.1)
    assert tp.recipe_model_kwargs(ft, "finetune") == {"drop_path_rate": 0.1, "global_pool": True}
    assert tp.recipe_settings(tp.recipe_path("none", "pretrain", "mae_vit_base_patch16")) == {}

    # a pretraining model is built from its method's reading of the recipe
    from paddle_cae.methods import get_method

    def run(model, **kwargs):
        return tp.pretrain_run_args(tp.parse_args(["--model", model, "--model_kwargs", json.dumps(kwargs)]))

    cae_run = run("cae_base_patch16_224_8k_vocab")
    cae_kwargs = get_method("cae").model_kwargs(cae_run)
    assert (cae_kwargs["drop_path_rate"], cae_kwargs["init_values"]) == (0.1, 0.1)
    assert get_method("mae").model_kwargs(run("mae_vit_base_patch16"))["norm_pix_loss"] is True

    # the CAE batch masks the recipe's 98 of 196 patches; --no_tokenizer brings token ids
    tiny = dict(embed_dim=24, depth=1, num_heads=3, decoder_embed_dim=24, decoder_num_heads=3,
                regressor_depth=1, decoder_depth=1)
    model = create_model("cae_base_patch16_224_8k_vocab", **tiny)
    batch, conversions = tp.pretrain_batch(paddle, get_method("cae"), cae_run, model, 2, no_tokenizer=True)
    assert batch["bool_masked_pos"].astype("int32").flatten(1).sum(axis=1).numpy().tolist() == [98, 98]
    assert list(batch["target_ids"].shape) == [2, 196] and "tokenizer_images" not in batch
    assert batch["images"].dtype == paddle.uint8 and list(conversions) == ["images"]


def test_the_bootmae_step_of_the_throughput_benchmark_updates_the_teacher():
    """The timed BootMAE step is the training loop's: the method's batch (rolled orders), its
    feature weight of the epoch, and the teacher's EMA step after the optimizer step."""
    tp = _throughput_module()
    args = tp.parse_args(["--model", "bootmae_base", "--batch_size", "2", "--input_size", "32",
                          "--epoch", "3", "--model_kwargs",
                          json.dumps({"embed_dim": 24, "depth": 2, "num_heads": 3, "decode_dim": 16,
                                      "fea_list": [0, 1]})])
    args.phase = "pretrain"
    model, step, _, _ = tp.build(args, paddle, {"rank": 0, "world": 1})
    assert model.has_teacher  # the recipe's --model_ema
    before = {k: v.numpy().copy() for k, v in model.teacher_state_dict().items()}
    step()
    changed = [k for k, v in model.teacher_state_dict().items() if not (v.numpy() == before[k]).all()]
    assert changed and "cls_token" in changed


@pytest.mark.slow
def test_throughput_profile_on_recipe_step():
    """--profile prints the top operators of one recipe step (CAE: tokenizer, drop path,
    clipping) with their share of the step; the fused kernels' forward calls are counted."""
    kwargs = {"embed_dim": 24, "depth": 1, "num_heads": 3, "decoder_embed_dim": 24,
              "decoder_num_heads": 3, "regressor_depth": 1, "decoder_depth": 1}
    r = run_script("--model", "cae_base_patch16_224_8k_vocab", "--model_kwargs",
                   json.dumps(kwargs), "--profile", "200", "--steps", "1")
    assert r["recipe"]["clip_grad"] == 3.0 and r["recipe"]["drop_path"] == 0.1
    top = r["profile"]["top"]
    ops = [row["op"] for row in top]
    assert "conv2d" in ops and "matmul" in ops  # the tokenizer and the transformer
    assert "cae_split_heads" in ops if r["fused_kernels"] else "cae_split_heads" not in ops
    shares = [row["share"] for row in top]
    assert shares == sorted(shares, reverse=True) and 0 < sum(shares) <= 1.0
