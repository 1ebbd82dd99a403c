"""main_infer.py: top-5 with the stored class names, folders, export through paddle.inference,
reconstruction pictures, and one-line errors for bad input."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import paddle
import pytest
from PIL import Image

import main_infer
from paddle_cae.api import load_checkpoint, predict_batch
from paddle_cae.data.imagenet_classes import imagenet_class_names, imagenet_synsets
from paddle_cae.inference.predict import (export_inference_model, image_paths, preprocessing, run_inference_model,
                                     to_batch)
from paddle_cae.runtime.checkpoint import save_checkpoint
from paddle_cae.runtime.checkpoint import load_checkpoint as read_pd
from tests.test_finetune import demo_runs, one_line_error

ROOT = Path(__file__).resolve().parents[1]
VAL = ROOT / "demo" / "digits" / "val"


def first_image(label):
    return str(VAL / str(label) / sorted(os.listdir(VAL / str(label)))[0])


@pytest.mark.slow
def test_main_infer_prints_the_true_class_among_the_top5():
    runs = demo_runs()
    image = first_image(3)
    env = dict(os.environ, OMP_NUM_THREADS="2")
    result = subprocess.run([sys.executable, "main_infer.py", "--model", "vit_base_patch16", "--resume",
                             runs["best"], "--img_path", image], cwd=ROOT, env=env,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    names, probs = printed_top5(result.stdout)
    assert len(names) == 5 and "3" in names, names
    assert probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1 + 1e-6


def test_folder_input_is_predicted_in_batches_one_section_per_image(capsys):
    runs = demo_runs()
    assert main_infer.main(["--resume", runs["best"], "--img_path", str(VAL / "7"), "--batch_size", "8"]) == 0
    out = capsys.readouterr().out
    count = len(os.listdir(VAL / "7"))
    assert sum(1 for line in out.splitlines() if line.endswith(".png:")) == count
    assert sum(1 for line in out.splitlines() if PREDICTION_LINE.match(line)) == 5 * count


def test_exported_model_gives_the_same_logits_through_paddle_inference(tmp_path):
    model = load_checkpoint(demo_runs()["best"])
    prefix = export_inference_model(model, str(tmp_path), 32)
    batch = to_batch(image_paths(VAL / "5")[:4], preprocessing(model.preprocess_config))
    with paddle.no_grad():
        expected = model(batch).numpy()
    got = run_inference_model(prefix, batch.numpy())
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


def test_visualize_saves_the_four_panels_of_a_pretraining_checkpoint(tmp_path, capsys):
    out = tmp_path / "vis.png"
    rc = main_infer.main(["--resume", demo_runs()["pretrain"], "--img_path", first_image(1),
                          "--visualize", str(out)])
    assert rc == 0
    assert "true mean and std" in capsys.readouterr().out  # norm-pix de-normalisation is stated
    with Image.open(out) as img:
        assert img.width > 4 * 32 and img.height > 32


def test_visualize_refuses_an_encoder_only_checkpoint_saying_why(tmp_path, capsys):
    state = read_pd(demo_runs()["pretrain"])
    encoder = {k: v for k, v in state["model"].items() if not k.startswith(("decoder", "mask_token"))}
    path = tmp_path / "encoder.pd"
    save_checkpoint({"kind": "encoder", "model_name": state["model_name"], "model": encoder}, path)
    rc = main_infer.main(["--resume", str(path), "--img_path", first_image(1), "--visualize",
                          str(tmp_path / "x.png")])
    assert rc != 0
    assert "decoder" in one_line_error(capsys.readouterr().err)
    assert not (tmp_path / "x.png").exists()


def test_missing_image_is_a_one_line_error(capsys):
    assert main_infer.main(["--resume", demo_runs()["best"], "--img_path", "no/such.png"]) != 0
    assert "no/such.png" in one_line_error(capsys.readouterr().err)


def test_a_file_that_is_not_an_image_is_a_one_line_error(tmp_path, capsys):
    fake = tmp_path / "fake.jpg"
    fake.write_text("not pixels")
    assert main_infer.main(["--resume", demo_runs()["best"], "--img_path", str(fake)]) != 0
    assert "not an image" in one_line_error(capsys.readouterr().err)


def test_checkpoint_of_another_model_is_a_one_line_error(capsys):
    rc = main_infer.main(["--model", "cae_base_patch16_224", "--resume", demo_runs()["best"],
                          "--img_path", first_image(2)])
    assert rc != 0
    assert "vit_base_patch16" in one_line_error(capsys.readouterr().err)


def test_pretraining_checkpoint_cannot_classify(capsys):
    rc = main_infer.main(["--resume", demo_runs()["pretrain"], "--img_path", first_image(2)])
    assert rc != 0
    assert "pretraining checkpoint" in one_line_error(capsys.readouterr().err)


def test_imagenet_class_names_cover_the_1000_sorted_synsets():
    synsets = imagenet_synsets()
    wnids = [w for w, _ in synsets]
    assert len(wnids) == 1000 == len(set(wnids)) and wnids == sorted(wnids)
    assert all(w.startswith("n") and len(w) == 9 for w in wnids)
    assert all(names for _, names in synsets)
    assert len(imagenet_class_names()) == 1000


PREDICTION_LINE = re.compile(r"^\s+(\d+)\. (.+) \(class (\d+)\)\s+([0-9.]+)%$")


def printed_top5(text):
    """(class names, probabilities) of the first image's ranked lines, e.g. ``  1. 3 (class 3)  97.12%``."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("Inference results"))
    found = [PREDICTION_LINE.match(line) for line in lines[start + 2:start + 7]]
    assert all(found), lines[start:start + 7]
    assert [int(m.group(1)) for m in found] == list(range(1, len(found) + 1))
    return [m.group(2) for m in found], [float(m.group(4)) / 100 for m in found]


