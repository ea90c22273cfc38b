"""Interoperability with Hugging Face transformers and DeepSeek's published checkpoints.

`from_transformers` / `to_transformers` convert one MoE layer (`layer`) or a whole model (`model`),
by the type of their argument; `published` loads DeepSeek's released checkpoints (safetensors shards,
FP8 block scales), whole or one layer at a time.
"""

from torch import nn

from ..model import Transformer
from . import layer
from .model import model_from_transformers, model_to_transformers
from .published import PublishedCheckpoint, dequantize_fp8, load_deepseek, load_deepseek_layer


def from_transformers(module: nn.Module, **overrides) -> nn.Module:
    """The moe_lib twin of a transformers module, with copied weights: a `Transformer` for a
    `DeepseekV3ForCausalLM` (`model_from_transformers`), a `DeepSeekMoE` for a `DeepseekV3MoE` or
    `DeepseekV2Moe` (`layer.from_transformers`). `overrides`: MoEConfig dispatch/balancing fields."""
    from transformers import PreTrainedModel

    if isinstance(module, PreTrainedModel):
        return model_from_transformers(module, **overrides)
    return layer.from_transformers(module, **overrides)


def to_transformers(module: nn.Module, **options) -> nn.Module:
    """The transformers twin of a `Transformer` (`model_to_transformers`, options: drop_mtp) or of a
    `DeepSeekMoE` (`layer.to_transformers`)."""
    if isinstance(module, Transformer):
        return model_to_transformers(module, **options)
    return layer.to_transformers(module, **options)


__all__ = ["PublishedCheckpoint", "dequantize_fp8", "from_transformers", "load_deepseek",
           "load_deepseek_layer", "model_from_transformers", "model_to_transformers", "to_transformers"]
