"""MoEConfig: every validation rule fails at construction with a message naming field, value, allowed."""

from __future__ import annotations

import math
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
    (dict(n_groups=8, topk_groups=4, top_k=2), "n_groups", "8",
     "at most n_routed/2=4 groups, so that each group holds the 2 experts"),
    (dict(score_func="relu"), "score_func", "'relu'", "one of 'softmax', 'sigmoid'"),
    (dict(group_score="mean"), "group_score", "'mean'", "one of 'auto', 'top2_sum', 'max'"),
    (dict(dispatch="fast"), "dispatch", "'fast'", "one of 'loop', 'sorted', 'grouped'"),
    (dict(bias_update="epoch"), "bias_update", "'epoch'", "one of 'step', 'forward', 'none'"),
    (dict(aux_loss="z_loss"), "aux_loss", "'z_loss'",
     "one of 'none', 'expert', 'sequence', 'batch', 'device'"),
    (dict(d_model=True), "d_model", "True", "a positive integer"),
    (dict(route_scale=float("inf")), "route_scale", "inf", "a finite real number"),
    (dict(route_scale="2.5"), "route_scale", "'2.5'", "a finite real number"),
    (dict(aux_loss_alpha=float("nan")), "aux_loss_alpha", "nan", "a finite real number"),
    (dict(capacity_factor="1.0"), "capacity_factor", "'1.0'", "None (dropless) or a positive number"),
    (dict(norm_topk_prob=1), "norm_topk_prob", "1", "True or False"),
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


@pytest.mark.parametrize("changes", [
    dict(n_routed=1, top_k=1),                           # one expert, sigmoid scores, no groups
    dict(n_routed=4, top_k=2, n_groups=4, topk_groups=4),  # groups of one expert, limit inactive
    dict(n_routed=8, top_k=2, n_groups=8, topk_groups=8),
])
def test_top2_sum_needs_two_experts_per_group_only_when_the_group_limit_is_active(changes):
    cfg = MoEConfig(**{**SMALL, **changes})
    assert cfg.resolved_group_score == "top2_sum"


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


# --- property-based: random valid and invalid configurations (hypothesis) ---------------------------

INT_FIELDS = ("d_model", "d_expert", "n_routed", "top_k", "n_groups", "topk_groups", "aux_loss_devices",
              "limit_units", "limit_max")
ENUMS = {"score_func": ("softmax", "sigmoid"), "group_score": ("auto", "top2_sum", "max", "topk_sum"),
         "route_limit": ("none", "node", "device"),
         "dispatch": ("loop", "sorted", "grouped"), "bias_update": ("step", "forward", "none"),
         "bias_update_rule": ("sign", "proportional"),
         "aux_loss": ("none", "expert", "sequence", "batch", "device")}


def _int(value) -> bool:
    return type(value) is int


def _real(value) -> bool:
    return type(value) in (int, float) and math.isfinite(value)


