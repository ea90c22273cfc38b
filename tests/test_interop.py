"""moe_lib.interop: our layer computes exactly what transformers' DeepseekV3MoE / DeepseekV2Moe compute."""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

from moe_lib import DeepSeekMoE, MoEConfig
from moe_lib.interop import from_transformers, to_transformers

transformers = pytest.importorskip("transformers")
from transformers.models.deepseek_v2.modeling_deepseek_v2 import DeepseekV2Moe  # noqa: E402
from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3MoE  # noqa: E402

DISPATCHES = ("loop", "sorted", "grouped")
TINY = dict(hidden_size=48, moe_intermediate_size=16, n_routed_experts=8, n_shared_experts=1,
            num_experts_per_tok=2, n_group=1, topk_group=1, experts_implementation="eager")

# groups on/off, norm_topk_prob on/off, route scale != 1, one or two shared experts
V3_CONFIGS = {
    "plain": dict(),
    "groups-scale": dict(n_group=4, topk_group=2, routed_scaling_factor=2.5),
    "nonorm-2shared": dict(norm_topk_prob=False, n_shared_experts=2, routed_scaling_factor=2.5),
    "groups-nonorm-top3": dict(n_group=2, topk_group=1, norm_topk_prob=False, num_experts_per_tok=3,
                               n_shared_experts=2, routed_scaling_factor=0.7),
}
V2_CONFIGS = {
    "greedy": dict(topk_method="greedy", routed_scaling_factor=1.0),
    "greedy-scale-2shared": dict(topk_method="greedy", n_shared_experts=2, routed_scaling_factor=16.0),
    "group-limited": dict(topk_method="group_limited_greedy", n_group=4, topk_group=2,
                          num_experts_per_tok=3, n_shared_experts=2, routed_scaling_factor=16.0),
}


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def _randomize(module: torch.nn.Module, std: float = 0.2) -> torch.nn.Module:
    """Fresh random-normal values in every parameter (transformers leaves experts uninitialised)."""
    with torch.no_grad():
        for param in module.parameters():
            param.normal_(0.0, std)
    return module


def hf_v3(bias_scale: float = 0.2, **changes) -> DeepseekV3MoE:
    """A tiny transformers V3 layer with random weights and a random, non-zero correction bias."""
    cfg = transformers.DeepseekV3Config(**{**TINY, **changes})
    layer = _randomize(DeepseekV3MoE(cfg))
    layer.gate.e_score_correction_bias.copy_(bias_scale * torch.randn(cfg.n_routed_experts))
    return layer.eval()


def hf_v2(**changes) -> DeepseekV2Moe:
    cfg = transformers.DeepseekV2Config(**{**TINY, "num_attention_heads": 1, **changes})
    return _randomize(DeepseekV2Moe(cfg)).eval()


