"""Figure builders of chapter 2: trace counts, rounded data and the values they show."""

import math

import torch

from moe_lib.accounting import moe_params
from moe_lib.config import MoEConfig
from moe_lib.presets import DEEPSEEK_V3_MODEL
from moe_lib.router import route
from moe_lib.viz.segmentation import (
    BASE,
    combinations_figure,
    cost_rows,
    cost_table,
    group_routing_figure,
    groups_touched,
    groups_touched_figure,
    kept_groups,
    markdown_table,
    model_breakdown_figure,
    routing_map,
    segmentation_figure,
    segmentation_rows,
)
from moe_lib.viz.widgets import static_slider

GROUPED = MoEConfig(d_model=8, d_expert=4, n_routed=32, n_shared=0, top_k=4, n_groups=8,
                    topk_groups=2, score_func="sigmoid")


def _scores(n_tokens=50, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n_tokens, GROUPED.n_routed, generator=gen).sigmoid()


def test_segmentation_rows_keep_expert_parameters_and_count_combinations():
    rows = segmentation_rows([1, 2, 4], n_shared=1)
    expert = 3 * BASE["n_experts"] * BASE["d_model"] * BASE["d_ff"]
    assert {r["expert params"] for r in rows} == {expert}
    assert [r["combinations"] for r in rows] == [math.comb(15, 1), math.comb(31, 3), math.comb(63, 7)]
    assert [r["width"] for r in rows] == [4096, 2048, 1024]
    table = markdown_table(rows).splitlines()
    assert len(table) == 2 + 3 and "553,270,671" in table[-1]


def test_combinations_figure_is_log10_rounded():
    fig = combinations_figure([1, 4], n_experts=16, top_k=2)
    assert fig.data[0].y == (round(math.log10(120), 3), round(math.log10(4_426_165_368), 3))


def test_segmentation_figure_has_fixed_traces_and_clips_shared_experts():
    for m in (1, 2, 16):
        assert len(segmentation_figure(m=m, n_shared=1).data) == 4
    fig = segmentation_figure(m=1, n_shared=5)  # m*K - 1 = 1 shared at most
    assert "K_s = 1" in fig.layout.title.text
    grid = [v for row in fig.data[0].z for v in row]
    assert grid.count(2) == 1 and grid.count(1) == 1 and len(grid) == 16
    (row,) = segmentation_rows([1], n_shared=1)
    assert fig.data[1].y == (round(row["total"] / 1e6, 2), round(row["active"] / 1e6, 2))
    slider = static_slider(segmentation_figure, "m", [1, 2, 4], n_shared=1)
    assert len(slider.data) == 12 and len(slider.layout.sliders[0].steps) == 3


def test_routing_map_matches_the_router():
    scores = _scores()
    logits = torch.logit(scores)
    indices = route(logits, None, GROUPED).indices
    map_TE = routing_map(scores, GROUPED)
    assert torch.equal((map_TE == 2).sum(1), torch.full((50,), GROUPED.top_k))
    assert torch.equal(map_TE == 2, torch.zeros_like(map_TE, dtype=torch.bool).scatter_(1, indices, True))
    keep = kept_groups(scores, GROUPED)
    assert torch.equal(keep.sum(1), torch.full((50,), GROUPED.topk_groups))
    assert torch.equal(map_TE > 0, keep.repeat_interleave(4, dim=1))


def test_groups_touched_respects_the_limit():
    scores = _scores(200)
    assert groups_touched(scores, GROUPED).max() <= GROUPED.topk_groups
    free = groups_touched(scores, GROUPED.replace(topk_groups=8))
    assert free.max() > GROUPED.topk_groups  # without the limit some token spreads wider
    fig = groups_touched_figure(scores, GROUPED, GROUPED.replace(topk_groups=8))
    assert len(fig.data) == 2
    for trace in fig.data:
        assert math.isclose(sum(trace.y), 1.0, abs_tol=1e-3)
        assert all(round(v, 4) == v for v in trace.y)
    assert sum(fig.data[1].y[GROUPED.topk_groups:]) == 0


def test_group_routing_figure_draws_one_cell_per_token_and_expert():
    fig = group_routing_figure(_scores(6), GROUPED)
    assert len(fig.data) == 1 and len(fig.data[0].z) == 6 and len(fig.data[0].z[0]) == 32
    assert len(fig.layout.shapes) == GROUPED.n_groups - 1


def test_model_breakdown_figure_adds_up_to_the_model_counts():
    fig = model_breakdown_figure(DEEPSEEK_V3_MODEL)
    counts = DEEPSEEK_V3_MODEL.params()
    total = fig.data[0].y[0] + fig.data[1].y[0]
    assert math.isclose(total, counts["total"] / 1e9, abs_tol=0.02)
    routed_active = 58 * moe_params(DEEPSEEK_V3_MODEL.moe).active_routed / 1e9
    assert fig.data[0].y[1] == round(routed_active, 2)


def test_cost_rows_count_tokens_gemms_copies_and_intensity_by_hand():
    rows = cost_rows([1, 4], n_tokens=4096, d_model=64, d_ff=256, n_experts=8, top_k=2)
    one, four = rows
    assert (one["width"], four["width"]) == (256, 64)
    assert one["tokens per expert"] == four["tokens per expert"] == 4096 * 2 / 8
    assert (one["expert GEMMs"], four["expert GEMMs"]) == (3 * 8, 3 * 32)
    assert (one["token copies"], four["token copies"]) == (4096 * 2, 4096 * 8)
    n, h, i = 1024, 64, 64  # m = 4: 1024 tokens per expert, width 64, bf16
    assert four["flop per byte"] == 2 * n * h * i / (2 * (h * i + n * h + n * i))
    assert four["flop per byte"] < one["flop per byte"]
    table = cost_table(rows)
    assert table.count("\n") == 3 and "| 4 | 64 | 1024 |" in table


def test_cost_rows_with_a_shared_expert_route_fewer_copies():
    (row,) = cost_rows([2], n_tokens=100, n_shared=1, d_model=8, d_ff=16, n_experts=4, top_k=2)
    assert row["token copies"] == 100 * 3 and row["tokens per expert"] == 100 * 3 / 7
