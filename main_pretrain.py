"""Masked-image-modeling pretraining (MAE, CAE, BootMAE).

    python main_pretrain.py                                   # MAE demo on the bundled digits
    python main_pretrain.py --config configs/demo/bootmae.yaml
    python -m paddle.distributed.launch --nproc_per_node 8 main_pretrain.py \\
        --config configs/pretrain/mae_vit_base_patch16_800e.yaml --data_path /data/imagenet

Run with --help for every flag.
"""
import sys

from paddle_cae.startup import prepare_process  # noqa: E402  (before paddle is imported)

prepare_process()  # OMP_NUM_THREADS: yours, else 1 (README "Threads"); no ccache warning

from paddle_cae.cli.pretrain import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
