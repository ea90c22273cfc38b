"""`ModelConfig`: a whole DeepSeek-V3-style decoder (MLA attention, dense then MoE blocks, MTP).

Field names follow DeepSeek-V3's `inference/model.py` `ModelArgs` where they exist, so a reader can
hold the released `config.json`, the reference code and this library side by side:

    vocab_size, d_model (dim), n_layers, n_dense_layers (first_k_dense_replace), d_dense (inter_dim),
    n_heads, q_lora_rank, kv_lora_rank, qk_nope_head_dim, qk_rope_head_dim, v_head_dim,
    max_seq_len, rope_theta, moe (the `MoEConfig` of every MoE block), mtp_depth.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields, replace

from ..config import MoEConfig


def _default_moe() -> MoEConfig:
    return MoEConfig(d_model=128, d_expert=64, n_routed=16, n_shared=1, top_k=4, n_groups=4,
                     topk_groups=2, score_func="sigmoid", route_scale=2.5)


@dataclass(frozen=True)
class ModelConfig:
    """Configuration of a `moe_lib.model.Transformer`.

    vocab_size: token ids are in [0, vocab_size).
    d_model: hidden size H (must equal `moe.d_model`).
    n_layers / n_dense_layers: blocks in all, of which the first `n_dense_layers` use a dense SwiGLU
        FFN of width `d_dense` and the rest the `DeepSeekMoE` layer configured by `moe`.
    n_heads: attention heads.
    q_lora_rank: rank of the query compression (0 = no compression: one wq projection).
    kv_lora_rank: width of the compressed KV latent c_KV (what the cache stores, with the rope key).
    qk_nope_head_dim / qk_rope_head_dim: per-head query/key dims without and with rotary embedding;
        the rope key is one head shared by all heads.
    v_head_dim: per-head value dim.
    max_seq_len: longest sequence (prompt + generated tokens) the model accepts.
    rope_theta: RoPE base.
    norm_eps: RMSNorm epsilon.
    mtp_depth: number D of sequential Multi-Token Prediction modules (0 = none).
    mtp_moe: whether each MTP module's block uses the MoE FFN (else a dense FFN of width d_dense).
    init_std: standard deviation of the normal initialisation of the linear and embedding weights.
    """

    vocab_size: int = 256
    d_model: int = 128
    n_layers: int = 4
    n_dense_layers: int = 1
    d_dense: int = 256
    n_heads: int = 4
    q_lora_rank: int = 0
    kv_lora_rank: int = 64
    qk_nope_head_dim: int = 32
    qk_rope_head_dim: int = 16
    v_head_dim: int = 32
    max_seq_len: int = 256
    rope_theta: float = 10000.0
    norm_eps: float = 1e-6
    moe: MoEConfig = field(default_factory=_default_moe)
    mtp_depth: int = 0
    mtp_moe: bool = True
    init_std: float = 0.02

    def __post_init__(self) -> None:
        if isinstance(self.moe, dict):  # from JSON
            object.__setattr__(self, "moe", MoEConfig(**self.moe))
        for name in ("vocab_size", "d_model", "n_layers", "d_dense", "n_heads", "kv_lora_rank",
                     "qk_rope_head_dim", "v_head_dim", "max_seq_len"):
            value = getattr(self, name)
            _check(isinstance(value, int) and value >= 1, name, value, "a positive integer")
        for name in ("n_dense_layers", "q_lora_rank", "qk_nope_head_dim", "mtp_depth"):
            value = getattr(self, name)
            _check(isinstance(value, int) and value >= 0, name, value, "an integer >= 0")
        _check(self.n_dense_layers <= self.n_layers, "n_dense_layers", self.n_dense_layers,
               f"at most n_layers={self.n_layers}")
        _check(self.qk_rope_head_dim % 2 == 0, "qk_rope_head_dim", self.qk_rope_head_dim,
               "an even number (rotary embeddings rotate pairs)")
        _check(isinstance(self.moe, MoEConfig), "moe", self.moe, "a MoEConfig")
        _check(self.moe.d_model == self.d_model, "moe", f"MoEConfig(d_model={self.moe.d_model}, ...)",
               f"a MoEConfig with d_model={self.d_model} (the model's d_model)")
        _check(self.rope_theta > 0, "rope_theta", self.rope_theta, "a positive number")
        _check(self.norm_eps > 0, "norm_eps", self.norm_eps, "a positive number")
        _check(self.init_std > 0, "init_std", self.init_std, "a positive number")

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def n_moe_layers(self) -> int:
        return self.n_layers - self.n_dense_layers

    def replace(self, **changes) -> ModelConfig:
        """A copy with some fields changed (validated again)."""
        return replace(self, **changes)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> ModelConfig:
        """The inverse of `to_dict`; unknown keys are an error that names them."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"ModelConfig has no field(s) {unknown}; known fields: {sorted(known)}")
        return cls(**data)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)


def _check(ok: bool, name: str, value, allowed: str) -> None:
    if not ok:
        raise ValueError(f"ModelConfig.{name}={value!r} is invalid: expected {allowed}.")
