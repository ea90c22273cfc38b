"""Figures for the Multi-Token Prediction chapter: the speculative-decoding algebra, where generated
tokens came from, and the measured benchmark.

Numbers in the figures are rounded (`DIGITS`) so that executed notebooks store reproducible JSON.
"""

from __future__ import annotations

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from ..model.speculative import expected_tokens, predicted_speedup

DIGITS = 3
SOURCE_COLORS = ("#9aa5b1", "#2a9d8f", "#e9c46a", "#e76f51", "#6a4c93")  # main model, draft 1, 2, ..
VISIBLE = {" ": "\u00b7", "\n": "\u21b5", "\t": "\u2192"}  # space, newline, tab as visible marks


def speedup_curves(acceptance: float = 0.85, depth: int = 1, draft_cost: float = 0.1,
                   verify_cost: float = 1.0, max_depth: int = 4) -> go.Figure:
    """Predicted speedup E / (v + D c) against the acceptance rate a, one curve per depth
    D = 1..max_depth at draft cost c, with the point (a, D) marked; break-even at 1."""
    a_grid = np.linspace(0.0, 0.99, 100)
    fig = go.Figure()
    for d in range(1, max_depth + 1):
        speedup = [predicted_speedup(float(a), d, draft_cost, verify_cost) for a in a_grid]
        fig.add_trace(go.Scatter(x=np.round(a_grid, DIGITS).tolist(), y=np.round(speedup, DIGITS).tolist(),
                                 mode="lines", name=f"D = {d}",
                                 line={"width": 4 if d == depth else 1.5}))
    point = predicted_speedup(acceptance, depth, draft_cost, verify_cost)
    fig.add_trace(go.Scatter(x=[round(acceptance, DIGITS)], y=[round(point, DIGITS)], mode="markers",
                             marker={"size": 12, "color": "black"}, name="chosen a, D"))
    fig.add_hline(y=1.0, line_dash="dot", line_color="gray")
    e = expected_tokens(acceptance, depth)
    fig.update_layout(title=f"a = {acceptance:.2f}, D = {depth}, c = {draft_cost:.2f}: E = {e:.2f} tokens "
                            f"per verification, speedup {point:.2f}x",
                      xaxis_title="acceptance rate a", yaxis_title="predicted speedup E / (v + D c)",
                      yaxis_range=[0, 4], height=420, margin={"t": 60, "b": 40})
    return fig


def token_sources(tokens: list[str], sources: list[int], per_row: int = 48,
                  title: str = "generated tokens by source") -> go.Figure:
    """The generated tokens as a grid of cells coloured by where each came from: the main model (0)
    or an accepted draft of position k (k)."""
    n_rows = -(-len(tokens) // per_row)
    pad = n_rows * per_row - len(tokens)
    cells = [int(k) for k in sources] + [None] * pad  # None: no token (JSON null, not NaN)
    z = [cells[r * per_row:(r + 1) * per_row] for r in range(n_rows)]
    shown = [VISIBLE.get(t, t) for t in tokens] + [""] * pad
    text = np.array(shown, dtype=object).reshape(n_rows, per_row)
    n_colors = int(max(sources, default=0)) + 1
    colorscale = []
    for k in range(n_colors):
        colorscale += [[k / n_colors, SOURCE_COLORS[k]], [(k + 1) / n_colors, SOURCE_COLORS[k]]]
    labels = ["main model"] + [f"draft {k}" for k in range(1, n_colors)]
    fig = go.Figure(go.Heatmap(z=z, text=text.tolist(), texttemplate="%{text}", zmin=-0.5,
                               zmax=n_colors - 0.5, colorscale=colorscale, xgap=1, ygap=1,
                               colorbar={"tickvals": list(range(n_colors)), "ticktext": labels},
                               hovertemplate="%{text}<extra></extra>"))
    fig.update_yaxes(autorange="reversed", showticklabels=False)
    fig.update_xaxes(showticklabels=False)
    fig.update_layout(title=title, height=80 + 28 * n_rows, margin={"t": 50, "b": 10, "l": 10})
    return fig


def measured_figure(report: dict) -> go.Figure:
    """Benchmark (`python -m moe_lib.bench mtp` JSON): acceptance per draft position in generation
    next to the teacher-forced agreement of each depth; tokens/s plain vs speculative, with the
    speed-up the algebra predicts from the measured acceptance and costs (when the report has it)."""
    gen, tf = report["generation"], report["teacher_forced"]
    fig = make_subplots(rows=1, cols=2, subplot_titles=["acceptance per draft position",
                                                        "greedy decoding, batch 1"])
    for d, g in gen["speculative"].items():
        fig.add_trace(go.Bar(x=[f"position {k}" for k in range(1, len(g["acceptance"]) + 1)],
                             y=np.round(g["acceptance"], DIGITS).tolist(), name=f"generation, D = {d}"),
                      row=1, col=1)
    fig.add_trace(go.Bar(x=[f"position {t['depth']}" for t in tf["depths"]],
                         y=[round(t["agrees_with_main"], DIGITS) for t in tf["depths"]],
                         name="teacher-forced: depth k's argmax = main model's"), row=1, col=1)
    names = ["plain"] + [f"MTP D = {d}" for d in gen["speculative"]]
    tps = [gen["plain_tokens_per_s"]] + [g["tokens_per_s"] for g in gen["speculative"].values()]
    fig.add_trace(go.Bar(x=names, y=np.round(tps, 1).tolist(), showlegend=False,
                         marker_color=["#9aa5b1"] + ["#2a9d8f"] * len(gen["speculative"]),
                         text=["1.00x"] + [f"{g['speedup']:.2f}x" for g in gen["speculative"].values()],
                         textposition="outside"), row=1, col=2)
    if "prediction" in report:  # the algebra E / (v + D c) with the measured acceptance and costs
        predicted = [gen["plain_tokens_per_s"] * report["prediction"][d]["speedup_predicted"]
                     for d in gen["speculative"]]
        fig.add_trace(go.Scatter(x=names[1:], y=np.round(predicted, 1).tolist(), mode="markers",
                                 marker={"symbol": "diamond", "size": 12, "color": "black"},
                                 name="predicted E / (v + D c)"), row=1, col=2)
    fig.update_yaxes(title_text="fraction accepted", range=[0, 1], row=1, col=1)
    fig.update_yaxes(title_text="tokens/s", row=1, col=2)
    fig.update_layout(barmode="group", height=400, margin={"t": 60, "b": 40},
                      legend={"orientation": "h", "y": -0.2})
    return fig
