"""Linear probing of a frozen pretrained ViT encoder: BatchNorm (no affine) + Linear trained with
LARS on the cls token or the mean of the patch tokens of block --depth; or CAE's attentive probe
(--linear_type attentive, SGD).

    python main_linprobe.py --finetune output/demo_mae/checkpoint-2.pd       # CPU demo on the digits
    python -m paddle.distributed.launch --nproc_per_node 8 main_linprobe.py \\
        --config configs/linprobe/mae_vit_base_patch16.yaml --data_path /data/imagenet \\
        --finetune mae_pretrain_vit_base.pth

Run with --help for every flag.
"""
import sys

from paddle_cae.startup import prepare_process  # noqa: E402  (before paddle is imported)

prepare_process()  # OMP_NUM_THREADS: yours, else 1 (README "Threads"); no ccache warning

from paddle_cae.cli.classify import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:], phase="linprobe"))
