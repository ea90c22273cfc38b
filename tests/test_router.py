"""Router math against a hand-written float64 reference, one token at a time."""

from __future__ import annotations

import math

import pytest
import torch

from moe_lib import MoEConfig, Router, route
from moe_lib.router import combine_weights, group_scores, router_scores, select_experts


def reference_route(logits_TE, bias_E, cfg: MoEConfig):
    """DeepSeek-V3 routing written out per token in float64 Python."""
    E, G = cfg.n_routed, cfg.n_groups
    size = E // G
    all_idx, all_w = [], []
    for logits in logits_TE.double().tolist():
        if cfg.score_func == "sigmoid":
            s = [1 / (1 + math.exp(-v)) for v in logits]
        else:
            z = sum(math.exp(v) for v in logits)
            s = [math.exp(v) / z for v in logits]
        c = [s[i] + (0.0 if bias_E is None else float(bias_E[i])) for i in range(E)]
        group_value = []
        for g in range(G):
            members = sorted(c[g * size:(g + 1) * size], reverse=True)
            group_value.append(members[0] if cfg.resolved_group_score == "max" else members[0] + members[1])
        kept = sorted(range(G), key=lambda g: -group_value[g])[:cfg.topk_groups]
        candidates = [i for i in range(E) if i // size in kept]
        idx = sorted(candidates, key=lambda i: -c[i])[:cfg.top_k]
        w = [s[i] for i in idx]
        if cfg.norm_topk_prob:
            total = sum(w)
            w = [v / total for v in w]
        all_idx.append(idx)
        all_w.append([v * cfg.route_scale for v in w])
    return torch.tensor(all_idx), torch.tensor(all_w, dtype=torch.float64)


CASES = [
    dict(score_func="sigmoid", n_groups=1, topk_groups=1, norm_topk_prob=True, route_scale=1.0),
    dict(score_func="sigmoid", n_groups=4, topk_groups=2, norm_topk_prob=True, route_scale=2.5),
    dict(score_func="sigmoid", n_groups=4, topk_groups=2, norm_topk_prob=False, route_scale=2.5,
         group_score="max"),
    dict(score_func="softmax", n_groups=1, topk_groups=1, norm_topk_prob=False, route_scale=1.0),
    dict(score_func="softmax", n_groups=4, topk_groups=2, norm_topk_prob=False, route_scale=16.0),
    dict(score_func="softmax", n_groups=2, topk_groups=1, norm_topk_prob=True, route_scale=1.0,
         group_score="top2_sum"),
]


@pytest.mark.parametrize("changes", CASES, ids=[str(i) for i in range(len(CASES))])
@pytest.mark.parametrize("with_bias", [False, True])
def test_route_matches_per_token_reference(changes, with_bias):
    cfg = MoEConfig(d_model=8, d_expert=4, n_routed=16, top_k=4, **changes)
    logits_TE = 2 * torch.randn(32, 16)
    bias_E = 0.3 * torch.randn(16) if with_bias else None
    routing = route(logits_TE, bias_E, cfg)
    ref_idx, ref_w = reference_route(logits_TE, bias_E, cfg)
    assert torch.equal(routing.indices, ref_idx)
    torch.testing.assert_close(routing.weights.double(), ref_w, rtol=1e-6, atol=1e-7)
    assert routing.weights.dtype == torch.float32


def test_router_scores_sigmoid_and_softmax():
    logits_TE = torch.randn(5, 6, dtype=torch.float64)
    torch.testing.assert_close(router_scores(logits_TE, "sigmoid"), 1 / (1 + torch.exp(-logits_TE)))
    soft = router_scores(logits_TE, "softmax")
    torch.testing.assert_close(soft, logits_TE.exp() / logits_TE.exp().sum(-1, keepdim=True))
    torch.testing.assert_close(soft.sum(-1), torch.ones(5, dtype=torch.float64))
    with pytest.raises(ValueError, match="score_func='tanh'"):
        router_scores(logits_TE, "tanh")


def test_group_score_max_and_top2_sum_pick_different_groups():
    # group 0 = one strong expert, group 1 = two good experts: max prefers 0, top2_sum prefers 1.
    scores_TE = torch.tensor([[0.9, 0.0, 0.6, 0.6]])
    torch.testing.assert_close(group_scores(scores_TE, 2, "max"), torch.tensor([[0.9, 0.6]]))
    torch.testing.assert_close(group_scores(scores_TE, 2, "top2_sum"), torch.tensor([[0.9, 1.2]]))
    assert select_experts(scores_TE, None, 1, 2, 1, "max").tolist() == [[0]]
    assert select_experts(scores_TE, None, 1, 2, 1, "top2_sum").item() in (2, 3)
    with pytest.raises(ValueError, match="group_score='mean'"):
        group_scores(scores_TE, 2, "mean")


def test_masking_uses_minus_inf_when_biased_scores_are_negative():
    scores_TE = torch.tensor([[0.9, 0.8, 0.1, 0.2]])
    bias_E = torch.full((4,), -1.0)  # every biased score is negative
    chosen = select_experts(scores_TE, bias_E, top_k=2, n_groups=2, topk_groups=1)
    assert sorted(chosen.tolist()[0]) == [0, 1]  # both from the kept group 0
    # masking with 0 instead would pick the experts of the discarded group:
    zero_masked = (scores_TE + bias_E).clone()
    zero_masked[:, 2:] = 0.0
    assert sorted(zero_masked.topk(2).indices.tolist()[0]) == [2, 3]


def test_masked_experts_are_never_chosen_random():
    cfg = MoEConfig(d_model=8, d_expert=4, n_routed=16, top_k=4, n_groups=4, topk_groups=2)
    scores_TE = torch.rand(64, 16)
    bias_E = -2 + 0.1 * torch.randn(16)
    idx_TK = select_experts(scores_TE, bias_E, 4, 4, 2, cfg.resolved_group_score)
    groups_TK = idx_TK // 4
    assert all(len(set(row)) <= 2 for row in groups_TK.tolist())
    ref_idx, _ = reference_route(torch.logit(scores_TE), bias_E, cfg)
    assert torch.equal(idx_TK, ref_idx)


def test_bias_changes_choice_but_not_weights_of_a_choice():
    cfg = MoEConfig(d_model=8, d_expert=4, n_routed=16, top_k=4, n_groups=4, topk_groups=2,
                    route_scale=2.5)
    logits_TE = torch.randn(64, 16)
    bias_E = 0.5 * torch.randn(16)
    plain, biased = route(logits_TE, None, cfg), route(logits_TE, bias_E, cfg)
    assert not torch.equal(plain.indices, biased.indices)  # the bias moved some choices
    torch.testing.assert_close(biased.scores, plain.scores)  # scores are unbiased
    gathered = plain.scores.gather(1, biased.indices)
    torch.testing.assert_close(biased.weights, 2.5 * gathered / gathered.sum(-1, keepdim=True))
    biased_gathered = (plain.scores + bias_E).gather(1, biased.indices)
    assert not torch.allclose(biased.weights, 2.5 * biased_gathered / biased_gathered.sum(-1, keepdim=True))
    # a uniform shift of the bias keeps every choice, and then every weight is bit-identical
    shifted = route(logits_TE, bias_E + 0.7, cfg)
    assert torch.equal(shifted.indices, biased.indices)
    assert torch.equal(shifted.weights, biased.weights)


def test_large_bias_forces_an_expert_with_its_unbiased_weight():
    cfg = MoEConfig(d_model=8, d_expert=4, n_routed=8, top_k=2, norm_topk_prob=False)
    logits_TE = torch.randn(10, 8)
    bias_E = torch.zeros(8)
    bias_E[5] = 10.0
    routing = route(logits_TE, bias_E, cfg)
    assert (routing.indices[:, 0] == 5).all()
    torch.testing.assert_close(routing.weights[:, 0], torch.sigmoid(logits_TE[:, 5]))


@pytest.mark.parametrize("norm", [True, False])
@pytest.mark.parametrize("scale", [1.0, 2.5])
def test_norm_topk_prob_and_route_scale(norm, scale):
    cfg = MoEConfig(d_model=8, d_expert=4, n_routed=8, top_k=3, norm_topk_prob=norm, route_scale=scale)
    logits_TE = torch.randn(20, 8)
    routing = route(logits_TE, None, cfg)
    raw = torch.sigmoid(logits_TE).gather(1, routing.indices)
    expected_sum = torch.full((20,), scale) if norm else scale * raw.sum(-1)
    torch.testing.assert_close(routing.weights.sum(-1), expected_sum)
    torch.testing.assert_close(combine_weights(torch.sigmoid(logits_TE), routing.indices, norm, 1.0) * scale,
                               routing.weights)


def test_weights_carry_gradient_and_selection_does_not():
    cfg = MoEConfig(d_model=8, d_expert=4, n_routed=8, top_k=2)
    logits_TE = torch.randn(6, 8, requires_grad=True)
    routing = route(logits_TE, None, cfg)
    assert routing.weights.requires_grad and not routing.indices.requires_grad
    routing.weights.sum().backward()
    assert logits_TE.grad.abs().sum() > 0


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("score_func", ["sigmoid", "softmax"])
def test_nan_or_inf_logits_raise(bad, score_func):
    cfg = MoEConfig(d_model=8, d_expert=4, n_routed=8, top_k=2, score_func=score_func)
    logits_TE = torch.randn(4, 8)
    logits_TE[2, 3] = bad
    with pytest.raises(FloatingPointError, match="NaN or inf"):
        route(logits_TE, None, cfg)


def test_router_module_gate_and_buffers():
    cfg = MoEConfig(d_model=8, d_expert=4, n_routed=8, top_k=2)
    router = Router(cfg)
    assert router.weight.shape == (8, 8)
    assert [name for name, _ in router.named_parameters()] == ["weight"]
    assert {name for name, _ in router.named_buffers()} == {"correction_bias", "tokens_per_expert"}
    x_TH = torch.randn(12, 8)
    with torch.no_grad():
        router.correction_bias.copy_(0.2 * torch.randn(8))
    routing = router(x_TH)
    expected = route(x_TH @ router.weight.T, router.correction_bias, cfg)
    assert torch.equal(routing.indices, expected.indices)
    torch.testing.assert_close(routing.weights, expected.weights)


def test_router_accumulate_load_skips_dropped_pairs():
    router = Router(MoEConfig(d_model=8, d_expert=4, n_routed=4, top_k=2))
    router.accumulate_load(torch.tensor([[0, 1], [1, -1], [3, 1]]))
    assert router.tokens_per_expert.tolist() == [1.0, 3.0, 0.0, 1.0]


def test_router_buffers_stay_float32_when_the_module_is_cast():
    router = Router(MoEConfig(d_model=8, d_expert=4, n_routed=4, top_k=2)).to(torch.bfloat16)
    assert router.weight.dtype == torch.bfloat16
    assert router.correction_bias.dtype == torch.float32
    assert router.tokens_per_expert.dtype == torch.float32
    router.accumulate_load(torch.zeros(3000, 1, dtype=torch.long))
    assert router.tokens_per_expert[0].item() == 3000.0  # bf16 would round 3000 to 2992 or 3008


def test_float64_inputs_route_in_float64():
    router = Router(MoEConfig(d_model=8, d_expert=4, n_routed=4, top_k=2)).double()
    routing = router(torch.randn(3, 8, dtype=torch.float64))
    assert routing.weights.dtype == torch.float64 and routing.scores.dtype == torch.float64


def test_kept_groups_picks_best_groups_and_bounds_the_selection():
    from moe_lib.router import kept_groups

    # 2 tokens, 4 groups of 2 experts. t0: top-2 sums (0.3, 1.5, 0.85, 1.1), maxima (0.2, 0.8, 0.85, 0.6);
    # t1: sums (1.8, 0.2, 0.6, 0.4), maxima (0.9, 0.1, 0.3, 0.2)
    choice_TE = torch.tensor([[0.1, 0.2, 0.7, 0.8, 0.85, 0.0, 0.6, 0.5],
                              [0.9, 0.9, 0.1, 0.1, 0.3, 0.3, 0.2, 0.2]])
    keep_TG = kept_groups(choice_TE, n_groups=4, topk_groups=2, group_score="top2_sum")
    assert keep_TG.tolist() == [[False, True, False, True], [True, False, True, False]]
    assert kept_groups(choice_TE, 4, 2, "max").tolist() == [[False, True, True, False],
                                                            [True, False, True, False]]
    scores_TE = torch.rand(64, 16)
    indices_TK = select_experts(scores_TE, None, 3, n_groups=4, topk_groups=2)
    keep_TG = kept_groups(scores_TE, 4, 2)
    assert keep_TG.gather(1, indices_TK // 4).all()  # every chosen expert lies in a kept group


# --- node-limited (V3) and device-limited (V2) routing ------------------------------------------------


def reference_limited(logits_TE, bias_E, top_k, units, max_units, unit_score):
    """Per token in float64 Python: keep the best `max_units` blocks of experts, then the top-k.

    unit_score "node": a block's score is the sum of its top K/M biased scores (V3 Sec. 2.1.2);
    "device": its highest biased score (V2 Sec. 2.1.3).
    """
    per_unit = logits_TE.shape[1] // units
    chosen = []
    for logits in logits_TE.double().tolist():
        c = [1 / (1 + math.exp(-v)) + (0.0 if bias_E is None else float(bias_E[i]))
             for i, v in enumerate(logits)]
        blocks = [sorted(c[u * per_unit:(u + 1) * per_unit], reverse=True) for u in range(units)]
        score = [sum(b[:top_k // max_units]) if unit_score == "node" else b[0] for b in blocks]
        kept = sorted(range(units), key=lambda u: -score[u])[:max_units]
        candidates = [i for i in range(len(c)) if i // per_unit in kept]
        chosen.append(sorted(candidates, key=lambda i: -c[i])[:top_k])
    return torch.tensor(chosen)


@pytest.mark.parametrize("limit, units, max_units, top_k", [
    ("node", 4, 2, 6),     # nodes scored by their top-3 sum (K/M = 3, not V3's 2)
    ("node", 8, 3, 6),     # K/M = 2 (floor), 3 of 8 nodes
    ("node", 4, 1, 4),     # one node per token: its top-4 sum
    ("device", 8, 3, 6),   # V2: 3 of 8 devices by their best expert
    ("device", 4, 2, 5),
])
@pytest.mark.parametrize("with_bias", [False, True])
def test_limited_routing_matches_per_token_reference(limit, units, max_units, top_k, with_bias):
    cfg = MoEConfig(d_model=8, d_expert=4, n_routed=32, top_k=top_k, route_limit=limit,
                    limit_units=units, limit_max=max_units)
    logits_TE = 2 * torch.randn(64, 32)
    bias_E = 0.3 * torch.randn(32) if with_bias else None
    routing = route(logits_TE, bias_E, cfg)
    expected = reference_limited(logits_TE, bias_E, top_k, units, max_units,
                                 "node" if limit == "node" else "device")
    assert torch.equal(routing.indices, expected)
    units_per_token = [len(set(row)) for row in (routing.indices // (32 // units)).tolist()]
    assert max(units_per_token) <= max_units
    assert min(units_per_token) >= 1


def test_node_limit_with_k_over_m_two_is_v3_group_routing():
    """V3's 8 groups / 4 kept with top-2 sums ARE node-limited routing on 8 nodes, M = 4, K = 8."""
    logits_TE, bias_E = torch.randn(128, 64), 0.1 * torch.randn(64)
    groups = MoEConfig(d_model=8, d_expert=4, n_routed=64, top_k=8, n_groups=8, topk_groups=4)
    nodes = groups.replace(n_groups=1, topk_groups=1, route_limit="node", limit_units=8, limit_max=4)
    assert torch.equal(route(logits_TE, bias_E, groups).indices, route(logits_TE, bias_E, nodes).indices)
    assert nodes.selection_groups == (8, 4, "topk_sum") and groups.selection_groups == (8, 4, "top2_sum")


def test_topk_sum_group_score_sums_the_top_k_over_m():
    choice_TE = torch.tensor([[0.9, 0.1, 0.1, 0.5, 0.5, 0.5]])   # 2 groups of 3
    top3, top1 = (group_scores(choice_TE, 2, "topk_sum", per_group=k) for k in (3, 1))
    torch.testing.assert_close(top3, torch.tensor([[1.1, 1.5]]))
    torch.testing.assert_close(top1, torch.tensor([[0.9, 0.5]]))
    # K = 3, M = 1: the group with the best top-3 sum wins although the best expert lies elsewhere
    assert sorted(select_experts(choice_TE, None, 3, 2, 1, "topk_sum").tolist()[0]) == [3, 4, 5]
    assert select_experts(choice_TE, None, 3, 2, 1, "max").tolist()[0][0] == 0


def test_limited_routing_runs_in_the_layer_without_expert_parallelism():
    from moe_lib import DeepSeekMoE

    cfg = MoEConfig(d_model=16, d_expert=8, n_routed=16, n_shared=1, top_k=4, dispatch="sorted",
                    route_limit="node", limit_units=4, limit_max=2)
    layer = DeepSeekMoE(cfg)
    x = torch.randn(50, 16, requires_grad=True)
    layer(x).square().sum().backward()
    nodes_TK = layer.last_routing.indices // 4
    assert max(len(set(row)) for row in nodes_TK.tolist()) <= 2
    assert x.grad.abs().sum() > 0


@pytest.mark.parametrize("changes, field", [
    (dict(route_limit="rack"), "route_limit"),
    (dict(route_limit="node", limit_units=4, limit_max=2, n_groups=2, topk_groups=1), "n_groups"),
    (dict(route_limit="node", limit_units=3, limit_max=2), "limit_units"),
    (dict(route_limit="device", limit_units=4, limit_max=5), "limit_max"),
    (dict(route_limit="device", limit_units=8, limit_max=1), "limit_max"),   # 1 device x 2 < top_k 4
    (dict(route_limit="node", limit_units=2, limit_max=2, top_k=1), "limit_max"),  # K/M = 0 terms
    (dict(route_limit="node", limit_units=0), "limit_units"),
    (dict(n_groups=4, topk_groups=3, top_k=2, group_score="topk_sum"), "topk_groups"),
])
def test_limit_options_are_validated(changes, field):
    base = dict(d_model=8, d_expert=4, n_routed=16, top_k=4)
    with pytest.raises(ValueError, match=rf"MoEConfig\.{field}=.* is invalid: expected "):
        MoEConfig(**{**base, **changes})
