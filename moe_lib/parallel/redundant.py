"""Redundant experts for inference (DeepSeek-V3 Sec. 3.4): copy hot experts onto idle ranks.

Under expert parallelism a rank's work is the sum of its experts' loads, so one popular expert
makes its rank the straggler of every all-to-all. V3's inference deployment measures the expert
loads, gives every GPU one or more extra expert slots, and fills them with copies of high-load
experts so that the GPUs' loads even out; the tokens of a copied expert are split between its copies.
The layer's output does not change: every copy holds the same weights.

A `Placement` says which logical expert each physical slot holds and which share of that expert's
tokens it serves. `plan_redundant` fills the extra slots by local search: it repeatedly takes the
busiest rank and moves part of its largest expert's load to the least-loaded rank that holds, or
can take, a copy of it, moving at most half of the gap between the two ranks. Every move lowers the
sum of squared rank loads, so the search ends; it is a heuristic (the exact problem is a bin
packing), and the tests check it against the lower bound max(mean rank load, ...) it can reach.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch


@dataclass(frozen=True)
class Placement:
    """Expert slots of W ranks: expert_RS [W, S] logical expert per slot (-1: empty), share_RS
    [W, S] the fraction of that expert's tokens the slot serves (each expert's shares sum to 1).
    Physical slot id of (rank r, slot s) = r * S + s; slots [0, E/W) of rank r hold its own block."""

    expert_RS: torch.Tensor
    share_RS: torch.Tensor

    @staticmethod
    def contiguous(n_experts: int, n_ranks: int) -> Placement:
        """No redundancy: rank r holds experts [r E/W, (r+1) E/W), each with all of its tokens."""
        expert_RS = torch.arange(n_experts).view(n_ranks, -1)
        return Placement(expert_RS, torch.ones(expert_RS.shape, dtype=torch.float64))

    @property
    def n_ranks(self) -> int:
        return self.expert_RS.shape[0]

    @property
    def slots_per_rank(self) -> int:
        return self.expert_RS.shape[1]

    @property
    def n_experts(self) -> int:
        return int(self.expert_RS.max()) + 1

    @property
    def n_copies(self) -> int:
        """Slots holding a copy beyond the first of their expert."""
        return int((self.expert_RS >= 0).sum()) - self.n_experts

    def rank_load(self, load_E: torch.Tensor) -> torch.Tensor:
        """Expected load [W] of each rank: sum over its slots of share x expert load."""
        held_RS = self.expert_RS.clamp(min=0)
        return (self.share_RS * load_E.double()[held_RS] * (self.expert_RS >= 0)).sum(dim=1)

    def assign(self, indices_TK: torch.Tensor) -> torch.Tensor:
        """Physical slots [T, K] for routed experts [T, K] (-1 stays -1).

        The pairs of an expert, in token order, go to its copies in proportion to their shares:
        the pair at position p of the expert's n pairs goes to the copy whose cumulative share
        interval holds (p + 1/2) / n.
        """
        slot_EC, cum_share_EC = (t.to(indices_TK.device) for t in self.copy_table)
        flat_N = indices_TK.reshape(-1)
        expert_N = flat_N.clamp(min=0)
        if slot_EC.shape[1] == 1:
            return torch.where(flat_N >= 0, slot_EC[expert_N, 0], -1).view(indices_TK.shape)
        order_N = torch.argsort(torch.where(flat_N >= 0, flat_N, slot_EC.shape[0]), stable=True)
        sorted_N = flat_N[order_N]
        counts_E = torch.bincount(sorted_N[sorted_N >= 0], minlength=slot_EC.shape[0])
        starts_E = torch.cumsum(counts_E, 0) - counts_E
        valid = sorted_N >= 0
        expert_s = sorted_N.clamp(min=0)
        position_N = torch.arange(len(sorted_N), device=flat_N.device) - starts_E[expert_s]
        u_N1 = ((position_N + 0.5) / counts_E[expert_s].clamp(min=1)).double().unsqueeze(1)
        copy_N = torch.searchsorted(cum_share_EC[expert_s], u_N1).squeeze(1)
        copy_N = torch.minimum(copy_N, (slot_EC[expert_s] >= 0).sum(dim=1) - 1)
        slot_N = torch.where(valid, slot_EC[expert_s, copy_N], -1)
        return torch.empty_like(flat_N).scatter_(0, order_N, slot_N).view(indices_TK.shape)

    @cached_property
    def copy_table(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Per expert: its physical slots [E, C] (-1 padded) and cumulative shares [E, C]."""
        n_experts = self.n_experts
        held_N = self.expert_RS.reshape(-1)
        copies_E = torch.bincount(held_N[held_N >= 0], minlength=n_experts)
        slot_EC = torch.full((n_experts, int(copies_E.max())), -1, dtype=torch.long)
        cum_EC = torch.full(slot_EC.shape, 2.0, dtype=torch.float64)
        filled_E = [0] * n_experts
        total_E = [0.0] * n_experts
        for slot, expert in enumerate(held_N.tolist()):
            if expert < 0:
                continue
            c = filled_E[expert]
            total_E[expert] += float(self.share_RS.reshape(-1)[slot])
            slot_EC[expert, c], cum_EC[expert, c] = slot, total_E[expert]
            filled_E[expert] += 1
        return slot_EC, cum_EC


