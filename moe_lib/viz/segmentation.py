"""Figures for chapter 2 (DeepSeekMoE): fine-grained segmentation, shared experts, group-limited routing.

Every number comes from `moe_lib.accounting` and `moe_lib.router`; figure data is rounded so the
figures' JSON is reproducible. `segmentation_figure` keeps the same traces for every (m, K_s), so
`moe_lib.viz.widgets.static_slider` can stack it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import plotly.graph_objects as go
import torch
from plotly.subplots import make_subplots

from .. import router
from ..accounting import ModelShape, fine_grained, moe_flops_per_token, moe_params, n_combinations
from ..config import MoEConfig
from ..router import select_experts

#: The coarse baseline of chapter 2: 16 experts, each as wide as a dense FFN, top-2 (GShard-like).
BASE = {"d_model": 1024, "d_ff": 4096, "n_experts": 16, "top_k": 2}
SHARED, ROUTED_ON, ROUTED_OFF, GROUP_OFF = "#2ca02c", "#d62728", "#c6dbef", "#f0f0f0"


def segmentation_rows(ms: Sequence[int], n_shared: int = 0, **base) -> list[dict]:
    """One row per m: the `fine_grained` config and its counts (parameters, FLOPs, combinations)."""
    base = {**BASE, **base}
    rows = []
    for m in ms:
        cfg = fine_grained(m=m, n_shared=n_shared, **base)
        p = moe_params(cfg)
        rows.append({"m": m, "K_s": n_shared, "experts": cfg.n_routed, "active routed": cfg.top_k,
                     "width": cfg.d_expert, "total": p.total, "active": p.active,
                     "expert params": p.routed + p.shared,
                     "active expert params": p.active_routed + p.shared,
                     "flops": moe_flops_per_token(cfg),
                     "combinations": n_combinations(cfg.n_routed, cfg.top_k), "cfg": cfg})
    return rows


def markdown_table(rows: Sequence[dict]) -> str:
    """`segmentation_rows` as a Markdown table (parameters in millions, combinations in full)."""
    lines = ["| m | K_s | routed experts | active routed | expert width | total params | "
             "active params | MFLOP/token | combinations |", "|" + "---:|" * 9]
    for r in rows:
        lines.append(f"| {r['m']} | {r['K_s']} | {r['experts']} | {r['active routed']} | {r['width']} "
                     f"| {r['total'] / 1e6:.2f}M | {r['active'] / 1e6:.2f}M | {r['flops'] / 1e6:.2f} "
                     f"| {r['combinations']:,} |")
    return "\n".join(lines)


def cost_rows(ms: Sequence[int], n_tokens: int, n_shared: int = 0, bytes_per_value: int = 2,
              **base) -> list[dict]:
    """What segmentation changes at equal parameters and FLOPs, for a batch of `n_tokens` tokens.

    Per m: the routed experts' width I, the mean tokens per routed expert n = T K' / N', the expert
    GEMMs per layer (3 per routed expert), the token copies dispatched to routed experts (T K'), and
    the arithmetic intensity of one routed expert's gate projection, 2 n H I FLOPs over the
    (H I + n H + n I) values of `bytes_per_value` bytes it reads and writes (weights, inputs, outputs).
    """
    rows = []
    for r in segmentation_rows(ms, n_shared, **base):
        cfg = r["cfg"]
        h, width = cfg.d_model, cfg.d_expert
        per_expert = n_tokens * cfg.top_k / cfg.n_routed
        moved = bytes_per_value * (h * width + per_expert * h + per_expert * width)
        rows.append({"m": r["m"], "width": width, "tokens per expert": per_expert,
                     "expert GEMMs": 3 * cfg.n_routed, "token copies": n_tokens * cfg.top_k,
                     "flop per byte": 2 * per_expert * h * width / moved})
    return rows


def cost_table(rows: Sequence[dict]) -> str:
    """`cost_rows` as a Markdown table."""
    lines = ["| m | expert width | tokens per expert | expert GEMMs per layer | token copies dispatched "
             "| FLOP per byte (gate projection) |", "|" + "---:|" * 6]
    for r in rows:
        lines.append(f"| {r['m']} | {r['width']} | {r['tokens per expert']:g} | {r['expert GEMMs']} "
                     f"| {r['token copies']:,} | {r['flop per byte']:.0f} |")
    return "\n".join(lines)


def combinations_figure(ms: Sequence[int], n_experts: int = 16, top_k: int = 2) -> go.Figure:
    """log10 of C(mN, mK) against the segmentation factor m."""
    counts = [n_combinations(m * n_experts, m * top_k) for m in ms]
    fig = go.Figure(go.Bar(x=[f"m = {m}" for m in ms], y=[round(math.log10(c), 3) for c in counts],
                           text=[f"{c:.3g}" for c in counts], textposition="outside"))
    fig.update_layout(title=f"Expert combinations C({n_experts}m, {top_k}m) a token can choose",
                      yaxis_title="log10(combinations)", height=380)
    return fig


def segmentation_figure(m: int = 4, n_shared: int = 1, **base) -> go.Figure:
    """Top: the m*N experts of one layer (shared / active routed / idle routed); bottom: parameters,
    FLOPs per token and the number of routed combinations.

    `n_shared` is clipped to m*K - 1 (at least one routed expert stays active). Always 4 traces.
    """
    base = {**BASE, **base}
    n_shared = min(n_shared, m * base["top_k"] - 1)
    (row,) = segmentation_rows([m], n_shared, **base)
    cfg: MoEConfig = row["cfg"]
    n_cells = m * base["n_experts"]
    kind = [2] * cfg.n_shared + [1] * cfg.top_k + [0] * (cfg.n_routed - cfg.top_k)
    cols = base["n_experts"] * max(1, m // 4)  # at most 4 rows of cells
    grid = [kind[i:i + cols] for i in range(0, n_cells, cols)]
    fig = make_subplots(rows=2, cols=2, specs=[[{"colspan": 2}, None], [{}, {}]],
                        row_heights=[0.5, 0.5], vertical_spacing=0.14, horizontal_spacing=0.12,
                        subplot_titles=[f"{n_cells} experts of width {cfg.d_expert} "
                                        "(green: shared, red: active, blue: idle)",
                                        "millions", f"{row['combinations']:.3g} combinations"])
    fig.add_trace(go.Heatmap(z=grid, zmin=0, zmax=2, showscale=False, xgap=1, ygap=1,
                             colorscale=[[0, ROUTED_OFF], [0.5, ROUTED_ON], [1, SHARED]],
                             hoverinfo="skip"), row=1, col=1)
    fig.add_trace(go.Bar(x=["total params", "active params"],
                         y=[round(row["total"] / 1e6, 2), round(row["active"] / 1e6, 2)],
                         marker_color=["#7f7f7f", ROUTED_ON], name="parameters"), row=2, col=1)
    fig.add_trace(go.Bar(x=["FLOP/token"], y=[round(row["flops"] / 1e6, 2)],
                         marker_color="#9467bd", name="FLOPs"), row=2, col=1)
    fig.add_trace(go.Bar(x=["log10 C"], y=[round(math.log10(row["combinations"]), 3)],
                         marker_color="#ff7f0e", name="combinations"), row=2, col=2)
    fig.update_yaxes(autorange="reversed", showticklabels=False, row=1, col=1)
    fig.update_xaxes(showticklabels=False, row=1, col=1)
    fig.update_yaxes(range=[0, 1.1 * row["total"] / 1e6], row=2, col=1)
    fig.update_yaxes(range=[0, 45], row=2, col=2)
    fig.update_layout(title=f"m = {m}, K_s = {n_shared}: {cfg.n_shared} shared + {cfg.top_k} of "
                            f"{cfg.n_routed} routed experts active",
                      showlegend=False, height=560, margin={"t": 80, "l": 50, "r": 20})
    return fig


def kept_groups(scores_TE: torch.Tensor, cfg: MoEConfig) -> torch.Tensor:
    """[T, G] bool: the groups each token keeps under `cfg` (`moe_lib.router.kept_groups`)."""
    return router.kept_groups(scores_TE, cfg.n_groups, cfg.topk_groups, cfg.resolved_group_score)


def routing_map(scores_TE: torch.Tensor, cfg: MoEConfig) -> torch.Tensor:
    """[T, E] int: 0 = expert in a dropped group, 1 = kept group but not selected, 2 = selected."""
    map_TE = kept_groups(scores_TE, cfg).repeat_interleave(cfg.n_routed // cfg.n_groups, dim=1).long()
    indices_TK = select_experts(scores_TE, None, cfg.top_k, cfg.n_groups, cfg.topk_groups,
                                cfg.resolved_group_score)
    return map_TE.scatter_(1, indices_TK, 2)


def group_routing_figure(scores_TE: torch.Tensor, cfg: MoEConfig) -> go.Figure:
    """Heatmap, tokens x experts: which groups each token keeps and which experts it selects."""
    map_TE = routing_map(scores_TE, cfg)
    n_tokens = scores_TE.shape[0]
    per_group = cfg.n_routed // cfg.n_groups
    text = [[f"{s:.2f}" for s in row] for row in scores_TE.tolist()]
    fig = go.Figure(go.Heatmap(
        z=map_TE.tolist(), zmin=0, zmax=2, xgap=1, ygap=2, text=text,
        colorscale=[[0, GROUP_OFF], [0.33, GROUP_OFF], [0.33, ROUTED_OFF], [0.67, ROUTED_OFF],
                    [0.67, ROUTED_ON], [1, ROUTED_ON]],
        colorbar={"tickvals": [0, 1, 2], "ticktext": ["group dropped", "kept group", "selected"]},
        hovertemplate="token %{y}, expert %{x}: score %{text}<extra></extra>"))
    for g in range(1, cfg.n_groups):
        fig.add_vline(x=g * per_group - 0.5, line={"color": "#444", "width": 1.5})
    fig.update_layout(
        title=f"Group-limited routing: top-{cfg.top_k} of {cfg.n_routed} experts inside the best "
              f"{cfg.topk_groups} of {cfg.n_groups} groups",
        xaxis={"title": f"expert (groups of {per_group})", "tickvals": [
            g * per_group + (per_group - 1) / 2 for g in range(cfg.n_groups)],
            "ticktext": [f"group {g}" for g in range(cfg.n_groups)]},
        yaxis={"title": "token", "autorange": "reversed", "dtick": 1},
        height=70 + 34 * n_tokens + 80)
    return fig


def groups_touched(scores_TE: torch.Tensor, cfg: MoEConfig) -> torch.Tensor:
    """[T]: the number of distinct groups holding each token's selected experts."""
    indices_TK = select_experts(scores_TE, None, cfg.top_k, cfg.n_groups, cfg.topk_groups,
                                cfg.resolved_group_score)
    group_TK = indices_TK // (cfg.n_routed // cfg.n_groups)
    hit_TG = torch.zeros(scores_TE.shape[0], cfg.n_groups, dtype=torch.bool)
    return hit_TG.scatter_(1, group_TK, True).sum(dim=1)


def groups_touched_figure(scores_TE: torch.Tensor, limited: MoEConfig, free: MoEConfig) -> go.Figure:
    """Share of tokens whose experts span 1..G groups, with and without the group limit."""
    fig = go.Figure()
    for name, cfg in (("no group limit", free), (f"top-{limited.topk_groups} groups", limited)):
        counts = torch.bincount(groups_touched(scores_TE, cfg), minlength=cfg.n_groups + 1)[1:]
        share = (counts.double() / scores_TE.shape[0]).tolist()
        fig.add_trace(go.Bar(x=list(range(1, cfg.n_groups + 1)), y=[round(s, 4) for s in share],
                             name=name))
    fig.update_layout(title="How many groups (devices / nodes) does a token's expert set span?",
                      xaxis_title="groups touched by one token", yaxis_title="share of tokens",
                      barmode="group", height=380)
    return fig


def model_breakdown_figure(model: ModelShape, unit: float = 1e9) -> go.Figure:
    """Stacked bars, total vs activated parameters of a whole model: routed experts vs the rest."""
    counts = model.params()
    n_moe = model.n_layers - model.n_dense_layers
    routed = [counts["routed_experts"], n_moe * moe_params(model.moe).active_routed]
    rest = [counts["total"] - routed[0], counts["active"] - routed[1]]
    fig = go.Figure()
    fig.add_trace(go.Bar(x=["total", "active per token"], y=[round(v / unit, 2) for v in routed],
                         name="routed experts", marker_color=ROUTED_ON,
                         texttemplate="%{y:.1f}B", textposition="inside"))
    fig.add_trace(go.Bar(x=["total", "active per token"], y=[round(v / unit, 2) for v in rest],
                         name="attention, shared experts, dense layers, embeddings",
                         marker_color="#7f7f7f", texttemplate="%{y:.1f}B", textposition="outside"))
    fig.update_layout(barmode="stack", legend={"orientation": "h", "y": -0.15},
                      yaxis_title="parameters (billions)", height=420,
                      title=f"{counts['total'] / unit:.1f}B parameters stored, "
                            f"{counts['active'] / unit:.1f}B used per token")
    return fig
