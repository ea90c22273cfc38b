"""The DeepSeekMoE layer: dispatch paths agree, gradcheck, input checks, capacity, routing stats."""

from __future__ import annotations

import re

import pytest
import torch
from conftest import make_layer, tiny_cfg
from torch.func import functional_call

from moe_lib import DeepSeekMoE


def clone_with(layer: DeepSeekMoE, **changes) -> DeepSeekMoE:
    other = DeepSeekMoE(layer.cfg.replace(**changes)).to(layer.gate.weight.dtype)
    other.load_state_dict(layer.state_dict())
    return other


def reference_output(layer: DeepSeekMoE, x_TH, indices_TK, weights_TK):
    """Shared MLP plus the weighted experts of the given (token, expert) pairs, one pair at a time."""
    y = layer.shared_experts(x_TH) if layer.shared_experts is not None else torch.zeros_like(x_TH)
    rows = []
    for t in range(x_TH.shape[0]):
        row = y[t]
        for k in range(indices_TK.shape[1]):
            e = int(indices_TK[t, k])
            if e >= 0:
                row = row + weights_TK[t, k] * layer.experts.expert_forward(e, x_TH[t:t + 1])[0]
        rows.append(row)
    return torch.stack(rows)


def forward_backward(layer, x0):
    layer.zero_grad()
    x = x0.clone().requires_grad_()
    out = layer(x)
    (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
    grads = {name: p.grad.clone() for name, p in layer.named_parameters()}
    return out.detach(), x.grad, grads


@pytest.mark.parametrize("shape", [(40, 16), (4, 10, 16)], ids=["2d", "3d"])
@pytest.mark.parametrize("capacity_factor", [None, 0.75], ids=["dropless", "capacity"])
def test_dispatch_paths_agree_forward_and_backward(shape, capacity_factor):
    loop = make_layer(tiny_cfg(capacity_factor=capacity_factor))
    x0 = torch.randn(*shape)
    ref_out, ref_dx, ref_grads = forward_backward(loop, x0)
    assert ref_out.shape == shape
    if capacity_factor is not None:
        assert loop.last_routing.n_dropped > 0
    for name in ("sorted", "grouped"):
        out, dx, grads = forward_backward(clone_with(loop, dispatch=name), x0)
        torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(dx, ref_dx, rtol=1e-5, atol=1e-6)
        assert grads.keys() == ref_grads.keys()
        for key in ref_grads:
            assert ref_grads[key].abs().sum() > 0, key
            torch.testing.assert_close(grads[key], ref_grads[key], rtol=1e-5, atol=1e-6, msg=key)


@pytest.mark.parametrize("dispatch", ["loop", "sorted", "grouped"])
@pytest.mark.parametrize("score_func", ["sigmoid", "softmax"])
def test_gradcheck_float64_input_and_parameters(dispatch, score_func):
    cfg = tiny_cfg(d_model=6, d_expert=3, n_routed=4, top_k=2, n_groups=2, topk_groups=1,
                   score_func=score_func, dispatch=dispatch, route_scale=2.5)
    layer = make_layer(cfg, bias_scale=0.05, dtype=torch.float64).eval()
    names = [name for name, _ in layer.named_parameters()]
    params = tuple(p.detach().clone().requires_grad_() for p in layer.parameters())
    x = torch.randn(5, 6, dtype=torch.float64, requires_grad=True)

    def fn(x, *params):
        return functional_call(layer, dict(zip(names, params, strict=True)), (x,))

    assert fn(x, *params).dtype == torch.float64
    assert torch.autograd.gradcheck(fn, (x, *params), eps=1e-6, atol=1e-6, rtol=1e-5)


def test_non_floating_input_raises_type_error():
    layer = DeepSeekMoE(tiny_cfg())
    with pytest.raises(TypeError, match="floating-point input, got dtype torch.int64"):
        layer(torch.ones(3, 16, dtype=torch.long))


@pytest.mark.parametrize("shape", [(3, 15), (2, 3, 32), ()])
def test_wrong_width_raises_value_error(shape):
    layer = DeepSeekMoE(tiny_cfg())
    with pytest.raises(ValueError, match=re.escape(f"shape [..., d_model=16], got {shape}")):
        layer(torch.randn(shape))


def test_nan_input_raises():
    layer = DeepSeekMoE(tiny_cfg())
    x = torch.randn(4, 16)
    x[1, 2] = float("nan")
    with pytest.raises(FloatingPointError, match="NaN or inf"):
        layer(x)
    x[1, 2] = float("inf")
    with pytest.raises(FloatingPointError, match="NaN or inf"):
        layer(x)


@pytest.mark.parametrize("dispatch", ["loop", "sorted", "grouped"])
def test_capacity_drops_are_counted_and_kept_tokens_exact(dispatch):
    cfg = tiny_cfg(n_groups=1, topk_groups=1, capacity_factor=1.0, dispatch=dispatch)
    layer = make_layer(cfg).eval()
    with torch.no_grad():
        layer.gate.correction_bias.zero_()
        layer.gate.correction_bias[0] = 1.0  # expert 0 is wanted by every token: 32 > capacity 12
        x_TH = torch.randn(32, 16)
        out = layer(x_TH)
        stats = layer.last_routing
        routing = layer.gate(x_TH)
        capacity = 12  # ceil(1.0 * 32 * 3 / 8)
        kept = stats.indices
        assert stats.n_dropped == int((kept < 0).sum()) > 0
        assert torch.bincount(kept[kept >= 0], minlength=8).max() <= capacity
        assert torch.equal(kept[kept >= 0], routing.indices[kept >= 0])
        assert torch.equal(stats.load, torch.bincount(routing.indices.reshape(-1), minlength=8))
        expected = reference_output(layer, x_TH, kept, routing.weights)
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
        dropless = clone_with(layer, capacity_factor=None).eval()(x_TH)
        untouched = (kept >= 0).all(dim=1)
        assert untouched.any() and not untouched.all()
        torch.testing.assert_close(out[untouched], dropless[untouched], rtol=1e-5, atol=1e-6)
        assert not torch.allclose(out[~untouched], dropless[~untouched])


def test_large_capacity_factor_drops_nothing():
    layer = make_layer(tiny_cfg(capacity_factor=8 / 3)).eval()  # capacity = T: nothing can overflow
    x_TH = torch.randn(20, 16)
    out = layer(x_TH)
    assert layer.last_routing.n_dropped == 0
    torch.testing.assert_close(out, clone_with(layer, capacity_factor=None).eval()(x_TH))


def test_last_routing_stats_are_sane():
    cfg = tiny_cfg()
    layer = make_layer(cfg)
    x = torch.randn(3, 7, 16)
    layer(x)
    stats = layer.last_routing
    assert stats.indices.shape == (21, 3) and stats.weights.shape == (21, 3) and stats.scores.shape == (21, 8)
    assert not stats.weights.requires_grad and not stats.scores.requires_grad
    assert ((stats.indices >= 0) & (stats.indices < 8)).all()
    assert all(len(set(row)) == 3 for row in stats.indices.tolist())
    torch.testing.assert_close(stats.weights.sum(-1), torch.full((21,), 2.5))
    assert stats.load.sum() == 21 * 3 and stats.n_dropped == 0
    assert torch.equal(stats.load, torch.bincount(stats.indices.reshape(-1), minlength=8))
    torch.testing.assert_close(stats.scores, torch.sigmoid(x.reshape(21, 16) @ layer.gate.weight.T))
    expected = reference_output(layer, x.reshape(21, 16), stats.indices, stats.weights)
    torch.testing.assert_close(layer(x).reshape(21, 16), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("bias_update", ["step", "none"])
def test_eval_and_train_outputs_identical_without_aux_loss(bias_update):
    layer = make_layer(tiny_cfg(bias_update=bias_update, aux_loss="none"))
    x = torch.randn(2, 9, 16)
    train_out = layer.train()(x)
    assert layer.aux_loss.item() == 0.0
    eval_out = layer.eval()(x)
    assert torch.equal(train_out, eval_out)


def test_shared_expert_width_and_unscaled_output():
    layer = make_layer(tiny_cfg(n_shared=2, route_scale=1.0))
    assert layer.shared_experts.gate_proj.weight.shape == (16, 16)  # one MLP of width 2 * d_expert
    scaled = clone_with(layer, route_scale=3.0)
    x = torch.randn(10, 16)
    shared = layer.shared_experts(x)
    torch.testing.assert_close(scaled(x) - shared, 3.0 * (layer(x) - shared), rtol=1e-5, atol=1e-6)
    no_shared = DeepSeekMoE(tiny_cfg(n_shared=0))
    assert no_shared.shared_experts is None
    assert not any("shared" in name for name, _ in no_shared.named_parameters())


def test_output_keeps_input_dtype_and_shape():
    layer = make_layer(tiny_cfg(dispatch="sorted"), dtype=torch.float64)
    x = torch.randn(2, 3, 16, dtype=torch.float64)
    out = layer(x)
    assert out.dtype == torch.float64 and out.shape == x.shape


# --- property-based: random valid layers and bad inputs (hypothesis) --------------------------------

def valid_layer_configs():
    """A strategy of valid MoEConfigs built constructively (groups x experts per group)."""
    from hypothesis import strategies as st

    @st.composite
    def build(draw):
        n_groups, per_group = draw(st.integers(1, 4)), draw(st.integers(1, 4))
        topk_groups = draw(st.integers(1, n_groups))
        top_k = draw(st.integers(1, topk_groups * per_group))
        score_func = draw(st.sampled_from(["sigmoid", "softmax"]))
        group_score = draw(st.sampled_from(["auto", "top2_sum", "max"]))
        if per_group < 2 and topk_groups < n_groups:
            group_score = "max"  # the top-2-sum group score needs two experts per group
        return tiny_cfg(
            d_model=draw(st.sampled_from([4, 8])), d_expert=draw(st.sampled_from([2, 6])),
            n_routed=n_groups * per_group, n_groups=n_groups, topk_groups=topk_groups, top_k=top_k,
            n_shared=draw(st.integers(0, 2)), score_func=score_func, group_score=group_score,
            norm_topk_prob=draw(st.booleans()), route_scale=draw(st.sampled_from([1.0, 2.5, 16.0])),
            capacity_factor=draw(st.sampled_from([None, 0.5, 1.5])),
            dispatch=draw(st.sampled_from(["loop", "sorted", "grouped"])),
            bias_update=draw(st.sampled_from(["step", "forward", "none"])),
            aux_loss=draw(st.sampled_from(["none", "expert", "sequence", "batch", "device"])),
            aux_loss_alpha=0.1, aux_loss_devices=n_groups)
    return build()


def test_random_valid_layers_run_forward_and_backward_with_finite_results():
    from hypothesis import given, settings
    from hypothesis import strategies as st

    @settings(max_examples=150, deadline=None, derandomize=True)
    @given(valid_layer_configs(), st.sampled_from([(0,), (1,), (7,), (2, 5), (3, 0), (1, 1, 4)]),
           st.booleans())
    def check(cfg, lead_shape, training):
        layer = make_layer(cfg, bias_scale=0.3).train(training)
        x = torch.randn(*lead_shape, cfg.d_model, requires_grad=True)
        y = layer(x)
        assert y.shape == x.shape and torch.isfinite(y).all()
        (y * torch.randn_like(y)).sum().backward()
        assert torch.isfinite(x.grad).all()
        assert all(torch.isfinite(p.grad).all() for p in layer.parameters() if p.grad is not None)
        if training:
            assert torch.isfinite(layer.aux_loss)
        assert torch.isfinite(layer.gate.correction_bias).all()

    check()


def test_random_bad_inputs_fail_with_a_clear_error():
    from hypothesis import given, settings
    from hypothesis import strategies as st

    layer = DeepSeekMoE(tiny_cfg())

    @settings(max_examples=60, deadline=None, derandomize=True)
    @given(st.lists(st.integers(0, 4), min_size=0, max_size=3), st.integers(1, 40),
           st.sampled_from(["width", "dtype", "nan", "inf"]))
    def check(lead_shape, width, fault):
        if fault == "width":
            width = width if width != 16 else 17
            with pytest.raises(ValueError, match=re.escape(f"[..., d_model=16], got {(*lead_shape, width)}")):
                layer(torch.randn(*lead_shape, width))
        elif fault == "dtype":
            with pytest.raises(TypeError, match="floating-point input"):
                layer(torch.ones(*lead_shape, 16, dtype=torch.int32))
        else:
            x = torch.randn(*[max(n, 1) for n in lead_shape], 3, 16)
            x.view(-1, 16)[-1, width % 16] = float(fault)
            with pytest.raises(FloatingPointError, match="NaN or inf"):
                layer(x)

    check()
