"""moe_lib.interop.published: DeepSeek's published checkpoint format (shards, FP8 block scales, MTP).

The tests write small checkpoints in exactly that format (several shards, the index, config.json,
FP8 e4m3 weights with 128x128 block scales whose edge blocks are partial, an MTP layer) and load them.
"""

from __future__ import annotations

import json
import math
import re
import shutil

import pytest
import torch
from safetensors.torch import save_file

from moe_lib import MoEConfig
from moe_lib.interop import PublishedCheckpoint, dequantize_fp8, load_deepseek, load_deepseek_layer
from moe_lib.model import ModelConfig, Transformer

# d_model 160, d_dense 200, d_expert 48: not multiples of 128, so FP8 edge blocks are partial
V3_CONFIG = {
    "architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3", "torch_dtype": "bfloat16",
    "vocab_size": 300, "hidden_size": 160, "intermediate_size": 200, "moe_intermediate_size": 48,
    "num_hidden_layers": 3, "num_nextn_predict_layers": 1, "num_attention_heads": 2,
    "num_key_value_heads": 2, "n_shared_experts": 1, "n_routed_experts": 8, "routed_scaling_factor": 2.5,
    "kv_lora_rank": 64, "q_lora_rank": 96, "qk_rope_head_dim": 16, "v_head_dim": 32,
    "qk_nope_head_dim": 32, "topk_method": "noaux_tc", "scoring_func": "sigmoid", "n_group": 4,
    "topk_group": 2, "num_experts_per_tok": 2, "moe_layer_freq": 1, "first_k_dense_replace": 1,
    "norm_topk_prob": True, "hidden_act": "silu", "max_position_embeddings": 163840,
    "rms_norm_eps": 1e-6, "rope_theta": 10000, "initializer_range": 0.02, "tie_word_embeddings": False,
    "attention_bias": False, "aux_loss_alpha": 0.001, "seq_aux": True, "ep_size": 1,
    "rope_scaling": {"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096,
                     "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0},
    "quantization_config": {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                            "weight_block_size": [128, 128]},
}
V3_MODEL = ModelConfig(vocab_size=300, d_model=160, n_layers=3, n_dense_layers=1, d_dense=200, n_heads=2,
                       q_lora_rank=96, kv_lora_rank=64, qk_nope_head_dim=32, qk_rope_head_dim=16,
                       v_head_dim=32, max_seq_len=4096, rope_theta=10000, norm_eps=1e-6, init_std=0.02,
                       mtp_depth=1, moe=MoEConfig(d_model=160, d_expert=48, n_routed=8, n_shared=1, top_k=2,
                                                  n_groups=4, topk_groups=2, score_func="sigmoid",
                                                  group_score="top2_sum", route_scale=2.5))
# V2-Lite style: softmax scores, max group score, no bias, no query compression, bf16, no MTP
V2_CONFIG = {**V3_CONFIG, "topk_method": "group_limited_greedy", "scoring_func": "softmax",
             "q_lora_rank": None, "norm_topk_prob": False, "routed_scaling_factor": 16.0,
             "num_nextn_predict_layers": 0, "rope_scaling": None, "max_position_embeddings": 64}
del V2_CONFIG["quantization_config"]
V2_MODEL = V3_MODEL.replace(q_lora_rank=0, mtp_depth=0, max_seq_len=64, moe=V3_MODEL.moe.replace(
    score_func="softmax", group_score="max", norm_topk_prob=False, route_scale=16.0, bias_update="none"))
SHARDS = [f"model-0000{k}-of-00004.safetensors" for k in range(1, 5)]


def quantize_fp8(w_OI: torch.Tensor, block: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """Per 128x128 block: s = amax / 448 (e4m3's largest value), Q = w / s in float8_e4m3fn."""
    scale = torch.empty(math.ceil(w_OI.shape[0] / block), math.ceil(w_OI.shape[1] / block))
    q_OI = torch.empty(w_OI.shape, dtype=torch.float8_e4m3fn)
    for i in range(scale.shape[0]):
        for j in range(scale.shape[1]):
            rows, cols = slice(i * block, (i + 1) * block), slice(j * block, (j + 1) * block)
            scale[i, j] = w_OI[rows, cols].abs().max() / 448
            q_OI[rows, cols] = (w_OI[rows, cols] / scale[i, j]).to(torch.float8_e4m3fn)
    return q_OI, scale


def dequantize_loop(q_OI: torch.Tensor, scale: torch.Tensor, block=(128, 128)) -> torch.Tensor:
    """The reference: each block times its own scale, one block at a time."""
    w_OI = torch.empty(q_OI.shape)
    for i in range(scale.shape[0]):
        for j in range(scale.shape[1]):
            rows = slice(i * block[0], (i + 1) * block[0])
            cols = slice(j * block[1], (j + 1) * block[1])
            w_OI[rows, cols] = q_OI[rows, cols].float() * scale[i, j]
    return w_OI


def published_name(name: str, n_layers: int) -> str:
    """Our parameter name -> the published one (experts aside)."""
    if name == "lm_head.weight":
        return name
    name = re.sub(r"^mtp\.(\d+)\.", lambda m: f"layers.{n_layers + int(m.group(1))}.", name)
    return "model." + name.replace("gate.correction_bias", "gate.e_score_correction_bias")


def shard_of(name: str) -> str:
    """Layers 0-1 and the embedding in shard 1; layer 2 split over shards 2 and 3; the rest in 4."""
    expert = re.match(r"model\.layers\.2\.mlp\.experts\.(\d+)\.", name)
    if expert:
        return SHARDS[1 if int(expert.group(1)) < 4 else 2]
    if name.startswith("model.layers.2."):
        return SHARDS[2]
    return SHARDS[0] if name.startswith(("model.layers.0.", "model.layers.1.", "model.embed")) else SHARDS[3]


def write_checkpoint(path, model: Transformer, config: dict, fp8: bool) -> Transformer:
    """Write `model` in the published format; return it holding exactly the weights written
    (FP8 and bf16 rounding included), the reference for the loader."""
    tensors, written = {}, {}

    def store(name: str, w: torch.Tensor) -> torch.Tensor:
        if name.endswith("e_score_correction_bias"):
            tensors[name] = w.float()
            return tensors[name]
        if fp8 and name.endswith(("_proj.weight", "_proj_with_mqa.weight")):
            tensors[name], tensors[name + "_scale_inv"] = quantize_fp8(w)
            return dequantize_loop(tensors[name], tensors[name + "_scale_inv"])
        tensors[name] = w.to(torch.bfloat16)
        return tensors[name].float()

    for name, w in model.state_dict().items():
        pub = published_name(name, config["num_hidden_layers"])
        experts = pub.removesuffix("gate_up_proj").removesuffix("down_proj")
        if name.endswith("tokens_per_expert") or (name.endswith("correction_bias")
                                                   and config["topk_method"] != "noaux_tc"):
            written[name] = w  # zeros, not in the checkpoint (V2 routes without a bias)
        elif name.endswith("experts.gate_up_proj"):
            gate, up = w.chunk(2, dim=1)  # [E, I, H] each
            written[name] = torch.stack([torch.cat([store(f"{experts}{e}.gate_proj.weight", g),
                                                    store(f"{experts}{e}.up_proj.weight", u)])
                                         for e, (g, u) in enumerate(zip(gate, up, strict=True))])
        elif name.endswith("experts.down_proj"):
            written[name] = torch.stack([store(f"{experts}{e}.down_proj.weight", d) for e, d in enumerate(w)])
        else:
            written[name] = store(pub, w)
    for k in range(config["num_nextn_predict_layers"]):  # the MTP layer's copies of embedding and head
        layer = config["num_hidden_layers"] + k
        tensors[f"model.layers.{layer}.embed_tokens.weight"] = tensors["model.embed_tokens.weight"].clone()
        tensors[f"model.layers.{layer}.shared_head.head.weight"] = tensors["lm_head.weight"].clone()
    path.mkdir()
    for shard in SHARDS:
        save_file({n: t.contiguous() for n, t in tensors.items() if shard_of(n) == shard},
                  path / shard, metadata={"format": "pt"})
    (path / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {n: shard_of(n) for n in sorted(tensors)}}))
    (path / "config.json").write_text(json.dumps(config))
    model.load_state_dict(written)
    return model


