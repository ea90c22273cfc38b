"""`DeepSeekMoE`: shared experts plus fine-grained routed experts (DeepSeekMoE, arXiv 2401.06066).

    h'_t = u_t + sum_{i<=N_s} FFN^(s)_i(u_t) + sum_{i<=N_r} g_{i,t} FFN^(r)_i(u_t)   (V3 Eq. 12)

The layer returns the FFN part (without the residual u_t, which the transformer block adds).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .balance import (
    AddAuxiliaryLoss,
    apply_bias_update,
    batch_aux_loss,
    device_aux_loss,
    expert_aux_loss,
    sequence_aux_loss,
    unbiased_topk,
)
from .config import MoEConfig
from .dispatch import DISPATCH, apply_capacity, expert_capacity
from .experts import Expert, RoutedExperts
from .router import Router, Routing


@dataclass
class RoutingStats:
    """What the last forward did, detached, for notebooks and monitoring.

    indices [T, K] (-1 = dropped by capacity), weights [T, K], scores [T, E],
    load [E] tokens routed to each expert (before capacity), n_dropped pairs dropped.
    """

    indices: torch.Tensor
    weights: torch.Tensor
    scores: torch.Tensor
    load: torch.Tensor
    n_dropped: int


class DeepSeekMoE(nn.Module):
    """The DeepSeek MoE layer: `gate` (Router), `experts` (RoutedExperts), `shared_experts`.

    forward(x [..., H]) -> [..., H]. A 3-D input [B, S, H] is B sequences (used by the
    sequence-wise auxiliary loss); any other shape is flattened to tokens.
    After each call `last_routing` holds `RoutingStats`; in training mode `aux_loss` holds the
    auxiliary loss (0 when `cfg.aux_loss == "none"`).
    """

    def __init__(self, cfg: MoEConfig):
        super().__init__()
        self.cfg = cfg
        self.gate = Router(cfg)
        self.experts = RoutedExperts(cfg.n_routed, cfg.d_model, cfg.d_expert)
        self.shared_experts = Expert(cfg.d_model, cfg.n_shared * cfg.d_expert) if cfg.n_shared else None
        self.last_routing: RoutingStats | None = None
        self.aux_loss: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        x_TH = x.reshape(-1, self.cfg.d_model)
        routing = self.gate(x_TH)
        indices_TK = routing.indices
        if self.cfg.capacity_factor is not None:
            capacity = expert_capacity(x_TH.shape[0], self.cfg.top_k, self.cfg.n_routed,
                                       self.cfg.capacity_factor)
            indices_TK = apply_capacity(indices_TK, self.cfg.n_routed, capacity)
        # routed experts plus the shared expert: y + shared(x)
        y_TH = DISPATCH[self.cfg.dispatch](x_TH, indices_TK, routing.weights.to(x.dtype),
                                           self.experts, self.shared_experts)
        if x_TH.shape[0] == 0:  # no tokens: adding the empty input keeps the output in the graph
            y_TH = y_TH + x_TH
        self._record(routing, indices_TK)
        if self.training:
            y_TH = self._balance(routing, x.shape, y_TH)
        return y_TH.view(x.shape)

    def _check_input(self, x: torch.Tensor) -> None:
        if not torch.is_floating_point(x):
            raise TypeError(f"DeepSeekMoE expects a floating-point input, got dtype {x.dtype}")
        if x.dim() == 0 or x.shape[-1] != self.cfg.d_model:
            raise ValueError(f"DeepSeekMoE expects inputs of shape [..., d_model={self.cfg.d_model}],"
                             f" got {tuple(x.shape)}")

    @torch.no_grad()
    def _record(self, routing: Routing, indices_TK: torch.Tensor) -> None:
        load_E = torch.bincount(routing.indices.reshape(-1), minlength=self.cfg.n_routed)
        # only a capacity drops pairs (-1): without one, no count (and no host sync on a GPU)
        n_dropped = 0 if self.cfg.capacity_factor is None else int((indices_TK < 0).sum())
        self.last_routing = RoutingStats(indices_TK, routing.weights.detach(),
                                         routing.scores.detach(), load_E, n_dropped)

    def _balance(self, routing: Routing, shape: torch.Size, y_TH: torch.Tensor) -> torch.Tensor:
        """Training-time balancing: accumulate loads (loss-free) and the auxiliary loss."""
        cfg = self.cfg
        if cfg.bias_update != "none":
            self.gate.accumulate_load(routing.indices)
        if cfg.bias_update == "forward":
            apply_bias_update(self.gate)
        if cfg.aux_loss == "none" or routing.scores.shape[0] == 0:  # no loss on an empty batch
            self.aux_loss = y_TH.new_zeros((), dtype=torch.float32)
            return y_TH
        # f_i counts the top-K of the unbiased scores over all experts (V3 Eq. 18), not the routing
        chosen_TK = unbiased_topk(routing.scores, cfg.top_k)
        if cfg.aux_loss == "expert":
            loss = expert_aux_loss(routing.scores, chosen_TK, cfg.aux_loss_alpha)
        elif cfg.aux_loss == "batch":
            loss = batch_aux_loss(routing.scores, chosen_TK, cfg.aux_loss_alpha)
        elif cfg.aux_loss == "device":
            loss = device_aux_loss(routing.scores, chosen_TK, cfg.aux_loss_devices, cfg.aux_loss_alpha)
        else:
            n_seq, seq_len = (shape[0], shape[1]) if len(shape) == 3 else (1, routing.scores.shape[0])
            loss = sequence_aux_loss(routing.scores.view(n_seq, seq_len, cfg.n_routed),
                                     chosen_TK.view(n_seq, seq_len, cfg.top_k), cfg.aux_loss_alpha)
        self.aux_loss = loss
        return AddAuxiliaryLoss.apply(y_TH, loss) if cfg.aux_loss_inject else y_TH
