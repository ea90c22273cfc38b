"""The whole decoder: token embedding, n_layers pre-norm blocks (dense, then MoE), final norm, head,
and optionally D Multi-Token Prediction modules that share the embedding and the head.

    h_0 = Emb(ids);   h_l = Block_l(h_{l-1});   logits = lm_head(norm(h_L))

Parameter names are those of DeepSeek's published checkpoints without the leading `model.`.
"""

from __future__ import annotations

import torch
from torch import nn

from ..experts import RoutedExperts
from ..kernels import linear
from ..moe import DeepSeekMoE
from ..router import Router
from .block import Block
from .cache import KVCache
from .config import ModelConfig
from .mtp import MTPModule
from .norm import RMSNorm
from .rope import rope_angles


def check_ids(ids_BS, vocab_size: int, max_seq_len: int, n_cached: int = 0) -> None:
    """Raise a TypeError/ValueError naming the problem unless ids_BS is a valid [B, S] id tensor
    that fits after `n_cached` cached tokens."""
    if not isinstance(ids_BS, torch.Tensor):
        raise TypeError(f"token ids must be a torch.Tensor of integers, got {type(ids_BS).__name__}")
    if ids_BS.dtype.is_floating_point or ids_BS.dtype.is_complex or ids_BS.dtype == torch.bool:
        raise TypeError(f"token ids must be an integer tensor (torch.long), got dtype {ids_BS.dtype}")
    if ids_BS.dim() != 2:
        raise ValueError(f"token ids must have shape [batch, seq], got shape {tuple(ids_BS.shape)}"
                         + (" (use ids.unsqueeze(0) for one sequence)" if ids_BS.dim() == 1 else ""))
    if ids_BS.numel() == 0:
        raise ValueError(f"token ids are empty (shape {tuple(ids_BS.shape)}): need at least one "
                         "sequence of at least one token")
    bad = (ids_BS < 0) | (ids_BS >= vocab_size)
    if bad.any():
        b, s = (int(i) for i in bad.nonzero()[0])
        raise ValueError(f"token id {int(ids_BS[b, s])} at [batch {b}, position {s}] is out of range "
                         f"[0, vocab_size={vocab_size})")
    if n_cached + ids_BS.shape[1] > max_seq_len:
        raise ValueError(f"sequence too long: {n_cached} cached + {ids_BS.shape[1]} new tokens = "
                         f"{n_cached + ids_BS.shape[1]} > max_seq_len={max_seq_len}")


