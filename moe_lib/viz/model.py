"""Figures and accounting for the chapter on Multi-head Latent Attention and the tiny DeepSeek-V3.

- `model_shape` / `model_config` translate between the model's `ModelConfig` and the accounting's
  `ModelShape`, so `moe_lib.accounting` can be checked against the parameters of a real model;
  `component_params` counts a built model's parameters by component from its module names.
- `cache_rows` / `make_cache_figure`: KV-cache size per token of multi-head attention, grouped-query
  attention, multi-query attention and MLA (library formula `cache_bytes_per_token` for MHA and MLA;
  GQA with g key-value heads caches g / n_heads of MHA, MQA is GQA with g = 1).
- `scores_figure`: attention logits computed two ways (naive vs absorbed), one panel per variant.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import plotly.graph_objects as go
import torch
from plotly.subplots import make_subplots

from ..accounting import MLAShape, ModelShape
from ..model import ModelConfig, Transformer, cache_bytes_per_token
from ..presets import DEEPSEEK_V3_MODEL
from .balance import _r, _significant

COMPONENTS = ("embedding", "attention", "norms", "dense FFN", "router", "shared experts",
              "routed experts", "output head")


def model_shape(cfg: ModelConfig) -> ModelShape:
    """The accounting shape (`moe_lib.accounting.ModelShape`) of the main model of `cfg` (no MTP)."""
    mla = MLAShape(n_heads=cfg.n_heads, q_lora_rank=cfg.q_lora_rank, kv_lora_rank=cfg.kv_lora_rank,
                   qk_nope_head_dim=cfg.qk_nope_head_dim, qk_rope_head_dim=cfg.qk_rope_head_dim,
                   v_head_dim=cfg.v_head_dim)
    return ModelShape(vocab_size=cfg.vocab_size, n_layers=cfg.n_layers, n_dense_layers=cfg.n_dense_layers,
                      d_dense=cfg.d_dense, moe=cfg.moe, mla=mla)


def model_config(shape: ModelShape, **changes) -> ModelConfig:
    """A `ModelConfig` with the dimensions of an accounting shape (e.g. `presets.DEEPSEEK_V3_MODEL`)."""
    mla = shape.mla
    return ModelConfig(vocab_size=shape.vocab_size, d_model=shape.moe.d_model, n_layers=shape.n_layers,
                       n_dense_layers=shape.n_dense_layers, d_dense=shape.d_dense, n_heads=mla.n_heads,
                       q_lora_rank=mla.q_lora_rank, kv_lora_rank=mla.kv_lora_rank,
                       qk_nope_head_dim=mla.qk_nope_head_dim, qk_rope_head_dim=mla.qk_rope_head_dim,
                       v_head_dim=mla.v_head_dim, moe=shape.moe, **changes)


def _component(name: str) -> str:
    if name.startswith("mtp."):
        return "MTP modules"
    if name.startswith("embed_tokens."):
        return "embedding"
    if name.startswith("lm_head."):
        return "output head"
    if ".self_attn." in name:
        return "attention"
    if ".mlp.gate." in name:
        return "router"
    if ".mlp.shared_experts." in name:
        return "shared experts"
    if ".mlp.experts." in name:
        return "routed experts"
    if ".mlp." in name:
        return "dense FFN"
    return "norms"


def component_params(model: Transformer) -> dict[str, int]:
    """Parameters of a built model by component (COMPONENTS, then "MTP modules"), counted from its
    module names; parameters shared with the main model (the MTP modules' embedding and head) count
    once. Buffers (the routers' correction bias) are not parameters."""
    counts = dict.fromkeys((*COMPONENTS, "MTP modules"), 0)
    for name, p in model.named_parameters():  # named_parameters yields a shared tensor once
        counts[_component(name)] += p.numel()
    return counts


def active_params(model: Transformer, counts: Mapping[str, int] | None = None) -> dict[str, int]:
    """Parameters a token uses in the main model, by component: all of them except the routed
    experts, of which top_k of n_routed per MoE layer."""
    counts = component_params(model) if counts is None else counts
    moe = model.cfg.moe
    active = {k: v for k, v in counts.items() if k != "MTP modules"}
    active["routed experts"] = counts["routed experts"] * moe.top_k // moe.n_routed
    return active


def params_figure(total: Mapping[str, int], active: Mapping[str, int], unit: float = 1e3,
                  unit_name: str = "thousand") -> go.Figure:
    """Stacked bars: the parameters of each component, all of them vs those a token uses."""
    fig = go.Figure()
    for name in total:
        fig.add_trace(go.Bar(name=name, x=["total", "active per token"],
                             y=_r([total[name] / unit, active.get(name, 0) / unit], 1),
                             hovertemplate=f"{name}: %{{y}} {unit_name}<extra></extra>"))
    fig.update_layout(barmode="stack", height=380, yaxis_title=f"parameters ({unit_name})",
                      title="parameters of the model by component", margin={"t": 50, "b": 40})
    return fig


# --- the KV cache ----------------------------------------------------------------------------------

_CACHE_COLORS = ("#1f77b4", "#2ca02c", "#9467bd", "#8c564b")

def cache_rows(cfg: ModelConfig, gqa_groups: Sequence[int] = (8, 1),
               dtype: torch.dtype = torch.bfloat16) -> list[dict]:
    """Cache bytes per token (all layers, one sequence) of MHA, GQA with each g in `gqa_groups`
    (g = 1: MQA) and MLA, with the same layers and head dims as `cfg`."""
    sizes = cache_bytes_per_token(cfg, dtype)
    rows = [{"attention": f"MHA ({cfg.n_heads} heads)", "short": "MHA", "bytes": sizes["mha"]}]
    for g in gqa_groups:
        name, short = ("MQA (1 KV head)", "MQA") if g == 1 else (f"GQA ({g} KV heads)", f"GQA-{g}")
        rows.append({"attention": name, "short": short, "bytes": sizes["mha"] * g / cfg.n_heads})
    rows.append({"attention": f"MLA (latent {cfg.kv_lora_rank} + rope key {cfg.qk_rope_head_dim})",
                 "short": "MLA", "bytes": sizes["mla"]})
    return rows


def make_cache_figure(kv_lora_rank: int = 512, qk_rope_head_dim: int = 64, n_heads: int = 128,
                      base: ModelConfig | None = None, dtype: torch.dtype = torch.bfloat16,
                      contexts: Sequence[int] = (1024, 4096, 16384, 32768, 65536, 131072)) -> go.Figure:
    """Left: cache KiB per token per attention kind; right: GiB of cache for one sequence against
    the context length (log axes). `base` (default: DeepSeek-V3's dimensions) supplies the rest."""
    base = model_config(DEEPSEEK_V3_MODEL) if base is None else base
    cfg = base.replace(kv_lora_rank=kv_lora_rank, qk_rope_head_dim=qk_rope_head_dim, n_heads=n_heads)
    rows = cache_rows(cfg, dtype=dtype)
    fig = make_subplots(rows=1, cols=2, subplot_titles=["cache per token (KiB, all layers)",
                                                        "cache of one sequence (GiB)"])
    names = [r["short"] for r in rows]
    colors = [_CACHE_COLORS[i % len(_CACHE_COLORS)] for i in range(len(rows) - 1)] + ["#d62728"]
    fig.add_trace(go.Bar(x=names, y=_significant([r["bytes"] / 2**10 for r in rows]), showlegend=False,
                         marker_color=colors,
                         hovertemplate="%{x}: %{y} KiB per token<extra></extra>"), row=1, col=1)
    for r, color in zip(rows, colors, strict=True):
        fig.add_trace(go.Scatter(x=list(contexts), y=_significant([r["bytes"] * n / 2**30 for n in contexts]),
                                 mode="lines+markers", name=r["short"], line={"color": color}), row=1, col=2)
    fig.update_yaxes(type="log", row=1, col=1)
    fig.update_yaxes(type="log", row=1, col=2)
    fig.update_xaxes(type="log", title_text="context length (tokens)", row=1, col=2)
    ratio = cache_bytes_per_token(cfg, dtype)["ratio"]
    title = (f"{cfg.n_layers} layers, {cfg.n_heads} heads, latent {kv_lora_rank}, "
             f"rope key {qk_rope_head_dim}, "
             f"{str(dtype).split('.')[-1]}: MLA caches {ratio:.1f}x less than MHA")
    fig.update_layout(height=420, margin={"t": 90, "b": 40}, title=title)
    return fig


def scores_figure(panels: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
                  max_points: int = 400) -> go.Figure:
    """One scatter per panel: attention logits computed the reference way (x) and the absorbed way
    (y); exact absorption puts every point on the diagonal. At most `max_points` points per panel."""
    fig = make_subplots(rows=1, cols=len(panels), subplot_titles=list(panels), horizontal_spacing=0.08)
    for col, (reference, absorbed) in enumerate(panels.values(), start=1):
        x, y = reference.flatten()[:max_points], absorbed.flatten()[:max_points]
        lo, hi = float(torch.minimum(x.min(), y.min())), float(torch.maximum(x.max(), y.max()))
        fig.add_trace(go.Scatter(x=[round(lo, 2), round(hi, 2)], y=[round(lo, 2), round(hi, 2)], mode="lines",
                                 line={"color": "#b0b0b0", "dash": "dot"}, showlegend=False,
                                 hoverinfo="skip"), row=1, col=col)
        fig.add_trace(go.Scatter(x=_r(x), y=_r(y), mode="markers", marker={"size": 4}, showlegend=False,
                                 hovertemplate="reference %{x}<br>absorbed %{y}<extra></extra>"),
                      row=1, col=col)
        fig.update_xaxes(title_text="reference logit q·k", row=1, col=col)
    fig.update_yaxes(title_text="absorbed logit", row=1, col=1)
    fig.update_layout(height=380, margin={"t": 50, "b": 40})
    return fig
