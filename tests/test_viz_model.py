"""moe_lib.viz.model: accounting shape vs a built model's parameters, cache rows, figures."""

from __future__ import annotations

import pytest
import torch
from model_utils import tiny_model_cfg

from moe_lib.model import KVCache, Transformer, cache_bytes_per_token
from moe_lib.presets import DEEPSEEK_V3_MODEL
from moe_lib.viz import model as vm
from moe_lib.viz.widgets import static_slider


@pytest.mark.parametrize("changes", [{}, {"q_lora_rank": 12}, {"n_dense_layers": 0, "mtp_depth": 1},
                                     {"n_dense_layers": 3, "q_lora_rank": 8}])
def test_accounting_shape_counts_the_built_model(changes):
    cfg = tiny_model_cfg(**changes)
    model = Transformer(cfg)
    counts = vm.component_params(model)
    assert sum(counts.values()) == sum(p.numel() for p in model.parameters())
    assert (counts["MTP modules"] > 0) == (cfg.mtp_depth > 0)
    shape = vm.model_shape(cfg).params()
    main = {k: v for k, v in counts.items() if k != "MTP modules"}
    assert sum(main.values()) == shape["total"]
    assert sum(vm.active_params(model, counts).values()) == shape["active"]
    assert counts["routed experts"] == shape["routed_experts"]


def test_component_names():
    model = Transformer(tiny_model_cfg())
    counts = vm.component_params(model)
    cfg = model.cfg
    assert counts["embedding"] == counts["output head"] == cfg.vocab_size * cfg.d_model
    assert counts["router"] == cfg.n_moe_layers * cfg.moe.n_routed * cfg.d_model
    assert counts["dense FFN"] == cfg.n_dense_layers * 3 * cfg.d_model * cfg.d_dense
    assert counts["norms"] == (2 * cfg.n_layers + 1) * cfg.d_model


def test_model_config_round_trip():
    cfg = vm.model_config(DEEPSEEK_V3_MODEL)
    assert vm.model_shape(cfg) == DEEPSEEK_V3_MODEL
    assert cfg.n_heads == 128 and cfg.kv_lora_rank == 512 and cfg.qk_rope_head_dim == 64


def test_cache_rows_match_a_real_cache():
    cfg = tiny_model_cfg()
    rows = vm.cache_rows(cfg, gqa_groups=(cfg.n_heads, 1), dtype=torch.float32)
    by_name = {r["attention"].split()[0]: r["bytes"] for r in rows}
    assert by_name["MLA"] == KVCache.for_config(cfg, 1).nbytes_per_token()
    assert rows[0]["bytes"] == rows[1]["bytes"] == cache_bytes_per_token(cfg)["mha"]
    assert by_name["MQA"] == cfg.n_layers * (cfg.qk_head_dim + cfg.v_head_dim) * 4


def test_cache_figure_has_fixed_traces_and_the_ratio_in_its_title():
    fig = static_slider(vm.make_cache_figure, "kv_lora_rank", [128, 512], active=1)
    assert len(fig.data) == 2 * 5 and len(fig.layout.sliders[0].steps) == 2
    assert "71.1x" in vm.make_cache_figure().layout.title.text


def test_params_and_scores_figures():
    fig = vm.params_figure({"a": 1000, "b": 3000}, {"a": 1000, "b": 500})
    assert [t.y for t in fig.data] == [(1.0, 1.0), (3.0, 0.5)]
    x = torch.randn(50)
    fig = vm.scores_figure({"same": (x, x), "other": (x, -x)}, max_points=20)
    assert len(fig.data) == 4 and len(fig.data[1].x) == 20
