"""Multi-head Latent Attention (DeepSeek-V2 Sec. 2.1, arXiv 2405.04434; V3 Sec. 2.1.1).

Queries (q_lora_rank > 0: low-rank; q_lora_rank == 0: one projection q_proj):
    c_Q = W_DQ h;   [q^C ; q^R] = W_UQ RMSNorm(c_Q) per head;   q^R = RoPE(q^R)
Keys and values from one shared latent and one shared rope key:
    [c_KV ; k^R] = W_DKV h;   c_KV <- RMSNorm(c_KV);   k^R = RoPE(k^R)   (ONE head, shared)
    [k^C ; v] = W_UKV c_KV per head;   k = [k^C ; k^R]
    o = softmax(q k^T / sqrt(d_nope + d_rope)) v,   u = W_O o

Two exact ways to compute it:
- full (training): expand the latent into per-head keys and values, one causal
  `scaled_dot_product_attention`.
- absorbed (decoding, on a `KVCache` that holds only c_KV and k^R):
    q^C . k^C = q^C . (W_UK c) = (W_UK^T q^C) . c     (W_UK folded into the query)
    sum_t a_t v_t = W_UV (sum_t a_t c_t)               (W_UV folded into the output)
  i.e. multi-query attention with keys [c ; k^R] (width kv_lora_rank + d_rope) and values c.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..kernels import linear
from .cache import KVCache
from .config import ModelConfig
from .norm import RMSNorm
from .rope import Rotary, apply_rope


class MLA(nn.Module):
    """Multi-head Latent Attention with DeepSeek's parameter names (all linears bias-free).

    forward(x [B, S, H], rotary for the S positions, cache=None, layer=0) -> [B, S, H].
    Without a cache: positions 0..S-1, causal. With a cache: the S tokens follow the cache.length
    cached ones; their latents and rope keys are written into `cache` at `layer`.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        n_h, d_qk = cfg.n_heads, cfg.qk_head_dim
        if cfg.q_lora_rank == 0:
            self.q_proj = nn.Linear(cfg.d_model, n_h * d_qk, bias=False)
        else:
            self.q_a_proj = nn.Linear(cfg.d_model, cfg.q_lora_rank, bias=False)
            self.q_a_layernorm = RMSNorm(cfg.q_lora_rank, cfg.norm_eps)
            self.q_b_proj = nn.Linear(cfg.q_lora_rank, n_h * d_qk, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(cfg.d_model, cfg.kv_lora_rank + cfg.qk_rope_head_dim,
                                            bias=False)
        self.kv_a_layernorm = RMSNorm(cfg.kv_lora_rank, cfg.norm_eps)
        self.kv_b_proj = nn.Linear(cfg.kv_lora_rank, n_h * (cfg.qk_nope_head_dim + cfg.v_head_dim),
                                   bias=False)
        self.o_proj = nn.Linear(n_h * cfg.v_head_dim, cfg.d_model, bias=False)
        self.scale = 1.0 / math.sqrt(d_qk)

    def forward(self, x_BSH: torch.Tensor, rotary: Rotary, cache: KVCache | None = None,
                layer: int = 0) -> torch.Tensor:
        q_nope_BSND, q_rope_BSNR = self.queries(x_BSH, rotary)
        latent_BSC, k_rope_BSR = self.latent(x_BSH, rotary)
        if cache is None:
            o_BSNV = self.attend_full(q_nope_BSND, q_rope_BSNR, latent_BSC, k_rope_BSR)
        else:
            kv_BTF = cache.write(layer, latent_BSC, k_rope_BSR)
            o_BSNV = self.attend_absorbed(q_nope_BSND, q_rope_BSNR, kv_BTF)
        return linear(o_BSNV.flatten(2), self.o_proj.weight)

    def queries(self, x_BSH: torch.Tensor, rotary: Rotary) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-head queries: the no-rope part [B, S, n_h, d_nope] and the rotated part [B, S, n_h, d_rope]."""
        cfg = self.cfg
        if cfg.q_lora_rank == 0:
            q = linear(x_BSH, self.q_proj.weight)
        else:
            c_q = self.q_a_layernorm(linear(x_BSH, self.q_a_proj.weight))
            q = linear(c_q, self.q_b_proj.weight)
        q_BSNK = q.unflatten(-1, (cfg.n_heads, cfg.qk_head_dim))
        q_nope, q_rope = q_BSNK.split([cfg.qk_nope_head_dim, cfg.qk_rope_head_dim], dim=-1)
        return q_nope, apply_rope(q_rope, rotary)

    def latent(self, x_BSH: torch.Tensor, rotary: Rotary) -> tuple[torch.Tensor, torch.Tensor]:
        """What the cache stores: the normalised latent [B, S, C] and the rotated rope key [B, S, R]."""
        kv_BSF = linear(x_BSH, self.kv_a_proj_with_mqa.weight)
        latent_BSC, k_rope_BSR = kv_BSF.split([self.cfg.kv_lora_rank, self.cfg.qk_rope_head_dim], dim=-1)
        return self.kv_a_layernorm(latent_BSC), apply_rope(k_rope_BSR, rotary)

    def attend_full(self, q_nope_BSND: torch.Tensor, q_rope_BSNR: torch.Tensor, latent_BSC: torch.Tensor,
                    k_rope_BSR: torch.Tensor) -> torch.Tensor:
        """Causal attention over per-head keys and values expanded from the latent: [B, S, n_h, d_v]."""
        cfg = self.cfg
        kv_BSNF = linear(latent_BSC, self.kv_b_proj.weight).unflatten(-1, (cfg.n_heads, -1))
        k_nope_BSND, v_BSNV = kv_BSNF.split([cfg.qk_nope_head_dim, cfg.v_head_dim], dim=-1)
        q_BNSK = torch.cat((q_nope_BSND, q_rope_BSNR), dim=-1).transpose(1, 2)
        k_rope_BSNR = k_rope_BSR.unsqueeze(2).expand(-1, -1, cfg.n_heads, -1)
        k_BNSK = torch.cat((k_nope_BSND, k_rope_BSNR), dim=-1).transpose(1, 2)
        # values zero-padded to the key width: torch's fused CPU kernel needs equal widths
        v_BNSK = F.pad(v_BSNV, (0, max(0, cfg.qk_head_dim - cfg.v_head_dim))).transpose(1, 2)
        o_BNSK = F.scaled_dot_product_attention(q_BNSK, k_BNSK, v_BNSK, is_causal=True, scale=self.scale)
        return o_BNSK[..., :cfg.v_head_dim].transpose(1, 2)

    def attend_absorbed(self, q_nope_BSND: torch.Tensor, q_rope_BSNR: torch.Tensor,
                        kv_BTF: torch.Tensor) -> torch.Tensor:
        """Attention of S new queries over T >= S cached tokens (the last S are the new ones), on
        the cache kv [B, T, C+R] = [latent ; rope key], with W_UK and W_UV absorbed: [B, S, n_h, d_v]."""
        cfg = self.cfg
        w_ukv_NFC = self.kv_b_proj.weight.unflatten(0, (cfg.n_heads, -1))
        w_uk_NDC, w_uv_NVC = w_ukv_NFC.split([cfg.qk_nope_head_dim, cfg.v_head_dim], dim=1)
        q_lat_BSNC = torch.einsum("bsnd,ndc->bsnc", q_nope_BSND, w_uk_NDC)
        q_BNSF = torch.cat((q_lat_BSNC, q_rope_BSNR), dim=-1).transpose(1, 2)
        k_B1TF = kv_BTF.unsqueeze(1)  # one key head shared by all query heads (multi-query attention)
        n_new, n_all = q_BNSF.shape[2], k_B1TF.shape[2]
        mask_ST = None
        if n_new > 1:  # query i sits at position n_all - n_new + i and sees keys t <= that position
            t_T = torch.arange(n_all, device=q_BNSF.device)
            mask_ST = t_T <= (n_all - n_new + torch.arange(n_new, device=q_BNSF.device)).unsqueeze(1)
        o_lat_BNSC = F.scaled_dot_product_attention(q_BNSF, k_B1TF, k_B1TF[..., :cfg.kv_lora_rank],
                                                    attn_mask=mask_ST, scale=self.scale, enable_gqa=True)
        return torch.einsum("bnsc,nvc->bsnv", o_lat_BNSC, w_uv_NVC)
