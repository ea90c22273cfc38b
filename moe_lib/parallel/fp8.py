"""FP8 (e4m3) dispatch payloads with per-128-channel power-of-two scales (DeepSeek-V3 Sec. 3.3).

DeepSeek-V3 sends the activations that go to the experts in FP8 and combines their outputs in
BF16. Each token's hidden vector is cut into blocks of 128 channels, and each block gets one scale,
a power of two so that scaling and unscaling are exact:

    s = 2^ceil(log2(amax / 448))        (448: the largest finite e4m3 value)
    q = e4m3(x / s),   x' = q * s       (per token and 128-channel block)

The payload is 1 byte per channel plus one float32 scale per block (4/128 byte per channel):
3.1% more than the 1 byte/channel of plain FP8, half of BF16. e4m3 keeps 3 mantissa bits, so a
value in the normal range is rounded by at most 2^-4 of itself (6.25%); the error of a whole
vector is much smaller (`relative_error`).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F

E4M3 = torch.float8_e4m3fn
E4M3_MAX = 448.0
BLOCK = 128


class FP8Payload(NamedTuple):
    """A quantised [N, H] tensor: e4m3 codes as bytes [N, H] (uint8) and scales [N, ceil(H/128)]."""

    codes_NH: torch.Tensor
    scales_NB: torch.Tensor


def block_scales(amax_NB: torch.Tensor) -> torch.Tensor:
    """Power-of-two scales 2^ceil(log2(amax / 448)) per block; 1 for an all-zero block."""
    exponent_NB = torch.ceil(torch.log2(amax_NB.float() / E4M3_MAX))
    return torch.where(amax_NB > 0, torch.exp2(exponent_NB), torch.ones_like(exponent_NB))


def _blocks(x_NH: torch.Tensor, block: int) -> torch.Tensor:
    """[N, B, block] view of x zero-padded to a multiple of `block` channels."""
    n_blocks = math.ceil(x_NH.shape[1] / block)
    return F.pad(x_NH, (0, n_blocks * block - x_NH.shape[1])).view(x_NH.shape[0], n_blocks, block)


def quantize(x_NH: torch.Tensor, block: int = BLOCK) -> FP8Payload:
    """e4m3 codes (as uint8 bytes, which every collective backend can send) and block scales."""
    blocks_NBC = _blocks(x_NH.float(), block)
    scales_NB = block_scales(blocks_NBC.abs().amax(dim=-1))
    codes_NBC = (blocks_NBC / scales_NB.unsqueeze(-1)).to(E4M3)
    codes_NH = codes_NBC.flatten(1)[:, :x_NH.shape[1]].contiguous()
    return FP8Payload(codes_NH.view(torch.uint8), scales_NB)


def dequantize(payload: FP8Payload, dtype: torch.dtype, block: int = BLOCK) -> torch.Tensor:
    """x' = q * s, back to `dtype` ([N, H])."""
    codes_NH = payload.codes_NH.view(E4M3).float()
    values_NBC = _blocks(codes_NH, block) * payload.scales_NB.unsqueeze(-1)
    return values_NBC.flatten(1)[:, :codes_NH.shape[1]].to(dtype)


def round_trip(x_NH: torch.Tensor, block: int = BLOCK) -> torch.Tensor:
    """What the receiver of an FP8 dispatch sees: dequantize(quantize(x))."""
    return dequantize(quantize(x_NH, block), x_NH.dtype, block)


def relative_error(x: torch.Tensor, approx: torch.Tensor) -> float:
    """||x - approx|| / ||x|| (Frobenius), in float64."""
    x, approx = x.double(), approx.double()
    return ((x - approx).norm() / x.norm().clamp_min(1e-300)).item()


def payload_bytes(d_model: int, block: int = BLOCK) -> int:
    """Bytes per token of an FP8 payload: one per channel plus a float32 scale per block."""
    return d_model + 4 * math.ceil(d_model / block)
