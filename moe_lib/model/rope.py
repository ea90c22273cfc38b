"""Rotary position embeddings (RoFormer, arXiv 2104.09864) as DeepSeek-V3 applies them.

Pairs are INTERLEAVED: (x_{2i}, x_{2i+1}) is rotated by the angle p * theta_i at position p, with

    theta_i = rope_theta^(-2i/d),   i = 0 .. d/2 - 1,
    (x_{2i} + j x_{2i+1}) -> (x_{2i} + j x_{2i+1}) * exp(j p theta_i),

the complex-multiplication form of DeepSeek-V3's `inference/model.py`. MLA rotates only the
`qk_rope_head_dim` part of each query head and the one rope key shared by all heads.
(transformers' DeepseekV3 with `rope_interleave=True` permutes to its half-split layout and back,
which gives the same attention scores.)
"""

from __future__ import annotations

from typing import NamedTuple

import torch


class Rotary(NamedTuple):
    """cos and sin of the angles p * theta_i, each [S, d/2], for S consecutive positions."""

    cos: torch.Tensor
    sin: torch.Tensor


def rope_angles(start: int, length: int, dim: int, theta: float, dtype: torch.dtype,
                device: torch.device | str = "cpu") -> Rotary:
    """cos/sin of p * theta_i for positions p = start .. start+length-1, in float32 at least."""
    dtype = torch.promote_types(dtype, torch.float32)
    inv_freq_D2 = 1.0 / theta ** (torch.arange(0, dim, 2, dtype=dtype, device=device) / dim)
    positions_S = torch.arange(start, start + length, dtype=dtype, device=device)
    angles_SD2 = torch.outer(positions_S, inv_freq_D2)
    return Rotary(angles_SD2.cos(), angles_SD2.sin())


def apply_rope(x: torch.Tensor, rotary: Rotary) -> torch.Tensor:
    """Rotate interleaved pairs of x [B, S, ..., d] by the angles of `rotary` (positions on dim 1).

        (a, b) -> (a cos - b sin, a sin + b cos)    for (a, b) = (x_{2i}, x_{2i+1})
    """
    shape = (1, x.shape[1]) + (1,) * (x.dim() - 3) + (x.shape[-1] // 2,)
    cos, sin = rotary.cos.view(shape), rotary.sin.view(shape)
    pairs = x.to(cos.dtype).unflatten(-1, (-1, 2))
    a, b = pairs[..., 0], pairs[..., 1]
    rotated = torch.stack((a * cos - b * sin, a * sin + b * cos), dim=-1)
    return rotated.flatten(-2).to(x.dtype)
