"""Figures of the expert-parallelism chapter: the algorithm steps, traffic matrices, cost widgets."""

from __future__ import annotations

import torch

from moe_lib.viz import parallel as vp
from moe_lib.viz.widgets import static_slider


def test_algorithm_steps_follow_the_dispatch_plan():
    steps = vp.algorithm_rows()
    assert len(steps) == len(vp.STEPS) == 7
    route, plan, counts, received, experts, combine, total = steps
    assert [label for label, _ in route[0]] == ["a0 → e0, e3", "a1 → e1, e0", "a2 → e2, e3"]
    # a token goes once to each rank holding one of its experts: a1 (e1, e0) only to rank 0, once
    assert [label for label, _ in plan[0]] == ["→ rank 0: a0 [e0]", "→ rank 0: a1 [e1, e0]",
                                               "→ rank 1: a0 [e3]", "→ rank 1: a2 [e2, e3]"]
    assert [label for label, _ in counts[1]] == ["from rank 0: e2×1, e3×2", "from rank 1: e2×2, e3×2"]
    assert [src for _, src in received[0]] == [0, 0, 1, 1]                     # rank-major
    assert [label.split(":")[0] for label, _ in experts[1]] == ["e2"] * 3 + ["e3"] * 4   # expert-major
    pairs = sum(len(ks) for ex in vp.EXAMPLE for ks in ex)
    assert sum(len(rows) for rows in experts) == pairs
    assert len(combine[0]) == len(plan[0]) and total[1][1][0] == "b1 = part 0 + part 1"


def test_algorithm_figure_has_one_trace_per_rank_for_every_step():
    fig = static_slider(vp.algorithm_figure, "step", list(range(7)))
    assert len(fig.data) == 14 and len(fig.layout.sliders[0].steps) == 7
    assert fig.layout.sliders[0].steps[3].args[1]["title.text"] == vp.STEPS[3]


def test_traffic_heatmap_shows_the_matrix_and_node_boundaries():
    matrix = torch.tensor([[5, 1, 0, 2], [0, 3, 4, 1], [2, 2, 2, 2], [0, 0, 0, 9]])
    fig = vp.traffic_heatmap(matrix, ranks_per_node=2, title="tokens")
    assert [list(row) for row in fig.data[0].z] == matrix.double().tolist()
    assert len(fig.layout.shapes) == 2


def test_cost_figure_same_traces_for_every_setting_and_numbers_from_the_model():
    from moe_lib.parallel import cost

    for kwargs in (dict(), dict(nodes=4, max_nodes=8), dict(skew=1.0, redundant=1), dict(fp8=False)):
        fig = vp.make_cost_figure(**kwargs)
        assert len(fig.data) == 3
    fig = vp.make_cost_figure(max_nodes=2)
    c = cost.predict(max_nodes=2)
    assert list(fig.data[0].y) == [round(c.dispatch_ib_us, 1), round(c.combine_ib_us, 1)]
    assert f"dispatch {c.dispatch_us:,.0f} µs" in fig.layout.title.text


def test_v3_argument_figure_rises_with_k():
    fig = vp.v3_argument_figure(top_ks=(4, 8, 16))
    experts_per_node = list(fig.data[0].y)
    assert experts_per_node == sorted(experts_per_node) and experts_per_node[-1] == 4.0
