"""Fused CPU kernels for the ViT training step, with pure-Paddle fallbacks (see fused.py)."""
from .fused import (bias_gelu, extension_available, layer_norm, merge_heads, residual_bias,
                    scaled_softmax, split_heads)

__all__ = ["bias_gelu", "extension_available", "layer_norm", "merge_heads", "residual_bias",
           "scaled_softmax", "split_heads"]
