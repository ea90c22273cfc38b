"""Figure builders of moe_lib.viz.balance: shapes, rounding, and the static-slider contract."""

import json

import plotly.io as pio
import torch

from moe_lib.synthetic import simulate_loss_free
from moe_lib.viz import balance as vb
from moe_lib.viz.widgets import static_slider


def _numbers(fig) -> list[float]:
    out = []

    def walk(v):
        if isinstance(v, float):
            out.append(v)
        elif isinstance(v, (list, tuple)):
            for item in v:
                walk(item)

    for trace in fig.to_dict()["data"]:
        for value in trace.values():
            walk(value)
    return out


def test_load_share_is_one_for_even_load():
    assert torch.allclose(vb.load_share(torch.full((3, 4), 5.0)), torch.ones(3, 4))


def test_load_heatmaps_subsample_and_round():
    load = torch.rand(10, 4, generator=torch.Generator().manual_seed(0)) * 7
    fig = vb.load_heatmaps({"a": load, "b": load}, every=5)
    assert len(fig.data) == 2
    assert len(fig.data[0].z) == 4 and len(fig.data[0].z[0]) == 2
    assert all(round(v, 2) == v for row in fig.data[0].z for v in row)


def test_dynamics_figure_is_reproducible_and_rounded():
    fig1 = vb.make_dynamics_figure(steps=10, n_tokens=128, n_experts=8, top_k=2)
    fig2 = vb.make_dynamics_figure(steps=10, n_tokens=128, n_experts=8, top_k=2)
    assert pio.to_json(fig1) == pio.to_json(fig2)
    assert len(fig1.data) == 4
    assert all(round(v, 4) == v for v in _numbers(fig1))


def test_make_dynamics_figure_works_with_static_slider():
    fig = static_slider(vb.make_dynamics_figure, "gamma", [0.001, 0.01], steps=5, n_tokens=64,
                        n_experts=8, top_k=2)
    assert len(fig.data) == 8 and len(fig.layout.sliders[0].steps) == 2
    json.loads(pio.to_json(fig))


def test_dynamics_figure_title_and_other_builders():
    dyn = simulate_loss_free(n_experts=8, top_k=2, steps=5, n_tokens=64)
    assert vb.dynamics_figure(dyn, "t").layout.title.text == "t"
    assert len(vb.tradeoff_figure([0, 0.1], [1.0, 1.1], [2.0, 0.5]).data) == 2
    assert len(vb.curves_figure({"x": torch.arange(6.0)}, "t", "y", every=2).data[0].y) == 3
    assert len(vb.gradient_bars(torch.ones(4), torch.zeros(4)).data) == 2
    changed = {"previous": torch.zeros(6, dtype=torch.bool), "current": torch.ones(6, dtype=torch.bool)}
    z = vb.future_dependence_figure(changed).data[0].z
    assert [list(row) for row in z] == [[0.0] * 6, [1.0] * 6]


def test_curves_figure_log_axis_keeps_small_values():
    fig = vb.curves_figure({"gap": torch.tensor([12.3456, 1.23456e-4, 2e-9])}, "t", "y", log_y=True)
    assert list(fig.data[0].y) == [12.3, 0.000123, 2e-09] and fig.layout.yaxis.type == "log"
    assert list(vb.curves_figure({"gap": torch.tensor([1.23456e-4])}, "t", "y").data[0].y) == [0.0]


def test_gradient_bars_draw_the_threshold_over_the_loads():
    fig = vb.gradient_bars(torch.tensor([1.5, 0.5]), torch.tensor([0.2, -0.2]),
                           threshold_E=torch.tensor([1.25, 1.125]))
    assert len(fig.data) == 3 and list(fig.data[1].y) == [1.25, 1.125] and fig.data[1].xaxis == "x"
