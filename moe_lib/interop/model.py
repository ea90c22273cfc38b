"""Whole-model interoperability with transformers' `DeepseekV3ForCausalLM` (v5).

`model_from_transformers(hf)` returns a `moe_lib.model.Transformer` computing the same logits with
copied weights; `model_to_transformers(model)` goes back. `moe_lib.interop.from_transformers` /
`to_transformers` dispatch here for whole models and to `layer` for single MoE layers.

Parameter names, transformers -> ours (our names are the published ones without `model.`):

    model.embed_tokens.weight                           embed_tokens.weight
    model.layers.N.<anything else>                      layers.N.<same>
    model.layers.N.mlp.gate.e_score_correction_bias     layers.N.mlp.gate.correction_bias (float32)
    model.layers.N.mlp.experts.gate_up_proj [E, 2I, H]  layers.N.mlp.experts.gate_up_proj (same layout)
    model.norm.weight                                   norm.weight
    lm_head.weight                                      lm_head.weight
    (ours only)                                         layers.N.mlp.gate.tokens_per_expert: zeros

Config, DeepseekV3Config -> ModelConfig: vocab_size, hidden_size (d_model), num_hidden_layers
(n_layers), first_k_dense_replace (n_dense_layers, at most n_layers), intermediate_size (d_dense),
num_attention_heads (n_heads), q_lora_rank (None <-> 0), kv_lora_rank, qk_nope_head_dim,
qk_rope_head_dim, v_head_dim, max_position_embeddings (max_seq_len),
rope_parameters["rope_theta"] (rope_theta), rms_norm_eps (norm_eps), initializer_range (init_std);
the MoE fields as in `layer` (n_group/topk_group, routed_scaling_factor, norm_topk_prob, ...).
Both compute the same function: sigmoid routing with the top-2-sum group score, interleaved RoPE
(`rope_interleave=True`: transformers permutes the rotated half, which leaves q.k unchanged),
softmax scale 1/sqrt(qk_nope_head_dim + qk_rope_head_dim), RMSNorm in float32.

Refused with ValueError (no counterpart on the other side): rope scaling (YaRN) or
rope_interleave=False, attention_bias, tied embeddings, num_key_value_heads < num_attention_heads,
attention dropout, and whatever `layer` refuses for the MoE layers (softmax scores, capacity,
node/device-limited routing).
transformers' DeepseekV3ForCausalLM has no MTP modules: `model_to_transformers` refuses a model
with mtp_depth > 0 unless `drop_mtp=True`. `to_transformers` sets bos/eos/pad token ids to None
(our model has none, so transformers' `generate` does not stop early).
"""

from __future__ import annotations

import warnings

from torch import nn

from ..config import MoEConfig
from ..model import ModelConfig, Transformer
from .layer import _check_expressible, _v3_arch
from .state import assign_state, on_meta

_HF_BIAS, _OUR_BIAS = "mlp.gate.e_score_correction_bias", "mlp.gate.correction_bias"


def config_from_transformers(config, **moe_overrides) -> ModelConfig:
    """The `ModelConfig` of a transformers `DeepseekV3Config` (mtp_depth 0)."""
    _check_hf_config(config)
    return ModelConfig(
        vocab_size=config.vocab_size, d_model=config.hidden_size, n_layers=config.num_hidden_layers,
        n_dense_layers=min(config.first_k_dense_replace or 0, config.num_hidden_layers),
        d_dense=config.intermediate_size, n_heads=config.num_attention_heads,
        q_lora_rank=config.q_lora_rank or 0, kv_lora_rank=config.kv_lora_rank,
        qk_nope_head_dim=config.qk_nope_head_dim, qk_rope_head_dim=config.qk_rope_head_dim,
        v_head_dim=config.v_head_dim, max_seq_len=config.max_position_embeddings,
        rope_theta=float(config.rope_parameters["rope_theta"]), norm_eps=config.rms_norm_eps,
        moe=MoEConfig(**_v3_arch(config), **moe_overrides), mtp_depth=0, init_std=config.initializer_range)


def config_to_transformers(cfg: ModelConfig):
    """The transformers `DeepseekV3Config` of `cfg` (eager experts, no MTP, no special tokens)."""
    from transformers import DeepseekV3Config

    moe = cfg.moe
    groups_ok = moe.n_routed // moe.n_groups >= 2  # V3 scores each group by its top 2
    return DeepseekV3Config(
        vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, intermediate_size=cfg.d_dense,
        moe_intermediate_size=moe.d_expert, num_hidden_layers=cfg.n_layers,
        num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.n_heads,
        n_shared_experts=moe.n_shared, n_routed_experts=moe.n_routed,
        routed_scaling_factor=float(moe.route_scale), kv_lora_rank=cfg.kv_lora_rank,
        q_lora_rank=cfg.q_lora_rank or None, qk_rope_head_dim=cfg.qk_rope_head_dim,
        v_head_dim=cfg.v_head_dim, qk_nope_head_dim=cfg.qk_nope_head_dim,
        n_group=moe.n_groups if groups_ok else 1, topk_group=moe.topk_groups if groups_ok else 1,
        num_experts_per_tok=moe.top_k, first_k_dense_replace=cfg.n_dense_layers,
        norm_topk_prob=moe.norm_topk_prob, hidden_act="silu", max_position_embeddings=cfg.max_seq_len,
        initializer_range=cfg.init_std, rms_norm_eps=cfg.norm_eps, tie_word_embeddings=False,
        rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta}, rope_interleave=True,
        attention_bias=False, attention_dropout=0.0, num_mtp_layers=0, pad_token_id=None,
        bos_token_id=None, eos_token_id=None, experts_implementation="eager")


