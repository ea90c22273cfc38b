"""Figures for chapter 1 (from a dense FFN to a sparse MoE): the gate, token by token.

`gating_logits` draws a fixed set of router logits; `gating_figure` runs `moe_lib.router` on them
(scores, top-k selection, normalisation, scaling) and draws, for every token, the score of each
expert with the selected experts highlighted and their combine weights marked. It has the same
number of traces for every setting, so `moe_lib.viz.widgets.static_slider` can stack it.
`param_breakdown_figure` compares total and activated parameters of several MoE layers.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import plotly.graph_objects as go
import torch
from plotly.subplots import make_subplots

from ..accounting import moe_params
from ..config import MoEConfig
from ..router import combine_weights, router_scores, select_experts

SELECTED = "#d62728"
IDLE = "#b0b0b0"
WEIGHT = "#1f77b4"


def gating_logits(n_tokens: int = 4, n_experts: int = 8, seed: int = 0) -> torch.Tensor:
    """Router logits [T, E] = x_T @ W_gate^T for random tokens and a random gate, seeded."""
    gen = torch.Generator().manual_seed(seed)
    x_TH = torch.randn(n_tokens, 16, generator=gen)
    w_EH = torch.randn(n_experts, 16, generator=gen) / 4.0
    return x_TH @ w_EH.T


def gate(logits_TE: torch.Tensor, temperature: float = 1.0, k: int = 2,
         score_func: str = "softmax", norm_topk_prob: bool = True,
         route_scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The router's three steps on `logits / temperature`: (scores [T, E], indices [T, K], weights [T, K])."""
    if temperature <= 0:
        raise ValueError(f"temperature={temperature!r} is invalid: expected a positive number")
    scores_TE = router_scores(logits_TE / temperature, score_func)
    indices_TK = select_experts(scores_TE, None, k)
    weights_TK = combine_weights(scores_TE, indices_TK, norm_topk_prob, route_scale)
    return scores_TE, indices_TK, weights_TK


def gating_figure(temperature: float = 1.0, k: int = 2, score_func: str = "softmax",
                  norm_topk_prob: bool = True, route_scale: float = 1.0,
                  logits_TE: torch.Tensor | None = None, decimals: int = 3) -> go.Figure:
    """One row per token: bars = scores s (selected experts in red), diamonds = combine weights g.

    Always 2 traces per token (scores, weights); data rounded to `decimals` so the figure's JSON
    is reproducible.
    """
    logits_TE = gating_logits() if logits_TE is None else logits_TE
    scores_TE, indices_TK, weights_TK = gate(logits_TE, temperature, k, score_func,
                                             norm_topk_prob, route_scale)
    n_tokens, n_experts = scores_TE.shape
    experts = [f"e{i}" for i in range(n_experts)]
    fig = make_subplots(rows=n_tokens, cols=1, shared_xaxes=True, vertical_spacing=0.09,
                        subplot_titles=[f"token {t}" for t in range(n_tokens)])
    for t in range(n_tokens):
        chosen = set(indices_TK[t].tolist())
        weight_E = torch.full((n_experts,), float("nan"), dtype=weights_TK.dtype)
        weight_E[indices_TK[t]] = weights_TK[t]
        fig.add_trace(go.Bar(x=experts, y=np.round(scores_TE[t].double().numpy(), decimals).tolist(),
                             marker_color=[SELECTED if e in chosen else IDLE for e in range(n_experts)],
                             name="score s", legendgroup="s", showlegend=t == 0), row=t + 1, col=1)
        fig.add_trace(go.Scatter(x=experts, y=[None if np.isnan(w) else round(w, decimals)
                                               for w in weight_E.tolist()],
                                 mode="markers", marker={"symbol": "diamond", "size": 10,
                                                         "color": WEIGHT},
                                 name="weight g", legendgroup="g", showlegend=t == 0),
                      row=t + 1, col=1)
    norm = "normalised" if norm_topk_prob else "not normalised"
    fig.update_layout(title=f"{score_func} scores, temperature {temperature:g}, top-{k}, {norm}, "
                            f"scale {route_scale:g}",
                      height=140 * n_tokens + 120, barmode="overlay",
                      margin={"l": 50, "r": 20, "t": 80, "b": 40},
                      legend={"orientation": "h", "x": 1, "xanchor": "right", "y": 1.02,
                              "yanchor": "bottom"})
    return fig


def param_breakdown_figure(configs: Mapping[str, MoEConfig], unit: float = 1e6) -> go.Figure:
    """Grouped bars: total vs activated parameters per token of each layer, in `unit`s (log axis)."""
    names = list(configs)
    params = [moe_params(cfg) for cfg in configs.values()]
    fig = go.Figure()
    fig.add_trace(go.Bar(x=names, y=[round(p.total / unit, 3) for p in params], name="total"))
    fig.add_trace(go.Bar(x=names, y=[round(p.active / unit, 3) for p in params],
                         name="active per token"))
    label = {1e6: "millions", 1e9: "billions"}.get(unit, f"units of {unit:g}")
    fig.update_layout(barmode="group", yaxis={"type": "log", "title": f"parameters ({label})"},
                      title="One MoE layer: parameters stored vs parameters used per token")
    return fig
