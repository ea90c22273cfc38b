"""Figures for the expert-parallelism chapter: the dispatch/combine algorithm step by step, traffic
matrices, and the communication model of `moe_lib.parallel.cost`.

The algorithm figure runs the real dispatch plan (`moe_lib.parallel.dispatch.plan_dispatch`) on a
tiny example and shows the buffers of every rank after each step; the exchanges between ranks are
shown by concatenating the plans' pieces in one process (the chapter runs the real thing on local
ranks next to it). `make_*` functions take only scalar parameters and return figures with the same
traces for every value, for `moe_lib.viz.widgets.live` and `static_slider`. Numbers are rounded.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import plotly.graph_objects as go
import torch
from plotly.subplots import make_subplots

from ..parallel import cost
from ..parallel.dispatch import plan_dispatch

RANK_COLORS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728")
#: The algorithm figure's example: 2 ranks x 3 tokens, 4 experts (2 per rank), top-2.
EXAMPLE = ([[0, 3], [1, 0], [2, 3]], [[3, 2], [0, 2], [1, 3]])
STEPS = ("1. route: every rank's tokens and their K = 2 experts",
         "2. plan: one copy per (token, rank holding one of its experts), rank-major",
         "3. counts all-to-all: each rank learns what it will receive, per source and expert",
         "4. dispatch all-to-all: the copies arrive, rank-major",
         "5. experts: regrouped expert-major, each local expert runs once on its rows",
         "6. combine all-to-all: each copy's weighted expert sum goes back to its source",
         "7. sum: a token's output = its partial sums from every rank (+ the shared expert)")


def _r(values, digits: int = 3) -> list:
    return [round(float(v), digits) for v in values]


def token_name(rank: int, t: int) -> str:
    return f"{'ab'[rank] if rank < 2 else f'r{rank}.'}{t}"


def algorithm_rows(example: Sequence[Sequence[Sequence[int]]] = EXAMPLE,
                   experts_per_rank: int = 2) -> list[list[list[tuple[str, int]]]]:
    """For each step, for each rank, its rows as (label, source rank of the token)."""
    world = len(example)
    plans = [plan_dispatch(torch.tensor(ex), experts_per_rank, world) for ex in example]
    steps = [[[(f"{token_name(r, t)} → " + ", ".join(f"e{e}" for e in ks), r)
               for t, ks in enumerate(ex)] for r, ex in enumerate(example)]]

    def sent(r):  # (destination, label, local experts) of rank r's copies, in send order
        plan, dest = plans[r], torch.repeat_interleave(torch.arange(world), plans[r].send_R).tolist()
        return [(d, token_name(r, int(t)), [int(e) + d * experts_per_rank for e in loc if e >= 0])
                for d, t, loc in zip(dest, plan.token_N.tolist(), plan.local_NK.tolist(), strict=True)]

    steps.append([[(f"→ rank {d}: {name} [" + ", ".join(f"e{e}" for e in es) + "]", r)
                   for d, name, es in sent(r)] for r in range(world)])
    received = [[(name, src, es) for src in range(world) for d, name, es in sent(src) if d == dst]
                for dst in range(world)]
    steps.append([[(f"from rank {src}: " + ", ".join(
        f"e{e}×{sum(e in es for _, s, es in received[dst] if s == src)}"
        for e in range(dst * experts_per_rank, (dst + 1) * experts_per_rank)), src)
        for src in range(world)] for dst in range(world)])
    steps.append([[(f"{name} [" + ", ".join(f"e{e}" for e in es) + "]", src) for name, src, es in rows]
                  for rows in received])
    steps.append([[(f"e{e}: {name}", src) for e in range(dst * experts_per_rank, (dst + 1) * experts_per_rank)
                   for name, src, es in received[dst] if e in es] for dst in range(world)])
    steps.append([[(f"{name}: part from rank {d}", r) for d, name, _ in sent(r)] for r in range(world)])
    steps.append([[(f"{token_name(r, t)} = " + " + ".join(f"part {d}" for d, name, _ in sent(r)
                                                         if name == token_name(r, t)), r)
                   for t in range(len(example[r]))] for r in range(world)])
    return steps


def algorithm_figure(step: int = 0) -> go.Figure:
    """The buffers of the example's 2 ranks after `step` (0-6); colour = the token's source rank."""
    rows = algorithm_rows()[step]
    fig = go.Figure()
    for rank, column in enumerate(rows):
        fig.add_trace(go.Scatter(
            x=[rank * 2.0] * len(column), y=[-i for i in range(len(column))], mode="markers+text",
            marker={"symbol": "square", "size": 16, "color": [RANK_COLORS[src] for _, src in column]},
            text=[label for label, _ in column], textposition="middle right", hoverinfo="text",
            showlegend=False))
    for rank in range(len(rows)):
        label = f"<b>rank {rank}</b> (experts e{2 * rank}, e{2 * rank + 1})"
        fig.add_annotation(x=rank * 2.0, y=1.2, text=label, showarrow=False, xanchor="left")
    fig.update_xaxes(visible=False, range=[-0.3, 4.2])
    fig.update_yaxes(visible=False, range=[-6.5, 1.8])
    fig.update_layout(title=STEPS[step], height=330, margin={"t": 50, "b": 10, "l": 10, "r": 10},
                      plot_bgcolor="white")
    return fig


def traffic_heatmap(matrix_RR: torch.Tensor, ranks_per_node: int, title: str,
                    unit: str = "tokens") -> go.Figure:
    """A [W, W] traffic matrix (rows send, columns receive); dotted lines separate the nodes."""
    world = matrix_RR.shape[0]
    values = matrix_RR.double().tolist()
    fig = go.Figure(go.Heatmap(z=[_r(row, 1) for row in values], x=list(range(world)), y=list(range(world)),
                               colorscale="Blues", colorbar={"title": unit},
                               text=[[f"{v:,.0f}" for v in row] for row in values], texttemplate="%{text}",
                               hovertemplate="rank %{y} → rank %{x}: %{text}<extra></extra>"))
    line = {"dash": "dot", "color": "gray"}
    for boundary in range(ranks_per_node, world, ranks_per_node):
        edge = boundary - 0.5
        fig.add_shape(type="line", x0=edge, x1=edge, y0=-0.5, y1=world - 0.5, line=line)
        fig.add_shape(type="line", y0=edge, y1=edge, x0=-0.5, x1=world - 0.5, line=line)
    fig.update_layout(title=title, xaxis_title="receiving rank", yaxis_title="sending rank", height=360,
                      yaxis={"autorange": "reversed"}, margin={"t": 50, "b": 40})
    return fig


def make_cost_figure(nodes: int = 8, max_nodes: int = 4, skew: float = 0.0, fp8: bool = True,
                     redundant: int = 0) -> go.Figure:
    """The model of `moe_lib.parallel.cost.predict` for one setting: the busiest GPU's dispatch and
    combine time on each link (left) and every GPU's expert load relative to the mean (right)."""
    max_nodes = min(max_nodes, nodes)
    c = cost.predict(nodes=nodes, max_nodes=max_nodes, skew=skew, fp8_dispatch=fp8, redundant_slots=redundant)
    tr, gpus = c.traffic, nodes * 8
    fig = make_subplots(rows=1, cols=2, column_widths=[0.4, 0.6], subplot_titles=[
        "busiest GPU per link, µs per layer", "expert work per GPU / mean"])
    for name, times, colour in (("IB", (c.dispatch_ib_us, c.combine_ib_us), "#d62728"),
                                ("NVLink", (c.dispatch_nvlink_us, c.combine_nvlink_us), "#1f77b4")):
        fig.add_trace(go.Bar(x=["dispatch", "combine"], y=_r(times, 1), name=name, marker_color=colour),
                      row=1, col=1)
    load = tr.gpu_load_G.double()
    fig.add_trace(go.Bar(x=list(range(gpus)), y=_r(load / load.mean()), showlegend=False,
                         marker_color=[RANK_COLORS[(g // 8) % 4] for g in range(gpus)]), row=1, col=2)
    setting = (f"{nodes} nodes, M = {max_nodes}, skew {skew:g}, {'FP8' if fp8 else 'BF16'} dispatch, "
               f"{redundant} redundant/GPU")
    fig.update_layout(title=(f"{setting}<br>dispatch {c.dispatch_us:,.0f} µs, combine {c.combine_us:,.0f} µs "
                             f"({c.bound}-bound), {tr.nodes_per_token:.2f} nodes/token"),
                      barmode="group", height=380, margin={"t": 90, "b": 40}, title_font_size=13,
                      legend={"orientation": "h", "y": -0.15})
    fig.update_xaxes(title_text="GPU (colour = node)", row=1, col=2)
    return fig


def v3_argument_figure(top_ks: Sequence[int] = (4, 6, 8, 10, 12, 13, 14, 16),
                       max_nodes: int = 4) -> go.Figure:
    """Experts per reached node (our router, M nodes) and the model's NVLink / IB time against K."""
    costs = [cost.predict(max_nodes=max_nodes, top_k=k) for k in top_ks]
    fig = make_subplots(rows=1, cols=2, subplot_titles=[
        f"experts per reached node (M = {max_nodes})", "dispatch time: NVLink / IB (model)"])
    fig.add_trace(go.Scatter(x=list(top_ks), y=_r([c.traffic.experts_per_node for c in costs]),
                             mode="lines+markers", name="experts / node"), row=1, col=1)
    fig.add_trace(go.Scatter(x=list(top_ks), y=_r([c.traffic.gpus_per_node for c in costs]),
                             mode="lines+markers", name="GPUs / node"), row=1, col=1)
    fig.add_trace(go.Scatter(x=list(top_ks), y=_r([c.dispatch_nvlink_us / c.dispatch_ib_us for c in costs]),
                             mode="lines+markers", name="NVLink / IB time", showlegend=False), row=1, col=2)
    fig.add_hline(y=160 / 50, line_dash="dot", line_color="gray", row=1, col=1,
                  annotation_text="160/50 = 3.2", annotation_position="top left")
    fig.add_hline(y=1.0, line_dash="dot", line_color="gray", row=1, col=2)
    fig.update_xaxes(title_text="experts per token K")
    fig.update_layout(height=360, margin={"t": 50, "b": 40}, legend={"orientation": "h", "y": -0.2})
    return fig


def rank_load_figure(loads: Mapping[str, torch.Tensor], title: str) -> go.Figure:
    """Each rank's expert work relative to the mean, one group of bars per setting (e.g. without and
    with redundant experts); the dotted line is an even split."""
    fig = go.Figure()
    for name, load_R in loads.items():
        load_R = load_R.double()
        fig.add_trace(go.Bar(x=[f"rank {r}" for r in range(len(load_R))], y=_r(load_R / load_R.mean()),
                             name=name))
    fig.add_hline(y=1.0, line_dash="dot", line_color="gray")
    fig.update_layout(title=title, yaxis_title="load / mean", barmode="group", height=320,
                      margin={"t": 50, "b": 40})
    return fig
