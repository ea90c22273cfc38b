"""Shared test helpers: seeded randomness, small threads, tiny configurations."""

from __future__ import annotations

import pytest
import torch

from moe_lib import DeepSeekMoE, MoEConfig

# The tests use tiny tensors: one intra-op thread avoids thread start-up and contention costs.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


def tiny_cfg(**changes) -> MoEConfig:
    """A V3-shaped layer small enough for exhaustive checks: 8 experts in 4 groups, top-3."""
    base = dict(d_model=16, d_expert=8, n_routed=8, n_shared=1, top_k=3, n_groups=4, topk_groups=2,
                score_func="sigmoid", route_scale=2.5, dispatch="loop")
    base.update(changes)
    return MoEConfig(**base)


def make_layer(cfg: MoEConfig, bias_scale: float = 0.1, dtype=torch.float32) -> DeepSeekMoE:
    """A layer with random weights and a random, non-zero correction bias."""
    layer = DeepSeekMoE(cfg).to(dtype)
    with torch.no_grad():
        layer.gate.correction_bias.copy_(bias_scale * torch.randn(cfg.n_routed))
    return layer
