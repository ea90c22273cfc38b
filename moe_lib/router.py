"""The router (gate): which K experts each token visits, and with what weight.

DeepSeek-V3 (arXiv 2412.19437, Sec. 2.1.2, Eqs. 12-16 and 16 for the bias):

    s_{i,t} = sigmoid(u_t^T e_i)                                  (Eq. 15)
    g'_{i,t} = s_{i,t} if s_{i,t} + b_i in TopK({s_{j,t} + b_j}, K) else 0    (Eq. 16)
    g_{i,t} = g'_{i,t} / sum_j g'_{j,t}                            (Eq. 14)

The bias b only changes WHICH experts are selected; the weights come from the unbiased scores.
DeepSeekMoE and DeepSeek-V2 use softmax scores instead and V2 does not renormalise.

The math lives in pure functions so that expert parallelism and node-limited routing can reuse
it; `Router` only holds the gate weight, the correction bias and the accumulated expert loads.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from . import native
from .config import MoEConfig
from .kernels import linear


class Routing(NamedTuple):
    """The routing decision for T tokens.

    indices: [T, K] int64 expert ids (-1 marks a pair dropped by capacity).
    weights: [T, K] float32 (float64 for float64 inputs) combine weights, normalised and scaled.
    scores:  [T, E] unbiased affinity scores s, same dtype (keeps the graph, for auxiliary losses).
    """

    indices: torch.Tensor
    weights: torch.Tensor
    scores: torch.Tensor


def router_scores(logits_TE: torch.Tensor, score_func: str) -> torch.Tensor:
    """Affinity scores s from router logits: sigmoid (V3) or softmax over experts (V2)."""
    if score_func == "sigmoid":
        return logits_TE.sigmoid()
    if score_func == "softmax":
        return logits_TE.softmax(dim=-1)
    raise ValueError(f"score_func={score_func!r} is invalid: expected 'softmax' or 'sigmoid'.")


def group_scores(choice_TE: torch.Tensor, n_groups: int, group_score: str,
                 per_group: int = 2) -> torch.Tensor:
    """Score of each expert group, [T, G]: the sum of its top 2 (V3), its maximum (V2), or the sum
    of its top `per_group` ("topk_sum": V3's node-limited routing scores a node by the sum of its
    K/M highest affinities; with K = 8, M = 4 nodes that is the top-2 sum)."""
    grouped_TGe = choice_TE.view(choice_TE.shape[0], n_groups, choice_TE.shape[1] // n_groups)
    if group_score in ("top2_sum", "topk_sum"):
        k = 2 if group_score == "top2_sum" else per_group
        return grouped_TGe.topk(k, dim=-1).values.sum(dim=-1)
    if group_score == "max":
        return grouped_TGe.amax(dim=-1)
    raise ValueError(f"group_score={group_score!r} is invalid: expected 'top2_sum', 'topk_sum' or 'max'.")


def kept_groups(choice_TE: torch.Tensor, n_groups: int, topk_groups: int,
                group_score: str = "top2_sum", per_group: int = 2) -> torch.Tensor:
    """[T, G] bool: the `topk_groups` best-scoring expert groups of each token (V2/V3 group limit)."""
    keep_TG = group_scores(choice_TE, n_groups, group_score, per_group).topk(topk_groups, dim=-1).indices
    return torch.zeros(choice_TE.shape[0], n_groups, dtype=torch.bool,
                       device=choice_TE.device).scatter_(1, keep_TG, True)


def select_experts(scores_TE: torch.Tensor, bias_E: torch.Tensor | None, top_k: int,
                   n_groups: int = 1, topk_groups: int = 1,
                   group_score: str = "top2_sum") -> torch.Tensor:
    """Indices [T, K] of the chosen experts: top-k of s + b inside the best `topk_groups` groups.

    The groups are contiguous blocks of experts: expert groups, or the nodes (V3's node-limited
    routing, "topk_sum" scores with K/M = top_k // topk_groups per group) or devices (V2's
    device-limited routing, "max" scores) that expert parallelism places them on.
    Experts outside the kept groups are masked with -inf, not 0: s + b can be negative.
    """
    choice_TE = scores_TE if bias_E is None else scores_TE + bias_E
    if topk_groups < n_groups:
        keep_TG = kept_groups(choice_TE, n_groups, topk_groups, group_score, max(top_k // topk_groups, 1))
        keep_TE = keep_TG.repeat_interleave(choice_TE.shape[1] // n_groups, dim=1)
        choice_TE = choice_TE.masked_fill(~keep_TE, float("-inf"))
    ops = native.ops_for(choice_TE)
    if ops is not None and not choice_TE.requires_grad:  # one pass per token on the CPU, same order
        return ops.topk_indices(choice_TE, top_k)
    return choice_TE.topk(top_k, dim=-1).indices


def combine_weights(scores_TE: torch.Tensor, indices_TK: torch.Tensor, norm_topk_prob: bool,
                    route_scale: float) -> torch.Tensor:
    """Weights [T, K] gathered from the UNBIASED scores, optionally renormalised, then scaled."""
    weights_TK = scores_TE.gather(1, indices_TK)
    if norm_topk_prob:
        weights_TK = weights_TK / (weights_TK.sum(dim=-1, keepdim=True) + 1e-20)
    return weights_TK * route_scale


def route(logits_TE: torch.Tensor, bias_E: torch.Tensor | None, cfg: MoEConfig) -> Routing:
    """The full routing of `cfg` from router logits; computed in float32 (float64 stays float64)."""
    # sigmoid would hide an inf input behind scores of 0 or 1; a sum is NaN or inf if any term is
    if not torch.isfinite(logits_TE.detach().sum()) and not torch.isfinite(logits_TE).all():
        raise FloatingPointError("router logits contain NaN or inf: check the input and the gate "
                                 "weight for NaN/inf values or overflow")
    scores_TE = router_scores(logits_TE.to(torch.promote_types(logits_TE.dtype, torch.float32)),
                              cfg.score_func)
    with torch.no_grad():
        indices_TK = select_experts(scores_TE, bias_E, cfg.top_k, *cfg.selection_groups)
    weights_TK = combine_weights(scores_TE, indices_TK, cfg.norm_topk_prob, cfg.route_scale)
    return Routing(indices_TK, weights_TK, scores_TE)


class Router(nn.Module):
    """The gate: weight [E, H] (the expert centroids e_i), correction bias b [E] and loads.

    Buffers (fp32, saved in `state_dict`, never seen by the optimizer or autograd):
        correction_bias: b, updated by `moe_lib.balance.update_bias`.
        tokens_per_expert: tokens routed to each expert since the last bias update (c_i).
    """

    def __init__(self, cfg: MoEConfig):
        super().__init__()
        self.cfg = cfg
        self.weight = nn.Parameter(torch.empty(cfg.n_routed, cfg.d_model))
        self.register_buffer("correction_bias", torch.zeros(cfg.n_routed, dtype=torch.float32))
        self.register_buffer("tokens_per_expert", torch.zeros(cfg.n_routed, dtype=torch.float32))
        nn.init.kaiming_uniform_(self.weight, a=5**0.5)

    def forward(self, x_TH: torch.Tensor) -> Routing:
        dtype = torch.promote_types(x_TH.dtype, torch.float32)  # fp32 at least, as in HF / V3
        logits_TE = linear(x_TH.to(dtype), self.weight.to(dtype))
        return route(logits_TE, self.correction_bias, self.cfg)

    def _apply(self, fn, recurse=True):
        """`.to()`, `.half()`, `.double()` move the buffers but keep them float32 (exact load counts)."""
        super()._apply(fn, recurse)
        self.correction_bias = self.correction_bias.float()
        self.tokens_per_expert = self.tokens_per_expert.float()
        return self

    @torch.no_grad()
    def accumulate_load(self, indices_TK: torch.Tensor) -> None:
        """Add this micro-batch's routed-token counts to `tokens_per_expert` (-1, a dropped pair,
        counts nothing). One scatter-add with fixed shapes: no host synchronisation on a GPU."""
        flat_N = indices_TK.reshape(-1)
        self.tokens_per_expert.index_add_(0, flat_N.clamp(min=0), (flat_N >= 0).float())

    def extra_repr(self) -> str:
        return f"n_routed={self.cfg.n_routed}, d_model={self.cfg.d_model}, top_k={self.cfg.top_k}"
