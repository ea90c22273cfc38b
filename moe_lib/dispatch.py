"""Token dispatch: send each (token, expert) pair to its expert and combine the weighted outputs.

    y_t = sum_k w_{t,k} * Expert_{idx_{t,k}}(x_t)

Three interchangeable paths compute exactly this sum:

- `dispatch_loop`: the readable reference, one boolean mask per expert.
- `dispatch_sorted`: sort the T*K pairs by expert so that each expert reads one contiguous slice,
  then combine with one scatter-add.
- `dispatch_grouped`: the same sorted layout run by `moe_lib.kernels.expert_swiglu`, forward and
  backward: on the CPU whole experts run concurrently, one per core; elsewhere grouped GEMMs.

Every path takes `(x_TH, indices_TK, weights_TK, experts, shared=None)`; an index of -1 marks a pair
dropped by the expert capacity (`apply_capacity`) and contributes nothing. `shared`, the layer's
shared expert (an `Expert`) or None, is added to the output: `y + shared(x)` (on the CPU the grouped
path runs it in the routed experts' call). Expert parallelism and the GPU path plug in here as
further functions of the same signature.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F

from . import kernels, native
from .experts import Expert, RoutedExperts, swiglu


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


def _add_shared(y_TH: torch.Tensor, x_TH: torch.Tensor, shared: Expert | None) -> torch.Tensor:
    return y_TH if shared is None else y_TH + shared(x_TH)


def dispatch_loop(x_TH: torch.Tensor, indices_TK: torch.Tensor, weights_TK: torch.Tensor,
                  experts: RoutedExperts, shared: Expert | None = None) -> torch.Tensor:
    """Reference: for each expert, gather its tokens, run it, add the weighted output back."""
    y_TH = torch.zeros_like(x_TH)
    for e in range(experts.n_experts):
        token_N, slot_N = torch.where(indices_TK == e)
        if token_N.numel() == 0:
            continue
        out_NH = experts.expert_forward(e, x_TH[token_N])
        y_TH = y_TH.index_add(0, token_N, out_NH * weights_TK[token_N, slot_N, None])
    return _add_shared(y_TH, x_TH, shared)


class SortedPairs(NamedTuple):
    """The T*K (token, expert) pairs sorted by expert; dropped pairs removed.

    token_N: source token of each pair; weight_N: its combine weight;
    counts_E: pairs per expert (the length of each contiguous slice);
    position_TK: where each pair landed in the sorted order (N, one past the end, if dropped).
    """

    token_N: torch.Tensor
    weight_N: torch.Tensor
    counts_E: torch.Tensor
    position_TK: torch.Tensor


def sort_by_expert(indices_TK: torch.Tensor, weights_TK: torch.Tensor, n_experts: int) -> SortedPairs:
    """Argsort the flattened pairs by expert id (stable), skipping dropped (-1) pairs."""
    ops = native.ops_for(indices_TK, dtype=torch.int64)
    if ops is not None:  # one counting sort on the CPU
        order_N, token_N, counts_E, position_TK = ops.sort_pairs(indices_TK, n_experts)
        return SortedPairs(token_N, weights_TK.reshape(-1).index_select(0, order_N), counts_E, position_TK)
    flat_N = indices_TK.reshape(-1)
    order_N = torch.argsort(flat_N, stable=True)
    counts_E = torch.bincount(flat_N + 1, minlength=n_experts + 1)
    order_N = order_N[counts_E[0]:]  # -1 sorts first: skip the dropped pairs
    position_N = torch.full_like(flat_N, order_N.shape[0])
    position_N[order_N] = torch.arange(order_N.shape[0], device=flat_N.device)
    return SortedPairs(order_N // indices_TK.shape[1], weights_TK.reshape(-1).index_select(0, order_N),
                       counts_E[1:], position_N.view(indices_TK.shape))


def dispatch_sorted(x_TH: torch.Tensor, indices_TK: torch.Tensor, weights_TK: torch.Tensor,
                    experts: RoutedExperts, shared: Expert | None = None) -> torch.Tensor:
    """Sorted: one gather, one contiguous slice per expert, one scatter-add."""
    pairs = sort_by_expert(indices_TK, weights_TK, experts.n_experts)
    x_NH = x_TH.index_select(0, pairs.token_N)  # index_select: far faster than x[idx] on CPU
    chunks = x_NH.split(pairs.counts_E.tolist())
    # unbind, not indexing: its backward stacks the E weight gradients once instead of adding E
    # full-size [E, ...] gradients
    gate_up_E, down_E = experts.gate_up_proj.unbind(0), experts.down_proj.unbind(0)
    out_NH = torch.cat([swiglu(chunk, gate_up_E[e], down_E[e]) for e, chunk in enumerate(chunks)])
    weighted_NH = out_NH * pairs.weight_N.unsqueeze(-1)
    return _add_shared(torch.zeros_like(x_TH).index_add(0, pairs.token_N, weighted_NH), x_TH, shared)


def dispatch_grouped(x_TH: torch.Tensor, indices_TK: torch.Tensor, weights_TK: torch.Tensor,
                     experts: RoutedExperts, shared: Expert | None = None) -> torch.Tensor:
    """The sorted layout run by `kernels.expert_swiglu`: on the CPU each expert's whole SwiGLU is
    one task and the cores run different experts at once, the shared expert's blocks among them;
    elsewhere one grouped GEMM per product. The combine is a gather-and-sum over each token's K
    sorted rows (plus its shared row), no scatter."""
    if x_TH.is_cuda:  # the GPU path keeps the tokens per expert on the device: no host sync
        from .gpu.grouped import dispatch_device, supports
        if supports(x_TH, experts):
            return _add_shared(dispatch_device(x_TH, indices_TK, weights_TK, experts), x_TH, shared)
    pairs = sort_by_expert(indices_TK, weights_TK, experts.n_experts)
    return kernels.expert_swiglu(x_TH, experts.gate_up_proj, experts.down_proj, pairs.counts_E.tolist(),
                                 pairs.weight_N, pairs.token_N, pairs.position_TK,
                                 None if shared is None else shared.stacked_weights())


DISPATCH: dict[str, Callable[..., torch.Tensor]] = {
    "loop": dispatch_loop,
    "sorted": dispatch_sorted,
    "grouped": dispatch_grouped,
}
