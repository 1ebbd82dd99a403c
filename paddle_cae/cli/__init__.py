"""The entrypoints: ``start`` (what every training entrypoint does first), ``pretrain``,
``classify`` (fine-tuning and linear probing) and ``infer``, and below the console commands of
an installed package (``pip install .``), the same programs as the repository's ``main_*.py``
scripts.

    paddle-cae-pretrain   = python main_pretrain.py
    paddle-cae-finetune   = python main_finetune.py
    paddle-cae-linprobe   = python main_linprobe.py
    paddle-cae-infer      = python main_infer.py
    paddle-cae-segment    = python main_segment.py   (needs requirements-downstream.txt)

Thread default and quiet start as in the scripts (:mod:`paddle_cae.startup`), applied before
Paddle is imported.
"""
import sys

from ..startup import prepare_process


def pretrain_command():
    prepare_process()
    from .pretrain import main

    return main(sys.argv[1:])


def finetune_command():
    prepare_process()
    from .classify import main

    return main(sys.argv[1:], phase="finetune")


def linprobe_command():
    prepare_process()
    from .classify import main

    return main(sys.argv[1:], phase="linprobe")


def infer_command():
    prepare_process()
    from .infer import main

    return main(sys.argv[1:])


def segment_command():
    prepare_process()
    from .segment import main

    return main(sys.argv[1:])


__all__ = ["finetune_command", "infer_command", "linprobe_command", "pretrain_command",
           "segment_command"]
