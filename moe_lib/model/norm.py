"""RMSNorm (Zhang & Sennrich 2019), as DeepSeek-V3 uses it before attention, FFN, latents and head.

    RMSNorm(x) = x / sqrt(mean(x^2) + eps) * weight
"""

from __future__ import annotations

import torch
from torch import nn


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x / sqrt(mean_j x_j^2 + eps) * weight over the last dim, computed in float32 at least."""
    x_f = x.to(torch.promote_types(x.dtype, torch.float32))
    normed = x_f * torch.rsqrt(x_f.pow(2).mean(dim=-1, keepdim=True) + eps)
    return normed.to(x.dtype) * weight


class RMSNorm(nn.Module):
    """RMSNorm over the last dim of width `dim`, with a learned scale `weight` (initialised to 1)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"
