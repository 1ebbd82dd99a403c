"""Semantic segmentation (UperNet) on a pretrained ViT encoder (MAE, CAE, BootMAE).

    python main_segment.py                                    # CPU demo: digits on canvases
    python main_segment.py --finetune output/demo_mae/encoder.pd
    python -m paddle.distributed.launch --nproc_per_node 8 main_segment.py \\
        --config configs/segmentation/cae_base_ade20k_512_160k.yaml \\
        --data_path /data/ADEChallengeData2016 --finetune cae_base_1600ep.pth
    python main_segment.py --eval --resume output_segment/checkpoint-best.pd --data_path ...
    python main_segment.py --predict photo.jpg --resume output_segment/checkpoint-best.pd

Needs paddleseg (requirements-downstream.txt). Run with --help for every flag.
"""
import sys

from paddle_cae.startup import prepare_process  # noqa: E402  (before paddle is imported)

prepare_process()  # OMP_NUM_THREADS: yours, else 1 (README "Threads"); no ccache warning

from paddle_cae.cli.segment import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