@torch.no_grad()
def random_model(cfg: ModelConfig) -> Transformer:
    torch.manual_seed(0)
    model = Transformer(cfg).eval()
    for name, param in model.named_parameters():
        noise = torch.randn_like(param)
        param.copy_(1 + 0.1 * noise if "norm" in name else 0.1 * noise)
    if cfg.moe.score_func == "sigmoid":
        for moe in model.moe_layers(include_mtp=True):
            moe.gate.correction_bias.copy_(0.1 * torch.randn(cfg.moe.n_routed))
    return model


@pytest.fixture(scope="module")
def v3(tmp_path_factory):
    """(checkpoint directory, the float model it holds)."""
    path = tmp_path_factory.mktemp("published") / "v3"
    return path, write_checkpoint(path, random_model(V3_MODEL), V3_CONFIG, fp8=True)


@pytest.fixture
def copy(v3, tmp_path):
    """A scratch copy of the V3 checkpoint, to break."""
    return shutil.copytree(v3[0], tmp_path / "v3")


def edit_json(path, edit) -> None:
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


def test_dequantize_fp8_matches_blockwise_reference():
    torch.manual_seed(0)
    w = 3 * torch.randn(200, 300)  # 2 x 3 blocks, the last row and column of blocks partial
    q, scale = quantize_fp8(w)
    assert scale.shape == (2, 3)
    w_deq = dequantize_fp8(q, scale)
    assert w_deq.dtype == torch.float32 and torch.equal(w_deq, dequantize_loop(q, scale))
    assert float(((w_deq - w).abs() / w.abs()).median()) < 2 ** -4  # e4m3: 3 mantissa bits
    assert torch.equal(dequantize_fp8(q, scale.repeat_interleave(2, 0)[:4], (64, 128)),
                       dequantize_loop(q, scale.repeat_interleave(2, 0)[:4], (64, 128)))
    with pytest.raises(ValueError, match=r"scales of shape \(2, 2\).*expected \(2, 3\)"):
        dequantize_fp8(q, scale[:, :2])


