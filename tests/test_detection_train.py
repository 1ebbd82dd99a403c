"""Mask R-CNN (and Cascade R-CNN) of configs/detection/ trained for 2 iterations by the installed
paddledet on a tiny COCO-format set made from the digits, starting from an encoder export
(skipped with a reason where paddledet is not installed; run by CI's downstream leg).

On a CPU the configs' layer-wise lr decay is switched off (``set_param_lr_func: null``): Paddle's
AdamW implements the per-parameter ``lr_ratio`` that PaddleDetection's AdamWDL uses on GPUs only."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("ppdet", reason="paddledet is not installed (pip install -r "
                                    "requirements-downstream.txt in its own environment)")

from paddle_cae.downstream.detection import export_for_ppdet  # noqa: E402
from paddle_cae.downstream.train_detection import make_digit_coco, parse_overrides  # noqa: E402
from paddle_cae.models import create_model  # noqa: E402
from paddle_cae.runtime.checkpoint import save_checkpoint  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
SMALL = {"embed_dim": 64, "depth": 4, "num_heads": 4}
CPU_SIZED = [
    "use_gpu=false", "epoch=1", "worker_num=0", "log_iter=1", "num_classes=10",
    "VisionTransformer.img_size=[128,128]", "VisionTransformer.embed_dim=64", "VisionTransformer.depth=4",
    "VisionTransformer.num_heads=4", "VisionTransformer.out_indices=[0,1,2,3]",
    "VisionTransformer.drop_path_rate=0.0",
    "OptimizerBuilder.optimizer.num_layers=4", "OptimizerBuilder.optimizer.set_param_lr_func=null",
    "HRFPN.out_channel=32", "BBoxAssigner.batch_size_per_im=64",
    "RPNHead.train_proposal.pre_nms_top_n=200", "RPNHead.train_proposal.post_nms_top_n=100",
    "LearningRate.schedulers=[{name: PiecewiseDecay, gamma: 0.1, milestones: [9, 11]}, "
    "{name: LinearWarmup, start_factor: 0.001, steps: 1}]",
    "TrainReader.use_shared_memory=false",
    "TrainReader.sample_transforms=[{Decode: {}}, {RandomResize: {target_size: [[128, 128]], interp: 2, "
    "keep_ratio: true}}, {RandomFlip: {prob: 0.5}}, {NormalizeImage: {is_scale: true, "
    "mean: [0.485, 0.456, 0.406], std: [0.229, 0.224, 0.225]}}, {Permute: {}}]",
]
HEADS = {"mask_rcnn_vit_base_1x_coco.yaml": ["XConvNormHead.conv_dim=32", "XConvNormHead.out_channel=64",
                                             "MaskFeat.out_channel=32"],
         "cascade_rcnn_vit_base_1x_coco.yaml": ["CascadeXConvNormHead.conv_dim=32",
                                                "CascadeXConvNormHead.out_channel=64"]}


def test_overrides_nest_and_read_yaml_values():
    got = parse_overrides(["A.b.c=3", "A.d=[1, 2]", "e=null", "f=cpu"])
    assert got == {"A": {"b": {"c": 3}, "d": [1, 2]}, "e": None, "f": "cpu"}
    with pytest.raises(ValueError, match="KEY=VALUE"):
        parse_overrides(["novalue"])


@pytest.mark.slow
@pytest.mark.parametrize("config", sorted(HEADS))
def test_two_iterations_of_the_detector_from_an_encoder_export(tmp_path, config):
    encoder = create_model("cae_base_patch16_224", img_size=128, num_classes=0, **SMALL)
    save_checkpoint({"kind": "encoder", "model_name": "cae_base_patch16_224",
                     "model": {k: v.numpy() for k, v in encoder.state_dict().items()}},
                    str(tmp_path / "encoder.pd"))
    export = str(tmp_path / "vit.pdparams")
    export_for_ppdet(str(tmp_path / "encoder.pd"), export, "cae_base_patch16_224", SMALL, 128)
    root, _ = make_digit_coco(tmp_path / "coco", count=2)
    data = [f"TrainDataset.dataset_dir={root}", "TrainDataset.image_dir=images",
            "TrainDataset.anno_path=annotations/instances_train.json"]
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "paddle_cae.downstream.train_detection", "-c",
           str(ROOT / "configs" / "detection" / config), "--device", "cpu", "-o",
           f"VisionTransformer.pretrained={export}", f"save_dir={out}"] + CPU_SIZED + HEADS[config] + data
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True,
                         env=dict(os.environ, OMP_NUM_THREADS="1"))
    log = res.stdout + res.stderr
    assert res.returncode == 0, log[-4000:]
    assert "Load load_state_dict" in log  # the backbone read the export
    steps = [line for line in log.splitlines() if "Epoch: [0] [" in line]
    assert len(steps) == 2 and all("loss:" in line for line in steps)
    losses = [float(line.split(" loss: ")[1].split()[0]) for line in steps]
    assert all(0 < v < 100 for v in losses)
    assert any(p.suffix == ".pdparams" for p in out.rglob("*"))
    coco = json.loads((Path(root) / "annotations" / "instances_train.json").read_text())
    assert len(coco["images"]) == 2 and len(coco["annotations"]) >= 4
