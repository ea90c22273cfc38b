"""Figures for the load-balancing chapters (auxiliary losses, auxiliary-loss-free balancing).

Every builder returns a plotly `go.Figure` whose numbers are rounded (`DIGITS` decimals), so that
the JSON stored in an executed notebook is reproducible byte for byte. The `make_*` functions
take only scalar parameters and run their own simulation: they are the functions handed to
`moe_lib.viz.widgets.live` and `static_slider`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import plotly.graph_objects as go
import torch
from plotly.subplots import make_subplots

from ..synthetic import BiasDynamics, simulate_loss_free

DIGITS = 3


def _r(values, digits: int = DIGITS) -> list:
    """Values as a rounded (nested) list of floats, for reproducible figure JSON."""
    if isinstance(values, torch.Tensor):
        values = values.detach().double().cpu().numpy()
    return np.round(np.asarray(values, dtype=float), digits).tolist()


def load_share(load_SE: torch.Tensor) -> torch.Tensor:
    """Load of each expert relative to an even split, [S, E]: 1 = its fair share, 0 = idle."""
    load_SE = load_SE.float()
    return load_SE / load_SE.mean(dim=-1, keepdim=True)


def load_heatmaps(loads: Mapping[str, torch.Tensor], every: int = 5, zmax: float = 3.0) -> go.Figure:
    """One heatmap per run (side by side): expert load share (expert x step), every `every` steps."""
    fig = make_subplots(rows=1, cols=len(loads), subplot_titles=list(loads), shared_yaxes=True,
                        horizontal_spacing=0.04)
    for col, load_SE in enumerate(loads.values(), start=1):
        share_ES = load_share(load_SE)[::every].T
        steps = list(range(0, load_SE.shape[0], every))
        fig.add_trace(go.Heatmap(z=_r(share_ES, 2), x=steps, y=list(range(share_ES.shape[0])),
                                 zmin=0, zmax=zmax, colorscale="Viridis", showscale=col == 1,
                                 colorbar={"title": "load / fair share"},
                                 hovertemplate="step %{x}<br>expert %{y}<br>share %{z}<extra></extra>"),
                      row=1, col=col)
        fig.update_xaxes(title_text="training step", row=1, col=col)
    fig.update_yaxes(title_text="expert", row=1, col=1)
    fig.update_layout(height=360, margin={"t": 50, "b": 40})
    return fig


def tradeoff_figure(alphas: Sequence[float], task_loss: Sequence[float],
                    imbalance: Sequence[float], imbalance_name: str = "MaxVio") -> go.Figure:
    """Task loss and load imbalance against the auxiliary-loss weight alpha (categorical x)."""
    labels = [f"{a:g}" for a in alphas]
    fig = make_subplots(rows=1, cols=2, subplot_titles=["task loss (lower is better)",
                                                        f"{imbalance_name} (lower is more balanced)"])
    fig.add_trace(go.Scatter(x=labels, y=_r(task_loss), mode="lines+markers", name="task loss"),
                  row=1, col=1)
    fig.add_trace(go.Scatter(x=labels, y=_r(imbalance), mode="lines+markers", name=imbalance_name),
                  row=1, col=2)
    fig.update_xaxes(title_text="alpha", type="category")
    fig.update_layout(height=340, showlegend=False, margin={"t": 50, "b": 40})
    return fig


def _significant(values, digits: int = 3) -> list:
    """Values rounded to `digits` significant digits (for log axes, where decimals would give 0)."""
    return [float(f"{v:.{digits}g}") for v in torch.as_tensor(values, dtype=torch.float64).tolist()]


def curves_figure(curves: Mapping[str, torch.Tensor], title: str, yaxis: str,
                  xaxis: str = "training step", every: int = 1, hline: float | None = None,
                  log_y: bool = False) -> go.Figure:
    """Several per-step curves (one trace per name) on one axis, every `every` steps.

    `log_y` draws a log axis and rounds to 3 significant digits instead of 3 decimals.
    """
    fig = go.Figure()
    for name, values in curves.items():
        steps = list(range(0, len(values), every))
        sampled = torch.as_tensor(values)[::every]
        fig.add_trace(go.Scatter(x=steps, y=_significant(sampled) if log_y else _r(sampled),
                                 mode="lines", name=name))
    if hline is not None:
        fig.add_hline(y=hline, line_dash="dot", line_color="gray")
    fig.update_layout(title=title, xaxis_title=xaxis, yaxis_title=yaxis, height=340,
                      margin={"t": 50, "b": 40})
    if log_y:
        fig.update_yaxes(type="log")
    return fig


def gradient_bars(f_E: torch.Tensor, grad_E: torch.Tensor,
                  threshold_E: torch.Tensor | None = None) -> go.Figure:
    """Per expert: its load fraction f_i and the summed gradient of the loss on its logits.

    `threshold_E`, if given, is drawn as markers over the f_i bars: the load at which the summed
    gradient of each expert changes sign.
    """
    experts = list(range(len(f_E)))
    fig = make_subplots(rows=1, cols=2, subplot_titles=["load fraction f_i (1 = fair share)",
                                                        "dL/dz summed over tokens"])
    fig.add_trace(go.Bar(x=experts, y=_r(f_E), name="f_i"), row=1, col=1)
    if threshold_E is not None:
        fig.add_trace(go.Scatter(x=experts, y=_r(threshold_E), mode="markers", name="sign change at",
                                 marker={"symbol": "line-ew-open", "size": 22, "color": "#d62728",
                                         "line": {"width": 3}}), row=1, col=1)
    fig.add_trace(go.Bar(x=experts, y=_r(grad_E, 5), name="gradient"), row=1, col=2)
    fig.update_xaxes(title_text="expert")
    fig.update_layout(height=320, showlegend=threshold_E is not None, margin={"t": 50, "b": 40},
                      legend={"orientation": "h", "y": -0.3})
    return fig


def dynamics_figure(dyn: BiasDynamics, title: str | None = None, window: int = 20) -> go.Figure:
    """A loss-free run: MaxVio per step; load share at step 0 vs the last `window` steps; final bias."""
    share_SE = load_share(dyn.load)
    experts = list(range(dyn.load.shape[1]))
    fig = make_subplots(rows=1, cols=3, column_widths=[0.4, 0.3, 0.3],
                        subplot_titles=["MaxVio per batch", "load / fair share: step 0 (gray),<br>"
                                        f"last {window} steps (blue)", "final bias b_i"])
    fig.add_trace(go.Scatter(y=_r(dyn.max_vio), mode="lines", name="MaxVio", showlegend=False),
                  row=1, col=1)
    fig.add_trace(go.Bar(x=experts, y=_r(share_SE[0]), name="step 0 (no bias)",
                         marker_color="lightgray"), row=1, col=2)
    fig.add_trace(go.Bar(x=experts, y=_r(share_SE[-window:].mean(dim=0)),
                         name=f"last {window} steps", marker_color="#636efa"), row=1, col=2)
    fig.add_trace(go.Bar(x=experts, y=_r(dyn.bias[-1], 4), name="bias", marker_color="#ef553b",
                         showlegend=False), row=1, col=3)
    fig.update_xaxes(title_text="step", row=1, col=1)
    fig.update_xaxes(title_text="expert", row=1, col=2)
    fig.update_xaxes(title_text="expert", row=1, col=3)
    fig.update_layout(title=title, barmode="overlay", height=380, margin={"t": 100, "b": 40},
                      showlegend=False)
    return fig


def make_dynamics_figure(gamma: float = 0.01, skew: float = 2.0, n_experts: int = 32, top_k: int = 4,
                         steps: int = 150, n_tokens: int = 1024) -> go.Figure:
    """Simulate loss-free balancing on a skewed sigmoid router and draw `dynamics_figure`."""
    dyn = simulate_loss_free(n_experts=n_experts, top_k=top_k, skew=skew, gamma=gamma, steps=steps,
                             n_tokens=n_tokens)
    tail = float(dyn.max_vio[-20:].mean())
    title = (f"gamma={gamma:g}, skew={skew:g}, E={n_experts}, K={top_k}: MaxVio "
             f"{float(dyn.max_vio[0]):.2f} at step 0, {tail:.2f} over the last 20 steps")
    return dynamics_figure(dyn, title)


def future_dependence_figure(changed: Mapping[str, torch.Tensor]) -> go.Figure:
    """Rows: bias sources; columns: tokens of the first half; dark = routing changed by the future."""
    names = list(changed)
    z = torch.stack([changed[n].float() for n in names])
    fig = go.Figure(go.Heatmap(z=_r(z, 0), y=names, x=list(range(z.shape[1])), zmin=0, zmax=1,
                               colorscale=[[0, "#f0f0f0"], [1, "#d62728"]], showscale=False,
                               hovertemplate="token %{x}<br>%{y}<br>changed %{z}<extra></extra>"))
    fig.update_layout(title="Tokens 0..T/2-1 whose experts change when only tokens T/2..T-1 change",
                      xaxis_title="token position (first half of the sequence)", height=230,
                      margin={"t": 50, "b": 40, "l": 120})
    return fig
