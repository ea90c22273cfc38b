"""Parameter and FLOP accounting, fine-grained segmentation, the published V3 totals."""

from __future__ import annotations

import pytest

from moe_lib import DeepSeekMoE
from moe_lib.accounting import fine_grained, moe_flops_per_token, moe_params, n_combinations
from moe_lib.presets import DEEPSEEK_V3, DEEPSEEK_V3_MODEL

H, D_FF, N, K = 64, 256, 8, 2


@pytest.mark.parametrize("m, n_shared", [(m, s) for m in (1, 2, 4, 8) for s in (0, 1, 2) if s < m * K])
def test_fine_grained_keeps_total_and_activated_expert_params(m, n_shared):
    cfg = fine_grained(H, D_FF, N, K, m, n_shared=n_shared)
    assert cfg.d_expert == D_FF // m
    assert cfg.n_routed == m * N - n_shared and cfg.top_k == m * K - n_shared and cfg.n_shared == n_shared
    params = moe_params(cfg)
    assert params.routed + params.shared == N * 3 * H * D_FF
    assert params.active_routed + params.shared == K * 3 * H * D_FF
    assert params.router == cfg.n_routed * H


def test_fine_grained_passes_overrides_and_counts_combinations():
    cfg = fine_grained(H, D_FF, 16, 2, 4, score_func="softmax", dispatch="sorted")
    assert (cfg.n_routed, cfg.top_k, cfg.score_func, cfg.dispatch) == (64, 8, "softmax", "sorted")
    assert n_combinations(16, 2) == 120
    assert n_combinations(cfg.n_routed, cfg.top_k) == 4_426_165_368


@pytest.mark.parametrize("m, message", [(0, "m=0"), (-2, "m=-2"), (3, "m=3 is invalid: expected a positive "
                                                                   "divisor of d_ff=256")])
def test_fine_grained_rejects_bad_m(m, message):
    with pytest.raises(ValueError, match=message):
        fine_grained(H, D_FF, N, K, m)


def test_fine_grained_rejects_too_many_shared():
    with pytest.raises(ValueError, match=r"n_shared=4 is invalid: expected 0 <= n_shared < m\*top_k=4"):
        fine_grained(H, D_FF, N, K, 2, n_shared=4)


def test_moe_params_match_the_module():
    cfg = fine_grained(H, D_FF, N, K, 2, n_shared=1)
    layer = DeepSeekMoE(cfg)
    assert sum(p.numel() for p in layer.parameters()) == moe_params(cfg).total  # bias is a buffer
    params = moe_params(cfg)
    assert params.active == params.router + (cfg.top_k + cfg.n_shared) * 3 * H * cfg.d_expert


def test_flops_per_token():
    cfg = fine_grained(H, D_FF, N, K, 2)
    forward = moe_flops_per_token(cfg)
    assert forward == 2 * moe_params(cfg).active
    assert moe_flops_per_token(cfg, backward=True) == 3 * forward


def test_deepseek_v3_totals_match_the_paper():
    params = DEEPSEEK_V3_MODEL.params()
    assert abs(params["total"] / 671e9 - 1) < 0.005
    assert abs(params["active"] / 37e9 - 1) < 0.03
    assert params["routed_experts"] == 58 * 256 * 3 * 7168 * 2048
    layer = moe_params(DEEPSEEK_V3)
    assert layer.active_routed == 8 * 3 * 7168 * 2048 and layer.shared == 3 * 7168 * 2048