def test_load_equals_the_float_model(v3):
    path, reference = v3
    model = load_deepseek(path)
    assert model.cfg == V3_MODEL and not model.training
    ours = model.state_dict()
    for name, tensor in reference.state_dict().items():
        assert torch.equal(ours[name], tensor), name
    assert ours["layers.1.mlp.gate.correction_bias"].abs().min() > 0
    ids = torch.randint(0, 300, (2, 9))
    with torch.no_grad():
        logits, (mtp_logits,) = model.forward_with_mtp(ids)
        ref_logits, (ref_mtp_logits,) = reference.forward_with_mtp(ids)
    assert torch.equal(logits, ref_logits) and torch.equal(mtp_logits, ref_mtp_logits)


def test_layer_loader_reads_only_that_layer(v3, copy):
    path, reference = v3
    ckpt = PublishedCheckpoint(path)
    moe = load_deepseek_layer(ckpt, 2)
    assert ckpt.shards_opened == {SHARDS[1], SHARDS[2]}
    layer_names = {n for n in ckpt.weight_map if n.startswith("model.layers.2.mlp.")}
    assert set(ckpt.read) == layer_names and len(ckpt.read) == len(layer_names)
    x = torch.randn(2, 7, 160)
    with torch.no_grad():
        assert torch.equal(moe(x), reference.layers[2].mlp(x))
    for shard in (SHARDS[0], SHARDS[3]):  # the other shards are not even needed on disk
        (copy / shard).unlink()
    assert torch.equal(load_deepseek_layer(copy, 2).experts.down_proj,
                       reference.layers[2].mlp.experts.down_proj)


def test_layer_loader_mtp_layer_and_dtype(v3):
    path, reference = v3
    moe = load_deepseek_layer(path, 3, dtype=torch.bfloat16)  # the MTP module's MoE
    assert moe.experts.gate_up_proj.dtype == torch.bfloat16
    assert moe.gate.correction_bias.dtype == torch.float32
    assert torch.equal(moe.gate.correction_bias, reference.mtp[0].mlp.gate.correction_bias)
    assert torch.equal(moe.experts.gate_up_proj, reference.mtp[0].mlp.experts.gate_up_proj.bfloat16())


def test_first_layers_only(v3):
    path, reference = v3
    ckpt = PublishedCheckpoint(path)
    model = load_deepseek(ckpt, n_layers=2)
    assert (model.cfg.n_layers, model.cfg.mtp_depth) == (2, 0)
    assert not any(name.startswith(("model.layers.2.", "model.layers.3.")) for name in ckpt.read)
    ids = torch.randint(0, 300, (2, 6))
    with torch.no_grad():
        x = reference.embed_tokens(ids)
        rotary = model_rotary(reference, ids.shape[1])
        for block in reference.layers[:2]:
            x = block(x, rotary)
        assert torch.equal(model.forward_hidden(ids), x)


def model_rotary(model: Transformer, length: int):
    from moe_lib.model.rope import rope_angles

    return rope_angles(0, length, model.cfg.qk_rope_head_dim, model.cfg.rope_theta, torch.float32)