@pytest.mark.slow
def test_export_stores_preprocessing_and_the_example_predictor_prints_main_infers_top5(tmp_path, capsys):
    import importlib.util
    import json

    runs = demo_runs()
    out = tmp_path / "exported"
    image = first_image(6)
    assert main_infer.main(["--resume", runs["best"], "--export", str(out), "--img_path", image]) == 0
    expected_names, expected_probs = printed_top5(capsys.readouterr().out)
    spec = json.loads((out / "preprocess.json").read_text())
    model = load_checkpoint(runs["best"])
    assert spec["class_names"] == model.class_names and spec["crop_size"] == 32
    assert spec["mean"] == [0.485, 0.456, 0.406] and spec["resize_short"] == 36
    # the stored preprocessing alone reproduces the training evaluation transform
    spec_module = importlib.util.spec_from_file_location("predict_exported",
                                                         ROOT / "examples" / "predict_exported.py")
    example = importlib.util.module_from_spec(spec_module)
    spec_module.loader.exec_module(example)
    np.testing.assert_array_equal(example.preprocess(image, spec)[0],
                                  preprocessing(model.preprocess_config)(Image.open(image).convert("RGB")))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run([sys.executable, str(ROOT / "examples" / "predict_exported.py"), str(out), image],
                            cwd=tmp_path, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    names, probs = printed_top5(result.stdout)
    assert names == expected_names
    np.testing.assert_allclose(probs, expected_probs, rtol=1e-5, atol=1e-6)
    # the machine-readable form of both programs: the same records
    assert main_infer.main(["--resume", runs["best"], "--img_path", image, "--json"]) == 0
    ours = json.loads(capsys.readouterr().out)
    result = subprocess.run([sys.executable, str(ROOT / "examples" / "predict_exported.py"), str(out), image,
                             "--json", "--device", "cpu"], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    theirs = json.loads(result.stdout)
    assert [r["image"] for r in theirs] == [r["image"] for r in ours] == [image]
    assert [p["class_id"] for p in theirs[0]["predictions"]] == [p["class_id"] for p in ours[0]["predictions"]]
    np.testing.assert_allclose([p["prob"] for p in theirs[0]["predictions"]],
                               [p["prob"] for p in ours[0]["predictions"]], rtol=1e-5, atol=1e-6)


def test_folder_inference_skips_and_reports_unreadable_files(tmp_path, capsys):
    folder = tmp_path / "mixed"
    folder.mkdir()
    good = [first_image(1), first_image(2)]
    for i, path in enumerate(good):
        (folder / f"{i}.png").write_bytes(Path(path).read_bytes())
    (folder / "broken.png").write_bytes(b"not a png at all")
    assert main_infer.main(["--resume", demo_runs()["best"], "--img_path", str(folder)]) == 0
    captured = capsys.readouterr()
    assert sum(1 for line in captured.out.splitlines() if line.endswith(".png:")) == 2
    assert "broken.png" in captured.err and "broken.png:" not in captured.out
    assert "1 of 3 files skipped" in captured.err
    # nothing readable at all stays an error
    (folder / "0.png").write_bytes(b"x")
    (folder / "1.png").write_bytes(b"y")
    assert main_infer.main(["--resume", demo_runs()["best"], "--img_path", str(folder)]) != 0


def test_json_output_lists_class_id_name_and_probability_per_image(tmp_path, capsys):
    model = load_checkpoint(demo_runs()["best"])
    images = [first_image(3), first_image(8)]
    folder = tmp_path / "two"
    folder.mkdir()
    for i, image in enumerate(images):
        Image.open(image).save(folder / f"{i}.png")
    assert main_infer.main(["--resume", demo_runs()["best"], "--img_path", str(folder), "--json",
                            "--topk", "3"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert [Path(r["image"]).name for r in out] == ["0.png", "1.png"]
    probs = predict_batch(model, [str(folder / "0.png"), str(folder / "1.png")])
    for record, row in zip(out, probs):
        preds = record["predictions"]
        assert [p["class_id"] for p in preds] == list(np.argsort(-row, kind="stable")[:3])
        assert [p["class_name"] for p in preds] == [model.class_names[p["class_id"]] for p in preds]
        np.testing.assert_allclose([p["prob"] for p in preds], np.sort(row)[::-1][:3], rtol=1e-6)


def test_device_defaults_to_the_build_and_accepts_cuda_as_gpu():
    from paddle_cae.inference.predict import resolve_device

    assert resolve_device(None) == ("gpu" if paddle.is_compiled_with_cuda() else "cpu")
    assert resolve_device("CPU") == "cpu"
    if paddle.is_compiled_with_cuda():
        assert resolve_device("cuda") == "gpu" and resolve_device("cuda:1") == "gpu:1"
    else:
        for asked in ("cuda", "cuda:1", "gpu"):
            with pytest.raises(ValueError, match=f"--device {asked}: .*no CUDA"):
                resolve_device(asked)
    with pytest.raises(ValueError, match="--device tpu"):
        resolve_device("tpu")


@pytest.mark.slow
@pytest.mark.skipif(paddle.is_compiled_with_cuda(), reason="the error of a CPU-only Paddle build")
def test_a_gpu_asked_of_a_cpu_build_is_a_one_line_error_naming_it(tmp_path, capsys):
    assert main_infer.main(["--resume", demo_runs()["best"], "--img_path", first_image(1),
                            "--device", "cuda:0"]) != 0
    assert "--device cuda:0" in one_line_error(capsys.readouterr().err)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run([sys.executable, str(ROOT / "examples" / "predict_exported.py"), str(tmp_path),
                             first_image(1), "--device", "cuda"], cwd=tmp_path, env=env,
                            capture_output=True, text=True)
    assert result.returncode != 0 and "--device cuda" in result.stderr.strip().splitlines()[-1]
