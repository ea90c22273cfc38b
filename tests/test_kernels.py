"""moe_lib.kernels: every product against a float64 reference, on oneDNN and on the fallback."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from moe_lib import kernels
from moe_lib.dispatch import dispatch_grouped, dispatch_loop
from moe_lib.experts import RoutedExperts

COUNTS = [5, 0, 9, 1, 0, 7]  # experts with no rows included


@pytest.fixture(params=["onednn", "fallback"])
def backend(request, monkeypatch):
    if request.param == "onednn" and not kernels.ONEDNN:
        pytest.skip("this torch build has no oneDNN")
    if request.param == "fallback":
        monkeypatch.setattr(kernels, "ONEDNN", False)
    return request.param


def close(actual, expected_f64):
    torch.testing.assert_close(actual.double(), expected_f64, rtol=1e-5, atol=1e-5)


def per_expert(counts, fn):
    """Concatenate fn(e, rows) over the experts that have rows."""
    out, start = [], 0
    for e, n in enumerate(counts):
        if n:
            out.append(fn(e, slice(start, start + n)))
        start += n
    return out


def test_onednn_is_used_on_this_machine():
    assert kernels.ONEDNN  # torch 2.13's CPU wheel ships oneDNN; the benchmark relies on it
    assert kernels.use_onednn(torch.randn(2, 2))
    assert not kernels.use_onednn(torch.randn(2, 2, dtype=torch.float64))


@pytest.mark.skipif(not kernels.ONEDNN, reason="this torch build has no oneDNN")
def test_flop_counter_counts_the_onednn_kernels():
    """torch's FlopCounterMode sees oneDNN's linear (torch has no formula for _grouped_mm itself)."""
    from torch.utils.flop_counter import FlopCounterMode

    a, b = torch.randn(7, 12), torch.randn(5, 12)
    with FlopCounterMode(display=False) as counter:
        kernels.mm_nt(a, b)
        kernels.grouped_mm_nt(torch.randn(sum(COUNTS), 12), torch.randn(len(COUNTS), 8, 12), COUNTS)
    assert counter.get_total_flops() == 2 * 7 * 12 * 5 + 2 * sum(COUNTS) * 12 * 8


def test_mm_nt_and_linear(backend):
    a, b = torch.randn(7, 12), torch.randn(5, 12)
    close(kernels.mm_nt(a, b), a.double() @ b.double().t())
    x = torch.randn(2, 3, 12)
    close(kernels.linear(x, b), F.linear(x.double(), b.double()))
    assert kernels.linear(torch.randn(0, 12), b).shape == (0, 5)  # an expert with no tokens


def test_linear_gradients_match_f_linear(backend):
    x1, w1 = torch.randn(2, 9, 12, requires_grad=True), torch.randn(5, 12, requires_grad=True)
    x2, w2 = x1.detach().double().requires_grad_(), w1.detach().double().requires_grad_()
    grad = torch.randn(2, 9, 5)
    kernels.linear(x1, w1).backward(grad)
    F.linear(x2, w2).backward(grad.double())
    close(x1.grad, x2.grad)
    close(w1.grad, w2.grad)


def test_grouped_products(backend):
    n = sum(COUNTS)
    a_NK, b_EOK = torch.randn(n, 12), torch.randn(len(COUNTS), 8, 12)
    a_NO, b_NK = torch.randn(n, 8), torch.randn(n, 12)
    A, B = a_NK.double(), b_EOK.double()
    close(kernels.grouped_mm_nt(a_NK, b_EOK, COUNTS),
          torch.cat(per_expert(COUNTS, lambda e, r: A[r] @ B[e].t())))
    close(kernels.grouped_mm_nn(a_NO, b_EOK, COUNTS),
          torch.cat(per_expert(COUNTS, lambda e, r: a_NO.double()[r] @ B[e])))
    expected = torch.zeros(len(COUNTS), 8, 12, dtype=torch.float64)
    per_expert(COUNTS, lambda e, r: expected[e].copy_(a_NO.double()[r].t() @ b_NK.double()[r]))
    close(kernels.grouped_mm_tn(a_NO, b_NK, COUNTS), expected)


def test_grouped_dispatch_matches_loop_forward_and_backward(backend):
    experts = RoutedExperts(6, 16, 8)
    x1 = torch.randn(20, 16, requires_grad=True)
    indices_TK = torch.stack([torch.randperm(6)[:2] for _ in range(20)])
    w1 = torch.rand(20, 2, requires_grad=True)
    grad = torch.randn(20, 16)
    grads = []
    for dispatch in (dispatch_grouped, dispatch_loop):
        x, w = x1.detach().clone().requires_grad_(), w1.detach().clone().requires_grad_()
        experts.zero_grad()
        out = dispatch(x, indices_TK, w, experts)
        out.backward(grad)
        grads.append([out, x.grad, w.grad, experts.gate_up_proj.grad.clone(),
                      experts.down_proj.grad.clone()])
    for got, want in zip(*grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
