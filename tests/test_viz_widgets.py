"""Tests for moe_lib.viz.widgets: the live ipywidgets panel and its static plotly twin."""

from __future__ import annotations

import ipywidgets as widgets
import plotly.graph_objects as go
import pytest

from moe_lib.viz import RENDERER, setup_notebook
from moe_lib.viz.widgets import live, static_slider


def bars(k: int, c: int = 1) -> go.Figure:
    return go.Figure([go.Bar(x=[0, 1], y=[k, c]), go.Scatter(x=[0, 1], y=[c, k])],
                     layout={"title": f"k={k}"})


def test_static_slider_one_step_per_value_shows_that_values_traces():
    fig = static_slider(bars, "k", [1, 2, 3], c=5)
    assert len(fig.data) == 6
    assert [t.visible for t in fig.data] == [True, True, False, False, False, False]
    step = fig.layout.sliders[0].steps[2]
    assert step.label == "3"
    assert step.args[0]["visible"] == [False, False, False, False, True, True]
    assert step.args[1] == {"title.text": "k=3"}
    assert list(fig.data[4].y) == [3, 5]


def test_static_slider_rejects_empty_values_and_changing_trace_counts():
    with pytest.raises(ValueError, match="at least one value"):
        static_slider(bars, "k", [])
    with pytest.raises(ValueError, match="same number of traces"):
        static_slider(lambda k: go.Figure([go.Bar(y=[1])] * k), "k", [1, 2])


def test_live_draws_into_its_output_widget_and_redraws_on_change():
    assert setup_notebook() == RENDERER
    slider = widgets.IntSlider(value=1, min=1, max=5)
    panel = live(bars, k=slider)
    output = panel.children[1]
    assert len(output.outputs) == 1
    bundle = output.outputs[0]["data"]
    assert set(bundle) == {"application/vnd.plotly.v1+json", "text/html"}
    assert bundle["application/vnd.plotly.v1+json"]["data"][0]["y"] == [1, 1]
    assert "cdn.plot.ly" not in bundle["text/html"]
    slider.value = 4
    assert len(output.outputs) == 1
    assert output.outputs[0]["data"]["application/vnd.plotly.v1+json"]["data"][0]["y"] == [4, 1]


def test_live_shows_every_control_label_in_full():
    slider = widgets.FloatLogSlider(value=1.0, base=2, min=-1, max=1, description="temperature")
    box = widgets.Checkbox(value=True, description="normalise")
    live(lambda k, flag: bars(int(k)), k=slider, flag=box)
    assert slider.style.description_width == box.style.description_width == "initial"
