"""`MoEConfig`: every knob of a DeepSeek-style MoE layer, validated on construction.

Field names follow DeepSeek-V3's ``inference/model.py`` and the papers so that a reader can hold
paper, reference code and this library side by side.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace

SCORE_FUNCS = ("softmax", "sigmoid")
GROUP_SCORES = ("auto", "top2_sum", "max", "topk_sum")
ROUTE_LIMITS = ("none", "node", "device")
DISPATCHES = ("loop", "sorted", "grouped")
BIAS_UPDATES = ("step", "forward", "none")
BIAS_RULES = ("sign", "proportional")
AUX_LOSSES = ("none", "expert", "sequence", "batch", "device")


@dataclass(frozen=True)
class MoEConfig:
    """Configuration of one `DeepSeekMoE` layer.

    Architecture:
        d_model: hidden size H of the tokens entering the layer.
        d_expert: intermediate width I of ONE routed expert (V3: 2048).
        n_routed: number of routed experts E (V3: 256).
        n_shared: number of shared experts; they form one SwiGLU MLP of width n_shared * d_expert.
        top_k: routed experts activated per token K (V3: 8).
        n_groups / topk_groups: group-limited routing, keep the best `topk_groups` of `n_groups`
            expert groups per token (V3: 8 / 4; 1 / 1 disables it).
        score_func: "sigmoid" (V3) or "softmax" (DeepSeekMoE, V2).
        group_score: how a group is scored: "top2_sum" (V3), "max" (V2), "topk_sum" (the sum of its
            top K/M scores, M = topk_groups, as Megatron-LM does) or "auto" (top2_sum for sigmoid
            scores, max for softmax, as in the reference implementations).
        route_limit / limit_units / limit_max: "node" (V3's node-limited routing: the experts lie on
            `limit_units` nodes in contiguous blocks, and each token reaches at most M = `limit_max`
            of them, the nodes with the highest sums of their top K/M biased scores) or "device"
            (V2's device-limited routing: M devices, ranked by their highest biased score). The limit
            is a group limit whose groups are the nodes or devices that `moe_lib.parallel` places
            the experts on, so it replaces n_groups (which must then be 1). "none" disables it.
        norm_topk_prob: renormalise the K gathered weights to sum to one.
        route_scale: multiply the routed weights (V3: 2.5; the shared output is never scaled).

    Dispatch:
        dispatch: "loop" (readable reference), "sorted" (argsort + contiguous slices) or "grouped"
            (grouped GEMM; falls back to "sorted" when the installed torch has no grouped_mm).
        capacity_factor: None for dropless routing (V3); otherwise each expert keeps at most
            ceil(capacity_factor * T * K / E) tokens, earlier tokens first.

    Balancing:
        bias_update_speed: gamma of the loss-free bias update b += gamma * sign(mean(c) - c).
        bias_update: "step" (accumulate loads, apply with `update_bias` once per optimizer step, as
            DeepSeek-V3), "forward" (apply after every training forward, for demos) or "none".
        bias_update_rule: "sign" (Wang et al. Alg. 1, DeepSeek-V3) or "proportional" (the variant
            of Wang et al.'s ablation: b += gamma * (mean(c) - c) on the RAW token counts c of the
            update, so gamma's effect scales with the tokens counted per update).
        aux_loss: "none", "expert" (DeepSeekMoE/Switch), "sequence" (V3 Eqs. 17-20), "batch" (V3
            Sec. 4.5.3: the sequence-wise loss over the whole batch; the same value as "expert") or
            "device" (DeepSeekMoE Sec. 3.3, reused by V2). Every one counts f_i on the top-K of the
            unbiased scores over all experts (V3 Eq. 18), whatever the bias and group limit select.
        aux_loss_alpha: weight alpha of the auxiliary loss.
        aux_loss_devices: number of devices D for the device-level loss (experts split evenly).
        aux_loss_inject: attach the loss's gradient to the layer output (DeepSeekMoE's trick) so a
            plain `loss.backward()` includes it; otherwise read `layer.aux_loss` and add it yourself.
    """

    d_model: int = 256
    d_expert: int = 128
    n_routed: int = 64
    n_shared: int = 1
    top_k: int = 6
    n_groups: int = 1
    topk_groups: int = 1
    score_func: str = "sigmoid"
    group_score: str = "auto"
    route_limit: str = "none"
    limit_units: int = 1
    limit_max: int = 1
    norm_topk_prob: bool = True
    route_scale: float = 1.0
    dispatch: str = "grouped"
    capacity_factor: float | None = None
    bias_update_speed: float = 1e-3
    bias_update: str = "step"
    bias_update_rule: str = "sign"
    aux_loss: str = "none"
    aux_loss_alpha: float = 0.0
    aux_loss_devices: int = 1
    aux_loss_inject: bool = True

    def __post_init__(self) -> None:
        for name in ("d_model", "d_expert", "n_routed", "top_k", "n_groups", "topk_groups",
                     "aux_loss_devices"):
            _check(_is_int(getattr(self, name)) and getattr(self, name) >= 1, name,
                   getattr(self, name), "a positive integer")
        _check(_is_int(self.n_shared) and self.n_shared >= 0, "n_shared", self.n_shared,
               "an integer >= 0")
        for name in ("route_scale", "bias_update_speed", "aux_loss_alpha"):
            _check(_is_real(getattr(self, name)), name, getattr(self, name), "a finite real number")
        _check(self.capacity_factor is None or _is_real(self.capacity_factor), "capacity_factor",
               self.capacity_factor, "None (dropless) or a positive number")
        for name in ("norm_topk_prob", "aux_loss_inject"):
            _check(isinstance(getattr(self, name), bool), name, getattr(self, name), "True or False")
        _check(self.top_k <= self.n_routed, "top_k", self.top_k,
               f"at most n_routed={self.n_routed}")
        _check(self.n_routed % self.n_groups == 0, "n_groups", self.n_groups,
               f"a divisor of n_routed={self.n_routed}")
        _check(self.topk_groups <= self.n_groups, "topk_groups", self.topk_groups,
               f"at most n_groups={self.n_groups}")
        kept = self.topk_groups * self.n_routed // self.n_groups
        _check(kept >= self.top_k, "topk_groups", self.topk_groups,
               f"a value whose kept groups hold at least top_k={self.top_k} experts "
               f"({self.topk_groups} groups x {self.n_routed // self.n_groups} experts = {kept})")
        _choice(self.score_func, "score_func", SCORE_FUNCS)
        _choice(self.group_score, "group_score", GROUP_SCORES)
        if self.resolved_group_score == "top2_sum" and self.topk_groups < self.n_groups:
            # the group limit is active: each group is scored by its two best experts
            _check(self.n_routed // self.n_groups >= 2, "n_groups", self.n_groups,
                   f"at most n_routed/2={self.n_routed // 2} groups, so that each group holds the 2 "
                   f"experts the top-2-sum group score needs (or topk_groups=n_groups, no group limit)")
        if self.resolved_group_score == "topk_sum" and self.topk_groups < self.n_groups:
            _check(self.topk_groups <= self.top_k, "topk_groups", self.topk_groups,
                   f"at most top_k={self.top_k}, so that each group's top K/M sum has a term")
        self._check_route_limit()
        _choice(self.dispatch, "dispatch", DISPATCHES)
        _choice(self.bias_update, "bias_update", BIAS_UPDATES)
        _choice(self.bias_update_rule, "bias_update_rule", BIAS_RULES)
        _choice(self.aux_loss, "aux_loss", AUX_LOSSES)
        _check(self.route_scale > 0, "route_scale", self.route_scale, "a positive number")
        _check(self.capacity_factor is None or self.capacity_factor > 0, "capacity_factor",
               self.capacity_factor, "None (dropless) or a positive number")
        _check(self.bias_update_speed >= 0, "bias_update_speed", self.bias_update_speed,
               "a number >= 0")
        _check(self.aux_loss_alpha >= 0, "aux_loss_alpha", self.aux_loss_alpha, "a number >= 0")
        _check(self.n_routed % self.aux_loss_devices == 0, "aux_loss_devices",
               self.aux_loss_devices, f"a divisor of n_routed={self.n_routed}")

    def _check_route_limit(self) -> None:
        _choice(self.route_limit, "route_limit", ROUTE_LIMITS)
        for name in ("limit_units", "limit_max"):
            _check(_is_int(getattr(self, name)) and getattr(self, name) >= 1, name,
                   getattr(self, name), "a positive integer")
        if self.route_limit == "none":
            return
        _check(self.n_groups == 1, "n_groups", self.n_groups,
               f"1 with route_limit={self.route_limit!r}: the node/device limit is itself the group "
               "limit, its groups are the nodes or devices")
        _check(self.n_routed % self.limit_units == 0, "limit_units", self.limit_units,
               f"a divisor of n_routed={self.n_routed}")
        _check(self.limit_max <= self.limit_units, "limit_max", self.limit_max,
               f"at most limit_units={self.limit_units}")
        per_unit = self.n_routed // self.limit_units
        _check(self.limit_max * per_unit >= self.top_k, "limit_max", self.limit_max,
               f"a value whose units hold at least top_k={self.top_k} experts "
               f"({self.limit_max} x {per_unit} experts = {self.limit_max * per_unit})")
        if self.route_limit == "node":
            _check(self.limit_max <= self.top_k, "limit_max", self.limit_max,
                   f"at most top_k={self.top_k}, so that each node's top K/M sum has a term")

    @property
    def selection_groups(self) -> tuple[int, int, str]:
        """(groups, groups kept per token, group score) that `router.select_experts` applies: the
        nodes or devices of `route_limit` when it is set, the expert groups otherwise."""
        if self.route_limit == "node":
            return self.limit_units, self.limit_max, "topk_sum"
        if self.route_limit == "device":
            return self.limit_units, self.limit_max, "max"
        return self.n_groups, self.topk_groups, self.resolved_group_score

    @property
    def resolved_group_score(self) -> str:
        """The group score actually used ("auto" resolved by the score function)."""
        if self.group_score != "auto":
            return self.group_score
        return "top2_sum" if self.score_func == "sigmoid" else "max"

    def replace(self, **changes) -> MoEConfig:
        """A copy with some fields changed (validated again)."""
        return replace(self, **changes)

    def to_dict(self) -> dict:
        return asdict(self)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_real(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check(ok: bool, field: str, value, allowed: str) -> None:
    if not ok:
        raise ValueError(f"MoEConfig.{field}={value!r} is invalid: expected {allowed}.")


def _choice(value, field: str, allowed: tuple[str, ...]) -> None:
    _check(value in allowed, field, value, "one of " + ", ".join(repr(a) for a in allowed))