class Transformer(nn.Module):
    """A DeepSeek-V3-style decoder: embed_tokens, layers, norm, lm_head (not tied), mtp.

    model(ids [B, S], cache=None) -> logits [B, S, vocab] (positions 0..S-1 without a cache,
    cache.length.. with one). Weights are initialised normal(0, init_std), MoE experts and router
    included, as DeepSeek-V3 initialises all learnable parameters (Sec. 4.2); norms start at 1 and
    the correction bias at 0.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.layers = nn.ModuleList(Block(cfg, moe=i >= cfg.n_dense_layers) for i in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.mtp = nn.ModuleList(MTPModule(cfg) for _ in range(cfg.mtp_depth))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """normal(0, init_std) for every linear, embedding, router and expert weight; norms to 1."""
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding, Router)):
                nn.init.normal_(module.weight, std=self.cfg.init_std)
            elif isinstance(module, RoutedExperts):
                nn.init.normal_(module.gate_up_proj, std=self.cfg.init_std)
                nn.init.normal_(module.down_proj, std=self.cfg.init_std)
            elif isinstance(module, RMSNorm):
                nn.init.ones_(module.weight)

    def forward(self, ids_BS: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        return self.head(self.forward_hidden(ids_BS, cache))

    def forward_hidden(self, ids_BS: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        """Final hidden states [B, S, H] BEFORE the final norm (the input of MTP depth 1)."""
        start = self._check_inputs(ids_BS, cache, self.cfg.n_layers)
        x_BSH = self.embed_tokens(ids_BS.long())
        rotary = rope_angles(start, ids_BS.shape[1], self.cfg.qk_rope_head_dim, self.cfg.rope_theta,
                             x_BSH.dtype, x_BSH.device)
        for i, layer in enumerate(self.layers):
            x_BSH = layer(x_BSH, rotary, cache, i)
        if cache is not None:
            cache.advance(ids_BS.shape[1])
        return x_BSH

    def head(self, h_BSH: torch.Tensor) -> torch.Tensor:
        """Logits lm_head(norm(h)) [B, S, vocab]."""
        return linear(self.norm(h_BSH), self.lm_head.weight)

    def forward_with_mtp(self, ids_BS: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Main logits [B, S, V] and, for each MTP depth k = 1..D, logits [B, S-k, V] whose
        position i predicts token i+k+1 of ids (training; no cache; see `mtp.mtp_objective`)."""
        if isinstance(ids_BS, torch.Tensor) and ids_BS.dim() == 2 and ids_BS.shape[1] <= self.cfg.mtp_depth:
            raise ValueError(f"forward_with_mtp needs sequences longer than mtp_depth="
                             f"{self.cfg.mtp_depth}, got shape {tuple(ids_BS.shape)}")
        h_BSH = self.forward_hidden(ids_BS)
        logits_BSV = self.head(h_BSH)
        depth_logits = []
        for k in range(1, self.cfg.mtp_depth + 1):
            h_BSH = self.mtp_forward(k, h_BSH[:, :-1], ids_BS[:, k:])
            depth_logits.append(self.mtp_head(k, h_BSH))
        return logits_BSV, depth_logits

    def mtp_forward(self, depth: int, h_prev_BSH: torch.Tensor, ahead_ids_BS: torch.Tensor,
                    cache: KVCache | None = None) -> torch.Tensor:
        """Hidden states h_k [B, S, H] of MTP depth k (module `mtp[k-1]`) from the previous depth's
        h_prev [B, S, H] and the ids k tokens ahead of its positions. With a one-layer cache
        (`new_mtp_cache`), the S positions follow the cache.length cached ones."""
        if not 1 <= depth <= self.cfg.mtp_depth:
            raise ValueError(f"MTP depth {depth!r} is invalid: expected 1..mtp_depth={self.cfg.mtp_depth}")
        start = self._check_inputs(ahead_ids_BS, cache, 1)
        if h_prev_BSH.shape != (*ahead_ids_BS.shape, self.cfg.d_model):
            raise ValueError(f"mtp_forward: h_prev of shape {tuple(h_prev_BSH.shape)} does not match ids "
                             f"of shape {tuple(ahead_ids_BS.shape)} (expected [B, S, {self.cfg.d_model}])")
        emb_BSH = self.embed_tokens(ahead_ids_BS.long())
        rotary = rope_angles(start, ahead_ids_BS.shape[1], self.cfg.qk_rope_head_dim, self.cfg.rope_theta,
                             emb_BSH.dtype, emb_BSH.device)
        h_BSH = self.mtp[depth - 1](h_prev_BSH, emb_BSH, rotary, cache)
        if cache is not None:
            cache.advance(ahead_ids_BS.shape[1])
        return h_BSH

    def mtp_head(self, depth: int, h_BSH: torch.Tensor) -> torch.Tensor:
        """Logits of MTP depth k: the main lm_head on mtp[k-1].shared_head.norm(h_k)."""
        return linear(self.mtp[depth - 1].shared_head.norm(h_BSH), self.lm_head.weight)

    def moe_layers(self, include_mtp: bool = False) -> list[DeepSeekMoE]:
        """The DeepSeekMoE layers in layer order (then the MTP modules' when include_mtp)."""
        blocks = list(self.layers) + (list(self.mtp) if include_mtp else [])
        return [block.mlp for block in blocks if isinstance(block.mlp, DeepSeekMoE)]

    def new_cache(self, batch_size: int) -> KVCache:
        """An empty KVCache for all n_layers, in the model's dtype and device."""
        weight = self.embed_tokens.weight
        return KVCache.for_config(self.cfg, batch_size, dtype=weight.dtype, device=weight.device)

    def new_mtp_cache(self, batch_size: int) -> KVCache:
        """An empty one-layer KVCache for one MTP module (each depth needs its own)."""
        weight = self.embed_tokens.weight
        return KVCache.for_config(self.cfg, batch_size, n_layers=1, dtype=weight.dtype,
                                  device=weight.device)

    def _check_inputs(self, ids_BS, cache: KVCache | None, n_layers: int) -> int:
        """Validate ids (and the cache they extend); return the position of the first new token."""
        cfg = self.cfg
        start = 0 if cache is None else cache.length
        check_ids(ids_BS, cfg.vocab_size, cfg.max_seq_len, start)
        if cache is None:
            return 0
        expected = (n_layers, ids_BS.shape[0], cfg.kv_lora_rank, cfg.qk_rope_head_dim)
        got = (cache.n_layers, cache.batch_size, cache.kv_lora_rank, cache.kv.shape[-1] - cache.kv_lora_rank)
        if got != expected:
            raise ValueError(f"KVCache does not fit: (n_layers, batch, kv_lora_rank, qk_rope_head_dim) = "
                             f"{got}, expected {expected}")
        weight = self.embed_tokens.weight
        if cache.kv.dtype != weight.dtype or cache.kv.device != weight.device:
            raise ValueError(f"KVCache holds {cache.kv.dtype} on {cache.kv.device}, the model "
                             f"{weight.dtype} on {weight.device}: create it with new_cache() after .to()")
        if start + ids_BS.shape[1] > cache.max_seq_len:
            raise ValueError(f"sequence too long for the cache: {start} cached + {ids_BS.shape[1]} new "
                             f"tokens > its max_seq_len={cache.max_seq_len}")
        return start
