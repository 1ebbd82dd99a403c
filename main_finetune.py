"""Fine-tune a pretrained ViT (MAE, CAE, BootMAE) for image classification.

    python main_finetune.py --finetune output/demo_mae/checkpoint-2.pd      # CPU demo on the digits
    python -m paddle.distributed.launch --nproc_per_node 8 main_finetune.py \\
        --config configs/finetune/mae_vit_base_patch16.yaml --data_path /data/imagenet \\
        --finetune mae_pretrain_vit_base.pth
    python main_finetune.py --eval --resume output/finetune/checkpoint-best.pd --model vit_base_patch16 \\
        --data_path /data/imagenet

--finetune takes this package's checkpoints (pretraining, encoder export) and the official
PyTorch files. Run with --help for every flag.
"""
import sys

from paddle_cae.startup import prepare_process  # noqa: E402  (before paddle is imported)

prepare_process()  # OMP_NUM_THREADS: yours, else 1 (README "Threads"); no ccache warning

from paddle_cae.cli.classify import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:], phase="finetune"))