def plan_redundant(load_E: torch.Tensor, n_ranks: int, extra_slots: int,
                   ranks_per_node: int | None = None, max_moves: int | None = None) -> Placement:
    """Fill `extra_slots` slots per rank with copies of hot experts to even out the rank loads.

    load_E: measured tokens per expert (the same on every rank). With `ranks_per_node`, a copy
    stays on its expert's node, as in V3 (no extra inter-node traffic).
    """
    n_experts = load_E.numel()
    if n_experts % n_ranks:
        raise ValueError(f"plan_redundant: {n_experts} experts do not split evenly over {n_ranks} ranks")
    base = Placement.contiguous(n_experts, n_ranks)
    per_rank = n_experts // n_ranks
    expert_RS = torch.cat([base.expert_RS, torch.full((n_ranks, extra_slots), -1)], dim=1)
    share_RS = torch.cat([base.share_RS, torch.zeros(n_ranks, extra_slots, dtype=torch.float64)], dim=1)
    load_E = load_E.double()
    rank_R = base.rank_load(load_E)
    node = ranks_per_node or n_ranks
    tolerance = 1e-9 * float(load_E.sum().clamp(min=1))
    for _ in range(max_moves or 50 * n_ranks * (extra_slots + 1)):
        busiest = int(rank_R.argmax())
        if not _move_one(busiest, expert_RS, share_RS, rank_R, load_E, per_rank, node, tolerance):
            break
    return Placement(expert_RS, share_RS)


def _move_one(busiest: int, expert_RS, share_RS, rank_R, load_E, per_rank: int, node: int,
              tolerance: float) -> bool:
    """Move load of the busiest rank's largest expert to the best other rank; False if none helps."""
    held_S = expert_RS[busiest]
    part_S = torch.where(held_S >= 0, share_RS[busiest] * load_E[held_S.clamp(min=0)], 0.0)
    for slot in torch.argsort(part_S, descending=True).tolist():
        if part_S[slot] <= tolerance:
            return False
        expert = int(held_S[slot])
        home = expert // per_rank // node * node
        best, best_slot = None, None
        for rank in range(home, home + node):
            if rank == busiest:
                continue
            hosted = (expert_RS[rank] == expert).nonzero()
            free = (expert_RS[rank] < 0).nonzero()
            target = hosted[0, 0] if len(hosted) else (free[0, 0] if len(free) else None)
            if target is not None and (best is None or rank_R[rank] < rank_R[best]):
                best, best_slot = rank, int(target)
        if best is None:
            continue
        moved = min(float(part_S[slot]), float(rank_R[busiest] - rank_R[best]) / 2)
        if moved <= tolerance:
            continue
        expert_RS[best, best_slot] = expert
        share_RS[busiest, slot] -= moved / float(load_E[expert])
        share_RS[best, best_slot] += moved / float(load_E[expert])
        rank_R[busiest] -= moved
        rank_R[best] += moved
        return True
    return False
