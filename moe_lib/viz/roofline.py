"""Figures for the CUDA-path chapter: the MoE roofline, its explorer, and measured benchmark results.

The roofline figures are computed from `moe_lib.gpu.roofline` (no measurement); `results_figure` and
`ladder_rows` read a report written by `python -m moe_lib.bench gpu` and name the machine that
produced it. Numbers are rounded to 4 significant digits so that executed notebooks are reproducible.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from ..config import MoEConfig
from ..gpu import roofline
from ..presets import DEEPSEEK_V3

TOKENS = np.unique(np.round(np.logspace(0, 5, 121))).tolist()
#: our variants in the order the optimisations are added, after the host-synchronising `sorted` path
LADDER = ("moe_lib:sorted", "moe_lib:layer", "moe_lib:device", "moe_lib:device+stream", "moe_lib:graph")


def _sig(values, digits: int = 4) -> list[float]:
    """Round to `digits` significant digits (values spanning decades, for reproducible JSON)."""
    out = []
    for v in np.atleast_1d(np.asarray(values, dtype=float)):
        out.append(float(v) if v == 0 or not np.isfinite(v) else float(f"{v:.{digits - 1}e}"))
    return out


def attainable_tflops(cfg: MoEConfig, tokens: Sequence[float], peak_flops: float, bandwidth: float,
                      ep_degree: int = 1) -> list[float]:
    """F(T) / bound(T) in TFLOP/s: the best throughput the roofline allows at each T per GPU."""
    return [roofline.expert_flops(cfg, t) / roofline.ep_bound(cfg, t, peak_flops, bandwidth, ep_degree) / 1e12
            for t in tokens]


def roofline_figure(machines: Mapping[str, tuple[float, float]], cfg: MoEConfig = DEEPSEEK_V3,
                    ep_degree: int = 1, title: str | None = None) -> go.Figure:
    """Attainable TFLOP/s against tokens per GPU, one curve per (peak FLOP/s, bandwidth) machine,
    with its crossover T* marked."""
    fig = go.Figure()
    for name, (peak, bandwidth) in machines.items():
        t_star = roofline.crossover_tokens(cfg, peak, bandwidth, ep_degree)
        fig.add_trace(go.Scatter(x=TOKENS, y=_sig(attainable_tflops(cfg, TOKENS, peak, bandwidth, ep_degree)),
                                 mode="lines", name=f"{name}: T* = {t_star:,.0f}"))
        fig.add_vline(x=t_star, line_dash="dot", line_color="gray")
    fig.update_xaxes(type="log", title_text="tokens per GPU, T")
    fig.update_yaxes(type="log", title_text="attainable TFLOP/s (roofline)")
    fig.update_layout(title=title or f"roofline of the V3 MoE layer, bf16, EP degree {ep_degree}",
                      height=380, margin={"t": 60, "b": 40}, legend={"x": 0.02, "y": 0.98})
    return fig


def make_explorer_figure(peak_tflops: float = 989.0, bandwidth_tbs: float = 3.35, tokens: int = 256,
                         ep_degree: int = 1) -> go.Figure:
    """The widget's figure for V3's layer: the roofline for this peak, bandwidth and EP degree with T
    and T* marked (left); at T, matmul time F/P against memory time B/W, the larger being the bound
    (right). Every element is a trace, so `static_slider` can switch them all."""
    cfg, peak, bandwidth = DEEPSEEK_V3, peak_tflops * 1e12, bandwidth_tbs * 1e12
    t_star = roofline.crossover_tokens(cfg, peak, bandwidth, ep_degree)
    hit = roofline.expected_experts_hit(ep_degree * tokens, cfg.n_routed, cfg.top_k) / ep_degree
    compute_us = 1e6 * roofline.expert_flops(cfg, tokens) / peak
    memory_us = 1e6 * roofline.expert_bytes(cfg, tokens, hit) / bandwidth
    regime = "compute" if compute_us >= memory_us else "bandwidth"
    per_expert = roofline.tokens_per_expert(cfg, tokens, ep_degree)
    fig = make_subplots(rows=1, cols=2, column_widths=[0.62, 0.38], horizontal_spacing=0.14,
                        subplot_titles=["attainable TFLOP/s", f"time at T = {tokens:,} (µs)"])
    curve = attainable_tflops(cfg, TOKENS, peak, bandwidth, ep_degree)
    fig.add_trace(go.Scatter(x=TOKENS, y=_sig(curve), mode="lines", name="roofline", showlegend=False),
                  row=1, col=1)
    fig.add_trace(go.Scatter(x=[t_star, t_star], y=_sig([min(curve), max(curve)]), mode="lines", name="T*",
                             line={"dash": "dot", "color": "gray"}, showlegend=False), row=1, col=1)
    fig.add_trace(go.Scatter(x=[tokens], y=_sig(attainable_tflops(cfg, [tokens], peak, bandwidth, ep_degree)),
                             mode="markers", marker={"size": 11}, name="T", showlegend=False), row=1, col=1)
    fig.add_trace(go.Bar(x=["matmul F/P", "memory B/W"], y=_sig([compute_us, memory_us]), showlegend=False,
                         marker_color=["#636efa", "#ef553b"]), row=1, col=2)
    fig.update_xaxes(type="log", title_text="tokens per GPU, T", row=1, col=1)
    fig.update_yaxes(type="log", row=1, col=1)
    fig.update_layout(height=380, margin={"t": 80, "b": 40},
                      title=f"T* = {t_star:,.0f} tokens per GPU; at T = {tokens:,}: {regime}-bound, "
                            f"{hit:.0f} of {cfg.n_routed // ep_degree} local experts hit, "
                            f"{per_expert:,.1f} tokens per expert")
    return fig


def machine_label(report: dict) -> str:
    """Who produced a benchmark report: the GPU, driver, torch and date, or a dry-run warning."""
    m = report["machine"]
    if report["dry_run"]:
        return "DRY RUN on the CPU at a small shape: a check of the code, not a GPU measurement"
    return f"{m['device']}, driver {m['driver']}, torch {m['torch']}, {m['date'][:10]}"


def results_figure(report: dict) -> go.Figure:
    """Measured TFLOP/s against T for every implementation (forward solid, forward+backward dashed)
    under the roofline of the measured ceilings, and each one's fraction of the roofline bound."""
    fig = make_subplots(rows=1, cols=2, horizontal_spacing=0.12,
                        subplot_titles=["TFLOP/s (roofline: measured ceilings)", "fraction of the bound"])
    names = list(dict.fromkeys(name for entry in report["results"] for mode in entry["modes"].values()
                               for name in mode["results"]))
    colors = dict(zip(names, ["#636efa", "#ef553b", "#00cc96", "#ab63fa", "#ffa15a", "#19d3f3", "#ff6692"],
                      strict=False))
    for mode, dash in (("forward", "solid"), ("forward_backward", "dash")):
        entries = [e for e in report["results"] if mode in e["modes"]]
        if not entries:
            continue
        tokens = [e["tokens"] for e in entries]
        bound = [e["modes"][mode]["flops"] / e["modes"][mode]["bound_ms"] / 1e9 for e in entries]
        fig.add_trace(go.Scatter(x=tokens, y=_sig(bound), mode="lines", line={"color": "black", "dash": dash},
                                 name=f"roofline ({mode.replace('_', '+')})"), row=1, col=1)
        for name in names:
            points = [(e["tokens"], e["modes"][mode]["results"][name]) for e in entries
                      if name in e["modes"][mode]["results"]]
            if not points:
                continue
            style = {"color": colors.get(name), "dash": dash}
            label = f"{name} ({mode.replace('_', '+')})"
            fig.add_trace(go.Scatter(x=[t for t, _ in points], y=_sig([r["tflops"] for _, r in points]),
                                     mode="lines+markers", line=style, name=label, legendgroup=name),
                          row=1, col=1)
            fractions = _sig([r["roofline_fraction"] for _, r in points])
            fig.add_trace(go.Scatter(x=[t for t, _ in points], y=fractions, mode="lines+markers", line=style,
                                     name=label, legendgroup=name, showlegend=False), row=1, col=2)
    fig.update_xaxes(type="log", title_text="tokens T")
    fig.update_yaxes(type="log", row=1, col=1)
    fig.update_yaxes(tickformat=".0%", row=1, col=2)
    fig.update_layout(title=machine_label(report), height=420, margin={"t": 70, "b": 40})
    return fig


