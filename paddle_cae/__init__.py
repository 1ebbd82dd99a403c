"""paddle-cae: CAE, MAE and BootMAE masked-image-modeling for Vision Transformers in PaddlePaddle.

The notebook API is imported on first use, so ``python -m paddle_cae.<tool>`` starts without
loading the rest of the package first. Importing the package selects MKL's fast matmul code path on
AMD CPUs (``paddle_cae/_cpu_math.py``; set ``MKL_DEBUG_CPU_TYPE`` yourself to keep another choice).

Pillow's C module is loaded here, before anything imports paddle: Paddle 2.6 brings its own zlib
and, imported first, leaves Pillow unable to decode PNG files ("codec configuration error").
"""
__version__ = "0.1.0"

import PIL.Image  # noqa: F401,E402  (before paddle: see above)

from paddle_cae.startup import quiet_paddle_import_warnings as _quiet_paddle_import_warnings

_quiet_paddle_import_warnings()  # Paddle's "No ccache found" on import, for notebook users too

from paddle_cae._cpu_math import select_mkl_code_path as _select_mkl_code_path

_select_mkl_code_path()

_API = {
    "create_model": "paddle_cae.models.registry",
    "list_models": "paddle_cae.models.registry",
    "load_checkpoint": "paddle_cae.api",
    "predict": "paddle_cae.api",
}

__all__ = sorted(_API)


def __getattr__(name):
    if name in _API:
        import importlib

        return getattr(importlib.import_module(_API[name]), name)
    raise AttributeError(f"module 'paddle_cae' has no attribute {name!r}")
