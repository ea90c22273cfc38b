"""moe_lib.gpu.roofline against hand computation at DeepSeek-V3's shape."""

from __future__ import annotations

import math

import pytest
import torch

from moe_lib.gpu import roofline
from moe_lib.presets import DEEPSEEK_V3

H, W = 7168, 2048  # hidden size, expert width


def test_flops_and_bytes_at_one_token():
    assert roofline.expert_flops(DEEPSEEK_V3, 1) == 2 * 3 * 9 * H * W == 792_723_456
    assert roofline.expert_flops(DEEPSEEK_V3, 10, backward=True) == 3 * 10 * 792_723_456
    # one token: its 8 routed experts + the shared one, then x read and y written
    assert roofline.expert_bytes(DEEPSEEK_V3, 1) == 2 * (9 * 3 * H * W + 2 * H)
    assert roofline.expert_bytes(DEEPSEEK_V3, 1, backward=True) == 2 * (3 * 9 * 3 * H * W + 5 * H)
    all_257 = roofline.expert_bytes(DEEPSEEK_V3, 0, experts_hit=256)
    assert all_257 == 2 * 257 * 3 * H * W and round(all_257 / 1e9, 1) == 22.6


def test_expected_experts_hit_matches_uniform_routing():
    assert roofline.expected_experts_hit(1, 256, 8) == pytest.approx(8)
    assert roofline.expected_experts_hit(16384, 256, 8) == pytest.approx(256)
    generator = torch.Generator().manual_seed(0)
    for n_tokens in (4, 16, 64):
        hits = [torch.rand(n_tokens, 256, generator=generator).topk(8, dim=-1).indices.unique().numel()
                for _ in range(200)]
        assert sum(hits) / len(hits) == pytest.approx(roofline.expected_experts_hit(n_tokens, 256, 8),
                                                      rel=0.02)


def test_crossover_by_hand():
    peak, bandwidth = 989e12, 3.35e12          # H100 SXM data sheet
    t_star = roofline.crossover_tokens(DEEPSEEK_V3, peak, bandwidth)
    assert t_star == pytest.approx(257 / 9 * peak / bandwidth) and round(t_star) == 8430
    # at T*, the matmul time equals the time to read all 257 experts
    weights = 2 * 257 * 3 * H * W
    assert roofline.expert_flops(DEEPSEEK_V3, t_star) / peak == pytest.approx(weights / bandwidth)
    ep64 = roofline.crossover_tokens(DEEPSEEK_V3, peak, bandwidth, ep_degree=64)
    assert ep64 == pytest.approx((4 + 1) / 9 * peak / bandwidth) and round(ep64) == 164
    assert roofline.tokens_per_expert(DEEPSEEK_V3, 4096, ep_degree=64) == 64 * 4096 * 8 / 256


def test_time_bound_switches_regime_at_the_crossover():
    peak, bandwidth = 800e12, 3.0e12
    t_star = roofline.crossover_tokens(DEEPSEEK_V3, peak, bandwidth)
    for n_tokens, compute_bound in [(1, False), (1024, False), (4 * t_star, True)]:
        flops = roofline.expert_flops(DEEPSEEK_V3, n_tokens)
        n_bytes = roofline.expert_bytes(DEEPSEEK_V3, n_tokens)
        bound = roofline.time_bound(flops, n_bytes, peak, bandwidth)
        assert bound == max(flops / peak, n_bytes / bandwidth)
        assert math.isclose(bound, flops / peak) == compute_bound
    assert roofline.ep_bound(DEEPSEEK_V3, 1, peak, bandwidth) == pytest.approx(
        roofline.expert_bytes(DEEPSEEK_V3, 1) / bandwidth)
    assert roofline.ep_bound(DEEPSEEK_V3, 64, peak, bandwidth, ep_degree=64) < roofline.ep_bound(
        DEEPSEEK_V3, 64, peak, bandwidth)