def ladder_rows(report: dict, mode: str = "forward") -> list[list[str]]:
    """What each optimisation bought: rows [variant, median ms at each T, ...] in `LADDER` order, with
    the speed-up over the previous variant present; a header row first."""
    entries = [e for e in report["results"] if mode in e["modes"]]
    rows = [["variant"] + [f"T = {e['tokens']:,}" for e in entries]]
    previous: dict[int, float] = {}
    for name in LADDER:
        cells = [name]
        for e in entries:
            result = e["modes"][mode]["results"].get(name)
            if result is None:
                cells.append("-")
                continue
            ms = result["median_ms"]
            gain = f" ({previous[e['tokens']] / ms:.2f}x)" if e["tokens"] in previous else ""
            cells.append(f"{ms:.3f} ms{gain}")
            previous[e["tokens"]] = ms
        rows.append(cells)
    return rows


def ladder_markdown(report: dict, mode: str = "forward") -> str:
    """`ladder_rows` as a markdown table."""
    rows = ladder_rows(report, mode)
    table = [rows[0], ["---"] * len(rows[0])] + rows[1:]
    return "\n".join("| " + " | ".join(row) + " |" for row in table)


def target_lines(report: dict) -> list[str]:
    """One line per (T, mode): the best of ours, its fraction of the bound against the target, and
    whether it beat every peer."""
    lines = []
    for key, t in report["targets"].items():
        tokens, mode = key.split("|")
        lines.append(f"T = {int(tokens):,} {mode.replace('_', '+')}: {t['best_ours']} at "
                     f"{t['roofline_fraction']:.0%} of the bound (target {t['fraction_target']:.0%}: "
                     f"{'met' if t['fraction_met'] else 'missed'}); faster than every peer: "
                     f"{'yes' if t['faster_than_every_peer'] else 'no'}")
    return lines
