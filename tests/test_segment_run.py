"""main_segment.py end to end on the demo set, with PaddleSeg's UperNet (requirements-downstream.txt;
skipped with a reason where paddleseg is not installed, run by CI's downstream leg)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("paddleseg", reason="paddleseg is not installed (pip install -r "
                                        "requirements-downstream.txt in its own environment)")

import paddle  # noqa: E402

from paddle_cae.downstream.seg_args import build_network  # noqa: E402
from paddle_cae.downstream.segmentor import build_uper_head  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
TINY = ["--iters", "4", "--eval_interval", "2", "--save_interval", "2", "--print_freq", "1",
        "--batch_size", "4", "--num_workers", "0", "--vis_count", "2"]


def test_uper_head_from_paddleseg_gives_main_and_aux_logits_at_stride_4():
    paddle.seed(0)
    head = build_uper_head(7, 32, 16)
    feats = [paddle.randn([2, 32, s, s]) for s in (16, 8, 4, 2)]
    main, aux = head(feats)
    assert list(main.shape) == [2, 7, 16, 16] and list(aux.shape) == [2, 7, 4, 4]


def test_vit_b_upernet_512_network_has_the_recipe_shapes():
    config = {"model": "cae_base_patch16_224", "model_args": {}, "crop_size": 512, "num_classes": 150,
              "channels": 768, "out_indices": None, "rel_pos_bias": True, "drop_path": 0.1}
    model = build_network(config)
    assert config["out_indices"] == [3, 5, 7, 11]
    assert list(model.backbone.blocks[0].attn.relative_position_bias_table.shape) == [63 * 63 + 3, 12]
    assert list(model.backbone.pos_embed.shape) == [1, 1 + 32 * 32, 768]
    with paddle.no_grad():
        feats = model.neck([paddle.zeros([1, 768, 32, 32])] * 4)
    assert [f.shape[-1] for f in feats] == [128, 64, 32, 16]


def _run(args, cwd, env=None):
    env = dict(os.environ, OMP_NUM_THREADS="1", **(env or {}))
    return subprocess.run([sys.executable, str(ROOT / "main_segment.py")] + args, cwd=cwd, env=env,
                          capture_output=True, text=True)


@pytest.mark.slow
def test_demo_run_logs_miou_saves_resumes_evaluates_and_predicts(tmp_path):
    out = tmp_path / "seg"
    first = _run(TINY[:1] + ["2"] + TINY[2:] + ["--output_dir", str(out), "--amp_dtype", "bf16"], ROOT)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "training runs in fp32" in first.stdout + first.stderr  # bf16 is a no-op on the CPU
    records = [json.loads(line) for line in (out / "log.txt").read_text().splitlines()]
    assert [r["iteration"] for r in records] == [2]
    assert 0.0 <= records[0]["mIoU"] <= 100.0 and len(records[0]["IoU"]) == 11
    assert {p.name for p in out.glob("checkpoint-*.pd")} >= {"checkpoint-2.pd", "checkpoint-latest.pd",
                                                             "checkpoint-best.pd"}
    assert any((out / "vdl").iterdir())

    second = _run(TINY + ["--output_dir", str(out)], ROOT)  # auto-resume to 4 iterations
    assert second.returncode == 0, second.stderr[-3000:]
    assert "continuing at iteration 2" in second.stdout + second.stderr
    records = [json.loads(line) for line in (out / "log.txt").read_text().splitlines()]
    assert [r["iteration"] for r in records] == [2, 4]

    from visualdl import LogReader

    reader = LogReader(file_path=str(next((out / "vdl").glob("vdlrecords.*"))))
    tags = reader.get_tags()
    assert "val/mIoU" in tags.get("scalar", []) and len(tags.get("image", [])) == 2

    evaluated = _run(["--eval", "--resume", str(out / "checkpoint-latest.pd")], tmp_path)
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    assert f"mIoU {records[-1]['mIoU']:.2f}" in evaluated.stdout + evaluated.stderr

    picture = tmp_path / "picture.png"
    Image.fromarray(np.full((40, 56, 3), 200, np.uint8)).save(picture)
    mask = tmp_path / "mask.png"
    predicted = _run(["--predict", str(picture), "--resume", str(out / "checkpoint-best.pd"),
                      "--predict_out", str(mask)], tmp_path)
    assert predicted.returncode == 0, predicted.stderr[-3000:]
    img = Image.open(mask)
    assert img.size == (56, 40) and img.mode == "RGB"


@pytest.mark.slow
def test_resume_refuses_another_kind_and_eval_refuses_a_non_segmentation_checkpoint(tmp_path):
    from paddle_cae.runtime.checkpoint import save_checkpoint

    other = tmp_path / "finetune.pd"
    save_checkpoint({"kind": "finetune", "model_name": "vit_base_patch16", "model": {},
                     "optimizer": {}, "epoch": 0}, str(other))
    res = _run(TINY + ["--resume", str(other), "--output_dir", str(tmp_path / "o")], ROOT)
    assert res.returncode == 2 and "is a finetune checkpoint of vit_base_patch16" in res.stderr
    ev = _run(["--eval", "--resume", str(other)], tmp_path)
    assert ev.returncode == 2 and "not a segmentation checkpoint" in ev.stderr
    assert len(ev.stderr.strip().splitlines()) == 1


@pytest.mark.slow
def test_two_processes_train_and_evaluate_every_validation_image_once(tmp_path):
    """paddle.distributed.launch (gloo on the CPU): 2 ranks x 2 crops, the validation split
    divided between them and the areas summed."""
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    logs, out = tmp_path / "logs", tmp_path / "out"
    cmd = [sys.executable, "-m", "paddle.distributed.launch", "--nproc_per_node", "2", "--log_dir",
           str(logs), str(ROOT / "main_segment.py"), "--iters", "2", "--eval_interval", "2",
           "--batch_size", "2", "--num_workers", "0", "--output_dir", str(out)]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=1800)  # a hang guard (a dead rank), not a speed limit
    text = "".join(p.read_text() for p in sorted(logs.glob("workerlog.*")))
    assert proc.returncode == 0, text[-3000:]
    assert "iteration 2: mIoU" in text and "on 64 images" in text  # rank 0 logs; both exited 0
    records = [json.loads(line) for line in (out / "log.txt").read_text().splitlines()]
    assert len(records) == 1 and records[0]["iteration"] == 2  # rank 0 writes, once
