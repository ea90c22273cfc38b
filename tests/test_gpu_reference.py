"""moe_lib.gpu.reference: the one-expert-at-a-time float32 oracle equals autograd through the layer."""

from __future__ import annotations

import torch
from conftest import make_layer, tiny_cfg

from moe_lib.gpu.reference import float32_reference


def test_reference_equals_autograd_of_the_loop_layer():
    layer = make_layer(tiny_cfg(n_routed=16, top_k=3, n_groups=4, topk_groups=2)).eval()
    x = torch.randn(6, 16, requires_grad=True)
    proj = torch.randn(6, 16)
    (layer(x) * proj).sum().backward()
    ref = float32_reference(layer, x, proj, experts=tuple(range(16)))
    torch.testing.assert_close(ref.y, layer(x).detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ref.dx, x.grad, rtol=1e-5, atol=1e-6)
    idle = set(range(16)) - set(layer.last_routing.indices.unique().tolist())
    assert idle, "some expert must get no token, to check its zero gradient"
    for e, (grad_gate_up, grad_down) in ref.expert_grads.items():
        torch.testing.assert_close(grad_gate_up, layer.experts.gate_up_proj.grad[e], rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(grad_down, layer.experts.down_proj.grad[e], rtol=1e-5, atol=1e-7)
        assert (grad_down.abs().sum() == 0) == (e in idle)


def test_reference_of_a_bf16_layer_is_float32_of_the_same_weights():
    layer_bf16 = make_layer(tiny_cfg(dispatch="loop"), dtype=torch.bfloat16)
    layer = make_layer(tiny_cfg(dispatch="loop"))
    layer.load_state_dict({k: v.float() for k, v in layer_bf16.state_dict().items()})
    x = torch.randn(5, 16).bfloat16()
    ref = float32_reference(layer_bf16, x)
    assert ref.y.dtype == torch.float32 and ref.dx is None
    torch.testing.assert_close(ref.y, layer(x.float()).detach(), rtol=1e-5, atol=1e-6)
