"""`ExpertParallel`: a `DeepSeekMoE` whose routed experts are sharded over a process group.

DeepSeek-V3 trains with 64-way expert parallelism (EP) over 8 nodes of 8 GPUs: each GPU holds 4 of
the 256 routed experts, while the router and the shared expert are replicated on every GPU (data
parallel). Every forward moves each token to the GPUs of its experts and the results back
(`moe_lib.parallel.dispatch`).

`ExpertParallel(moe)` keeps the wrapped layer's gate and shared experts and replaces its routed
experts by this rank's contiguous block. Its forward is a collective: every rank of the group calls
it, each with its own tokens (any number, including none), and gets exactly what the unsharded layer
returns for those tokens. In training every rank must then run backward, and `all_reduce_grads()`
sums the replicated gradients as data parallelism does; the experts' gradients already hold the
contributions of every rank's tokens. Gradients are those of the sum of the ranks' losses (to
average over ranks, divide each rank's loss by the world size).
"""

from __future__ import annotations

import hashlib
import time

import torch
import torch.distributed as dist
from torch import nn

from ..config import MoEConfig
from ..dispatch import DISPATCH, apply_capacity, expert_capacity
from ..experts import RoutedExperts
from ..moe import DeepSeekMoE
from . import fp8
from .dispatch import Combine, Dispatch, Splits, all_to_all, exchange_counts, plan_dispatch
from .redundant import Placement, plan_redundant
from .stats import EPStats, gather_stats