def invalid_fields(kw: dict) -> set[str]:
    """The fields an independent reading of the rules finds invalid (relations only among valid fields)."""
    bad = {f for f in INT_FIELDS if not (_int(kw[f]) and kw[f] >= 1)}
    bad |= {f for f, allowed in ENUMS.items() if kw[f] not in allowed}
    if not (_int(kw["n_shared"]) and kw["n_shared"] >= 0):
        bad.add("n_shared")
    if not (_real(kw["route_scale"]) and kw["route_scale"] > 0):
        bad.add("route_scale")
    for f in ("bias_update_speed", "aux_loss_alpha"):
        if not (_real(kw[f]) and kw[f] >= 0):
            bad.add(f)
    if not (kw["capacity_factor"] is None or (_real(kw["capacity_factor"]) and kw["capacity_factor"] > 0)):
        bad.add("capacity_factor")
    for f in ("norm_topk_prob", "aux_loss_inject"):
        if type(kw[f]) is not bool:
            bad.add(f)
    e, k, g, kg = kw["n_routed"], kw["top_k"], kw["n_groups"], kw["topk_groups"]
    if bad & {"n_routed", "top_k", "n_groups", "topk_groups"}:
        return bad
    if k > e:
        bad.add("top_k")
    if e % g:
        bad.add("n_groups")
    elif kg > g or kg * (e // g) < k:
        bad.add("topk_groups")
    elif "score_func" not in bad and "group_score" not in bad:
        top2 = (kw["group_score"] == "top2_sum"
                or (kw["group_score"] == "auto" and kw["score_func"] == "sigmoid"))
        if top2 and kg < g and e // g < 2:
            bad.add("n_groups")
        if kw["group_score"] == "topk_sum" and kg < g and kg > k:
            bad.add("topk_groups")
    bad |= route_limit_invalid(kw)
    if "aux_loss_devices" not in bad and e % kw["aux_loss_devices"]:
        bad.add("aux_loss_devices")
    return bad


def route_limit_invalid(kw: dict) -> set[str]:
    """Node/device-limited routing: groups are the units, so n_groups must be 1; M units hold K experts."""
    if kw["route_limit"] not in ("node", "device") or {"limit_units", "limit_max"} & invalid_ints(kw):
        return set()
    e, k, units, m = kw["n_routed"], kw["top_k"], kw["limit_units"], kw["limit_max"]
    if kw["n_groups"] != 1:
        return {"n_groups"}
    if e % units:
        return {"limit_units"}
    if m > units or m * (e // units) < k or (kw["route_limit"] == "node" and m > k):
        return {"limit_max"}
    return set()


def invalid_ints(kw: dict) -> set[str]:
    return {f for f in INT_FIELDS if not (_int(kw[f]) and kw[f] >= 1)}


def config_kwargs(valid_only: bool = False):
    """A strategy of MoEConfig keyword arguments, mostly small and often invalid."""
    from hypothesis import strategies as st

    def pick(good, bad):
        return st.sampled_from(good) if valid_only else st.sampled_from(good + bad)

    def ints(lo, hi):
        return st.integers(lo, hi) if valid_only else st.one_of(st.integers(lo - 2, hi), st.just(True),
                                                                  st.just(float(lo)))
    return st.fixed_dictionaries({
        "d_model": pick([4, 8, 12], [0, -4, 8.0, True]), "d_expert": pick([2, 4, 6], [0, -2]),
        "n_routed": ints(1, 12), "top_k": ints(1, 6), "n_groups": ints(1, 6), "topk_groups": ints(1, 6),
        "n_shared": pick([0, 1, 2], [-1, 1.5]),
        "score_func": pick(["sigmoid", "softmax"], ["relu"]),
        "group_score": pick(["auto", "top2_sum", "max", "topk_sum"], ["mean"]),
        "route_limit": pick(["none"] * 6 + ["node", "device"], ["rack"]),
        "limit_units": ints(1, 4), "limit_max": ints(1, 3),
        "norm_topk_prob": pick([True, False], [1, None]),
        "route_scale": pick([1.0, 2.5, 16], [0.0, -1.0, float("inf"), float("nan"), "2.5"]),
        "capacity_factor": pick([None, 0.5, 1.25, 4], [0.0, -1.0, "1"]),
        "dispatch": pick(["loop", "sorted", "grouped"], ["fast"]),
        "bias_update_speed": pick([0.0, 1e-3, 0.5], [-1e-3]),
        "bias_update": pick(["step", "forward", "none"], ["epoch"]),
        "bias_update_rule": pick(["sign", "proportional"], ["linear"]),
        "aux_loss": pick(["none", "expert", "sequence", "batch", "device"], ["z_loss"]),
        "aux_loss_alpha": pick([0.0, 0.1], [-0.1]),
        "aux_loss_devices": ints(1, 4),
        "aux_loss_inject": pick([True, False], [0]),
    })


def test_random_configs_are_accepted_exactly_when_valid_and_errors_name_an_invalid_field():
    from hypothesis import given, settings
    from hypothesis import strategies as st

    @settings(max_examples=600, deadline=None, derandomize=True)
    @given(st.one_of(config_kwargs(valid_only=True), config_kwargs()))
    def check(kw):
        bad = invalid_fields(kw)
        if not bad:
            assert MoEConfig(**kw).to_dict() == kw
            return
        with pytest.raises(ValueError) as err:
            MoEConfig(**kw)
        match = re.fullmatch(r"MoEConfig\.(\w+)=(.*) is invalid: expected (.+)\.", str(err.value), re.S)
        assert match, str(err.value)
        field, value = match.group(1), match.group(2)
        assert field in bad, (field, bad)
        assert value == repr(kw[field])

    check()


def test_config_strategy_explores_valid_and_invalid_configurations():
    from hypothesis import given, settings

    seen = {"valid": 0, "invalid": 0}

    @settings(max_examples=300, deadline=None, derandomize=True)
    @given(config_kwargs(valid_only=True))
    def count(kw):
        seen["invalid" if invalid_fields(kw) else "valid"] += 1

    count()
    assert seen["valid"] >= 30 and seen["invalid"] >= 30, seen
