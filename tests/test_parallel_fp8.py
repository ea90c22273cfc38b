"""FP8 dispatch payloads: power-of-two block scales, nearest e4m3 rounding, bounded error."""

from __future__ import annotations

import pytest
import torch

from moe_lib.parallel import fp8

E4M3_VALUES = torch.arange(256, dtype=torch.uint8).view(fp8.E4M3).float()
E4M3_VALUES = E4M3_VALUES[torch.isfinite(E4M3_VALUES)].unique()


def test_scales_are_powers_of_two_that_fit_each_block_into_e4m3():
    x = torch.randn(32, 300) * torch.logspace(-4, 4, 300)
    payload = fp8.quantize(x)
    assert payload.codes_NH.dtype == torch.uint8 and payload.codes_NH.shape == (32, 300)
    assert payload.scales_NB.shape == (32, 3)                      # ceil(300 / 128) blocks
    exponent = torch.log2(payload.scales_NB)
    assert torch.equal(exponent, exponent.round())
    amax = torch.nn.functional.pad(x.abs(), (0, 84)).view(32, 3, 128).amax(-1)
    ratio = amax / payload.scales_NB
    assert (ratio <= fp8.E4M3_MAX).all() and (ratio > fp8.E4M3_MAX / 2).all()


def test_round_trip_is_the_nearest_e4m3_value_times_the_scale():
    x = torch.randn(16, 256) * 3
    payload = fp8.quantize(x)
    scaled = x / payload.scales_NB.repeat_interleave(128, dim=1)
    decoded = payload.codes_NH.view(fp8.E4M3).float()
    nearest = (scaled.unsqueeze(-1) - E4M3_VALUES).abs().min(dim=-1).values
    assert torch.allclose((scaled - decoded).abs(), nearest, rtol=0, atol=1e-6)
    torch.testing.assert_close(fp8.round_trip(x), decoded * payload.scales_NB.repeat_interleave(128, 1))


def test_elementwise_error_bounds_and_vector_error():
    x = torch.randn(64, 512)
    approx = fp8.round_trip(x)
    scale = fp8.quantize(x).scales_NB.repeat_interleave(128, dim=1)
    normal = x.abs() >= scale * 2.0**-6                             # e4m3's smallest normal
    assert ((approx - x).abs()[normal] <= 2.0**-4 * x.abs()[normal] + 1e-12).all()
    assert ((approx - x).abs()[~normal] <= scale[~normal] * 2.0**-10 + 1e-12).all()
    assert 0.005 < fp8.relative_error(x, approx) < 0.05
    assert fp8.relative_error(x, x.bfloat16().float()) < fp8.relative_error(x, approx)


@pytest.mark.parametrize("shape", [(0, 128), (3, 5), (2, 7168)])
def test_edge_shapes_and_zero_blocks(shape):
    x = torch.randn(shape)
    if x.numel():
        x[0] = 0.0
    approx = fp8.round_trip(x)
    assert approx.shape == x.shape and approx.dtype == x.dtype
    if x.numel():
        assert (approx[0] == 0).all() and (fp8.quantize(x).scales_NB[0] == 1).all()


def test_payload_bytes():
    assert fp8.payload_bytes(7168) == 7168 + 4 * 56
    assert fp8.payload_bytes(16) == 16 + 4
