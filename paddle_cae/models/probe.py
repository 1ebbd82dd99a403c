"""CAE's attentive probe (SPEC e.2): a frozen ViT, one learned query token and one cross-attention
block over all final-LN tokens, then BatchNorm (no affine, eps 1e-5) + Linear.

The block has LayerNorms on query, keys and values and BEiT cross-attention (separate q/k/v
Linears, q/v biases, queries scaled first), and no residual and no MLP: the attention output is
the feature. The official release calls the block with keyword arguments it does not accept
and evaluates with batch statistics; here it runs, and the BatchNorm uses its running
statistics in eval mode.
"""
import paddle.nn as nn

from .base import Classifier
from .cae import CrossAttention, add_input_norms
from .common import LN_EPS
from .layers import normal_, trunc_normal_, zeros_
from .vit import LinearProbeHead


class AttentiveBlock(nn.Layer):
    def __init__(self, dim, num_heads, qkv_bias=True, norm_eps=LN_EPS):
        super().__init__()
        add_input_norms(self, dim, norm_eps)
        self.cross_attn = CrossAttention(dim, num_heads, qkv_bias=qkv_bias)

    def forward(self, query, tokens):
        """query [B, 1, D], tokens [B, 1 + N, D] -> [B, 1, D] (positions are zero)."""
        return self.cross_attn(self.norm1_q(query), self.norm1_k(tokens), self.norm1_v(tokens))


class AttentiveProbe(Classifier):
    """``backbone``: a ViT classifier built with the cls-token path (it has ``norm``) and no head.
    Only ``query_token``, ``attentive_block`` and ``head`` are meant to train."""

    def __init__(self, backbone, num_classes, depth=None, bn_eps=1e-5):
        super().__init__()
        if getattr(backbone, "norm", None) is None:
            raise ValueError("the attentive probe reads the final-LN tokens: build the backbone "
                             "with global_pool=False")
        dim = backbone.embed_dim
        self.backbone = backbone
        self.depth = depth
        self.query_token = self.create_parameter(
            [1, 1, dim], default_initializer=nn.initializer.Constant(0.0))
        heads = backbone.blocks[0].attn.num_heads
        self.attentive_block = AttentiveBlock(dim, heads)
        self.head = LinearProbeHead(dim, num_classes, eps=bn_eps)
        # CAE: the attentive block's Linears take the model's timm trunc_normal_(std=0.02), whose
        # +-2 bounds are absolute (untruncated in effect); run_attentive draws the head N(0, 0.01)
        for layer in self.attentive_block.sublayers():
            if isinstance(layer, nn.Linear):
                trunc_normal_(layer.weight, std=0.02, a=-2.0, b=2.0)
                if layer.bias is not None:
                    zeros_(layer.bias)
        normal_(self.head.linear.weight, std=0.01)
        zeros_(self.head.linear.bias)

    @property
    def num_classes(self):
        return self.head.linear.weight.shape[1]

    def trainable_prefixes(self):
        return ("query_token", "attentive_block.", "head.")

    def forward(self, x):
        tokens = self.backbone.norm(self.backbone.forward_tokens(x, self.depth))  # [B, 1 + N, D]
        query = self.query_token.expand([tokens.shape[0], -1, -1])  # [B, 1, D]
        feature = self.attentive_block(query, tokens)[:, 0]  # [B, D]
        return self.head(feature)


__all__ = ["AttentiveBlock", "AttentiveProbe"]