def test_unquantised_v2_style_checkpoint(tmp_path):
    reference = write_checkpoint(tmp_path / "v2", random_model(V2_MODEL), V2_CONFIG, fp8=False)
    model = load_deepseek(tmp_path / "v2")
    assert model.cfg == V2_MODEL
    assert not model.layers[1].mlp.gate.correction_bias.any()
    ids = torch.randint(0, 300, (2, 9))
    with torch.no_grad():
        assert torch.equal(model(ids), reference(ids))


def test_missing_shard(copy):
    (copy / SHARDS[2]).unlink()
    with pytest.raises(FileNotFoundError, match="model-00003-of-00004.safetensors"):
        load_deepseek(copy)
    load_deepseek_layer(copy, 1)  # layer 1 does not need that shard


def test_truncated_shard(copy):
    shard = copy / SHARDS[1]
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    with pytest.raises(ValueError, match=f"{SHARDS[1]} is truncated or corrupted"):
        load_deepseek_layer(copy, 2)


def test_index_and_shards_disagree(copy):
    index = copy / "model.safetensors.index.json"
    gone = "model.layers.1.mlp.experts.5.up_proj.weight"
    edit_json(index, lambda data: data["weight_map"].pop(gone))
    with pytest.raises(KeyError, match=re.escape(gone)):
        load_deepseek_layer(copy, 1)
    edit_json(index, lambda data: data["weight_map"].update({gone: SHARDS[3]}))  # the wrong shard
    with pytest.raises(KeyError, match=f"{re.escape(gone)}.*{SHARDS[3]}.*does not hold it"):
        load_deepseek_layer(copy, 1)
    edit_json(index, lambda data: data["weight_map"].update({gone: SHARDS[0]}))
    edit_json(index, lambda data: data["weight_map"].pop(gone + "_scale_inv"))
    with pytest.raises(KeyError, match=f"stored in FP8.*{re.escape(gone)}_scale_inv"):
        load_deepseek_layer(copy, 1)


def test_unknown_tensor(copy):
    name = "model.layers.1.self_attn.indexer.wk.weight"  # e.g. V3.2's sparse-attention indexer
    edit_json(copy / "model.safetensors.index.json",
              lambda data: data["weight_map"].update({name: SHARDS[0]}))
    with pytest.raises(ValueError, match=re.escape(name)):
        load_deepseek(copy)


@pytest.mark.parametrize("edit, error, match", [
    (lambda c: c.pop("n_routed_experts"), ValueError, r"lacks the key\(s\) \['n_routed_experts'\]"),
    (lambda c: c.update(topk_method="bogus"), ValueError, "topk_method='bogus'"),
    (lambda c: c.update(hidden_act="gelu"), ValueError, "hidden_act='gelu'"),
    (lambda c: c.update(moe_intermediate_size=40), ValueError,
     r"experts\.0\.gate_proj\.weight has shape \(48, 160\).*\(40, 160\)"),
    (lambda c: c.update(n_routed_experts=6, n_group=3), ValueError, r"no known.*experts\.6\."),
    (lambda c: c.update(n_routed_experts=10, n_group=5), KeyError, r"lacks tensors.*experts\.8\."),
    (lambda c: c["quantization_config"].update(fmt="e5m2"), ValueError, "fmt 'e4m3'"),
    (lambda c: c.update(top_k=3, num_experts_per_tok=9), ValueError, "top_k=9"),
])
def test_wrong_config(copy, edit, error, match):
    edit_json(copy / "config.json", edit)
    with pytest.raises(error, match=match):
        load_deepseek(copy)


def test_bad_arguments_and_files(v3, copy):
    path = v3[0]
    with pytest.raises(ValueError, match="YaRN.*at most 4096"):
        load_deepseek(path, max_seq_len=8192)
    with pytest.raises(ValueError, match="layer=0 is not a MoE layer.*dense"):
        load_deepseek_layer(path, 0)
    with pytest.raises(ValueError, match="layer=4 is not a MoE layer"):
        load_deepseek_layer(path, 4)
    with pytest.raises(ValueError, match="n_layers=5"):
        load_deepseek(path, n_layers=5)
    (copy / "model.safetensors.index.json").write_text('{"weight_map": {')
    with pytest.raises(ValueError, match="not valid JSON"):
        load_deepseek(copy)
    (copy / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="config.json does not exist"):
        load_deepseek(copy)
