"""Helpers shared by the model tests: a tiny V3-shaped model with a random non-zero correction bias."""

from __future__ import annotations

import torch

from moe_lib import MoEConfig
from moe_lib.model import ModelConfig, Transformer


def tiny_model_cfg(**changes) -> ModelConfig:
    """3 blocks (1 dense, 2 MoE with 8 experts in 4 groups, 2 groups kept, top-2), 2 heads."""
    moe = MoEConfig(d_model=32, d_expert=16, n_routed=8, n_shared=1, top_k=2, n_groups=4, topk_groups=2,
                    score_func="sigmoid", route_scale=2.5)
    base = dict(vocab_size=61, d_model=32, n_layers=3, n_dense_layers=1, d_dense=48, n_heads=2,
                q_lora_rank=0, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=6, v_head_dim=12,
                max_seq_len=40, moe=moe, init_std=0.1)
    base.update(changes)
    return ModelConfig(**base)


def make_model(cfg: ModelConfig, dtype=torch.float32, bias_scale: float = 0.05) -> Transformer:
    """An eval-mode model with random weights and random non-zero correction biases."""
    model = Transformer(cfg).to(dtype).eval()
    with torch.no_grad():
        for moe in model.moe_layers(include_mtp=True):
            moe.gate.correction_bias.copy_(bias_scale * torch.randn(cfg.moe.n_routed))
    return model


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b|."""
    a, b = a.detach(), b.detach()
    return float((a - b).abs().max() / b.abs().max())