def assert_near(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Within 1e-5 relative; atol 1e-6 of the largest |value| absorbs float32 rounding where terms
    cancel (transformers visits an expert's tokens in another order, so matmul rows round apart)."""
    assert_close(actual, expected, rtol=1e-5, atol=1e-6 * float(expected.detach().abs().max()))


def assert_same_layer(ours: torch.nn.Module, hf: torch.nn.Module, shape=(2, 5, 48)) -> None:
    """Same output, input gradient and parameter gradients on a random 3-D input [B, S, H]."""
    x = torch.randn(shape)
    x_ours, x_hf = x.clone().requires_grad_(), x.clone().requires_grad_()
    y_ours, y_hf = ours(x_ours), hf(x_hf)
    assert_near(y_ours, y_hf)
    grad_y = torch.randn_like(y_hf)
    y_ours.backward(grad_y)
    y_hf.backward(grad_y)
    assert_near(x_ours.grad, x_hf.grad)
    hf_params = dict(hf.named_parameters())
    for name, param in ours.named_parameters():
        assert_near(param.grad, hf_params[name].grad)


@pytest.mark.parametrize("dispatch", DISPATCHES)
@pytest.mark.parametrize("changes", V3_CONFIGS.values(), ids=V3_CONFIGS.keys())
def test_v3_equivalence(changes, dispatch):
    hf = hf_v3(**changes)
    ours = from_transformers(hf, dispatch=dispatch).eval()
    assert ours.cfg.dispatch == dispatch
    assert_same_layer(ours, hf)


@pytest.mark.parametrize("dispatch", DISPATCHES)
@pytest.mark.parametrize("changes", V2_CONFIGS.values(), ids=V2_CONFIGS.keys())
def test_v2_equivalence(changes, dispatch):
    hf = hf_v2(**changes)
    ours = from_transformers(hf, dispatch=dispatch).eval()
    assert ours.cfg.score_func == "softmax" and not ours.cfg.norm_topk_prob
    assert_same_layer(ours, hf)


def test_v3_config_and_weights_copied():
    hf = hf_v3(n_group=4, topk_group=2, routed_scaling_factor=2.5, n_shared_experts=2)
    ours = from_transformers(hf)
    cfg = ours.cfg
    assert (cfg.d_model, cfg.d_expert, cfg.n_routed, cfg.n_shared, cfg.top_k) == (48, 16, 8, 2, 2)
    assert (cfg.n_groups, cfg.topk_groups, cfg.score_func, cfg.resolved_group_score) == (
        4, 2, "sigmoid", "top2_sum")
    assert cfg.norm_topk_prob and cfg.route_scale == 2.5
    for name, param in hf.named_parameters():
        assert torch.equal(ours.get_parameter(name), param), name
    assert ours.gate.correction_bias.dtype == torch.float32
    assert torch.equal(ours.gate.correction_bias, hf.gate.e_score_correction_bias)


def test_v2_group_limited_config():
    cfg = from_transformers(hf_v2(**V2_CONFIGS["group-limited"])).cfg
    assert (cfg.n_groups, cfg.topk_groups, cfg.resolved_group_score) == (4, 2, "max")
    assert cfg.route_scale == 16.0 and cfg.bias_update == "none"


def test_bias_matters():
    """The copied bias changes the choice of experts: without it the output differs."""
    hf = hf_v3(bias_scale=0.5)
    ours = from_transformers(hf, dispatch="loop").eval()
    x = torch.randn(4, 8, 48)
    y = ours(x)
    chosen = ours.last_routing.indices.sort(dim=-1).values
    ours.gate.correction_bias.zero_()
    assert not torch.equal(ours(x), y)
    assert not torch.equal(ours.last_routing.indices.sort(dim=-1).values, chosen)


def test_training_mode_accumulates_loads_but_keeps_output():
    hf = hf_v3(**V3_CONFIGS["groups-scale"])
    ours = from_transformers(hf, dispatch="sorted")
    x = torch.randn(2, 5, 48)
    y_train = ours.train()(x)
    assert ours.gate.tokens_per_expert.sum() == 2 * 5 * 2
    assert_close(y_train, ours.eval()(x), rtol=0, atol=0)
    assert_near(y_train, hf(x))


def test_mode_follows_the_source():
    hf = hf_v3()
    assert not from_transformers(hf).training
    assert from_transformers(hf.train()).training


@pytest.mark.parametrize("make", [lambda: hf_v3(**V3_CONFIGS["groups-nonorm-top3"]),
                                  lambda: hf_v2(**V2_CONFIGS["group-limited"])], ids=["v3", "v2"])
def test_round_trip(make):
    hf = make()
    back = to_transformers(from_transformers(hf))
    assert type(back) is type(hf)
    for field in ("n_routed_experts", "n_shared_experts", "num_experts_per_tok", "n_group", "topk_group",
                  "routed_scaling_factor", "moe_intermediate_size", "hidden_size"):
        assert getattr(back.config, field) == getattr(hf.config, field), field
    assert back.state_dict().keys() == hf.state_dict().keys()
    for name, tensor in hf.state_dict().items():
        assert torch.equal(back.state_dict()[name], tensor), name
    x = torch.randn(3, 4, 48)
    assert_close(back(x), hf(x), rtol=0, atol=0)


@pytest.mark.parametrize("changes", [
    dict(score_func="sigmoid", n_groups=4, topk_groups=2, route_scale=2.5),
    dict(score_func="sigmoid", norm_topk_prob=False, n_shared=0),
    dict(score_func="softmax", norm_topk_prob=False, n_groups=4, topk_groups=2, route_scale=16.0),
], ids=["v3-groups", "v3-noshared", "v2-groups"])
def test_ours_to_transformers(changes):
    """Starting from our layer (random bias for sigmoid): transformers computes the same."""
    ours = DeepSeekMoE(MoEConfig(d_model=48, d_expert=16, n_routed=8, top_k=3, dispatch="loop",
                                 **changes)).eval()
    if ours.cfg.score_func == "sigmoid":
        ours.gate.correction_bias.copy_(0.2 * torch.randn(8))
    hf = to_transformers(ours)
    assert isinstance(hf, DeepseekV3MoE if ours.cfg.score_func == "sigmoid" else DeepseekV2Moe)
    assert_same_layer(ours, hf)


def test_dtype_is_kept():
    hf = hf_v3(**V3_CONFIGS["groups-scale"]).to(torch.bfloat16)
    ours = from_transformers(hf, dispatch="loop").eval()
    assert ours.experts.gate_up_proj.dtype == ours.gate.weight.dtype == torch.bfloat16
    assert ours.gate.correction_bias.dtype == torch.float32
    x = torch.randn(2, 5, 48, dtype=torch.bfloat16)
    assert_close(ours(x), hf(x), rtol=2e-2, atol=2e-2)
    back = to_transformers(ours)
    assert back.experts.down_proj.dtype == torch.bfloat16
    assert back.gate.e_score_correction_bias.dtype == torch.float32


def _cfg(**changes) -> MoEConfig:
    return MoEConfig(**{**dict(d_model=16, d_expert=8, n_routed=8, top_k=2), **changes})


@pytest.mark.parametrize("changes, message", [
    (dict(capacity_factor=1.25), "capacity_factor=1.25"),
    (dict(route_limit="node", limit_units=4, limit_max=2), "route_limit='node'"),
    (dict(route_limit="device", limit_units=4, limit_max=2), "route_limit='device'"),
    (dict(score_func="softmax"), "norm_topk_prob=True with softmax"),
    (dict(score_func="sigmoid", group_score="max", n_groups=4, topk_groups=2), "group_score='max'"),
    (dict(score_func="softmax", norm_topk_prob=False, group_score="top2_sum", n_groups=4, topk_groups=2),
     "group_score='top2_sum'"),
    (dict(score_func="sigmoid", group_score="max", n_routed=1, top_k=1), "n_routed=1"),
])
def test_to_transformers_rejects_inexpressible(changes, message):
    with pytest.raises(ValueError, match="transformers cannot express") as info:
        to_transformers(DeepSeekMoE(_cfg(**changes)))
    assert message in str(info.value)


def test_to_transformers_rejects_softmax_bias():
    ours = DeepSeekMoE(_cfg(score_func="softmax", norm_topk_prob=False))
    ours.gate.correction_bias.fill_(0.1)
    with pytest.raises(ValueError, match="non-zero correction bias"):
        to_transformers(ours)


def test_from_transformers_rejects():
    with pytest.raises(TypeError, match="got Linear"):
        from_transformers(torch.nn.Linear(4, 4))
    with pytest.raises(ValueError, match="top_k come"):
        from_transformers(hf_v3(), top_k=3)
    with pytest.raises(ValueError, match="hidden_act='gelu'"):
        from_transformers(hf_v3(hidden_act="gelu"))
    with pytest.raises(ValueError, match="mlp_bias=True"):
        from_transformers(hf_v2(mlp_bias=True))
