"""Token dispatch: send each (token, expert) pair to its expert and combine the weighted outputs.

    y_t = sum_k w_{t,k} * Expert_{idx_{t,k}}(x_t)

Three interchangeable paths compute exactly this sum:

- `dispatch_loop`: the readable reference, one boolean mask per expert.
- `dispatch_sorted`: sort the T*K pairs by expert so that each expert reads one contiguous slice,
  then combine with one scatter-add.
- `dispatch_grouped`: the same sorted layout fed to grouped GEMMs (`moe_lib.kernels`: oneDNN on the
  CPU, `torch.nn.functional.grouped_mm` / `torch._grouped_mm` elsewhere), forward and backward.

Every path takes `(x_TH, indices_TK, weights_TK, experts)`; an index of -1 marks a pair dropped by
the expert capacity (`apply_capacity`) and contributes nothing. Expert parallelism and the GPU
path plug in here as further functions of the same signature.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F

from . import kernels
from .experts import RoutedExperts, swiglu


def expert_capacity(n_tokens: int, top_k: int, n_experts: int, capacity_factor: float) -> int:
    """Tokens an expert may keep: ceil(capacity_factor * T * K / E)."""
    return math.ceil(capacity_factor * n_tokens * top_k / n_experts)


def apply_capacity(indices_TK: torch.Tensor, n_experts: int, capacity: int) -> torch.Tensor:
    """Drop the pairs beyond each expert's capacity (earlier tokens first): their index becomes -1.

    Within a token, slot k is served before slot k+1 (the higher-affinity choice first).
    """
    flat_N = indices_TK.t().reshape(-1)  # slot-major: all first choices before second choices
    one_hot_NE = F.one_hot(flat_N, n_experts)
    position_N = ((one_hot_NE.cumsum(dim=0) - 1) * one_hot_NE).sum(dim=-1)
    kept_N = torch.where(position_N < capacity, flat_N, torch.full_like(flat_N, -1))
    return kept_N.view(indices_TK.shape[1], -1).t().contiguous()


def dispatch_loop(x_TH: torch.Tensor, indices_TK: torch.Tensor, weights_TK: torch.Tensor,
                  experts: RoutedExperts) -> torch.Tensor:
    """Reference: for each expert, gather its tokens, run it, add the weighted output back."""
    y_TH = torch.zeros_like(x_TH)
    for e in range(experts.n_experts):
        token_N, slot_N = torch.where(indices_TK == e)
        if token_N.numel() == 0:
            continue
        out_NH = experts.expert_forward(e, x_TH[token_N])
        y_TH = y_TH.index_add(0, token_N, out_NH * weights_TK[token_N, slot_N, None])
    return y_TH


class SortedPairs(NamedTuple):
    """The T*K (token, expert) pairs sorted by expert; dropped pairs removed.

    token_N: source token of each pair; weight_N: its combine weight;
    counts_E: pairs per expert (the length of each contiguous slice).
    """

    token_N: torch.Tensor
    weight_N: torch.Tensor
    counts_E: torch.Tensor


def sort_by_expert(indices_TK: torch.Tensor, weights_TK: torch.Tensor, n_experts: int) -> SortedPairs:
    """Argsort the flattened pairs by expert id (stable), skipping dropped (-1) pairs."""
    flat_N = indices_TK.reshape(-1)
    order_N = torch.argsort(flat_N, stable=True)
    counts_E = torch.bincount(flat_N + 1, minlength=n_experts + 1)
    order_N = order_N[counts_E[0]:]  # -1 sorts first: skip the dropped pairs
    return SortedPairs(order_N // indices_TK.shape[1], weights_TK.reshape(-1).index_select(0, order_N),
                       counts_E[1:])


def dispatch_sorted(x_TH: torch.Tensor, indices_TK: torch.Tensor, weights_TK: torch.Tensor,
                    experts: RoutedExperts) -> torch.Tensor:
    """Sorted: one gather, one contiguous slice per expert, one scatter-add."""
    pairs = sort_by_expert(indices_TK, weights_TK, experts.n_experts)
    x_NH = x_TH.index_select(0, pairs.token_N)  # index_select: far faster than x[idx] on CPU
    chunks = x_NH.split(pairs.counts_E.tolist())
    # unbind, not indexing: its backward stacks the E weight gradients once instead of adding E
    # full-size [E, ...] gradients
    gate_up_E, down_E = experts.gate_up_proj.unbind(0), experts.down_proj.unbind(0)
    out_NH = torch.cat([swiglu(chunk, gate_up_E[e], down_E[e]) for e, chunk in enumerate(chunks)])
    weighted_NH = out_NH * pairs.weight_N.unsqueeze(-1)
    return torch.zeros_like(x_TH).index_add(0, pairs.token_N, weighted_NH)


class GroupedExperts(torch.autograd.Function):
    """y_t = sum_k w_{t,k} SwiGLU_{e_{t,k}}(x_t) on expert-sorted pairs, with grouped GEMMs both ways.

    Forward, for the N sorted pairs (counts_E: pairs per expert, a list of ints):
        x_NH = x[token_N];  g = x_NH @ gate_e^T;  u = x_NH @ up_e^T;  a = silu(g) * u
        y = scatter-add over token_N of (w_N * a) @ down_e^T
    The GEMMs are `moe_lib.kernels` grouped products (oneDNN on the CPU, grouped_mm elsewhere).
    The gate and up halves of `gate_up_proj` are two grouped GEMMs, so each result is contiguous
    (no strided half to copy). The combine weight scales the [N, I] activation rather than the
    [N, H] output (the same sum, half the elementwise work). silu(g) = g * sigmoid(g) is computed in
    place; fresh large allocations cost far more than in-place passes on CPU.
    Backward reuses the sorted layout: two grouped GEMMs per projection (input and weight
    gradients), with silu'(g) = sigmoid(g) + silu(g) * (1 - sigmoid(g)) and a = silu(g) * u
    recomputed. Saves x_NH, sigmoid(g), silu(g) and u.
    """

    @staticmethod
    def forward(ctx, x_TH, token_N, weight_N, counts_E, gate_up_EFH, down_EHI):
        d_expert = down_EHI.shape[-1]
        x_NH = x_TH.index_select(0, token_N)
        gate_NI = kernels.grouped_mm_nt(x_NH, gate_up_EFH[:, :d_expert], counts_E)
        up_NI = kernels.grouped_mm_nt(x_NH, gate_up_EFH[:, d_expert:], counts_E)
        sig_NI = torch.sigmoid(gate_NI)
        silu_NI = gate_NI.mul_(sig_NI)
        hidden_NI = (silu_NI * up_NI).mul_(weight_N.unsqueeze(-1))
        out_NH = kernels.grouped_mm_nt(hidden_NI, down_EHI, counts_E)
        ctx.counts_E = counts_E
        ctx.save_for_backward(x_NH, sig_NI, silu_NI, up_NI, token_N, weight_N, gate_up_EFH, down_EHI)
        return torch.zeros_like(x_TH).index_add_(0, token_N, out_NH)

    @staticmethod
    def backward(ctx, grad_TH):
        x_NH, sig_NI, silu_NI, up_NI, token_N, weight_N, gate_up_EFH, down_EHI = ctx.saved_tensors
        counts_E = ctx.counts_E
        act_NI = silu_NI * up_NI
        grad_NH = grad_TH.index_select(0, token_N)
        grad_h_NI = kernels.grouped_mm_nn(grad_NH, down_EHI, counts_E)
        grad_weight_N = (grad_h_NI * act_NI).sum(dim=-1)
        grad_down_EHI = kernels.grouped_mm_tn(grad_NH, act_NI.mul_(weight_N.unsqueeze(-1)), counts_E)
        grad_act_NI = grad_h_NI.mul_(weight_N.unsqueeze(-1))
        grad_up_NI = grad_act_NI * silu_NI
        grad_gate_NI = grad_act_NI.mul_(up_NI).mul_(torch.addcmul(sig_NI, silu_NI, 1 - sig_NI))
        grad_gate_up_NF = torch.cat([grad_gate_NI, grad_up_NI], dim=-1)
        grad_x_NH = kernels.grouped_mm_nn(grad_gate_up_NF, gate_up_EFH, counts_E)
        grad_gate_up_EFH = kernels.grouped_mm_tn(grad_gate_up_NF, x_NH, counts_E)
        grad_x_TH = torch.zeros_like(grad_TH).index_add_(0, token_N, grad_x_NH)
        return grad_x_TH, None, grad_weight_N, None, grad_gate_up_EFH, grad_down_EHI


def dispatch_grouped(x_TH: torch.Tensor, indices_TK: torch.Tensor, weights_TK: torch.Tensor,
                     experts: RoutedExperts) -> torch.Tensor:
    """Grouped GEMM: the sorted layout, all experts' GEMMs in one pass per projection.

    Falls back to `dispatch_sorted` where neither oneDNN nor grouped_mm takes the input
    (float64; 16-bit widths that are not multiples of 8).
    """
    if not (kernels.use_onednn(x_TH)
            or kernels.use_grouped_mm(x_TH, experts.d_model, experts.d_expert)):
        return dispatch_sorted(x_TH, indices_TK, weights_TK, experts)
    pairs = sort_by_expert(indices_TK, weights_TK, experts.n_experts)
    return GroupedExperts.apply(x_TH, pairs.token_N, pairs.weight_N, pairs.counts_E.tolist(),
                                experts.gate_up_proj, experts.down_proj)


DISPATCH: dict[str, Callable[..., torch.Tensor]] = {
    "loop": dispatch_loop,
    "sorted": dispatch_sorted,
    "grouped": dispatch_grouped,
}
