"""moe_lib.gpu.graphs: the layer's forward without host synchronisation equals `DeepSeekMoE.forward`;
the CUDA-graph and side-stream checks run only where a GPU is present."""

from __future__ import annotations

import pytest
import torch
from conftest import make_layer, tiny_cfg

from moe_lib.dispatch import dispatch_grouped
from moe_lib.gpu.graphs import GraphedMoE, moe_forward
from moe_lib.gpu.reference import float32_reference
from moe_lib.gpu.syncs import host_syncs

CUDA = torch.cuda.is_available()
V3_LIKE = dict(d_model=64, d_expert=32, n_routed=32, n_shared=1, top_k=8, n_groups=8, topk_groups=4,
               route_scale=2.5)


def grads(fn, layer, x, proj):
    layer.zero_grad(set_to_none=True)
    xg = x.detach().clone().requires_grad_()
    y = fn(xg)
    (y.float() * proj).sum().backward()
    return [y.detach(), xg.grad] + [p.grad for p in layer.parameters()]


@pytest.mark.parametrize("shape", [(1, 64), (2, 9, 64)])
def test_moe_forward_equals_the_layer(shape):
    layer = make_layer(tiny_cfg(**V3_LIKE, dispatch="loop")).eval()
    x, proj = torch.randn(shape), torch.randn(shape)
    ours, ref = grads(lambda t: moe_forward(layer, t), layer, x, proj), grads(layer, layer, x, proj)
    for a, b in zip(ours, ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_moe_forward_has_no_host_sync_and_the_layer_has():
    layer = make_layer(tiny_cfg(**V3_LIKE, dispatch="grouped")).train()
    x = torch.randn(12, 64)
    assert host_syncs(lambda: moe_forward(layer, x).sum().backward()) == []
    found = host_syncs(layer, x)
    assert "_local_scalar_dense" in found and "bincount" in found, found


def test_training_counts_loads_and_updates_the_bias_on_the_device():
    cfg = tiny_cfg(**V3_LIKE, dispatch="loop", bias_update="step")
    layer, twin = make_layer(cfg).train(), make_layer(cfg).train()
    twin.load_state_dict(layer.state_dict())
    x = torch.randn(2, 7, 64)
    layer(x)
    assert host_syncs(moe_forward, twin, x) == []
    assert twin.gate.tokens_per_expert.sum() == 2 * 7 * 8
    torch.testing.assert_close(twin.gate.tokens_per_expert, layer.gate.tokens_per_expert)
    forward_update = make_layer(cfg.replace(bias_update="forward")).train()
    bias = forward_update.gate.correction_bias.clone()
    assert host_syncs(moe_forward, forward_update, x) == []
    assert not torch.equal(forward_update.gate.correction_bias, bias)
    assert forward_update.gate.tokens_per_expert.sum() == 0


def test_moe_forward_refuses_capacity_and_auxiliary_losses():
    with pytest.raises(ValueError, match="auxiliary loss"):
        moe_forward(make_layer(tiny_cfg(**V3_LIKE, aux_loss="sequence")).train(), torch.randn(4, 64))
    layer = make_layer(tiny_cfg(**V3_LIKE, capacity_factor=1.0))
    with pytest.raises(ValueError, match="capacity_factor"):
        moe_forward(layer, torch.randn(4, 64))


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
def test_cuda_graph_and_side_stream_equal_eager():
    layer = make_layer(tiny_cfg(**V3_LIKE), dtype=torch.bfloat16).cuda().eval()
    xs = torch.randn(3, 4, 64, device="cuda", dtype=torch.bfloat16)
    graphed = GraphedMoE(layer, xs[0])
    with torch.no_grad():
        for x in xs:
            eager = moe_forward(layer, x)
            torch.testing.assert_close(moe_forward(layer, x, torch.cuda.Stream()), eager)
            torch.testing.assert_close(graphed(x).clone(), eager)


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("n_tokens", [3, 256])
def test_cuda_bf16_matches_float32_without_sync(n_tokens):
    """On the GPU: no synchronisation at all (torch's sync debug mode), and the bf16 forward and
    backward within bf16 tolerance of float32, including experts that got no token (zero gradient)."""
    layer = make_layer(tiny_cfg(**V3_LIKE), dtype=torch.bfloat16).cuda().eval()
    x = torch.randn(n_tokens, 64, device="cuda", dtype=torch.bfloat16)
    proj = torch.randn(n_tokens, 64, device="cuda")
    routing = layer.gate(x)
    torch.cuda.set_sync_debug_mode("error")
    try:
        dispatch_grouped(x, routing.indices, routing.weights, layer.experts)
        out = grads(lambda t: moe_forward(layer, t), layer, x, proj)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    ref = float32_reference(layer, x, proj, experts=tuple(range(32)))
    for a, b in [(out[0], ref.y), (out[1], ref.dx)]:
        assert ((a.float() - b).abs().max() / b.abs().max()) < 3e-2
    grad_gate_up, grad_down = layer.experts.gate_up_proj.grad, layer.experts.down_proj.grad
    for e, (g_gate_up, g_down) in ref.expert_grads.items():
        for a, b in [(grad_gate_up[e], g_gate_up), (grad_down[e], g_down)]:
            if b.abs().max() == 0:
                assert (a == 0).all(), f"expert {e} got no token but a non-zero gradient"
            else:
                assert ((a.float() - b).abs().max() / b.abs().max()) < 3e-2
