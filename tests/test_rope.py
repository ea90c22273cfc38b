"""Rotary embeddings against an independent float64 complex-multiplication reference."""

from __future__ import annotations

import math

import pytest
import torch

from moe_lib.model.rope import apply_rope, rope_angles


def reference_rope(x: torch.Tensor, start: int, theta: float) -> torch.Tensor:
    """(x_{2i} + j x_{2i+1}) * exp(j p theta^(-2i/d)), in complex128, positions p on dim 1."""
    d = x.shape[-1]
    freqs = torch.tensor([theta ** (-2 * i / d) for i in range(d // 2)], dtype=torch.float64)
    pos = torch.arange(start, start + x.shape[1], dtype=torch.float64)
    rot = torch.polar(torch.ones(len(pos), d // 2, dtype=torch.float64), torch.outer(pos, freqs))
    rot = rot.view(1, x.shape[1], *([1] * (x.dim() - 3)), d // 2)
    z = torch.view_as_complex(x.double().reshape(*x.shape[:-1], d // 2, 2).contiguous())
    return torch.view_as_real(z * rot).flatten(-2)


@pytest.mark.parametrize("shape", [(2, 7, 3, 8), (3, 5, 16)])
@pytest.mark.parametrize("start", [0, 11])
def test_rope_matches_complex_reference(shape, start):
    x = torch.randn(shape, dtype=torch.float64)
    rot = rope_angles(start, shape[1], shape[-1], 10000.0, torch.float64)
    torch.testing.assert_close(apply_rope(x, rot), reference_rope(x, start, 10000.0), rtol=1e-12, atol=1e-12)
    x32 = x.float()
    out32 = apply_rope(x32, rope_angles(start, shape[1], shape[-1], 10000.0, torch.float32))
    assert out32.dtype == torch.float32
    torch.testing.assert_close(out32.double(), reference_rope(x32, start, 10000.0), rtol=0, atol=2e-5)


def test_rope_pairs_are_interleaved_and_first_pair_turns_by_position():
    x = torch.zeros(1, 3, 4, dtype=torch.float64)
    x[..., 0] = 1.0  # the first pair is (x0, x1) = (1, 0): it turns by angle p * theta^0 = p
    out = apply_rope(x, rope_angles(0, 3, 4, 500.0, torch.float64))
    for p in range(3):
        torch.testing.assert_close(out[0, p], torch.tensor([math.cos(p), math.sin(p), 0, 0],
                                                           dtype=torch.float64))


def test_rope_scores_depend_on_relative_position_only():
    q, k = torch.randn(1, 1, 8, dtype=torch.float64), torch.randn(1, 1, 8, dtype=torch.float64)
    def score(pq, pk):
        rq = apply_rope(q, rope_angles(pq, 1, 8, 100.0, torch.float64))
        rk = apply_rope(k, rope_angles(pk, 1, 8, 100.0, torch.float64))
        return float((rq * rk).sum())
    assert score(5, 2) == pytest.approx(score(13, 10), abs=1e-12)
    assert abs(score(5, 2) - score(5, 3)) > 1e-3
