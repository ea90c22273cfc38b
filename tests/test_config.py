"""MoEConfig: every validation rule fails at construction with a message naming field, value, allowed."""

from __future__ import annotations

import re

import pytest

from moe_lib import MoEConfig
from moe_lib.presets import BOOK, DEEPSEEK_MOE_16B, DEEPSEEK_V2, DEEPSEEK_V3

SMALL = dict(d_model=16, d_expert=8, n_routed=8, top_k=2)

# (changes to SMALL, field, value as printed, what is allowed)
INVALID = [
    (dict(top_k=9), "top_k", "9", "at most n_routed=8"),
    (dict(n_groups=3), "n_groups", "3", "a divisor of n_routed=8"),
    (dict(n_groups=2, topk_groups=3), "topk_groups", "3", "at most n_groups=2"),
    (dict(n_groups=4, topk_groups=1, top_k=4), "topk_groups", "1",
     "at least top_k=4 experts (1 groups x 2 experts = 2)"),
    (dict(n_groups=8, topk_groups=4, top_k=2), "n_groups", "8", "at least 2 experts per group"),
    (dict(score_func="relu"), "score_func", "'relu'", "one of 'softmax', 'sigmoid'"),
    (dict(group_score="mean"), "group_score", "'mean'", "one of 'auto', 'top2_sum', 'max'"),
    (dict(dispatch="fast"), "dispatch", "'fast'", "one of 'loop', 'sorted', 'grouped'"),
    (dict(bias_update="epoch"), "bias_update", "'epoch'", "one of 'step', 'forward', 'none'"),
    (dict(aux_loss="z_loss"), "aux_loss", "'z_loss'",
     "one of 'none', 'expert', 'sequence', 'device'"),
    (dict(d_model=0), "d_model", "0", "a positive integer"),
    (dict(d_model=16.0), "d_model", "16.0", "a positive integer"),
    (dict(d_expert=-8), "d_expert", "-8", "a positive integer"),
    (dict(n_routed=0, top_k=0), "n_routed", "0", "a positive integer"),
    (dict(top_k=0), "top_k", "0", "a positive integer"),
    (dict(n_groups=0), "n_groups", "0", "a positive integer"),
    (dict(topk_groups=-1), "topk_groups", "-1", "a positive integer"),
    (dict(n_shared=-1), "n_shared", "-1", "an integer >= 0"),
    (dict(route_scale=0.0), "route_scale", "0.0", "a positive number"),
    (dict(route_scale=-2.5), "route_scale", "-2.5", "a positive number"),
    (dict(capacity_factor=0.0), "capacity_factor", "0.0", "None (dropless) or a positive number"),
    (dict(capacity_factor=-1.0), "capacity_factor", "-1.0", "None (dropless) or a positive number"),
    (dict(bias_update_speed=-1e-3), "bias_update_speed", "-0.001", "a number >= 0"),
    (dict(aux_loss_alpha=-0.1), "aux_loss_alpha", "-0.1", "a number >= 0"),
    (dict(aux_loss_devices=0), "aux_loss_devices", "0", "a positive integer"),
    (dict(aux_loss_devices=3), "aux_loss_devices", "3", "a divisor of n_routed=8"),
]


@pytest.mark.parametrize("changes, field, value, allowed", INVALID,
                         ids=[f"{c[1]}={c[2]}" for c in INVALID])
def test_invalid_config_names_field_value_and_allowed(changes, field, value, allowed):
    pattern = re.escape(f"MoEConfig.{field}={value} is invalid: expected ") + ".*" + re.escape(allowed)
    with pytest.raises(ValueError, match=pattern):
        MoEConfig(**{**SMALL, **changes})


def test_replace_validates_again():
    cfg = MoEConfig(**SMALL)
    assert cfg.replace(top_k=8).top_k == 8
    with pytest.raises(ValueError, match=re.escape("MoEConfig.top_k=9")):
        cfg.replace(top_k=9)


def test_config_is_frozen_and_round_trips_through_dict():
    cfg = MoEConfig(**SMALL, score_func="softmax", capacity_factor=1.25)
    assert MoEConfig(**cfg.to_dict()) == cfg
    with pytest.raises(AttributeError):
        cfg.top_k = 3  # type: ignore[misc]


@pytest.mark.parametrize("score_func, group_score, expected", [
    ("sigmoid", "auto", "top2_sum"), ("softmax", "auto", "max"),
    ("sigmoid", "max", "max"), ("softmax", "top2_sum", "top2_sum")])
def test_resolved_group_score(score_func, group_score, expected):
    cfg = MoEConfig(**SMALL, n_groups=2, topk_groups=1, score_func=score_func, group_score=group_score)
    assert cfg.resolved_group_score == expected


def test_max_group_score_allows_single_expert_groups():
    cfg = MoEConfig(**{**SMALL, "top_k": 2}, n_groups=8, topk_groups=4, group_score="max")
    assert cfg.n_routed // cfg.n_groups == 1


def test_published_presets_match_the_papers():
    assert (DEEPSEEK_V3.n_routed, DEEPSEEK_V3.top_k, DEEPSEEK_V3.n_groups, DEEPSEEK_V3.topk_groups,
            DEEPSEEK_V3.route_scale, DEEPSEEK_V3.score_func) == (256, 8, 8, 4, 2.5, "sigmoid")
    assert (DEEPSEEK_V2.n_routed, DEEPSEEK_V2.top_k, DEEPSEEK_V2.topk_groups, DEEPSEEK_V2.route_scale,
            DEEPSEEK_V2.norm_topk_prob, DEEPSEEK_V2.resolved_group_score) == (160, 6, 3, 16.0, False, "max")
    assert (DEEPSEEK_MOE_16B.n_routed, DEEPSEEK_MOE_16B.n_shared, DEEPSEEK_MOE_16B.top_k) == (64, 2, 6)
    assert (BOOK.d_model, BOOK.d_expert, BOOK.n_routed, BOOK.n_shared, BOOK.top_k) == (256, 128, 64, 1, 6)
