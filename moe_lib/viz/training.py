"""Figures for the training chapter, drawn from the JSON-lines metrics that `moe_lib.train` writes
(`metrics.jsonl`: one record per logged step; records with validation also hold `val_ce` and the
validation MaxVio per MoE layer) or from the records of a live `Trainer`.

`shipped_checkpoint` finds the checkpoint shipped with the repository; `read_metrics` reads the file;
`column` / `layer_columns` turn records into per-step arrays;
`loss_figure`, `balance_figure` and `make_bias_figure` draw them. `make_bias_figure(layer, records)`
takes the layer as its first argument so it serves `live` and `static_slider` alike.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path

import plotly.graph_objects as go
from plotly.subplots import make_subplots

from .balance import _r


def shipped_checkpoint(name: str = "tiny") -> Path:
    """The directory `checkpoints/<name>` of the repository: next to the `moe_lib` package (a checkout
    or an editable install) or in the working directory or one of its parents (a chapter runs in
    `chapters/`)."""
    package_root = Path(__file__).resolve().parents[2]
    for base in (package_root, Path.cwd(), *Path.cwd().parents):
        candidate = base / "checkpoints" / name
        if (candidate / "config.json").is_file():
            return candidate
    raise FileNotFoundError(f"no checkpoints/{name} found next to moe_lib ({package_root}) or above "
                            f"{Path.cwd()}: clone the repository, or train it with "
                            f"`python -m moe_lib.train --preset {name} --out checkpoints/{name}`")


def read_metrics(path: str | Path) -> list[dict]:
    """The records of a metrics.jsonl file, in step order."""
    lines = Path(path).read_text().splitlines()
    return sorted((json.loads(line) for line in lines if line.strip()), key=lambda r: r["step"])


def column(records: Sequence[dict], key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of the records that hold `key`."""
    kept = [r for r in records if key in r]
    return [r["step"] for r in kept], [r[key] for r in kept]


def layer_columns(records: Sequence[dict], key: str) -> dict[str, tuple[list[int], list]]:
    """{MoE layer name: (steps, values)} for a per-layer metric such as "max_vio_batch" or "bias"."""
    kept = [r for r in records if key in r]
    names = list(kept[0][key]) if kept else []
    return {name: ([r["step"] for r in kept], [r[key][name] for r in kept]) for name in names}


def main_layers(records: Sequence[dict], key: str = "bias") -> list[str]:
    """The main model's MoE layer names ("layers.N.mlp"), without the MTP modules'."""
    return [name for name in layer_columns(records, key) if name.startswith("layers.")]


def loss_figure(records: Sequence[dict], bigram: float | None = None,
                title: str = "cross-entropy", unit: str = "byte") -> go.Figure:
    """Training CE per logged step, validation CE where evaluated, and the bigram baseline (dotted),
    in nats per `unit`: the model's token ("byte" for byte-level models, "token" for BPE)."""
    fig = go.Figure()
    steps, ce = column(records, "ce")
    fig.add_trace(go.Scatter(x=steps, y=_r(ce), mode="lines", name="train (batch)"))
    steps, val = column(records, "val_ce")
    fig.add_trace(go.Scatter(x=steps, y=_r(val), mode="lines+markers", name="validation"))
    if bigram is not None:
        fig.add_hline(y=round(bigram, 3), line_dash="dot", line_color="#7f7f7f",
                      annotation_text=f"bigram baseline {bigram:.2f}", annotation_position="top right")
    fig.update_layout(title=title, xaxis_title="optimizer step", yaxis_title=f"nats per {unit}", height=380,
                      margin={"t": 50, "b": 40})
    return fig


def centred_norms(biases: Sequence[Sequence[float]]) -> list[float]:
    """||b - mean(b)|| of each bias vector: the part of the bias that changes which experts are chosen
    (adding the same constant to every expert's bias changes no top-k)."""
    return [math.sqrt(sum((v - sum(b) / len(b)) ** 2 for v in b)) for b in biases]


def balance_figure(records: Sequence[dict], layers: Sequence[str] | None = None) -> go.Figure:
    """Per MoE layer: MaxVio of each training batch (left; validation MaxVio_global as markers), and
    the norm of the correction bias with (solid) and without (dotted) its mean over the experts (right)."""
    layers = main_layers(records) if layers is None else list(layers)
    fig = make_subplots(rows=1, cols=2, subplot_titles=["MaxVio per batch (lines), validation global (dots)",
                                                        "bias norm ||b|| (solid), ||b - mean b|| (dotted)"])
    vio, val, norm, bias = (layer_columns(records, k)
                            for k in ("max_vio_batch", "val_max_vio_global", "bias_norm", "bias"))
    for i, name in enumerate(layers):
        color = f"hsl({int(360 * i / max(len(layers), 1))}, 60%, 45%)"
        fig.add_trace(go.Scatter(x=vio[name][0], y=_r(vio[name][1]), mode="lines", name=name,
                                 line={"color": color}, legendgroup=name), row=1, col=1)
        if name in val:
            fig.add_trace(go.Scatter(x=val[name][0], y=_r(val[name][1]), mode="markers", showlegend=False,
                                     marker={"color": color, "size": 8}, legendgroup=name), row=1, col=1)
        fig.add_trace(go.Scatter(x=norm[name][0], y=_r(norm[name][1]), mode="lines", showlegend=False,
                                 line={"color": color}, legendgroup=name), row=1, col=2)
        fig.add_trace(go.Scatter(x=bias[name][0], y=_r(centred_norms(bias[name][1])), mode="lines",
                                 showlegend=False, line={"color": color, "dash": "dot"}, legendgroup=name),
                      row=1, col=2)
    fig.update_xaxes(title_text="optimizer step")
    fig.update_yaxes(title_text="MaxVio", row=1, col=1)
    fig.update_layout(height=380, margin={"t": 50, "b": 40})
    return fig


def make_bias_figure(layer: str, records: Sequence[dict], zmax: float | None = None) -> go.Figure:
    """The correction bias of every expert of one MoE layer (rows) at every logged step (columns)."""
    steps, bias = layer_columns(records, "bias")[layer]
    z = _r([list(col) for col in zip(*bias, strict=True)], 4)  # [E, steps]
    zmax = zmax if zmax is not None else max(abs(v) for row in z for v in row) or 1.0
    fig = go.Figure(go.Heatmap(z=z, x=steps, y=list(range(len(z))), zmin=-zmax, zmax=zmax, zmid=0,
                               colorscale="RdBu", colorbar={"title": "bias b"},
                               hovertemplate="step %{x}<br>expert %{y}<br>b = %{z}<extra></extra>"))
    fig.update_layout(title=f"correction bias of {layer}", xaxis_title="optimizer step", yaxis_title="expert",
                      height=380, margin={"t": 50, "b": 40})
    return fig
