"""Predict the classes of images with a fine-tuned checkpoint, export it for deployment, or
picture what a MAE/BootMAE pretraining checkpoint reconstructs.

    python main_infer.py --model vit_base_patch16 --resume output/finetune/checkpoint-best.pd \\
        --img_path demo/digits/val/3/0003.png          # a file or a folder (batched)
    python main_infer.py --resume CKPT --export exported/           # paddle.jit.save + check
    python main_infer.py --resume output/demo_mae/checkpoint-2.pd --img_path IMG --visualize out.png

Prints, per image, the top-5 classes with their index and probability (``--json``: a list of
``{"image", "predictions": [{"class_id", "class_name", "prob"}]}``):

    Inference results (top-5 per image):
    cat.jpg:
      1. Persian cat (class 283)   88.69%
"""
import sys

from paddle_cae.startup import prepare_process  # noqa: E402  (before paddle is imported)

prepare_process()  # OMP_NUM_THREADS: yours, else 1 (README "Threads"); no ccache warning

from paddle_cae.cli.infer import build_parser, export, main, run, visualize  # noqa: E402,F401

if __name__ == "__main__":
    sys.exit(main())
