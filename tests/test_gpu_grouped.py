"""moe_lib.gpu.grouped: device-side sort and grouped-GEMM experts, run on CPU tensors (grouped_mm has a
CPU kernel), against the `loop` reference forward and backward, in float32 and bf16."""

from __future__ import annotations

import pytest
import torch

from moe_lib import RoutedExperts
from moe_lib.dispatch import dispatch_loop, dispatch_sorted
from moe_lib.gpu import grouped
from moe_lib.gpu.grouped import dispatch_device, sort_on_device, supports
from moe_lib.gpu.syncs import host_syncs


def routing(n_tokens, n_experts, top_k, n_dropped=0, skip_expert=None):
    """Distinct experts per token (never `skip_expert`), random weights, `n_dropped` pairs set to -1."""
    scores_TE = torch.rand(n_tokens, n_experts)
    if skip_expert is not None:
        scores_TE[:, skip_expert] = -1
    indices_TK = scores_TE.topk(top_k, dim=-1).indices
    indices_TK.view(-1)[torch.randperm(n_tokens * top_k)[:n_dropped]] = -1
    return indices_TK, torch.rand(n_tokens, top_k) + 0.1


def run(fn, x_TH, indices_TK, weights_TK, experts, proj_TH):
    """Output and the gradients of sum(y * P) to x, the weights and both expert parameters."""
    x = x_TH.detach().clone().requires_grad_()
    w = weights_TK.detach().clone().requires_grad_()
    experts.zero_grad(set_to_none=True)
    y = fn(x, indices_TK, w, experts)
    (y.float() * proj_TH).sum().backward()
    return [y.detach().float(), x.grad.float(), w.grad.float(), experts.gate_up_proj.grad.float(),
            experts.down_proj.grad.float()]


def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize("n_dropped", [0, 9])
def test_sort_on_device_groups_pairs_by_expert(n_dropped):
    indices_TK, weights_TK = routing(13, 6, 3, n_dropped, skip_expert=2)
    pairs = sort_on_device(indices_TK, weights_TK, 6)
    valid = indices_TK.reshape(-1)[indices_TK.reshape(-1) >= 0]
    counts_E = torch.bincount(valid, minlength=6)
    assert pairs.offsets_E.dtype == torch.int32
    torch.testing.assert_close(pairs.offsets_E, counts_E.cumsum(0).to(torch.int32))
    n_valid = int(counts_E.sum())
    assert pairs.valid_N[:n_valid].all() and not pairs.valid_N[n_valid:].any()
    assert (pairs.target_N[n_valid:] == 13).all() and torch.equal(pairs.target_N[:n_valid],
                                                                  pairs.source_N[:n_valid])
    experts_N = indices_TK[pairs.source_N[:n_valid]]
    slot_N = (experts_N == torch.repeat_interleave(torch.arange(6), counts_E)[:, None]).float().argmax(-1)
    torch.testing.assert_close(pairs.weight_N[:n_valid], weights_TK[pairs.source_N[:n_valid], slot_N])
    # stable: the same token order within each expert as the host-side sort of moe_lib.dispatch
    cpu_sorted = torch.argsort(indices_TK.reshape(-1), stable=True)[indices_TK.numel() - n_valid:] // 3
    assert torch.equal(pairs.source_N[:n_valid], cpu_sorted)


@pytest.mark.parametrize("n_tokens, n_dropped", [(1, 0), (23, 0), (23, 11)])
def test_forward_backward_equal_loop_in_float32(n_tokens, n_dropped):
    experts = RoutedExperts(8, 32, 16)
    x_TH, proj_TH = torch.randn(n_tokens, 32), torch.randn(n_tokens, 32)
    indices_TK, weights_TK = routing(n_tokens, 8, 3, n_dropped, skip_expert=5)
    ours = run(dispatch_device, x_TH, indices_TK, weights_TK, experts, proj_TH)
    ref = run(dispatch_loop, x_TH, indices_TK, weights_TK, experts, proj_TH)
    for name, a, b in zip(["y", "dx", "dw", "d gate_up", "d down"], ours, ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)
    assert (ours[3][5] == 0).all() and (ours[4][5] == 0).all(), "an expert without tokens has no gradient"
    if n_dropped:
        dropped = indices_TK < 0
        assert (ours[2][dropped] == 0).all() and (ours[2][~dropped] != 0).all()


def test_bf16_is_within_bf16_tolerance_of_float32():
    experts = RoutedExperts(16, 64, 32)
    x_TH, proj_TH = torch.randn(40, 64), torch.randn(40, 64)
    indices_TK, weights_TK = routing(40, 16, 4, n_dropped=5)
    ref = run(dispatch_loop, x_TH, indices_TK, weights_TK, experts, proj_TH)
    ours = run(dispatch_device, x_TH.bfloat16(), indices_TK, weights_TK, experts.bfloat16(), proj_TH)
    errors = [rel_err(a, b) for a, b in zip(ours, ref, strict=True)]
    assert max(errors) < 3e-2, errors
    assert min(errors) > 1e-4, "the bf16 run must really be bf16"


def test_garbage_rows_of_dropped_pairs_never_reach_outputs(monkeypatch):
    """grouped_mm leaves the rows past offsets[-1] uninitialised: fill them with NaN and check that
    neither the output nor any gradient sees them."""
    real = grouped.grouped_mm

    def poisoned(a, b, offs):
        out = real(a, b, offs=offs)
        if out.dim() == 2:
            out[offs[-1]:] = float("nan")
        return out

    monkeypatch.setattr(grouped, "grouped_mm", poisoned)
    experts = RoutedExperts(6, 16, 8)
    x_TH, proj_TH = torch.randn(12, 16), torch.randn(12, 16)
    indices_TK, weights_TK = routing(12, 6, 2, n_dropped=7)
    ours = run(dispatch_device, x_TH, indices_TK, weights_TK, experts, proj_TH)
    ref = run(dispatch_loop, x_TH, indices_TK, weights_TK, experts, proj_TH)
    for a, b in zip(ours, ref, strict=True):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_no_host_synchronisation_forward_or_backward():
    experts = RoutedExperts(8, 32, 16)
    x_TH = torch.randn(10, 32, requires_grad=True)
    indices_TK, weights_TK = routing(10, 8, 2, n_dropped=3)

    def forward_backward(fn):
        fn(x_TH, indices_TK, weights_TK, experts).sum().backward()

    assert host_syncs(forward_backward, dispatch_device) == []
    assert "tolist" in host_syncs(forward_backward, dispatch_sorted), "the detector must see .tolist()"


def test_supports_only_aligned_matching_dtypes():
    experts = RoutedExperts(4, 32, 16)
    assert supports(torch.randn(3, 32), experts)
    assert not supports(torch.randn(3, 32, dtype=torch.float64), experts.double())
    assert not supports(torch.randn(3, 32, dtype=torch.bfloat16), experts.float())
    assert supports(torch.randn(3, 32, dtype=torch.bfloat16), experts.bfloat16())
    assert not supports(torch.randn(3, 12, dtype=torch.bfloat16), RoutedExperts(4, 12, 16).bfloat16())
