"""All-to-all dispatch and combine for expert parallelism, with autograd.

W ranks; rank r holds the S expert slots [r S, (r+1) S) (S = E / W without redundant experts).
One forward of a rank's T tokens, routed to slots `slots_TK`:

1. plan (`plan_dispatch`, no communication): the tokens each rank must receive. A token goes ONCE
   to every rank that holds at least one of its K experts, with its K local expert ids there
   (-1 for the experts that live elsewhere) and its K routing weights.
2. counts: one all-to-all of the (token, expert) pair counts per destination slot, plus the token
   count per destination: every rank learns its receive splits and its per-expert load before
   any token moves (the host sync of `.tolist()` happens here).
3. dispatch (`Dispatch`): all-to-all of the tokens [N, H] (optionally FP8), their weights and ids.
   The received rows are rank-major (all tokens from rank 0, then rank 1, ...).
4. experts: `moe_lib.dispatch`'s paths regroup the received pairs expert-major (`sort_by_expert`),
   run the local experts and sum each received token's weighted outputs; ids of -1 count nothing.
5. combine (`Combine`): all-to-all of those per-token partial sums back to the source ranks, which
   add them up (index_add): y_t = sum over ranks of sum_{k on that rank} w_{t,k} FFN_{e_{t,k}}(x_t).

Autograd: the backward of an all-to-all is the all-to-all with the splits swapped. `Dispatch` sends
tokens and weights in ONE autograd node, so every rank runs the backward exchanges in the same
order whatever the shape of its graph (two nodes could run in different orders on different ranks
and pair up the wrong messages).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.distributed as dist
import torch.nn.functional as F

from . import fp8


class DispatchPlan(NamedTuple):
    """Where one rank's tokens go, in send order (rank-major, then token order).

    token_N: source token of each sent row; local_NK: the expert ids on the destination rank (-1:
    not there); send_R: rows per destination rank; pairs_RS: (token, expert) pairs per slot.
    """

    token_N: torch.Tensor
    local_NK: torch.Tensor
    send_R: torch.Tensor
    pairs_RS: torch.Tensor


class Splits(NamedTuple):
    """Rows this rank sends to (`send`) and receives from (`recv`) each rank, as Python ints."""

    send: list[int]
    recv: list[int]

    def reversed(self) -> Splits:
        return Splits(self.recv, self.send)


def plan_dispatch(slots_TK: torch.Tensor, slots_per_rank: int, n_ranks: int) -> DispatchPlan:
    """Deduplicate (token, rank) pairs and list each token's local expert ids per destination."""
    valid_TK = slots_TK >= 0
    rank_TK = torch.where(valid_TK, slots_TK // slots_per_rank, -1)
    hit_TR = F.one_hot(rank_TK + 1, n_ranks + 1)[..., 1:].any(dim=1)  # [T, W]: token needs rank
    rank_N, token_N = hit_TR.t().nonzero(as_tuple=True)  # rank-major, then token order
    here_NK = rank_TK.index_select(0, token_N) == rank_N.unsqueeze(1)
    local_NK = torch.where(here_NK, slots_TK.index_select(0, token_N) % slots_per_rank, -1)
    pairs_RS = torch.bincount(slots_TK[valid_TK], minlength=n_ranks * slots_per_rank)
    return DispatchPlan(token_N, local_NK, hit_TR.sum(dim=0), pairs_RS.view(n_ranks, slots_per_rank))


def all_to_all(x: torch.Tensor, splits: Splits, group: dist.ProcessGroup | None) -> torch.Tensor:
    """Rows of `x`: splits.send[j] rows to rank j; returns the sum(splits.recv) rows received."""
    out = x.new_empty((sum(splits.recv), *x.shape[1:]))
    dist.all_to_all_single(out, x.contiguous(), splits.recv, splits.send, group=group)
    return out


def exchange_counts(plan: DispatchPlan, group: dist.ProcessGroup | None) -> tuple[Splits, torch.Tensor]:
    """All-to-all of [tokens, pairs per local slot] per rank: the splits and the received counts.

    Returns the splits and recv_RS [W, S]: pairs each source rank sends to each of my slots.
    """
    counts_RC = torch.cat([plan.send_R.unsqueeze(1), plan.pairs_RS], dim=1)  # [W, 1 + S]
    recv_RC = torch.empty_like(counts_RC)
    dist.all_to_all_single(recv_RC, counts_RC.contiguous(), group=group)
    return Splits(plan.send_R.tolist(), recv_RC[:, 0].tolist()), recv_RC[:, 1:]


class Dispatch(torch.autograd.Function):
    """(tokens [N, H], weights [N, K]) sent by `splits` -> (tokens [M, H], weights [M, K]).

    With `use_fp8` the tokens travel as e4m3 codes plus power-of-two scales (`fp8.quantize`); the
    weights always travel exactly. Backward: the gradients travel back in full precision, and the
    FP8 rounding counts as the identity (a straight-through estimator).
    """

    @staticmethod
    def forward(ctx, x_NH, weights_NK, splits: Splits, group, use_fp8: bool):
        ctx.splits, ctx.group = splits, group
        if use_fp8:
            payload = fp8.quantize(x_NH)
            received = fp8.FP8Payload(all_to_all(payload.codes_NH, splits, group),
                                      all_to_all(payload.scales_NB, splits, group))
            x_MH = fp8.dequantize(received, x_NH.dtype)
        else:
            x_MH = all_to_all(x_NH, splits, group)
        return x_MH, all_to_all(weights_NK, splits, group)

    @staticmethod
    def backward(ctx, grad_x_MH, grad_weights_MK):
        back = ctx.splits.reversed()
        return (all_to_all(grad_x_MH, back, ctx.group), all_to_all(grad_weights_MK, back, ctx.group),
                None, None, None)


class Combine(torch.autograd.Function):
    """Per-token partial sums [M, H] sent back along `splits` reversed -> [N, H] on the source ranks.

    `dtype` is the wire precision (V3: BF16; None keeps the activations' dtype); the result comes
    back in the input's dtype. Backward: the gradient goes out along `splits`, in full precision.
    """

    @staticmethod
    def forward(ctx, y_MH, splits: Splits, group, dtype: torch.dtype | None):
        ctx.splits, ctx.group = splits, group
        wire_MH = y_MH if dtype is None else y_MH.to(dtype)
        return all_to_all(wire_MH, splits.reversed(), group).to(y_MH.dtype)

    @staticmethod
    def backward(ctx, grad_NH):
        return all_to_all(grad_NH, ctx.splits, ctx.group), None, None, None
