"""The MLA key-value cache: per layer and token, only the normalised latent c_KV and the rope key.

Standard multi-head attention caches every head's key and value, n_h (d_qk + d_v) numbers per token
and layer. MLA caches what all heads share, kv_lora_rank + qk_rope_head_dim numbers (DeepSeek-V2
Sec. 2.1.2, Table 1), and recovers the per-head keys and values inside the attention by absorbing
W_UK into the query and W_UV into the output (`moe_lib.model.attention`).
"""

from __future__ import annotations

import torch

from .config import ModelConfig


class KVCache:
    """Latents and rope keys of `n_layers` attention layers for a batch of `batch_size` sequences.

    latent: [n_layers, B, max_seq_len, kv_lora_rank], kv_a_layernorm(c_KV) of each cached token.
    k_rope: [n_layers, B, max_seq_len, qk_rope_head_dim], the rotated shared rope key.
    Both are views of one tensor `kv` [n_layers, B, max_seq_len, kv_lora_rank + qk_rope_head_dim],
    which is exactly the key of the absorbed attention (no concatenation per decoding step).
    length: tokens cached so far (the same for every sequence of the batch); the next tokens are
        written at positions length, length+1, ...
    """

    def __init__(self, n_layers: int, batch_size: int, max_seq_len: int, kv_lora_rank: int,
                 qk_rope_head_dim: int, dtype: torch.dtype = torch.float32,
                 device: torch.device | str = "cpu"):
        for name, value in (("n_layers", n_layers), ("batch_size", batch_size),
                            ("max_seq_len", max_seq_len), ("kv_lora_rank", kv_lora_rank),
                            ("qk_rope_head_dim", qk_rope_head_dim)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"KVCache {name}={value!r} is invalid: expected a positive integer.")
        self.kv = torch.zeros(n_layers, batch_size, max_seq_len, kv_lora_rank + qk_rope_head_dim,
                              dtype=dtype, device=device)
        self.kv_lora_rank = kv_lora_rank
        self.length = 0

    @classmethod
    def for_config(cls, cfg: ModelConfig, batch_size: int, n_layers: int | None = None,
                   dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> KVCache:
        """A cache shaped for `cfg` (all its `n_layers` attention layers unless given)."""
        return cls(cfg.n_layers if n_layers is None else n_layers, batch_size, cfg.max_seq_len,
                   cfg.kv_lora_rank, cfg.qk_rope_head_dim, dtype, device)

    @property
    def latent(self) -> torch.Tensor:
        return self.kv[..., :self.kv_lora_rank]

    @property
    def k_rope(self) -> torch.Tensor:
        return self.kv[..., self.kv_lora_rank:]

    @property
    def n_layers(self) -> int:
        return self.kv.shape[0]

    @property
    def batch_size(self) -> int:
        return self.kv.shape[1]

    @property
    def max_seq_len(self) -> int:
        return self.kv.shape[2]

    def write(self, layer: int, latent_BSC: torch.Tensor, k_rope_BSR: torch.Tensor) -> torch.Tensor:
        """Store S new tokens of `layer` at positions length .. length+S-1 (`length` is advanced
        separately, by `advance`, once every layer has written). Returns the layer's cache
        [B, length+S, C+R] (latent then rope key), new tokens included."""
        end = self.length + latent_BSC.shape[1]
        self.kv[layer, :, self.length:end, :self.kv_lora_rank] = latent_BSC
        self.kv[layer, :, self.length:end, self.kv_lora_rank:] = k_rope_BSR
        return self.kv[layer, :, :end]

    def advance(self, n_tokens: int) -> None:
        """Count `n_tokens` newly written tokens as cached."""
        if self.length + n_tokens > self.max_seq_len:
            raise ValueError(f"KVCache overflow: {self.length} cached + {n_tokens} new tokens exceed "
                             f"max_seq_len={self.max_seq_len}.")
        self.length += n_tokens

    def truncate(self, n: int) -> None:
        """Roll back to the first `n` tokens (rejected speculative tokens are dropped this way)."""
        if not isinstance(n, int) or not 0 <= n <= self.length:
            raise ValueError(f"KVCache.truncate({n!r}) is invalid: expected an integer in "
                             f"[0, length={self.length}].")
        self.length = n

    def nbytes_per_token(self) -> int:
        """Bytes cached per token of one sequence, all layers: n_layers (C + R) * element size."""
        return self.n_layers * self.kv.shape[-1] * self.kv.element_size()

    def __repr__(self) -> str:
        return (f"KVCache(n_layers={self.n_layers}, batch_size={self.batch_size}, length={self.length}"
                f", max_seq_len={self.max_seq_len}, dtype={self.kv.dtype})")


def cache_bytes_per_token(cfg: ModelConfig, dtype: torch.dtype = torch.float32) -> dict[str, float]:
    """Cache bytes per token of one sequence for `cfg`'s n_layers: MLA vs standard multi-head attention.

        MLA: n_layers (kv_lora_rank + qk_rope_head_dim) bytes_per_element
        MHA: n_layers n_heads (qk_nope_head_dim + qk_rope_head_dim + v_head_dim) bytes_per_element
    (MHA with the same heads and head dims, caching every head's key and value.)
    """
    size = torch.empty((), dtype=dtype).element_size()
    mla = cfg.n_layers * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * size
    mha = cfg.n_layers * cfg.n_heads * (cfg.qk_head_dim + cfg.v_head_dim) * size
    return {"mla": mla, "mha": mha, "ratio": mha / mla}