def model_from_transformers(hf: nn.Module, **moe_overrides) -> Transformer:
    """A `Transformer` computing the logits of the transformers `DeepseekV3ForCausalLM` `hf`.

    moe_overrides: `MoEConfig` fields transformers does not describe (dispatch, balancing).
    Weights are copied (dtype and device kept; router biases float32); same train/eval mode as `hf`.
    """
    from transformers import DeepseekV3ForCausalLM

    if not isinstance(hf, DeepseekV3ForCausalLM):
        raise TypeError(f"model_from_transformers expects a DeepseekV3ForCausalLM, got {type(hf).__name__}")
    cfg = config_from_transformers(hf.config, **moe_overrides)
    state = {}
    for name, tensor in hf.state_dict().items():
        ours = _our_name(name)
        if ours.endswith(_OUR_BIAS):
            tensor = tensor.float()
        if tensor.numel() or "shared_experts" not in ours:  # n_shared=0: transformers' empty MLP
            state[ours] = tensor.detach().clone()
    model = assign_state(on_meta(lambda: Transformer(cfg)), state, "the transformers model")
    return model.train(hf.training)


def model_to_transformers(model: Transformer, drop_mtp: bool = False) -> nn.Module:
    """The transformers `DeepseekV3ForCausalLM` of `model` (weights copied, dtype/device kept).

    Raises ValueError when transformers cannot express the model (see the module docstring); a
    model with MTP modules needs `drop_mtp=True` (transformers' class has none).
    """
    from transformers import DeepseekV3ForCausalLM

    if not isinstance(model, Transformer):
        raise TypeError(f"model_to_transformers expects a moe_lib Transformer, got {type(model).__name__}")
    cfg = model.cfg
    if cfg.mtp_depth and not drop_mtp:
        raise ValueError(f"to_transformers: the model has mtp_depth={cfg.mtp_depth} MTP modules, which "
                         f"DeepseekV3ForCausalLM cannot hold; pass drop_mtp=True to convert the rest")
    for moe in model.moe_layers():
        if moe.cfg.score_func != "sigmoid":
            raise ValueError(f"to_transformers: transformers cannot express score_func="
                             f"{moe.cfg.score_func!r} in a DeepseekV3ForCausalLM (sigmoid only).")
        if moe.cfg.route_limit != "none":
            raise ValueError(f"to_transformers: transformers cannot express route_limit="
                             f"{moe.cfg.route_limit!r} (use n_groups/topk_groups for V3's group limit).")
        _check_expressible(moe)
    weight = model.embed_tokens.weight
    with warnings.catch_warnings():  # n_shared=0: transformers initialises a zero-width MLP
        warnings.filterwarnings("ignore", "Initializing zero-element tensors")
        hf = DeepseekV3ForCausalLM(config_to_transformers(cfg)).to(device=weight.device,
                                                                    dtype=weight.dtype)
    state = {_hf_name(name): tensor.detach() for name, tensor in model.state_dict().items()
             if not name.startswith("mtp.") and not name.endswith("tokens_per_expert")}
    missing, unexpected = hf.load_state_dict(state, strict=False)
    missing = [name for name in missing if hf.get_parameter(name).numel()]  # empty shared MLP
    if missing or unexpected:
        raise ValueError(f"to_transformers: names do not match: missing {missing}, unexpected {unexpected}")
    for ours, theirs in zip(model.moe_layers(), hf.model.layers[cfg.n_dense_layers:], strict=True):
        theirs.mlp.gate.e_score_correction_bias = ours.gate.correction_bias.detach().clone()  # float32
    return hf.train(model.training)


def _our_name(hf_name: str) -> str:
    name = hf_name.removeprefix("model.")
    return name.replace(_HF_BIAS, _OUR_BIAS) if name.endswith(_HF_BIAS) else name


def _hf_name(name: str) -> str:
    name = name if name == "lm_head.weight" else "model." + name
    return name.replace(_OUR_BIAS, _HF_BIAS) if name.endswith(_OUR_BIAS) else name


def _check_hf_config(config) -> None:
    """Raise ValueError for a transformers config our model cannot compute."""
    problems = []
    rope = config.rope_parameters or {}
    if rope.get("rope_type", "default") != "default":
        problems.append(f"rope_parameters={rope!r} (rope scaling such as YaRN is not implemented)")
    if not config.rope_interleave:
        problems.append("rope_interleave=False (moe_lib rotates interleaved pairs, as DeepSeek-V3)")
    if config.attention_bias:
        problems.append("attention_bias=True (moe_lib's linears have no biases)")
    if config.tie_word_embeddings:
        problems.append("tie_word_embeddings=True (moe_lib's head is not tied)")
    if config.num_attention_heads // config.num_key_value_heads > 1:  # transformers would repeat keys
        problems.append(f"num_key_value_heads={config.num_key_value_heads} < num_attention_heads="
                        f"{config.num_attention_heads} (MLA has per-head keys)")
    if config.attention_dropout:
        problems.append(f"attention_dropout={config.attention_dropout} (moe_lib has no dropout)")
    if problems:
        raise ValueError("from_transformers: moe_lib cannot express " + "; ".join(problems))
