"""Figures of the MTP chapter: the speedup algebra, token sources, the benchmark figure."""

from __future__ import annotations

import pytest

from moe_lib.model.speculative import expected_tokens, predicted_speedup
from moe_lib.viz.mtp import measured_figure, speedup_curves, token_sources


def test_expected_tokens_and_speedup_algebra():
    assert expected_tokens(0.85, 1) == pytest.approx(1.85)
    for a in (0.0, 0.3, 0.85, 0.99):
        for d in (1, 2, 4):
            assert expected_tokens(a, d) == pytest.approx((1 - a ** (d + 1)) / (1 - a))
    assert expected_tokens([0.9, 0.5]) == pytest.approx(1 + 0.9 + 0.45)
    assert predicted_speedup(0.85, 1, 0.0) == pytest.approx(1.85)
    assert predicted_speedup([0.9, 0.5], 2, 0.1, 1.2) == pytest.approx(2.35 / 1.4)
    with pytest.raises(ValueError, match="depth"):
        expected_tokens(0.5)


def test_speedup_curves_follow_the_formula():
    fig = speedup_curves(acceptance=0.7, depth=2, draft_cost=0.2, max_depth=3)
    assert [t.name for t in fig.data] == ["D = 1", "D = 2", "D = 3", "chosen a, D"]
    curve = fig.data[1]
    for a, s in zip(curve.x[::20], curve.y[::20], strict=True):
        assert s == pytest.approx(predicted_speedup(a, 2, 0.2), abs=1e-3)
    assert fig.data[-1].y[0] == pytest.approx(predicted_speedup(0.7, 2, 0.2), abs=1e-3)
    assert "E = 2.19" in fig.layout.title.text


def test_token_sources_grid():
    fig = token_sources(list("ab c\nd"), [0, 1, 2, 0, 1, 0], per_row=4)
    heat = fig.data[0]
    assert [row[:4] for row in heat.z][0] == [0, 1, 2, 0] and len(heat.z) == 2
    assert heat.text[0][2] == "\u00b7" and heat.text[1][0] == "\u21b5"
    assert list(heat.colorbar.ticktext) == ["main model", "draft 1", "draft 2"]


def test_measured_figure_shows_every_depth():
    report = {"teacher_forced": {"depths": [{"depth": 1, "agrees_with_main": 0.8},
                                            {"depth": 2, "agrees_with_main": 0.6}]},
              "generation": {"plain_tokens_per_s": 40.0, "speculative": {
                  "1": {"acceptance": [0.75], "tokens_per_s": 50.0, "speedup": 1.25},
                  "2": {"acceptance": [0.7, 0.55], "tokens_per_s": 52.0, "speedup": 1.3}}}}
    fig = measured_figure(report)
    assert [t.name for t in fig.data[:3]] == ["generation, D = 1", "generation, D = 2",
                                              "teacher-forced: depth k's argmax = main model's"]
    assert list(fig.data[3].text) == ["1.00x", "1.25x", "1.30x"] and len(fig.data) == 4
    report["prediction"] = {"1": {"speedup_predicted": 1.2}, "2": {"speedup_predicted": 1.5}}
    assert list(measured_figure(report).data[4].y) == [48.0, 60.0]
