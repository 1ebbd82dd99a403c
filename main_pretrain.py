"""Masked-image-modeling pretraining (MAE, CAE, BootMAE).

    python main_pretrain.py                                   # MAE demo on the bundled digits
    python main_pretrain.py --config configs/demo/bootmae.yaml
    python -m paddle.distributed.launch --nproc_per_node 8 main_pretrain.py \\
        --config configs/pretrain/mae_vit_base_patch16_800e.yaml --data_path /data/imagenet

Run with --help for every flag.
"""
import os
import sys

os.environ.setdefault("OMP_NUM_THREADS", str(max(os.cpu_count() or 1, 1)))

from paddle_cae.engine.pretrain_main import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
