"""paddle-cae: CAE, MAE and BootMAE masked-image-modeling for Vision Transformers in PaddlePaddle."""
__version__ = "0.1.0"

from .models.registry import create_model, list_models  # noqa: F401,E402
from .api import load_checkpoint, predict  # noqa: F401,E402
