"""moe_lib: DeepSeek-style Mixture-of-Experts, exactly as DeepSeek-V3 does it, readable and tested."""

from .balance import LoadMonitor, update_bias
from .config import MoEConfig
from .experts import Expert, RoutedExperts
from .model import ModelConfig, Transformer, generate
from .moe import DeepSeekMoE, RoutingStats
from .router import Router, Routing, route
from .train.checkpoint import load_checkpoint, load_tokenizer

__all__ = ["DeepSeekMoE", "Expert", "LoadMonitor", "MoEConfig", "ModelConfig", "RoutedExperts", "Router",
           "Routing", "RoutingStats", "Transformer", "generate", "load_checkpoint", "load_tokenizer", "route",
           "update_bias"]
__version__ = "0.1.0"
