"""`MoEConfig`: every knob of a DeepSeek-style MoE layer, validated on construction.

Field names follow DeepSeek-V3's ``inference/model.py`` and the papers so that a reader can hold
paper, reference code and this library side by side.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

SCORE_FUNCS = ("softmax", "sigmoid")
GROUP_SCORES = ("auto", "top2_sum", "max")
DISPATCHES = ("loop", "sorted", "grouped")
BIAS_UPDATES = ("step", "forward", "none")
AUX_LOSSES = ("none", "expert", "sequence", "device")


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
        group_score: how a group is scored: "top2_sum" (V3), "max" (V2) or "auto" (top2_sum for
            sigmoid scores, max for softmax, as in the reference implementations).
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
        aux_loss: "none", "expert" (DeepSeekMoE/Switch), "sequence" (V3) or "device" (V2).
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
    norm_topk_prob: bool = True
    route_scale: float = 1.0
    dispatch: str = "grouped"
    capacity_factor: float | None = None
    bias_update_speed: float = 1e-3
    bias_update: str = "step"
    aux_loss: str = "none"
    aux_loss_alpha: float = 0.0
    aux_loss_devices: int = 1
    aux_loss_inject: bool = True

    def __post_init__(self) -> None:
        for name in ("d_model", "d_expert", "n_routed", "top_k", "n_groups", "topk_groups",
                     "aux_loss_devices"):
            _check(isinstance(getattr(self, name), int) and getattr(self, name) >= 1, name,
                   getattr(self, name), "a positive integer")
        _check(isinstance(self.n_shared, int) and self.n_shared >= 0, "n_shared", self.n_shared,
               "an integer >= 0")
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
        if self.resolved_group_score == "top2_sum":
            _check(self.n_routed // self.n_groups >= 2, "n_groups", self.n_groups,
                   "a value leaving at least 2 experts per group for the top-2-sum group score")
        _choice(self.dispatch, "dispatch", DISPATCHES)
        _choice(self.bias_update, "bias_update", BIAS_UPDATES)
        _choice(self.aux_loss, "aux_loss", AUX_LOSSES)
        _check(self.route_scale > 0, "route_scale", self.route_scale, "a positive number")
        _check(self.capacity_factor is None or self.capacity_factor > 0, "capacity_factor",
               self.capacity_factor, "None (dropless) or a positive number")
        _check(self.bias_update_speed >= 0, "bias_update_speed", self.bias_update_speed,
               "a number >= 0")
        _check(self.aux_loss_alpha >= 0, "aux_loss_alpha", self.aux_loss_alpha, "a number >= 0")
        _check(self.n_routed % self.aux_loss_devices == 0, "aux_loss_devices",
               self.aux_loss_devices, f"a divisor of n_routed={self.n_routed}")

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


def _check(ok: bool, field: str, value, allowed: str) -> None:
    if not ok:
        raise ValueError(f"MoEConfig.{field}={value!r} is invalid: expected {allowed}.")


def _choice(value, field: str, allowed: tuple[str, ...]) -> None:
    _check(value in allowed, field, value, "one of " + ", ".join(repr(a) for a in allowed))
