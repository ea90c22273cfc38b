"""The whole model: a DeepSeek-V3-style decoder with Multi-head Latent Attention, DeepSeekMoE blocks,
Multi-Token Prediction modules, a latent KV cache and generation."""

from .cache import KVCache, cache_bytes_per_token
from .config import ModelConfig
from .generate import generate
from .mtp import MTPModule, mtp_loss, mtp_objective
from .speculative import SpeculationStats, speculative_generate
from .transformer import Transformer

__all__ = ["KVCache", "MTPModule", "ModelConfig", "SpeculationStats", "Transformer", "cache_bytes_per_token",
           "generate", "mtp_loss", "mtp_objective", "speculative_generate"]
