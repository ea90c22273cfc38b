"""Experts: SwiGLU down(silu(gate(x)) * up(x)), no biases, routed experts stacked [E, ...]."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from moe_lib import Expert, RoutedExperts
from moe_lib.experts import swiglu


def manual_swiglu(x, w_gate, w_up, w_down):
    return (F.silu(x @ w_gate.T) * (x @ w_up.T)) @ w_down.T


def test_expert_is_swiglu_without_biases():
    expert = Expert(12, 20).double()
    assert all(m.bias is None for m in (expert.gate_proj, expert.up_proj, expert.down_proj))
    assert sum(p.numel() for p in expert.parameters()) == 3 * 12 * 20
    x = torch.randn(7, 12, dtype=torch.float64)
    expected = manual_swiglu(x, expert.gate_proj.weight, expert.up_proj.weight, expert.down_proj.weight)
    torch.testing.assert_close(expert(x), expected)
    x3 = torch.randn(2, 5, 12, dtype=torch.float64)
    torch.testing.assert_close(expert(x3), expert(x3.reshape(10, 12)).reshape(2, 5, 12))


def test_swiglu_fused_weight_has_gate_rows_first():
    x = torch.randn(5, 6, dtype=torch.float64)
    w_gate, w_up = torch.randn(4, 6, dtype=torch.float64), torch.randn(4, 6, dtype=torch.float64)
    w_down = torch.randn(6, 4, dtype=torch.float64)
    out = swiglu(x, torch.cat([w_gate, w_up]), w_down)
    torch.testing.assert_close(out, manual_swiglu(x, w_gate, w_up, w_down))
    assert not torch.allclose(out, manual_swiglu(x, w_up, w_gate, w_down))


def test_routed_experts_stacked_layout_and_expert_forward():
    experts = RoutedExperts(n_experts=5, d_model=6, d_expert=4).double()
    assert experts.gate_up_proj.shape == (5, 8, 6)
    assert experts.down_proj.shape == (5, 6, 4)
    assert [n for n, _ in experts.named_parameters()] == ["gate_up_proj", "down_proj"]
    x = torch.randn(3, 6, dtype=torch.float64)
    for e in range(5):
        w = experts.gate_up_proj[e]
        expected = manual_swiglu(x, w[:4], w[4:], experts.down_proj[e])
        torch.testing.assert_close(experts.expert_forward(e, x), expected)
    assert not torch.allclose(experts.expert_forward(0, x), experts.expert_forward(1, x))


def test_routed_experts_init_like_nn_linear():
    experts = RoutedExperts(n_experts=16, d_model=64, d_expert=16)
    bound_in, bound_hidden = 1 / math.sqrt(64), 1 / math.sqrt(16)
    assert experts.gate_up_proj.abs().max() <= bound_in
    assert experts.down_proj.abs().max() <= bound_hidden
    # uniform on [-b, b] has standard deviation b / sqrt(3)
    assert abs(experts.gate_up_proj.std().item() - bound_in / math.sqrt(3)) < 0.1 * bound_in
    assert abs(experts.down_proj.std().item() - bound_hidden / math.sqrt(3)) < 0.1 * bound_hidden