class ExpertParallel(nn.Module):
    """Expert-parallel `DeepSeekMoE`.

    Args:
        moe: the layer, built with the same config and weights on every rank (checked).
        group: the process group of the expert-parallel ranks (None: the default group).
        ranks_per_node: consecutive ranks that share a node (None: all of them), for the
            node-limited routing check and the intra/inter-node statistics.
        fp8_dispatch: send the tokens as e4m3 with per-128-channel power-of-two scales (V3).
        combine_dtype: wire precision of the combine (V3: torch.bfloat16; None: the input dtype).
        stats: gather an `EPStats` after every forward into `last_stats` (one extra all_gather).

    After each forward, `phase_times` holds this rank's seconds in route, dispatch, experts, shared
    and combine (wall-clock; the backward is not split).
    """

    def __init__(self, moe: DeepSeekMoE, group: dist.ProcessGroup | None = None,
                 ranks_per_node: int | None = None, fp8_dispatch: bool = False,
                 combine_dtype: torch.dtype | None = None, stats: bool = True):
        super().__init__()
        if not dist.is_initialized():
            raise RuntimeError("ExpertParallel needs an initialised torch.distributed process group: "
                               "launch with torchrun, or use moe_lib.parallel.LocalRanks")
        self.group = group
        self.rank, self.world = dist.get_rank(group), dist.get_world_size(group)
        self.ranks_per_node = ranks_per_node or self.world
        check_replicas(moe, group)
        check_layout(moe.cfg, self.world, self.ranks_per_node)
        self.moe = moe
        self.placement = Placement.contiguous(moe.cfg.n_routed, self.world)
        moe.experts = shard_experts(moe.experts, self.rank, self.world)
        self.fp8_dispatch, self.combine_dtype, self.collect_stats = fp8_dispatch, combine_dtype, stats
        self.last_stats: EPStats | None = None
        self.phase_times: dict[str, float] = {}

    @property
    def cfg(self) -> MoEConfig:
        return self.moe.cfg

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and self.placement.n_copies:
            raise RuntimeError("redundant experts are an inference feature (DeepSeek-V3 Sec. 3.4): "
                               "call .eval(), or clear_redundant() before training")
        moe, cfg = self.moe, self.moe.cfg
        start = time.perf_counter()
        moe._check_input(x)
        x_TH = x.reshape(-1, cfg.d_model)
        routing = moe.gate(x_TH)
        indices_TK = routing.indices
        if cfg.capacity_factor is not None:
            capacity = expert_capacity(x_TH.shape[0], cfg.top_k, cfg.n_routed, cfg.capacity_factor)
            indices_TK = apply_capacity(indices_TK, cfg.n_routed, capacity)
        slots_TK = self.placement.assign(indices_TK)
        plan = plan_dispatch(slots_TK, self.placement.slots_per_rank, self.world)
        times = {"route": time.perf_counter() - start}
        y_TH, splits = self._routed(x_TH, routing.weights.to(x.dtype), plan, times)
        start = time.perf_counter()
        if moe.shared_experts is not None:
            y_TH = y_TH + moe.shared_experts(x_TH)
        times["shared"] = time.perf_counter() - start
        moe._record(routing, indices_TK)
        if self.training:
            y_TH = moe._balance(routing, x.shape, y_TH)
        self.phase_times = times
        if self.collect_stats:
            self.last_stats = self._stats(plan, splits, slots_TK, x.dtype, times)
        return y_TH.view(x.shape)

    def _routed(self, x_TH: torch.Tensor, weights_TK: torch.Tensor, plan, times: dict):
        """Counts, dispatch, local experts, combine: the routed part of the output, [T, H]."""
        start = time.perf_counter()
        try:
            splits, recv_RS = exchange_counts(plan, self.group)
        except RuntimeError as err:
            raise RuntimeError(f"ExpertParallel (rank {self.rank} of {self.world}): the all-to-all of the "
                               "token counts failed; every rank of the group must call forward (and "
                               f"backward) once per step, even with no tokens. {err}") from err
        local_MK = all_to_all(plan.local_NK, splits, self.group)
        received_S = torch.bincount(local_MK[local_MK >= 0], minlength=recv_RS.shape[1])
        if not torch.equal(received_S, recv_RS.sum(dim=0)):  # the announced per-expert loads
            raise RuntimeError(f"ExpertParallel (rank {self.rank}): the expert ids received do not match "
                               "the announced per-expert counts")
        weights_NK = weights_TK.index_select(0, plan.token_N).masked_fill(plan.local_NK < 0, 0.0)
        x_MH, weights_MK = Dispatch.apply(x_TH.index_select(0, plan.token_N), weights_NK, splits,
                                          self.group, self.fp8_dispatch)
        times["dispatch"], start = time.perf_counter() - start, time.perf_counter()
        y_MH = DISPATCH[self.cfg.dispatch](x_MH, local_MK, weights_MK, self.moe.experts)
        if x_MH.requires_grad and not y_MH.requires_grad:
            # no local expert got a token: keep the combine in the graph anyway, so that this rank
            # also runs its backward all-to-all (the other ranks would wait for it forever)
            y_MH = y_MH + 0 * x_MH[:, :1]
        times["experts"], start = time.perf_counter() - start, time.perf_counter()
        y_NH = Combine.apply(y_MH, splits, self.group, self.combine_dtype)
        y_TH = torch.zeros_like(x_TH).index_add(0, plan.token_N, y_NH)
        times["combine"] = time.perf_counter() - start
        return y_TH, splits

    def _stats(self, plan, splits: Splits, slots_TK: torch.Tensor, dtype: torch.dtype,
               times: dict) -> EPStats:
        cfg, itemsize = self.cfg, torch.empty((), dtype=dtype).element_size()
        token_bytes = fp8.payload_bytes(cfg.d_model) if self.fp8_dispatch else cfg.d_model * itemsize
        dispatch_row = token_bytes + cfg.top_k * (8 + itemsize)  # + int64 ids and the weights
        combine_dtype = self.combine_dtype or dtype
        combine_row = cfg.d_model * torch.empty((), dtype=combine_dtype).element_size()
        recv_R = torch.tensor(splits.recv, device=plan.send_R.device)
        row = {"tokens": plan.send_R, "pairs": plan.pairs_RS.sum(dim=1),
               "dispatch_bytes": plan.send_R * dispatch_row, "combine_bytes": recv_R * combine_row}
        n_nodes = self.world // self.ranks_per_node
        node_TK = torch.where(slots_TK >= 0, slots_TK // self.placement.slots_per_rank
                              // self.ranks_per_node, -1)
        nodes_T = torch.nn.functional.one_hot(node_TK + 1, n_nodes + 1)[..., 1:].any(dim=1).sum(dim=1)
        return gather_stats(row, nodes_T, self.ranks_per_node, times, self.group)

    def replicated_parameters(self) -> list[nn.Parameter]:
        """The parameters every rank holds in full: the gate and the shared experts."""
        return [p for name, p in self.moe.named_parameters() if not name.startswith("experts.")]

    @torch.no_grad()
    def all_reduce_grads(self) -> None:
        """Sum the replicated parameters' gradients over the group (one all-reduce), as DP does."""
        params = self.replicated_parameters()
        flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1)
                          for p in params])
        dist.all_reduce(flat, group=self.group)
        for p, g in zip(params, flat.split([p.numel() for p in params]), strict=True):
            p.grad = g.view_as(p).clone()

    @torch.no_grad()
    def place_redundant(self, load_E: torch.Tensor, extra_slots: int = 1,
                        within_node: bool = True) -> Placement:
        """Give each rank `extra_slots` copies of hot experts, planned from the loads `load_E`.

        Rank 0's loads are broadcast so that every rank builds the same plan; the copies' weights
        come from their owners by one all-to-all. With `within_node`, copies stay on their
        expert's node (V3: no extra inter-node traffic). Returns the placement now in use.
        """
        load_E = load_E.detach().double().to(self.moe.gate.weight.device).clone()
        dist.broadcast(load_E, src=dist.get_global_rank(self.group or dist.group.WORLD, 0), group=self.group)
        placement = plan_redundant(load_E.cpu(), self.world, extra_slots,
                                   self.ranks_per_node if within_node else None)
        self.clear_redundant()
        self.moe.experts = self._with_copies(placement)
        self.placement = placement
        return placement

    def clear_redundant(self) -> None:
        """Back to one copy per expert (the contiguous placement)."""
        per_rank = self.cfg.n_routed // self.world
        if self.placement.slots_per_rank != per_rank:
            self.moe.experts = _slots(self.moe.experts, list(range(per_rank)))
            self.placement = Placement.contiguous(self.cfg.n_routed, self.world)

    def _with_copies(self, placement: Placement) -> RoutedExperts:
        """This rank's experts plus the copies `placement` puts here, fetched from their owners."""
        own = self.moe.experts
        per_rank = own.n_experts
        extra_RS = placement.expert_RS[:, per_rank:]
        sent = [[e % per_rank for e in extra_RS[h].tolist() if e >= 0 and e // per_rank == self.rank]
                for h in range(self.world)]
        mine = extra_RS[self.rank].tolist()
        slots = [[per_rank + j for j, e in enumerate(mine) if e >= 0 and e // per_rank == o]
                 for o in range(self.world)]
        splits = Splits([len(s) for s in sent], [len(s) for s in slots])
        index = torch.tensor(sum(sent, []), dtype=torch.long, device=own.gate_up_proj.device)
        experts = _slots(own, list(range(per_rank)) + [0] * extra_RS.shape[1])
        targets = torch.tensor(sum(slots, []), dtype=torch.long, device=index.device)
        for name in ("gate_up_proj", "down_proj"):
            received = all_to_all(getattr(own, name).index_select(0, index), splits, self.group)
            getattr(experts, name).index_copy_(0, targets, received)
        return experts

    def extra_repr(self) -> str:
        return (f"rank={self.rank}, world={self.world}, ranks_per_node={self.ranks_per_node}, "
                f"slots_per_rank={self.placement.slots_per_rank}, fp8_dispatch={self.fp8_dispatch}")


def shard_experts(experts: RoutedExperts, rank: int, n_ranks: int) -> RoutedExperts:
    """Rank `rank`'s contiguous block of E / W experts, as a new `RoutedExperts`."""
    per_rank = experts.n_experts // n_ranks
    return _slots(experts, list(range(rank * per_rank, (rank + 1) * per_rank)))


@torch.no_grad()
def _slots(experts: RoutedExperts, which: list[int]) -> RoutedExperts:
    """A `RoutedExperts` holding copies of the experts `which` of `experts`, in that order."""
    out = RoutedExperts(len(which), experts.d_model, experts.d_expert).to(experts.gate_up_proj)
    index = torch.tensor(which, dtype=torch.long, device=experts.gate_up_proj.device)
    out.gate_up_proj.copy_(experts.gate_up_proj.index_select(0, index))
    out.down_proj.copy_(experts.down_proj.index_select(0, index))
    return out


def fingerprint(moe: DeepSeekMoE) -> tuple[int, int]:
    """64-bit hashes of the layer's config and of its weights and bias (not its load counters)."""
    config = hashlib.sha256(repr(sorted(moe.cfg.to_dict().items())).encode())
    weights = hashlib.sha256()
    for name, tensor in moe.state_dict().items():
        if not name.endswith("tokens_per_expert"):
            weights.update(name.encode())
            weights.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    return tuple(int.from_bytes(h.digest()[:8], "little", signed=True) for h in (config, weights))


def check_replicas(moe: DeepSeekMoE, group: dist.ProcessGroup | None) -> None:
    """All-gather the fingerprints; raise the same error on every rank if any rank differs."""
    mine = torch.tensor(fingerprint(moe), dtype=torch.long, device=moe.gate.weight.device)
    every = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
    dist.all_gather(every, mine, group=group)
    table = torch.stack(every).cpu()
    for column, what, fix in ((0, "config", "build the same MoEConfig on every rank"),
                              (1, "weights", "seed every rank alike before building the layer, or "
                                             "load one checkpoint / broadcast rank 0's state_dict")):
        differ = (table[:, column] != table[0, column]).nonzero().flatten().tolist()
        if differ:
            raise ValueError(f"ExpertParallel: the layer's {what} differ(s) across ranks: rank(s) "
                             f"{differ} of the group differ from rank 0; {fix}")


def check_layout(cfg: MoEConfig, world: int, ranks_per_node: int) -> None:
    """Raise (identically on every rank) for set-ups that cannot be sharded as asked."""
    if cfg.n_routed % world:
        raise ValueError(f"ExpertParallel: n_routed={cfg.n_routed} experts cannot be split evenly over "
                         f"{world} ranks: use a world size that divides {cfg.n_routed}")
    if world % ranks_per_node:
        raise ValueError(f"ExpertParallel: ranks_per_node={ranks_per_node} does not divide the "
                         f"world size {world}")
    units = {"node": world // ranks_per_node, "device": world}.get(cfg.route_limit)
    if units is not None and cfg.limit_units != units:
        raise ValueError(f"ExpertParallel: route_limit={cfg.route_limit!r} with limit_units="
                         f"{cfg.limit_units}, but the group has {units} {cfg.route_limit}s "
                         f"({world} ranks, {ranks_per_node} per node)")
    if cfg.bias_update == "forward":
        raise ValueError("ExpertParallel: bias_update='forward' updates each rank's bias from its own "
                         "tokens; use 'step' and call moe_lib.update_bias(model, group) once per step, "
                         "which all-reduces the loads first")
