"""Interoperability with the DeepSeek MoE layers of Hugging Face transformers (v5).

`from_transformers` turns a transformers `DeepseekV3MoE` or `DeepseekV2Moe` into a `DeepSeekMoE`
with the same weights; `to_transformers` goes back. Both sides store the routed experts in the
transformers v5 layout, so the parameters copy one to one under the same names:

    gate.weight                           [E, H]
    experts.gate_up_proj                  [E, 2I, H]   (gate rows first)
    experts.down_proj                     [E, H, I]
    shared_experts.gate_proj.weight       [n_shared * I, H]   (likewise up_proj)
    shared_experts.down_proj.weight       [H, n_shared * I]

V3's correction bias `gate.e_score_correction_bias` [E] becomes our fp32 buffer
`gate.correction_bias`; V2 has none (ours starts at zero and, by default, is not updated).

The score function decides which transformers class `to_transformers` builds:

- sigmoid -> `DeepseekV3MoE`: top-2-sum group score, optional renormalisation, correction bias;
- softmax -> `DeepseekV2Moe`: max group score ("group_limited_greedy", or "greedy" without
  group limiting), no renormalisation, no correction bias.

A layer outside these raises `ValueError` (softmax with `norm_topk_prob` or a non-zero bias, a group
score the class does not use, expert capacity: transformers' layers are dropless). Dispatch and
balancing settings have no transformers counterpart: they do not change the output and are not
carried over. transformers is an optional dependency (`pip install moe_lib[interop]`), imported
inside the functions.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from ..config import MoEConfig
from ..moe import DeepSeekMoE

_WEIGHTS = ("gate.weight", "experts.gate_up_proj", "experts.down_proj")
_SHARED_WEIGHTS = ("shared_experts.gate_proj.weight", "shared_experts.up_proj.weight",
                   "shared_experts.down_proj.weight")
_ARCH_FIELDS = ("d_model", "d_expert", "n_routed", "n_shared", "top_k", "n_groups", "topk_groups",
                "score_func", "group_score", "norm_topk_prob", "route_scale")
_V2_TOPK_METHODS = ("greedy", "group_limited_greedy")


def from_transformers(module: nn.Module, **overrides) -> DeepSeekMoE:
    """A `DeepSeekMoE` computing what the transformers `module` computes, with copied weights.

    module: a `DeepseekV3MoE` or `DeepseekV2Moe`; forward [..., H] -> [..., H] on both sides.
    overrides: `MoEConfig` fields that transformers does not describe (dispatch, capacity,
        balancing), e.g. `dispatch="loop"`. The architecture fields come from `module.config`.
    Parameters keep their dtype and device; the correction bias is copied into an fp32 buffer.
    A V2 layer gets `bias_update="none"` unless overridden (V2 routes without a bias).
    The returned layer is in the same train/eval mode as `module`.
    """
    arch = _arch_from_transformers(module)
    _check_overrides(overrides)
    defaults = {"bias_update": "none"} if arch["score_func"] == "softmax" else {}
    cfg = MoEConfig(**arch, **{**defaults, **overrides})
    with torch.device(module.gate.weight.device):
        moe = DeepSeekMoE(cfg)
    _copy_weights(module, moe, cfg.n_shared)
    bias_E = getattr(module.gate, "e_score_correction_bias", None)
    if bias_E is not None:
        moe.gate.correction_bias.copy_(bias_E.detach())
    return moe.train(module.training)


def to_transformers(moe: DeepSeekMoE) -> nn.Module:
    """The transformers layer (`DeepseekV3MoE` for sigmoid, `DeepseekV2Moe` for softmax) of `moe`.

    Raises ValueError when transformers cannot express the layer (see the module docstring).
    Parameters keep their dtype and device; V3's correction bias stays fp32. The experts run with
    transformers' "eager" implementation; change `module.config._experts_implementation` to taste.
    """
    _check_expressible(moe)
    hf = _build_transformers(moe.cfg)
    hf.to(device=moe.gate.weight.device, dtype=moe.experts.gate_up_proj.dtype)
    _copy_weights(moe, hf, moe.cfg.n_shared)
    if moe.cfg.score_func == "sigmoid":
        hf.gate.e_score_correction_bias = moe.gate.correction_bias.detach().clone()
    return hf.train(moe.training)


def _arch_from_transformers(module: nn.Module) -> dict:
    from transformers.models.deepseek_v2.modeling_deepseek_v2 import DeepseekV2Moe
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3MoE

    if isinstance(module, DeepseekV3MoE):
        return _v3_arch(module.config)
    if isinstance(module, DeepseekV2Moe):
        return _v2_arch(module.config)
    raise TypeError(f"from_transformers expects a transformers DeepseekV3MoE or DeepseekV2Moe, "
                    f"got {type(module).__name__}")


def _common_arch(config) -> dict:
    """The fields V2 and V3 configs share."""
    if config.hidden_act != "silu":
        raise ValueError(f"transformers config hidden_act={config.hidden_act!r} is not supported: "
                         f"moe_lib experts are SwiGLU, expected 'silu'")
    return dict(d_model=config.hidden_size, d_expert=config.moe_intermediate_size,
                n_routed=config.n_routed_experts, n_shared=config.n_shared_experts,
                top_k=config.num_experts_per_tok, route_scale=float(config.routed_scaling_factor))


def _v3_arch(config) -> dict:
    """V3: sigmoid scores, bias, top-2-sum group score (always applied), optional renormalisation."""
    n_groups = config.n_group or 1
    return dict(_common_arch(config), n_groups=n_groups, topk_groups=config.topk_group or n_groups,
                score_func="sigmoid", group_score="top2_sum",
                norm_topk_prob=bool(config.norm_topk_prob))


def _v2_arch(config) -> dict:
    """V2: softmax scores, max group score, never renormalised (transformers ignores norm_topk_prob)."""
    if getattr(config, "mlp_bias", False):
        raise ValueError("transformers config mlp_bias=True is not supported: moe_lib experts have "
                         "no biases, expected False")
    if config.topk_method not in _V2_TOPK_METHODS:
        raise ValueError(f"transformers config topk_method={config.topk_method!r} is not supported: "
                         f"expected one of {_V2_TOPK_METHODS}")
    limited = config.topk_method == "group_limited_greedy"
    if limited and not (config.n_group and config.topk_group):
        raise ValueError("topk_method='group_limited_greedy' needs n_group and topk_group, got "
                         f"n_group={config.n_group!r}, topk_group={config.topk_group!r}")
    groups = (config.n_group, config.topk_group) if limited else (1, 1)
    return dict(_common_arch(config), n_groups=groups[0], topk_groups=groups[1],
                score_func="softmax", group_score="max", norm_topk_prob=False)


def _check_overrides(overrides: dict) -> None:
    fixed = sorted(set(overrides) & set(_ARCH_FIELDS))
    if fixed:
        raise ValueError(f"from_transformers: {', '.join(fixed)} come(s) from the transformers config "
                         f"and cannot be overridden; override only dispatch, capacity or balancing "
                         f"fields of MoEConfig")


def _check_expressible(moe: DeepSeekMoE) -> None:
    """Raise ValueError if no transformers DeepSeek MoE layer computes what `moe` computes."""
    cfg = moe.cfg
    if cfg.capacity_factor is not None:
        _inexpressible(f"capacity_factor={cfg.capacity_factor!r} (transformers is dropless; use None)")
    if cfg.route_limit != "none":
        _inexpressible(f"route_limit={cfg.route_limit!r} (transformers has no node- or device-limited "
                       "routing)")
    if cfg.score_func == "sigmoid" and cfg.n_routed < 2:
        _inexpressible("sigmoid routing with n_routed=1 (DeepseekV3MoE scores groups by their top 2)")
    limited = cfg.topk_groups < cfg.n_groups
    wanted = "top2_sum" if cfg.score_func == "sigmoid" else "max"
    if limited and cfg.resolved_group_score != wanted:
        _inexpressible(f"group_score={cfg.group_score!r} with {cfg.score_func} scores "
                       f"(transformers uses {wanted!r})")
    if cfg.score_func == "softmax" and cfg.norm_topk_prob:
        _inexpressible("norm_topk_prob=True with softmax scores (DeepseekV2Moe never renormalises)")
    if cfg.score_func == "softmax" and bool(moe.gate.correction_bias.any()):
        _inexpressible("a non-zero correction bias with softmax scores (DeepseekV2Moe has no bias)")


def _inexpressible(what: str) -> None:
    raise ValueError(f"to_transformers: transformers cannot express {what}.")


def _build_transformers(cfg: MoEConfig) -> nn.Module:
    """A fresh transformers layer with `cfg`'s architecture (weights still uninitialised)."""
    from transformers import DeepseekV2Config, DeepseekV3Config
    from transformers.models.deepseek_v2.modeling_deepseek_v2 import DeepseekV2Moe
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3MoE

    limited = cfg.topk_groups < cfg.n_groups
    # V3 scores groups by their top 2 even when it keeps them all: it needs 2 experts per group.
    groups_ok = cfg.score_func == "softmax" or cfg.n_routed // cfg.n_groups >= 2
    common = dict(hidden_size=cfg.d_model, moe_intermediate_size=cfg.d_expert,
                  n_routed_experts=cfg.n_routed, n_shared_experts=cfg.n_shared,
                  num_experts_per_tok=cfg.top_k, routed_scaling_factor=float(cfg.route_scale),
                  n_group=cfg.n_groups if groups_ok else 1,
                  topk_group=cfg.topk_groups if groups_ok else 1,
                  hidden_act="silu", experts_implementation="eager")
    with warnings.catch_warnings():  # n_shared=0: transformers initialises a zero-width MLP
        warnings.filterwarnings("ignore", "Initializing zero-element tensors")
        if cfg.score_func == "sigmoid":
            return DeepseekV3MoE(DeepseekV3Config(**common, norm_topk_prob=cfg.norm_topk_prob))
        # One attention head: attention fields are unused by an MoE layer; V2 checks H % heads.
        return DeepseekV2Moe(DeepseekV2Config(**common, norm_topk_prob=False, num_attention_heads=1,
                                              topk_method="group_limited_greedy" if limited else "greedy"))


def _copy_weights(src: nn.Module, dst: nn.Module, n_shared: int) -> None:
    """Copy the parameters both layouts name alike into `dst`, keeping `src`'s dtype and device."""
    names = _WEIGHTS + (_SHARED_WEIGHTS if n_shared else ())
    state = {name: src.get_parameter(name).detach().clone() for name in names}
    dst.load_state_dict(state, strict=False, assign=True)
