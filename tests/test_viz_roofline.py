"""moe_lib.viz.roofline: the roofline figures follow moe_lib.gpu.roofline."""

from __future__ import annotations

import pytest

from moe_lib.gpu import roofline
from moe_lib.gpu.roofline import DATA_SHEET
from moe_lib.presets import DEEPSEEK_V3
from moe_lib.viz import roofline as vr
from moe_lib.viz.widgets import static_slider


def test_attainable_throughput_is_capped_by_the_peak_and_rises_with_tokens():
    peak, bandwidth = DATA_SHEET["H100 SXM"]
    tflops = vr.attainable_tflops(DEEPSEEK_V3, [1, 128, 1024, 8430, 100_000], peak, bandwidth)
    assert tflops == sorted(tflops) and max(tflops) == pytest.approx(989, rel=1e-3)
    assert tflops[0] == pytest.approx(roofline.expert_flops(DEEPSEEK_V3, 1)
                                      / roofline.expert_bytes(DEEPSEEK_V3, 1) * bandwidth / 1e12)


def test_roofline_figure_marks_each_crossover():
    fig = vr.roofline_figure(DATA_SHEET)
    assert [t.name for t in fig.data] == ["H100 SXM: T* = 8,430", "H200 SXM: T* = 5,884"]
    assert len(fig.layout.shapes) == 2


def test_explorer_regimes_and_static_twin():
    decode = vr.make_explorer_figure(tokens=1)
    assert "bandwidth-bound" in decode.layout.title.text and "8 of 256" in decode.layout.title.text
    assert "compute-bound" in vr.make_explorer_figure(tokens=16384).layout.title.text
    ep = vr.make_explorer_figure(tokens=256, ep_degree=64)
    assert "T* = 164" in ep.layout.title.text and "512.0 tokens per expert" in ep.layout.title.text
    twin = static_slider(vr.make_explorer_figure, "ep_degree", [1, 8, 64], tokens=256)
    assert len(twin.layout.sliders[0].steps) == 3
