"""moe_lib.interop, whole model: our Transformer computes what transformers' DeepseekV3ForCausalLM does."""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

from moe_lib import DeepSeekMoE, MoEConfig
from moe_lib.interop import from_transformers, to_transformers
from moe_lib.interop.model import config_from_transformers, config_to_transformers
from moe_lib.model import ModelConfig, Transformer, generate

transformers = pytest.importorskip("transformers")
from transformers import DeepseekV3Config, DeepseekV3ForCausalLM  # noqa: E402

# 3 blocks (1 dense, 2 MoE), group-limited routing (2 of 4 groups), route scale, rope theta != 1e4
TINY = dict(vocab_size=97, hidden_size=64, intermediate_size=96, moe_intermediate_size=32,
            num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4, n_shared_experts=1,
            n_routed_experts=8, routed_scaling_factor=2.5, kv_lora_rank=32, q_lora_rank=24,
            qk_rope_head_dim=8, v_head_dim=16, qk_nope_head_dim=16, n_group=4, topk_group=2,
            num_experts_per_tok=2, first_k_dense_replace=1, max_position_embeddings=64,
            rms_norm_eps=1e-5, rope_parameters={"rope_type": "default", "rope_theta": 5000.0},
            experts_implementation="eager")
VARIANTS = {
    "q_lora": dict(),
    "no-q_lora": dict(q_lora_rank=None),
    "no-shared-nonorm-top3": dict(n_shared_experts=0, norm_topk_prob=False, num_experts_per_tok=3,
                                  n_group=2, topk_group=1, first_k_dense_replace=0),
}


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@torch.no_grad()
def randomize(model: torch.nn.Module) -> torch.nn.Module:
    """Norm scales 1 + N(0, 0.1^2), every other weight N(0, 0.2^2)."""
    for name, param in model.named_parameters():
        noise = torch.randn_like(param)
        param.copy_(1 + 0.1 * noise if "norm" in name else 0.2 * noise)
    return model


def hf_model(**changes) -> DeepseekV3ForCausalLM:
    """A tiny transformers V3 with random weights, random norm scales and random non-zero biases."""
    model = DeepseekV3ForCausalLM(DeepseekV3Config(**{**TINY, **changes})).eval()
    randomize(model)
    with torch.no_grad():
        for layer in model.model.layers[model.config.first_k_dense_replace:]:
            layer.mlp.gate.e_score_correction_bias.copy_(0.2 * torch.randn(model.config.n_routed_experts))
    return model


def our_model(**changes) -> Transformer:
    """Our tiny model with random weights, norm scales and biases (the other direction's start)."""
    moe = MoEConfig(d_model=64, d_expert=32, n_routed=8, n_shared=2, top_k=2, n_groups=4, topk_groups=2,
                    route_scale=1.5)
    cfg = ModelConfig(**{**dict(vocab_size=97, d_model=64, n_layers=3, n_dense_layers=1, d_dense=96,
                                n_heads=4, q_lora_rank=24, kv_lora_rank=32, qk_nope_head_dim=16,
                                qk_rope_head_dim=8, v_head_dim=16, max_seq_len=64, moe=moe), **changes})
    model = randomize(Transformer(cfg).eval())
    with torch.no_grad():
        for moe_layer in model.moe_layers():
            moe_layer.gate.correction_bias.copy_(0.2 * torch.randn(cfg.moe.n_routed))
    return model


