"""A float32 oracle for a bf16 MoE layer of any size: output, input gradient, a few weight gradients.

Upcasting DeepSeek-V3's experts to float32 at once would take 45 GB; this computes the layer in
float32 one expert at a time, so it never holds more than one expert in float32. The loss is the
fixed projection L = sum(y * P) used by the benchmarks. The routing comes from the library's pure
router functions; the experts are plain `F.linear` products, independent of `moe_lib.kernels`:

    y = sum_k w_{t,k} SwiGLU_{e_{t,k}}(x_t) + Shared(x_t)
    dL/dx = sum over pairs of the expert's input gradient + Shared's + the router's (through w)
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from ..router import combine_weights, router_scores, select_experts


class Reference(NamedTuple):
    """Float32 results: y [T, H], dx [T, H] (None without a projection), and for each requested
    routed expert e its (d gate_up_proj[e], d down_proj[e]), zero for an expert no token visits."""

    y: torch.Tensor
    dx: torch.Tensor | None
    expert_grads: dict[int, tuple[torch.Tensor, torch.Tensor]]


def float32_reference(layer, x_TH: torch.Tensor, proj_TH: torch.Tensor | None = None,
                      experts: tuple[int, ...] = ()) -> Reference:
    """The layer's output in float32 and, given proj_TH, dL/dx and the weight gradients of `experts`."""
    cfg, routed = layer.cfg, layer.experts
    x = x_TH.detach().float().requires_grad_(proj_TH is not None)
    proj = None if proj_TH is None else proj_TH.float()
    scores_TE = router_scores(F.linear(x, layer.gate.weight.float()), cfg.score_func)
    indices_TK = select_experts(scores_TE.detach(), layer.gate.correction_bias, cfg.top_k,
                                *cfg.selection_groups)
    weights_TK = combine_weights(scores_TE, indices_TK, cfg.norm_topk_prob, cfg.route_scale)
    y = torch.zeros_like(x, requires_grad=False)
    dx = torch.zeros_like(y)
    grad_weights_TK = torch.zeros_like(weights_TK)
    grads = {e: (torch.zeros_like(routed.gate_up_proj[e], dtype=torch.float32),
                 torch.zeros_like(routed.down_proj[e], dtype=torch.float32)) for e in experts}
    for e in indices_TK.unique().tolist():
        token_N, slot_N = torch.where(indices_TK == e)
        params = [routed.gate_up_proj[e].detach().float(), routed.down_proj[e].detach().float()]
        want = proj is not None and e in grads
        x_NH = x.detach()[token_N].requires_grad_(proj is not None)
        w_N = weights_TK.detach()[token_N, slot_N].requires_grad_(proj is not None)
        for p in params:
            p.requires_grad_(want)
        out_NH = _swiglu(x_NH, params[0].chunk(2), params[1]) * w_N.unsqueeze(-1)
        y.index_add_(0, token_N, out_NH.detach())
        if proj is not None:
            g = torch.autograd.grad((out_NH * proj[token_N]).sum(), [x_NH, w_N] + (params if want else []))
            dx.index_add_(0, token_N, g[0])
            grad_weights_TK[token_N, slot_N] = g[1]
            if want:
                grads[e] = (g[2], g[3])
    if layer.shared_experts is not None:
        shared = layer.shared_experts
        out_TH = _swiglu(x, (shared.gate_proj.weight.float(), shared.up_proj.weight.float()),
                         shared.down_proj.weight.float())
        y += out_TH.detach()
        if proj is not None:
            dx += torch.autograd.grad((out_TH * proj).sum(), x, retain_graph=True)[0]
    if proj is not None:  # the router's share: through the combine weights
        dx += torch.autograd.grad(weights_TK, x, grad_outputs=grad_weights_TK)[0]
    return Reference(y, dx if proj is not None else None, grads)


def _swiglu(x_NH: torch.Tensor, gate_up: tuple[torch.Tensor, torch.Tensor], down_HI: torch.Tensor):
    return F.linear(F.silu(F.linear(x_NH, gate_up[0])) * F.linear(x_NH, gate_up[1]), down_HI)
