"""Dispatch paths: y_t = sum_k w_tk Expert_{idx_tk}(x_t), with -1 (dropped) pairs contributing nothing."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from moe_lib import RoutedExperts
from moe_lib.dispatch import (
    DISPATCH,
    apply_capacity,
    dispatch_grouped,
    expert_capacity,
    sort_by_expert,
)
from moe_lib.kernels import HAS_GROUPED_MM


def reference_dispatch(x_TH, indices_TK, weights_TK, experts):
    """One (token, slot) pair at a time."""
    rows = []
    for t in range(x_TH.shape[0]):
        y_H = torch.zeros_like(x_TH[t])
        for k in range(indices_TK.shape[1]):
            e = int(indices_TK[t, k])
            if e >= 0:
                y_H = y_H + weights_TK[t, k] * experts.expert_forward(e, x_TH[t:t + 1])[0]
        rows.append(y_H)
    return torch.stack(rows)


def random_routing(n_tokens, n_experts, top_k, n_dropped=0, skip_expert=None):
    """Distinct experts per token (optionally never `skip_expert`), random weights, some -1 pairs."""
    scores_TE = torch.rand(n_tokens, n_experts)
    if skip_expert is not None:
        scores_TE[:, skip_expert] = -1
    indices_TK = scores_TE.topk(top_k, dim=-1).indices
    drop = torch.randperm(n_tokens * top_k)[:n_dropped]
    indices_TK.view(-1)[drop] = -1
    return indices_TK, torch.rand(n_tokens, top_k) + 0.1


@pytest.mark.parametrize("name", ["loop", "sorted", "grouped"])
@pytest.mark.parametrize("n_dropped", [0, 7])
def test_each_path_matches_pairwise_reference(name, n_dropped):
    experts = RoutedExperts(6, 16, 8).double()
    x_TH = torch.randn(20, 16, dtype=torch.float64)
    indices_TK, weights_TK = random_routing(20, 6, 3, n_dropped, skip_expert=4)
    weights_TK = weights_TK.double()
    out = DISPATCH[name](x_TH, indices_TK, weights_TK, experts)
    expected = reference_dispatch(x_TH, indices_TK, weights_TK, experts)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    assert out.abs().sum() > 0


@pytest.mark.parametrize("n_dropped", [0, 9])
def test_paths_agree_forward_and_backward(n_dropped):
    experts = RoutedExperts(6, 16, 16)
    x0 = torch.randn(24, 16)
    indices_TK, w0 = random_routing(24, 6, 2, n_dropped, skip_expert=0)
    results = {}
    for name, fn in DISPATCH.items():
        experts.zero_grad()
        x, w = x0.clone().requires_grad_(), w0.clone().requires_grad_()
        out = fn(x, indices_TK, w, experts)
        grad_out = torch.linspace(-1, 1, out.numel()).view_as(out)
        (out * grad_out).sum().backward()
        results[name] = [out.detach(), x.grad, w.grad, experts.gate_up_proj.grad.clone(),
                         experts.down_proj.grad.clone()]
    assert results["loop"][3][0].abs().sum() == 0  # expert 0 received no token: zero gradient
    if n_dropped:  # a dropped pair gets no weight gradient
        assert (results["loop"][2][indices_TK < 0] == 0).all()
    for name in ("sorted", "grouped"):
        for ours, ref in zip(results[name], results["loop"], strict=True):
            torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)


def test_grouped_float64_gradcheck_with_drops_and_an_empty_expert():
    indices_TK, weights_TK = random_routing(9, 4, 2, n_dropped=3, skip_expert=2)
    experts = RoutedExperts(4, 6, 5).double()
    inputs = [t.detach().clone().double().requires_grad_()
              for t in (torch.randn(9, 6), weights_TK, experts.gate_up_proj, experts.down_proj)]

    def fn(x_TH, weights_TK, gate_up_proj, down_proj):
        stand_in = SimpleNamespace(n_experts=4, gate_up_proj=gate_up_proj, down_proj=down_proj)
        return dispatch_grouped(x_TH, indices_TK, weights_TK, stand_in)

    torch.testing.assert_close(fn(*inputs), reference_dispatch(inputs[0], indices_TK, inputs[1], experts))
    assert torch.autograd.gradcheck(fn, inputs)


def test_grouped_bf16_with_unaligned_width():
    experts = RoutedExperts(4, 8, 4).to(torch.bfloat16)  # d_expert 4: rows not 16-byte aligned
    x_TH = torch.randn(10, 8, dtype=torch.bfloat16)
    indices_TK, weights_TK = random_routing(10, 4, 2)
    out = dispatch_grouped(x_TH, indices_TK, weights_TK.bfloat16(), experts)
    expected = reference_dispatch(x_TH.float(), indices_TK, weights_TK, experts.float())
    torch.testing.assert_close(out.float(), expected, rtol=3e-2, atol=3e-2)


def test_grouped_mm_available_in_pinned_torch():
    assert HAS_GROUPED_MM  # torch 2.13 has torch.nn.functional.grouped_mm


def test_expert_capacity_formula():
    assert expert_capacity(100, 6, 64, 1.0) == math.ceil(600 / 64) == 10
    assert expert_capacity(4096, 8, 256, 1.25) == 160
    assert expert_capacity(3, 1, 8, 0.1) == 1


def reference_capacity(indices_TK, n_experts, capacity):
    kept = indices_TK.clone()
    used = [0] * n_experts
    for k in range(indices_TK.shape[1]):  # every first choice before any second choice
        for t in range(indices_TK.shape[0]):
            e = int(indices_TK[t, k])
            if used[e] < capacity:
                used[e] += 1
            else:
                kept[t, k] = -1
    return kept


@pytest.mark.parametrize("capacity", [1, 3, 5, 100])
def test_apply_capacity_matches_reference(capacity):
    scores_TE = torch.rand(30, 8)
    scores_TE[:, 0] += 0.5  # expert 0 is popular, so it overflows first
    indices_TK = scores_TE.topk(3, dim=-1).indices
    kept = apply_capacity(indices_TK, 8, capacity)
    assert torch.equal(kept, reference_capacity(indices_TK, 8, capacity))
    counts = torch.bincount(kept[kept >= 0], minlength=8)
    assert counts.max() <= capacity
    assert torch.equal(kept[kept >= 0], indices_TK[kept >= 0])  # kept pairs are untouched
    if capacity == 100:
        assert torch.equal(kept, indices_TK)
    else:
        assert (kept < 0).any()


def test_sort_by_expert_groups_pairs_and_skips_dropped():
    indices_TK = torch.tensor([[2, 0], [0, -1], [2, 1], [-1, 0]])
    weights_TK = torch.tensor([[0.1, 0.2], [0.3, 0.4], [0.5, 0.6], [0.7, 0.8]])
    pairs = sort_by_expert(indices_TK, weights_TK, n_experts=4)
    assert pairs.counts_E.tolist() == [3, 1, 2, 0]
    assert pairs.token_N.tolist() == [0, 1, 3, 2, 0, 2]
    assert pairs.position_TK.tolist() == [[4, 0], [1, 6], [5, 3], [6, 2]]  # 6: dropped
    torch.testing.assert_close(pairs.weight_N, torch.tensor([0.2, 0.3, 0.8, 0.6, 0.1, 0.5]))
