"""MLA: the full path against an independent float64 reference, the absorbed path on the latent
cache against the full path, and the cache's size."""

from __future__ import annotations

import math

import pytest
import torch
from model_utils import rel_err, tiny_model_cfg
from test_rope import reference_rope

from moe_lib import MoEConfig
from moe_lib.model import KVCache, ModelConfig, cache_bytes_per_token
from moe_lib.model.attention import MLA
from moe_lib.model.rope import rope_angles


def rms(x, w, eps):
    return x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps) * w


def reference_mla(mla: MLA, x: torch.Tensor) -> torch.Tensor:
    """Explicit per-head keys and values, a -inf causal mask and a softmax, in float64."""
    cfg, B, S = mla.cfg, x.shape[0], x.shape[1]
    n, dn, dr, dv = cfg.n_heads, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
    x = x.double()
    W = {name: p.detach().double() for name, p in mla.named_parameters()}
    if cfg.q_lora_rank:
        q = rms(x @ W["q_a_proj.weight"].T, W["q_a_layernorm.weight"], cfg.norm_eps) @ W["q_b_proj.weight"].T
    else:
        q = x @ W["q_proj.weight"].T
    q = q.view(B, S, n, dn + dr)
    q_nope, q_pe = q[..., :dn], reference_rope(q[..., dn:], 0, cfg.rope_theta)
    kv = x @ W["kv_a_proj_with_mqa.weight"].T
    c = rms(kv[..., :cfg.kv_lora_rank], W["kv_a_layernorm.weight"], cfg.norm_eps)
    k_pe = reference_rope(kv[..., cfg.kv_lora_rank:], 0, cfg.rope_theta)  # [B, S, dr]: one shared head
    kvb = (c @ W["kv_b_proj.weight"].T).view(B, S, n, dn + dv)
    k_nope, v = kvb[..., :dn], kvb[..., dn:]
    scores = (torch.einsum("bsnd,btnd->bnst", q_nope, k_nope)
              + torch.einsum("bsnr,btr->bnst", q_pe, k_pe)) / math.sqrt(dn + dr)
    future = torch.triu(torch.ones(S, S, dtype=torch.bool), diagonal=1)
    probs = scores.masked_fill(future, float("-inf")).softmax(-1)
    o = torch.einsum("bnst,btnv->bsnv", probs, v).reshape(B, S, n * dv)
    return o @ W["o_proj.weight"].T


def make_mla(q_lora_rank: int, dtype=torch.float32) -> MLA:
    mla = MLA(tiny_model_cfg(q_lora_rank=q_lora_rank)).to(dtype)
    with torch.no_grad():
        for p in mla.parameters():  # norms too: a weight of 1 would hide a missing norm scale
            p.copy_(0.3 * torch.randn_like(p) + (1.0 if p.dim() == 1 else 0.0))
    return mla


@pytest.mark.parametrize("q_lora_rank", [0, 12])
def test_full_path_matches_reference(q_lora_rank):
    mla = make_mla(q_lora_rank, torch.float64)
    x = torch.randn(2, 9, mla.cfg.d_model, dtype=torch.float64)
    out = mla(x, rope_angles(0, 9, mla.cfg.qk_rope_head_dim, mla.cfg.rope_theta, torch.float64))
    assert rel_err(out, reference_mla(mla, x)) < 1e-12
    mla32 = mla.float()
    out32 = mla32(x.float(), rope_angles(0, 9, mla.cfg.qk_rope_head_dim, mla.cfg.rope_theta, torch.float32))
    assert out32.dtype == torch.float32 and rel_err(out32.double(), reference_mla(mla, x)) < 1e-5


@pytest.mark.parametrize("q_lora_rank", [0, 12])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float64, 1e-12)])
def test_absorbed_path_on_latent_cache_matches_full(q_lora_rank, dtype, tol):
    mla, S = make_mla(q_lora_rank, dtype), 11
    cfg = mla.cfg
    x = torch.randn(2, S, cfg.d_model, dtype=dtype)
    full = mla(x, rope_angles(0, S, cfg.qk_rope_head_dim, cfg.rope_theta, dtype))
    cache = KVCache.for_config(cfg, 2, n_layers=1, dtype=dtype)
    outs = []
    for a, b in [(0, 4), (4, 5), (5, 6), (6, 9), (9, 10), (10, 11)]:  # chunks and single tokens
        outs.append(mla(x[:, a:b], rope_angles(a, b - a, cfg.qk_rope_head_dim, cfg.rope_theta, dtype),
                        cache, 0))
        cache.advance(b - a)
    assert rel_err(torch.cat(outs, 1), full) < tol
    # the cache holds exactly the normalised latent and the rotated rope key, nothing per head
    latent, k_rope = mla.latent(x, rope_angles(0, S, cfg.qk_rope_head_dim, cfg.rope_theta, dtype))
    torch.testing.assert_close(cache.latent[0, :, :S], latent)
    torch.testing.assert_close(cache.k_rope[0, :, :S], k_rope)


def test_cache_truncate_and_errors():
    cfg = tiny_model_cfg()
    cache = KVCache.for_config(cfg, batch_size=3)
    cache.advance(5)
    cache.truncate(2)
    assert cache.length == 2
    with pytest.raises(ValueError, match=r"truncate\(3\).*\[0, length=2\]"):
        cache.truncate(3)
    with pytest.raises(ValueError, match="overflow"):
        cache.advance(cfg.max_seq_len)
    with pytest.raises(ValueError, match="batch_size=0"):
        KVCache.for_config(cfg, batch_size=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cache_bytes_per_token_formula(dtype):
    cfg = tiny_model_cfg()
    size = torch.tensor([], dtype=dtype).element_size()
    sizes = cache_bytes_per_token(cfg, dtype)
    assert sizes["mla"] == cfg.n_layers * (16 + 6) * size
    assert sizes["mha"] == cfg.n_layers * 2 * (8 + 6 + 12) * size
    assert KVCache.for_config(cfg, 2, dtype=dtype).nbytes_per_token() == sizes["mla"]


def test_cache_bytes_deepseek_v3_shape():
    moe = MoEConfig(d_model=7168, d_expert=2048, n_routed=256, n_shared=1, top_k=8, n_groups=8,
                    topk_groups=4, route_scale=2.5)
    v3 = ModelConfig(vocab_size=129280, d_model=7168, n_layers=61, n_dense_layers=3, d_dense=18432,
                     n_heads=128, q_lora_rank=1536, kv_lora_rank=512, qk_nope_head_dim=128,
                     qk_rope_head_dim=64, v_head_dim=128, max_seq_len=4096, moe=moe)
    sizes = cache_bytes_per_token(v3, torch.bfloat16)
    assert sizes["mla"] == 61 * 576 * 2 and sizes["mha"] == 61 * 128 * 320 * 2
    assert sizes["ratio"] == pytest.approx(40960 / 576)
