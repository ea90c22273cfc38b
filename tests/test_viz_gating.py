"""Figure builders of chapter 1: trace counts, rounded data and the values they show."""

import math

import pytest
import torch

from moe_lib.accounting import moe_params
from moe_lib.presets import BOOK, DEEPSEEK_V3
from moe_lib.viz.gating import gate, gating_figure, gating_logits, param_breakdown_figure
from moe_lib.viz.widgets import static_slider


def _decimals_at_most(values, decimals):
    return all(v is None or round(v, decimals) == v for v in values)


def test_gating_logits_are_seeded():
    assert torch.equal(gating_logits(seed=3), gating_logits(seed=3))
    assert not torch.equal(gating_logits(seed=3), gating_logits(seed=4))
    assert gating_logits(n_tokens=5, n_experts=6).shape == (5, 6)


def test_gate_weights_follow_the_options():
    logits = gating_logits()
    _, idx, w = gate(logits, k=3, score_func="sigmoid", norm_topk_prob=True, route_scale=2.5)
    assert idx.shape == (4, 3)
    assert torch.allclose(w.sum(-1), torch.full((4,), 2.5))
    scores, _, raw = gate(logits, k=3, score_func="sigmoid", norm_topk_prob=False)
    assert torch.allclose(raw, scores.gather(1, idx))
    with pytest.raises(ValueError, match="temperature"):
        gate(logits, temperature=0.0)


def test_gating_figure_marks_the_selected_experts_with_their_weights():
    k = 3
    fig = gating_figure(temperature=0.5, k=k, score_func="softmax")
    assert len(fig.data) == 2 * 4  # scores and weights for each of the 4 tokens
    _, idx, w = gate(gating_logits(), 0.5, k, "softmax")
    for t in range(4):
        bars, marks = fig.data[2 * t], fig.data[2 * t + 1]
        assert _decimals_at_most(bars.y, 3) and _decimals_at_most(marks.y, 3)
        shown = {i for i, y in enumerate(marks.y) if y is not None}
        assert shown == set(idx[t].tolist())
        red = {i for i, c in enumerate(bars.marker.color) if c == "#d62728"}
        assert red == shown
        assert math.isclose(sum(y for y in marks.y if y is not None), 1.0, abs_tol=2e-3)
        assert [round(marks.y[i], 3) for i in idx[t].tolist()] == [round(v, 3) for v in w[t].tolist()]


def test_gating_figure_stacks_into_a_static_slider():
    fig = static_slider(gating_figure, "temperature", [0.5, 1.0, 2.0], k=2)
    assert len(fig.data) == 3 * 8
    assert len(fig.layout.sliders[0].steps) == 3
    assert sum(bool(t.visible) for t in fig.data) == 8


def test_param_breakdown_figure_shows_total_and_active():
    fig = param_breakdown_figure({"book": BOOK, "V3": DEEPSEEK_V3})
    assert [t.name for t in fig.data] == ["total", "active per token"]
    total, active = fig.data[0].y, fig.data[1].y
    assert total[1] == round(moe_params(DEEPSEEK_V3).total / 1e6, 3)
    assert active[0] == round(moe_params(BOOK).active / 1e6, 3)
    assert all(a < t for a, t in zip(active, total, strict=True))
