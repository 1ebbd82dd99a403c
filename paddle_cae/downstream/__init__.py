"""Downstream transfer of the package's encoders: semantic segmentation (UperNet from PaddleSeg on
a BEiT-style multi-scale neck, trained by ``main_segment.py``) and detection (the encoder exported
in PaddleDetection's ViT layout, for its Mask / Cascade R-CNN configs).

Written here: the encoder features and the multi-scale neck (:mod:`.segmentor`), the segmentation
data and its recipe transforms (:mod:`.seg_data`), mIoU (:mod:`.metrics`), sliding-window inference
and colour masks (:mod:`.inference`), the layer-decay optimizer and poly schedule
(:mod:`.optim`), the training loop (:mod:`.seg_engine`) and the PaddleDetection export
(:mod:`.detection`). Taken from PaddleSeg: the UperNet decode head and its auxiliary FCN head.
Taken from PaddleDetection: the detector (its ``VisionTransformer`` backbone, FPN, RPN,
R-CNN heads, COCO data and training loop). Neither library is needed by the rest of the package.
"""

DOWNSTREAM_INSTALL = ("pip install -r requirements-downstream.txt (in an environment of its own: "
                      "README 'Segmentation and detection')")


def require(module):
    """Import ``module`` (paddleseg / ppdet) or fail with one line saying how to install it."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as err:
        package = {"paddleseg": "paddleseg", "ppdet": "paddledet"}.get(module.split(".")[0], module)
        raise ImportError(f"{module} is needed for this path ({package} is not importable: {err}); "
                          f"{DOWNSTREAM_INSTALL}") from None


__all__ = ["DOWNSTREAM_INSTALL", "require"]