def assert_near(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Within 1e-4 relative to the largest |value|."""
    assert_close(actual, expected, rtol=1e-4, atol=1e-4 * float(expected.detach().abs().max()))


@pytest.mark.filterwarnings("ignore:Initializing zero-element tensors")  # n_shared_experts=0
@pytest.mark.parametrize("variant", VARIANTS)
def test_from_transformers_same_logits_and_grads(variant):
    hf = hf_model(**VARIANTS[variant])
    ours = from_transformers(hf)
    assert isinstance(ours, Transformer) and not ours.training
    assert ours.cfg.q_lora_rank == (hf.config.q_lora_rank or 0)
    ids = torch.randint(0, 97, (3, 13))
    logits_hf = hf(ids).logits
    logits = ours(ids)
    assert logits.dtype == torch.float32
    assert_near(logits, logits_hf)
    grad = torch.randn_like(logits)
    (logits * grad).sum().backward()
    (logits_hf * grad).sum().backward()
    hf_params = dict(hf.named_parameters())
    for name, param in ours.named_parameters():
        assert_near(param.grad, hf_params["model." * (name != "lm_head.weight") + name].grad)


@pytest.mark.parametrize("q_lora_rank", [0, 24])
def test_to_transformers_same_logits(q_lora_rank):
    ours = our_model(q_lora_rank=q_lora_rank)
    hf = to_transformers(ours)
    assert isinstance(hf, DeepseekV3ForCausalLM)
    assert hf.config.q_lora_rank == (q_lora_rank or None) and hf.config.rope_interleave
    bias = hf.model.layers[2].mlp.gate.e_score_correction_bias
    assert bias.dtype == torch.float32 and torch.equal(bias, ours.layers[2].mlp.gate.correction_bias)
    ids = torch.randint(0, 97, (2, 17))
    with torch.no_grad():
        assert_near(hf(ids).logits, ours(ids))
        back = from_transformers(hf)
        assert torch.equal(back(ids), ours(ids))  # the round trip copies every weight exactly


def test_greedy_generation_matches():
    """Our cached (absorbed) decoding and transformers' generate pick the same tokens."""
    ours = our_model()
    hf = to_transformers(ours)
    prompt = torch.randint(0, 97, (2, 5))
    expected = hf.generate(prompt, max_new_tokens=8, do_sample=False, pad_token_id=0)
    assert torch.equal(generate(ours, prompt, 8), expected)


def test_configs_round_trip():
    cfg = our_model(q_lora_rank=0, rope_theta=123.0, norm_eps=1e-5, init_std=0.05).cfg
    hf_cfg = config_to_transformers(cfg)
    assert (hf_cfg.first_k_dense_replace, hf_cfg.n_group, hf_cfg.topk_group, hf_cfg.q_lora_rank,
            hf_cfg.rope_parameters["rope_theta"], hf_cfg.tie_word_embeddings) == (1, 4, 2, None, 123.0, False)
    assert config_from_transformers(hf_cfg) == cfg.replace(moe=cfg.moe.replace(group_score="top2_sum"))
    back = config_to_transformers(config_from_transformers(DeepseekV3Config(**TINY)))
    for key in ("hidden_size", "intermediate_size", "moe_intermediate_size", "n_routed_experts",
                "routed_scaling_factor", "norm_topk_prob", "rms_norm_eps", "max_position_embeddings",
                "q_lora_rank", "n_group", "topk_group", "first_k_dense_replace", "rope_parameters"):
        assert getattr(back, key) == getattr(DeepseekV3Config(**TINY), key), key


def test_mtp_modules_need_drop_mtp():
    ours = our_model(mtp_depth=1)
    with pytest.raises(ValueError, match="mtp_depth=1.*drop_mtp=True"):
        to_transformers(ours)
    hf = to_transformers(ours, drop_mtp=True)
    ids = torch.randint(0, 97, (2, 9))
    with torch.no_grad():
        assert_near(hf(ids).logits, ours(ids))


@pytest.mark.parametrize("changes, match", [
    (dict(rope_parameters={"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0,
                           "original_max_position_embeddings": 16}), "YaRN"),
    (dict(rope_interleave=False), "rope_interleave=False"),
    (dict(attention_bias=True), "attention_bias=True"),
    (dict(tie_word_embeddings=True), "tie_word_embeddings=True"),
    (dict(num_key_value_heads=2), "num_key_value_heads=2"),
    (dict(hidden_act="gelu"), "hidden_act='gelu'"),
])
def test_from_transformers_refuses_what_we_cannot_compute(changes, match):
    with pytest.raises(ValueError, match=match):
        from_transformers(hf_model(**changes))


def test_to_transformers_refuses_what_transformers_cannot_compute():
    softmax = our_model().cfg.moe.replace(score_func="softmax", norm_topk_prob=False)
    with pytest.raises(ValueError, match="score_func='softmax'"):
        to_transformers(our_model(moe=softmax))
    capacity = our_model().cfg.moe.replace(capacity_factor=1.0)
    with pytest.raises(ValueError, match="capacity_factor"):
        to_transformers(our_model(moe=capacity))
    node_limited = our_model().cfg.moe.replace(n_groups=1, topk_groups=1, route_limit="node",
                                               limit_units=4, limit_max=2)
    with pytest.raises(ValueError, match="route_limit='node'"):
        to_transformers(our_model(moe=node_limited))


def test_dispatch_by_type():
    ours = our_model()
    layer = to_transformers(ours.layers[1].mlp)
    assert type(layer).__name__ == "DeepseekV3MoE"
    assert isinstance(from_transformers(layer), DeepSeekMoE)
    with pytest.raises(TypeError, match="DeepseekV3ForCausalLM"):
        from_transformers(transformers.LlamaForCausalLM(transformers.LlamaConfig(
            vocab_size=16, hidden_size=8, intermediate_size=8, num_hidden_layers=1, num_attention_heads=2)))
