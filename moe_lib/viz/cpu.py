"""Figure for the CPU benchmark (`python -m moe_lib.bench cpu`, `benchmarks/cpu.json`): the default
path's speed-up over the best transformers implementation and its share of the dense matmul's
GFLOP/s, per shape, mode and instruction-set level.

Numbers in the figure are rounded (`DIGITS`) so that executed notebooks store reproducible JSON.
"""

from __future__ import annotations

import plotly.graph_objects as go
from plotly.subplots import make_subplots

DIGITS = 3
MODES = {"forward": "forward", "forward_backward": "forward+backward"}
LEVEL_COLORS = ("#2a9d8f", "#e9c46a", "#e76f51", "#6a4c93")


def shape_label(run: dict) -> str:
    cfg = run["config"]
    return f"{run['tokens']} tokens<br>H {cfg['d_model']}, I {cfg['d_expert']}"


def cpu_benchmark_figure(report: dict, path: str = "moe_lib:grouped",
                         bound: str = "bound:GEMMs") -> go.Figure:
    """Top: speed-up of `path` over the best transformers implementation, per shape, with the
    break-even (1x) and the report's target (1.3x, dashed). Bottom: its GFLOP/s as a percentage of
    the faster dense matmul of equal FLOPs, with the forward+backward target (75%, dashed). One bar
    per instruction-set level; where the report has the layer's GEMMs alone (`bound`), an outlined
    bar behind each shows theirs: how far removing everything but the GEMMs could take `path`."""
    levels = report["levels"]
    fig = make_subplots(rows=2, cols=len(MODES), shared_xaxes=True, vertical_spacing=0.08,
                        subplot_titles=[f"{title}: x best transformers" for title in MODES.values()]
                        + [f"{title}: % of dense matmul" for title in MODES.values()])
    for i, (level, data) in enumerate(levels.items()):
        labels = [shape_label(run) for run in data["runs"]]
        color = LEVEL_COLORS[i % len(LEVEL_COLORS)]
        for col, mode in enumerate(MODES, start=1):
            if all(bound in run["results"] for run in data["runs"]):  # drawn first: behind
                bounds = [run["results"][bound][mode] for run in data["runs"]]
                outline = {"color": "rgba(0,0,0,0)", "line": {"color": color, "width": 1.5}}
                for row, key, digits in ((1, "speedup_vs_best_transformers", DIGITS), (2, "pct_of_dense", 1)):
                    fig.add_trace(go.Bar(x=labels, y=[round(e[key], digits) for e in bounds],
                                         offsetgroup=level, name=f"{level}: GEMMs alone",
                                         legendgroup=f"{level} bound",
                                         showlegend=col == 1 and row == 1, marker=outline), row=row, col=col)
            entries = [run["results"][path][mode] for run in data["runs"]]
            speedups = [round(e["speedup_vs_best_transformers"], DIGITS) for e in entries]
            fig.add_trace(go.Bar(x=labels, y=speedups, offsetgroup=level,
                                 name=level, legendgroup=level, showlegend=col == 1, marker_color=color,
                                 text=[f"{e['speedup_vs_best_transformers']:.2f}x" for e in entries],
                                 textposition="outside"), row=1, col=col)
            fig.add_trace(go.Bar(x=labels, y=[round(e["pct_of_dense"], 1) for e in entries], name=level,
                                 offsetgroup=level, legendgroup=level, showlegend=False, marker_color=color),
                          row=2, col=col)
    targets = next(iter(levels.values()))["runs"][0].get("target", {})  # the same in every run
    for col in range(1, len(MODES) + 1):
        fig.add_hline(y=1.0, line_dash="dot", line_color="grey", row=1, col=col)
        if "speedup" in targets:
            fig.add_hline(y=targets["speedup"], line_dash="dash", line_color="#c0392b", row=1, col=col)
    if "pct_of_dense_forward_backward" in targets:
        fig.add_hline(y=targets["pct_of_dense_forward_backward"], line_dash="dash", line_color="#c0392b",
                      row=2, col=2)
    fig.update_yaxes(title_text="speed-up", row=1, col=1)
    fig.update_yaxes(title_text="% of dense GFLOP/s", row=2, col=1)
    fig.update_layout(barmode="group", height=560, margin={"t": 60, "b": 40},
                      legend={"title": "instruction set"})
    return fig
