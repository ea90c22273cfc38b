"""A pre-norm decoder block: MLA then a feed-forward network, each around a residual.

    h = x + Attn(RMSNorm(x));   out = h + FFN(RMSNorm(h))

The FFN is a dense SwiGLU MLP (`moe_lib.Expert` of width d_dense) in the first n_dense_layers
blocks (DeepSeek-V3's first_k_dense_replace) and `moe_lib.DeepSeekMoE` in the others.
"""

from __future__ import annotations

import torch
from torch import nn

from ..experts import Expert
from ..moe import DeepSeekMoE
from .attention import MLA
from .cache import KVCache
from .config import ModelConfig
from .norm import RMSNorm
from .rope import Rotary


class Block(nn.Module):
    """input_layernorm, self_attn (MLA), post_attention_layernorm, mlp (Expert or DeepSeekMoE).

    forward(x [B, S, H], rotary, cache=None, layer=0) -> [B, S, H]; `layer` is this block's index
    in `cache`.
    """

    def __init__(self, cfg: ModelConfig, moe: bool):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.self_attn = MLA(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mlp = DeepSeekMoE(cfg.moe) if moe else Expert(cfg.d_model, cfg.d_dense)

    def forward(self, x_BSH: torch.Tensor, rotary: Rotary, cache: KVCache | None = None,
                layer: int = 0) -> torch.Tensor:
        h_BSH = x_BSH + self.self_attn(self.input_layernorm(x_BSH), rotary, cache, layer)
        return h_BSH + self.mlp(self.post_attention_layernorm(h_BSH))
