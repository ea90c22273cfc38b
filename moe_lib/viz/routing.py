"""Figures for the chapter on what the experts learn: the routing of a text, per token and MoE
layer, and the experts used by each token class or corpus domain.

`make_text_routing_figure(text, model, tokenizer=...)` routes `text` through `model` and draws one
heatmap per MoE layer (experts x tokens, colour = gate weight, 0 where the expert was not selected).
It has one trace per layer whatever the text, so `static_slider` can stack it over several texts.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import plotly.graph_objects as go
import torch
from plotly.subplots import make_subplots

from ..analysis import RoutingTrace, routing_trace
from ..model import Transformer
from ..train.tokenizer import ByteTokenizer
from .balance import _r

_SHOWN = {ord(" "): "␣", ord("\n"): "↵", ord("\t"): "⇥"}


def _shown(data: bytes) -> str:
    return "".join(_SHOWN.get(b, chr(b) if 33 <= b < 127 else "·") for b in data)


def byte_labels(ids_T: torch.Tensor) -> list[str]:
    """A printable label per byte: the character, ␣ ↵ ⇥ for blanks, · for non-ASCII and control bytes."""
    return token_labels(ids_T, ByteTokenizer())


def token_labels(ids_T: torch.Tensor, tokenizer: ByteTokenizer | None = None) -> list[str]:
    """A printable label per token: its bytes shown as `byte_labels` shows them (bytes by default)."""
    tokenizer = tokenizer or ByteTokenizer()
    return [_shown(tokenizer.token_bytes(i)) for i in ids_T.tolist()]


def gate_matrix(trace: RoutingTrace, n_experts: int) -> torch.Tensor:
    """Gate weights [L, E, T] of every expert for every token (0 where it was not selected)."""
    n_layers, n_tokens, _ = trace.indices.shape
    dense_LTE = torch.zeros(n_layers, n_tokens, n_experts).scatter_(2, trace.indices, trace.weights.float())
    return dense_LTE.transpose(1, 2)


def routing_figure(trace: RoutingTrace, ids_T: torch.Tensor, n_experts: int, title: str = "",
                   tokenizer: ByteTokenizer | None = None) -> go.Figure:
    """One heatmap per MoE layer, stacked: experts (rows) x tokens (columns), colour = gate weight;
    tokens are labelled by their text in `tokenizer` (bytes by default)."""
    gates_LET = gate_matrix(trace, n_experts)
    labels = token_labels(ids_T, tokenizer)
    positions = list(range(len(labels)))
    n_layers = len(trace.layers)
    fig = make_subplots(rows=n_layers, cols=1, shared_xaxes=True, vertical_spacing=0.06,
                        subplot_titles=[f"layer {layer}" for layer in trace.layers])
    zmax = round(float(gates_LET.max()), 2) or 1.0
    for row, gates_ET in enumerate(gates_LET, start=1):
        fig.add_trace(go.Heatmap(z=_r(gates_ET, 2), x=positions, y=list(range(n_experts)), zmin=0, zmax=zmax,
                                 colorscale="Blues", showscale=row == 1, colorbar={"title": "gate"},
                                 hovertemplate="token %{x}<br>expert %{y}<br>gate %{z}<extra></extra>"),
                      row=row, col=1)
        fig.update_yaxes(title_text="expert", row=row, col=1)
    fig.update_xaxes(tickmode="array", tickvals=positions, ticktext=labels, tickangle=0, tickfont={"size": 9},
                     row=n_layers, col=1)
    fig.update_layout(title=title, height=190 * n_layers + 80, margin={"t": 60, "b": 30})
    return fig


def make_text_routing_figure(text: str, model: Transformer, max_tokens: int = 120,
                             tokenizer: ByteTokenizer | None = None) -> go.Figure:
    """Route the first `max_tokens` tokens of `text` (in `tokenizer`, default bytes) through `model`
    and draw `routing_figure`."""
    tokenizer = tokenizer or ByteTokenizer()
    if tokenizer.vocab_size != model.cfg.vocab_size:
        raise ValueError(f"the tokenizer has {tokenizer.vocab_size} ids but the model reads "
                         f"{model.cfg.vocab_size}: pass the checkpoint's tokenizer (moe_lib.load_tokenizer)")
    ids_T = tokenizer.encode(text)[:max_tokens]
    if ids_T.numel() == 0:
        ids_T = tokenizer.encode(" ")
    trace = routing_trace(model, ids_T)
    unit = "bytes" if tokenizer.kind == "bytes" else "tokens"
    return routing_figure(trace, ids_T, model.cfg.moe.n_routed, tokenizer=tokenizer,
                          title=f"routing of {ids_T.numel()} {unit} ({len(trace.layers)} MoE layers)")


def lift_figure(counts: Mapping[str, torch.Tensor], label_names: Sequence[str],
                zrange: float = 3.0) -> go.Figure:
    """Side-by-side heatmaps (one per layer) of log2 lift = log2 p(expert | label) / p(expert) from
    pair counts [labels, experts]: red = the label uses the expert more than average, blue = less."""
    fig = make_subplots(rows=1, cols=len(counts), subplot_titles=list(counts), shared_yaxes=True,
                        horizontal_spacing=0.03)
    for col, counts_CE in enumerate(counts.values(), start=1):
        counts_CE = counts_CE.double()
        p_e_given_c = counts_CE / counts_CE.sum(1, keepdim=True).clamp_min(1)
        p_e = counts_CE.sum(0) / counts_CE.sum()
        lift = (p_e_given_c / p_e.clamp_min(1e-12)).clamp_min(2**-zrange).log2().clamp(-zrange, zrange)
        lift[counts_CE.sum(1) == 0] = 0.0
        fig.add_trace(go.Heatmap(z=_r(lift, 2), x=list(range(counts_CE.shape[1])), y=list(label_names),
                                 zmin=-zrange, zmax=zrange, zmid=0, colorscale="RdBu_r", showscale=col == 1,
                                 colorbar={"title": "log2 lift"},
                                 hovertemplate="%{y}<br>expert %{x}<br>log2 lift %{z}<extra></extra>"),
                      row=1, col=col)
        fig.update_xaxes(title_text="expert", row=1, col=col)
    fig.update_yaxes(autorange="reversed")
    fig.update_layout(height=120 + 26 * len(label_names), margin={"t": 50, "b": 40})
    return fig


def specialisation_figure(measured: Mapping[str, Sequence[float]], layers: Sequence[str],
                          title: str = "mutual information between label and expert") -> go.Figure:
    """Grouped bars: one group per layer, one bar per measurement (e.g. trained, untrained, shuffled)."""
    fig = go.Figure([go.Bar(name=name, x=list(layers), y=_r(values, 4)) for name, values in measured.items()])
    fig.update_layout(barmode="group", title=title, yaxis_title="bits", height=360, margin={"t": 50, "b": 40})
    return fig
