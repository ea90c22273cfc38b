"""Figures and tables of the reproductions, drawn from the JSON files that `python -m moe_lib.repro`
writes (`benchmarks/repro_balancing.json`, `benchmarks/repro_architecture.json`).

`load` reads a file; `summary_rows` / `markdown_table` turn its summary into a table (mean ± sample
std over seeds); `metric_bars` draws one metric per variant with every seed as a dot;
`tradeoff_figure` plots validation CE against MaxVio_global; `curves_figure` the validation curves
(mean over seeds, band = min..max); `ablation_figure` the evaluation-time ablation per seed.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import plotly.graph_objects as go

from .balance import _r

METRIC_NAMES = {"val_ce": "validation CE (nats/byte)", "max_vio_global": "MaxVio_global",
                "max_vio_batch": "MaxVio_batch",
                "train_max_vio_batch_tail": "MaxVio_batch (training, last 20%)"}


def load(name: str, root: str | Path | None = None) -> dict:
    """The results `benchmarks/repro_<name>.json`, found next to moe_lib or above the working directory."""
    here = [Path(__file__).resolve().parents[2], Path.cwd(), *Path.cwd().parents]
    candidates = [Path(root)] if root else here
    for base in candidates:
        path = base / "benchmarks" / f"repro_{name}.json"
        if path.is_file():
            return json.loads(path.read_text())
    raise FileNotFoundError(f"benchmarks/repro_{name}.json not found: run `python -m moe_lib.repro {name}`")


def variants(data: dict) -> list[str]:
    """The variant names in the order the reproduction defines them."""
    return list(data["setup"]["variants"])


def _seed_values(data: dict, variant: str, metric: str) -> list[float]:
    runs = sorted((r for r in data["runs"] if r["variant"] == variant), key=lambda r: r["seed"])
    return [r[metric] for r in runs]


def _mean_std(spread: dict, digits: int) -> str:
    std = "" if spread["std"] is None else f" ± {spread['std']:.{digits}f}"
    return f"{spread['mean']:.{digits}f}{std}"


def summary_rows(data: dict, metrics: Sequence[str], digits: int = 3) -> list[dict]:
    """One row per variant: 'mean ± std' (sample std over seeds) of each metric, and the seeds."""
    rows = []
    for name in variants(data):
        entry = data["summary"].get(name)
        if entry:
            rows.append({"variant": name, "seeds": entry[metrics[0]]["n"],
                         **{METRIC_NAMES.get(m, m): _mean_std(entry[m], digits) for m in metrics}})
    return rows


def difference_rows(data: dict, key: str, metrics: Sequence[str], digits: int = 3) -> list[dict]:
    """Per variant, the seed-paired difference `key` (e.g. "minus_gshard"): mean, the 95% t-interval's
    half width, and whether the interval excludes zero."""
    rows = []
    for name in variants(data):
        diff = data["summary"].get(name, {}).get(key)
        if diff is None:
            continue
        row = {"variant": name}
        for m in metrics:
            d = diff[m] if m in diff else diff
            half = "" if d["half_width"] is None else f" ± {d['half_width']:.{digits}f}"
            row[f"Δ {METRIC_NAMES.get(m, m)}"] = f"{d['mean']:+.{digits}f}{half}"
            row[f"resolved ({m})"] = {True: "yes", False: "no", None: "-"}[d["resolved"]]
        rows.append(row)
    return rows


def markdown_table(rows: Sequence[dict]) -> str:
    """A Markdown table of rows (dicts with the same keys)."""
    if not rows:
        return ""
    keys = list(rows[0])
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(str(row[k]) for k in keys) + " |" for row in rows]
    return "\n".join(lines)


def metric_bars(data: dict, metric: str, title: str | None = None, log_y: bool = False) -> go.Figure:
    """Mean over seeds of `metric` per variant (bar, whisker = sample std) with each seed as a dot."""
    names = [n for n in variants(data) if n in data["summary"]]
    spreads = [data["summary"][n][metric] for n in names]
    fig = go.Figure(go.Bar(x=names, y=_r([s["mean"] for s in spreads], 5), name="mean over seeds",
                           error_y={"type": "data", "array": _r([s["std"] or 0.0 for s in spreads], 5)},
                           marker_color="lightsteelblue"))
    for seed in data["setup"]["seeds"]:
        xs, ys = [], []
        for n in names:
            for r in data["runs"]:
                if r["variant"] == n and r["seed"] == seed:
                    xs.append(n)
                    ys.append(r[metric])
        fig.add_trace(go.Scatter(x=xs, y=_r(ys, 5), mode="markers", name=f"seed {seed}",
                                 marker={"size": 7}))
    label = METRIC_NAMES.get(metric, metric)
    fig.update_layout(title=title or label, yaxis_title=label, height=380, margin={"t": 50, "b": 40})
    if log_y:
        fig.update_yaxes(type="log")
    return fig


def tradeoff_figure(data: dict, title: str = "validation CE against MaxVio_global (mean ± std over seeds)"
                    ) -> go.Figure:
    """Each variant at (MaxVio_global, validation CE), error bars = sample std over seeds."""
    fig = go.Figure()
    for name in variants(data):
        s = data["summary"].get(name)
        if not s:
            continue
        fig.add_trace(go.Scatter(
            x=_r([s["max_vio_global"]["mean"]], 4), y=_r([s["val_ce"]["mean"]], 5), mode="markers+text",
            text=[name], textposition="top center", name=name, showlegend=False,
            error_x={"type": "data", "array": _r([s["max_vio_global"]["std"] or 0.0], 4)},
            error_y={"type": "data", "array": _r([s["val_ce"]["std"] or 0.0], 5)}))
    fig.update_layout(title=title, xaxis_title="MaxVio_global (mean over layers)",
                      yaxis_title="validation CE (nats/byte)", height=460)
    return fig


def curves_figure(data: dict, key: str = "val_ce", names: Sequence[str] | None = None,
                  title: str | None = None) -> go.Figure:
    """`key` along training per variant: mean over seeds (line) and min..max over seeds (band)."""
    fig = go.Figure()
    for i, name in enumerate(names or variants(data)):
        runs = [r for r in data["runs"] if r["variant"] == name]
        if not runs:
            continue
        steps = [p["step"] for p in runs[0]["curve"]]
        table = [[p[key] for p in r["curve"]] for r in runs if [p["step"] for p in r["curve"]] == steps]
        columns = list(zip(*table, strict=True))
        color = f"hsl({(i * 360) // max(1, len(variants(data)))}, 60%, 45%)"
        fig.add_trace(go.Scatter(x=steps + steps[::-1], y=_r([max(c) for c in columns] +
                                                              [min(c) for c in columns][::-1], 5),
                                 fill="toself", line={"width": 0}, fillcolor=color, opacity=0.2,
                                 hoverinfo="skip", showlegend=False))
        fig.add_trace(go.Scatter(x=steps, y=_r([sum(c) / len(c) for c in columns], 5), mode="lines+markers",
                                 name=f"{name} ({len(table)} seeds)", line={"color": color}))
    fig.update_layout(title=title or f"{METRIC_NAMES.get(key, key)} during training",
                      xaxis_title="optimizer step", yaxis_title=METRIC_NAMES.get(key, key), height=420)
    return fig


def ablation_figure(data: dict, title: str = "evaluation-time ablation of the trained fine + shared model"
                    ) -> go.Figure:
    """Validation CE as trained, with the shared expert off, and off with one more routed expert,
    one line per seed."""
    fig = go.Figure()
    for r in sorted((r for r in data["runs"] if "eval_ablation" in r), key=lambda r: r["seed"]):
        keys = list(r["eval_ablation"])
        fig.add_trace(go.Scatter(x=keys, y=_r([r["eval_ablation"][k] for k in keys], 5),
                                 mode="lines+markers", name=f"seed {r['seed']}"))
    fig.update_layout(title=title, yaxis_title="validation CE (nats/byte)", height=380)
    return fig
