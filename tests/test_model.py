"""The whole model: names, shapes, causality, cached decoding = full forward, rollback, bad input,
gradients."""

from __future__ import annotations

import pytest
import torch
from model_utils import make_model, rel_err, tiny_model_cfg

from moe_lib import DeepSeekMoE, Expert
from moe_lib.model import Transformer


def test_parameter_names_follow_the_published_checkpoints():
    names = set(Transformer(tiny_model_cfg(q_lora_rank=12, mtp_depth=1)).state_dict())
    for name in ["embed_tokens.weight", "norm.weight", "lm_head.weight",
                 "layers.0.input_layernorm.weight", "layers.0.post_attention_layernorm.weight",
                 "layers.0.self_attn.q_a_proj.weight", "layers.0.self_attn.q_a_layernorm.weight",
                 "layers.0.self_attn.q_b_proj.weight", "layers.0.self_attn.kv_a_proj_with_mqa.weight",
                 "layers.0.self_attn.kv_a_layernorm.weight", "layers.0.self_attn.kv_b_proj.weight",
                 "layers.0.self_attn.o_proj.weight", "layers.0.mlp.gate_proj.weight",
                 "layers.0.mlp.up_proj.weight", "layers.0.mlp.down_proj.weight",
                 "layers.1.mlp.gate.weight", "layers.1.mlp.gate.correction_bias",
                 "layers.2.mlp.experts.gate_up_proj", "layers.2.mlp.experts.down_proj",
                 "layers.2.mlp.shared_experts.gate_proj.weight", "mtp.0.enorm.weight", "mtp.0.hnorm.weight",
                 "mtp.0.eh_proj.weight", "mtp.0.shared_head.norm.weight", "mtp.0.self_attn.kv_b_proj.weight",
                 "mtp.0.mlp.gate.weight"]:
        assert name in names, name
    assert not any("q_proj" in n and "q_a" not in n and "q_b" not in n for n in names)
    assert "layers.0.self_attn.q_proj.weight" in Transformer(tiny_model_cfg()).state_dict()


def test_blocks_and_initialisation():
    cfg = tiny_model_cfg(n_layers=4, n_dense_layers=2, init_std=0.05)
    model = Transformer(cfg)
    assert [type(b.mlp) for b in model.layers] == [Expert, Expert, DeepSeekMoE, DeepSeekMoE]
    assert model.moe_layers() == [model.layers[2].mlp, model.layers[3].mlp]
    for p in [model.embed_tokens.weight, model.lm_head.weight, model.layers[0].self_attn.kv_b_proj.weight,
              model.layers[2].mlp.experts.gate_up_proj, model.layers[2].mlp.gate.weight]:
        assert abs(float(p.detach().std()) - 0.05) < 0.01 and abs(float(p.detach().mean())) < 0.01
    assert torch.equal(model.norm.weight, torch.ones(cfg.d_model))
    assert not model.layers[2].mlp.gate.correction_bias.any()


@pytest.mark.parametrize("q_lora_rank", [0, 12])
def test_shapes_and_head(q_lora_rank):
    model = make_model(tiny_model_cfg(q_lora_rank=q_lora_rank))
    ids = torch.randint(0, 61, (3, 10))
    logits = model(ids)
    assert logits.shape == (3, 10, 61) and logits.dtype == torch.float32
    h = model.forward_hidden(ids)
    assert h.shape == (3, 10, 32)
    torch.testing.assert_close(model.head(h), logits)


def test_causality():
    model = make_model(tiny_model_cfg(q_lora_rank=12))
    ids = torch.randint(0, 61, (2, 16))
    changed = ids.clone()
    changed[:, 9:] = torch.randint(0, 61, (2, 7))
    changed[:, 9] = (ids[:, 9] + 1) % 61
    a, b = model(ids), model(changed)
    torch.testing.assert_close(a[:, :9], b[:, :9], rtol=0, atol=1e-6)
    assert (a[:, 9] - b[:, 9]).abs().max() > 1e-3


@pytest.mark.parametrize("q_lora_rank", [0, 12])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float64, 1e-12)])
def test_cached_decoding_equals_full_forward(q_lora_rank, dtype, tol):
    model = make_model(tiny_model_cfg(q_lora_rank=q_lora_rank), dtype)
    ids = torch.randint(0, 61, (2, 20))
    full = model(ids)
    cache = model.new_cache(2)
    by_token = torch.cat([model(ids[:, i:i + 1], cache) for i in range(20)], dim=1)
    assert cache.length == 20 and rel_err(by_token, full) < tol
    cache = model.new_cache(2)
    chunked = torch.cat([model(ids[:, :7], cache)] + [model(ids[:, i:i + 1], cache) for i in range(7, 12)]
                        + [model(ids[:, 12:20], cache)], dim=1)
    assert rel_err(chunked, full) < tol


def test_truncate_rolls_back():
    model = make_model(tiny_model_cfg(q_lora_rank=12))
    ids = torch.randint(0, 61, (2, 14))
    cache = model.new_cache(2)
    model(ids, cache)
    cache.truncate(6)
    other = torch.randint(0, 61, (2, 5))
    resumed = torch.cat([model(other[:, :2], cache), model(other[:, 2:], cache)], dim=1)
    full = model(torch.cat([ids[:, :6], other], dim=1))[:, 6:]
    assert cache.length == 11 and rel_err(resumed, full) < 1e-5


def test_bad_inputs_raise_clear_errors():
    model = make_model(tiny_model_cfg())
    ids = torch.randint(0, 61, (2, 5))
    cases = [
        (ids.float(), TypeError, "integer tensor.*float32"),
        (ids.bool(), TypeError, "integer tensor.*bool"),
        (ids.tolist(), TypeError, "torch.Tensor"),
        (ids[0], ValueError, r"shape \[batch, seq\].*\(5,\).*unsqueeze"),
        (ids[None], ValueError, r"shape \[batch, seq\].*\(1, 2, 5\)"),
        (ids[:, :0], ValueError, "empty"),
        (torch.tensor([[1, 61]]), ValueError, r"token id 61 at \[batch 0, position 1\].*vocab_size=61"),
        (torch.tensor([[4, -1]]), ValueError, "token id -1 .* out of range"),
        (torch.randint(0, 61, (1, 41)), ValueError, "too long.*41 new tokens.*max_seq_len=40"),
    ]
    for bad, error, message in cases:
        with pytest.raises(error, match=message):
            model(bad)
    cache = model.new_cache(2)
    model(torch.randint(0, 61, (2, 30)), cache)
    with pytest.raises(ValueError, match="30 cached \\+ 11 new tokens = 41 > max_seq_len=40"):
        model(torch.randint(0, 61, (2, 11)), cache)
    assert cache.length == 30  # a rejected call leaves the cache untouched
    with pytest.raises(ValueError, match="KVCache does not fit"):
        model(ids[:1], cache)
    with pytest.raises(ValueError, match="KVCache holds torch.float32"):
        model.double()(ids, cache)
    assert model(ids.int()).shape == (2, 5, 61)  # int32 ids are fine


def test_gradients_reach_every_parameter():
    cfg = tiny_model_cfg(q_lora_rank=12)
    model = make_model(cfg).train()
    ids = torch.randint(0, 61, (4, 16))
    logits = model(ids[:, :-1])
    torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, 1:].reshape(-1)).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert model.layers[1].mlp.gate.tokens_per_expert.sum() == 4 * 15 * cfg.moe.top_k  # loads counted
