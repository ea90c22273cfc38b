"""Parameter and FLOP accounting, and DeepSeekMoE's fine-grained expert segmentation.

Fine-grained segmentation (DeepSeekMoE Sec. 3.1): split each of N experts of width d_ff into m
experts of width d_ff/m and activate m*K of them: same total and activated parameters, but
C(mN, mK) possible expert combinations instead of C(N, K). Shared-expert isolation (Sec. 3.2)
turns K_s of the activated experts into always-on shared experts: mN - K_s routed, mK - K_s active.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .config import MoEConfig


def fine_grained(d_model: int, d_ff: int, n_experts: int, top_k: int, m: int,
                 n_shared: int = 0, **overrides) -> MoEConfig:
    """The segmented config: m*N experts of width d_ff/m, top-(m*K - K_s), K_s = `n_shared`."""
    if m < 1 or d_ff % m:
        raise ValueError(f"m={m!r} is invalid: expected a positive divisor of d_ff={d_ff}")
    if not 0 <= n_shared < m * top_k:
        raise ValueError(f"n_shared={n_shared!r} is invalid: expected 0 <= n_shared < m*top_k="
                         f"{m * top_k} (at least one routed expert must stay active)")
    return MoEConfig(d_model=d_model, d_expert=d_ff // m, n_routed=m * n_experts - n_shared,
                     n_shared=n_shared, top_k=m * top_k - n_shared, **overrides)


def n_combinations(n_routed: int, top_k: int) -> int:
    """Number of distinct expert sets a token can choose: C(n_routed, top_k)."""
    return math.comb(n_routed, top_k)


@dataclass(frozen=True)
class MoEParams:
    """Parameter counts of one MoE layer (router bias excluded: it is a buffer)."""

    router: int
    routed: int
    shared: int
    active_routed: int

    @property
    def total(self) -> int:
        return self.router + self.routed + self.shared

    @property
    def active(self) -> int:
        return self.router + self.active_routed + self.shared


def moe_params(cfg: MoEConfig) -> MoEParams:
    """Parameters of a `DeepSeekMoE` layer: 3*H*I per SwiGLU expert, E*H for the router."""
    per_expert = 3 * cfg.d_model * cfg.d_expert
    return MoEParams(router=cfg.n_routed * cfg.d_model, routed=cfg.n_routed * per_expert,
                     shared=cfg.n_shared * per_expert, active_routed=cfg.top_k * per_expert)


def moe_flops_per_token(cfg: MoEConfig, backward: bool = False) -> int:
    """Matmul FLOPs per token: 2 per activated weight forward, 3x that with the backward pass."""
    forward = 2 * moe_params(cfg).active
    return 3 * forward if backward else forward


@dataclass(frozen=True)
class MLAShape:
    """Multi-head Latent Attention dimensions (DeepSeek-V2/V3)."""

    n_heads: int = 128
    q_lora_rank: int = 1536
    kv_lora_rank: int = 512
    qk_nope_head_dim: int = 128
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128

    def params(self, d_model: int) -> int:
        """wq_a, q_norm, wq_b (or one wq when q_lora_rank == 0), wkv_a, kv_norm, wkv_b, wo."""
        qk_head = self.qk_nope_head_dim + self.qk_rope_head_dim
        query = (d_model * self.n_heads * qk_head if self.q_lora_rank == 0 else
                 d_model * self.q_lora_rank + self.q_lora_rank + self.q_lora_rank * self.n_heads * qk_head)
        return (query
                + d_model * (self.kv_lora_rank + self.qk_rope_head_dim) + self.kv_lora_rank
                + self.kv_lora_rank * self.n_heads * (self.qk_nope_head_dim + self.v_head_dim)
                + self.n_heads * self.v_head_dim * d_model)


@dataclass(frozen=True)
class ModelShape:
    """A DeepSeek-style decoder: `n_dense_layers` dense blocks, then MoE blocks, MLA attention."""

    vocab_size: int
    n_layers: int
    n_dense_layers: int
    d_dense: int
    moe: MoEConfig
    mla: MLAShape

    def params(self) -> dict[str, int]:
        """Total and activated parameters (embedding and output head counted in both)."""
        h = self.moe.d_model
        block = self.mla.params(h) + 2 * h  # attention + its two RMSNorms
        dense = block + 3 * h * self.d_dense
        moe = moe_params(self.moe)
        n_moe = self.n_layers - self.n_dense_layers
        outer = 2 * self.vocab_size * h + h  # embedding, head, final norm
        return {"total": outer + self.n_dense_layers * dense + n_moe * (block + moe.total),
                "active": outer + self.n_dense_layers * dense + n_moe * (block + moe.active),
                "routed_experts": n_moe * moe.routed}
