"""Matrix-multiply backends: oneDNN on the CPU where torch has it, torch's defaults elsewhere.

torch's float32 `mm` on the CPU calls MKL's sgemm. On some CPUs (the AMD EPYC machines this book is
tested on) oneDNN, which torch also ships, runs these GEMMs much faster at the same float32
precision (`python -m moe_lib.bench cpu` times a dense matmul both ways). Every function here
computes exactly the product it names and falls back to plain torch for other devices, dtypes or
builds.

Conventions (`_nt`: the second operand is used transposed, like `F.linear`):
    mm_nt(a_MK, b_NK) = a @ b^T                                   -> [M, N]
    grouped_mm_nt(a_NK, b_EOK, counts) = per expert e: a_e @ b_e^T    -> [N, O]
    grouped_mm_nn(a_NO, b_EOK, counts) = per expert e: a_e @ b_e      -> [N, K]
    grouped_mm_tn(a_NO, b_NK, counts)  = per expert e: a_e^T @ b_e    -> [E, O, K]
where rows of a (and b) are sorted by expert and `counts` are the rows per expert.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import register_flop_formula

_LINEAR = getattr(getattr(torch.ops, "mkldnn", None), "_linear_pointwise", None)
ONEDNN = _LINEAR is not None and torch.backends.mkldnn.is_available()
_GROUPED_MM = getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)
HAS_GROUPED_MM = _GROUPED_MM is not None


if ONEDNN:
    @register_flop_formula(torch.ops.mkldnn._linear_pointwise)
    def _linear_flops(x_shape, w_shape, *_args, **_kwargs) -> int:
        """2 M K N, so that torch's FlopCounterMode counts oneDNN's linear like aten.mm."""
        return 2 * math.prod(x_shape) * w_shape[0]


def use_onednn(*tensors: torch.Tensor) -> bool:
    """Whether oneDNN takes these operands: non-empty float32 CPU tensors, in a build that has it."""
    return ONEDNN and all(t.device.type == "cpu" and t.dtype == torch.float32 and t.numel() > 0
                          for t in tensors)


def use_grouped_mm(x: torch.Tensor, *dims: int) -> bool:
    """Whether torch's grouped_mm takes x: float32 or a 16-bit type, with every dim a multiple of
    16 bytes (its rows must be 16-byte aligned: 4 float32 or 8 16-bit elements)."""
    if not HAS_GROUPED_MM or x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return False
    return all(d * x.element_size() % 16 == 0 for d in dims)


def mm_nt(a_MK: torch.Tensor, b_NK: torch.Tensor) -> torch.Tensor:
    """a @ b^T for 2-D operands (no autograd)."""
    if use_onednn(a_MK, b_NK):
        return _LINEAR(a_MK, b_NK, None, "none", [], "")
    return a_MK @ b_NK.t()


class _Linear(torch.autograd.Function):
    """x @ w^T on 2-D x with the backward written in the same kernel: dx = g @ w, dw = g^T @ x."""

    @staticmethod
    def forward(ctx, x_MK, w_NK):
        ctx.save_for_backward(x_MK, w_NK)
        return mm_nt(x_MK, w_NK)

    @staticmethod
    def backward(ctx, grad_MN):
        x_MK, w_NK = ctx.saved_tensors
        grad_x = mm_nt(grad_MN, w_NK.t()) if ctx.needs_input_grad[0] else None
        grad_w = mm_nt(grad_MN.t(), x_MK.t()) if ctx.needs_input_grad[1] else None
        return grad_x, grad_w


def linear(x: torch.Tensor, weight_NK: torch.Tensor) -> torch.Tensor:
    """`F.linear(x, weight)` without bias, for x of any leading shape [..., K] -> [..., N]."""
    if not use_onednn(x, weight_NK):
        return F.linear(x, weight_NK)
    return _Linear.apply(x.reshape(-1, x.shape[-1]), weight_NK).view(*x.shape[:-1], weight_NK.shape[0])


def _slices(counts_E: list[int]):
    start = 0
    for e, count in enumerate(counts_E):
        if count:
            yield e, slice(start, start + count)
        start += count


def grouped_mm_nt(a_NK: torch.Tensor, b_EOK: torch.Tensor, counts_E: list[int]) -> torch.Tensor:
    """Per expert e, its rows of a times b_e^T: [N, K] x [E, O, K] -> [N, O]."""
    if not use_onednn(a_NK, b_EOK):
        return _GROUPED_MM(a_NK, b_EOK.transpose(-2, -1), offs=_offsets(counts_E, a_NK.device))
    out_NO = a_NK.new_empty(a_NK.shape[0], b_EOK.shape[1])
    for e, rows in _slices(counts_E):
        out_NO[rows] = _LINEAR(a_NK[rows], b_EOK[e], None, "none", [], "")
    return out_NO


def grouped_mm_nn(a_NO: torch.Tensor, b_EOK: torch.Tensor, counts_E: list[int]) -> torch.Tensor:
    """Per expert e, its rows of a times b_e: [N, O] x [E, O, K] -> [N, K]."""
    if not use_onednn(a_NO, b_EOK):
        return _GROUPED_MM(a_NO, b_EOK, offs=_offsets(counts_E, a_NO.device))
    out_NK = a_NO.new_empty(a_NO.shape[0], b_EOK.shape[2])
    for e, rows in _slices(counts_E):
        out_NK[rows] = _LINEAR(a_NO[rows], b_EOK[e].t(), None, "none", [], "")
    return out_NK


def grouped_mm_tn(a_NO: torch.Tensor, b_NK: torch.Tensor, counts_E: list[int]) -> torch.Tensor:
    """Per expert e, a_e^T b_e over its rows (weight gradients): [N, O], [N, K] -> [E, O, K]."""
    if not use_onednn(a_NO, b_NK):
        return _GROUPED_MM(a_NO.t(), b_NK, offs=_offsets(counts_E, a_NO.device))
    out_EOK = a_NO.new_zeros(len(counts_E), a_NO.shape[1], b_NK.shape[1])
    for e, rows in _slices(counts_E):
        out_EOK[e] = _LINEAR(a_NO[rows].t(), b_NK[rows].t(), None, "none", [], "")
    return out_EOK


def _offsets(counts_E: list[int], device: torch.device) -> torch.Tensor:
    return torch.tensor(counts_E, device=device).cumsum(0).to(torch.int32)
