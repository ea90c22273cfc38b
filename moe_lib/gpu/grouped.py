"""Expert-sorted dispatch that never asks the host how many tokens each expert got.

    y_t = sum_k w_{t,k} SwiGLU_{e_{t,k}}(x_t),   SwiGLU_e(x) = down_e(silu(gate_e x) * up_e x)

The CPU paths (`moe_lib.dispatch`) read the tokens per expert on the host (`counts.tolist()`). On a
GPU that read waits until every queued kernel has finished, and it makes CUDA-graph capture
impossible. Here every shape depends on T and K only and the group boundaries stay on the device:

    keys_N    = expert of pair n (N = T*K pairs), dropped pairs (index -1) moved to E
    order_N   = stable argsort of keys_N                       pairs grouped by expert
    offsets_E = #{n : keys_N <= e}                             int32 ends of each expert's rows

torch's `grouped_mm` takes the offsets as a device tensor (its bf16 kernel on sm90/sm100 reads them
on the device; other dtypes and GPUs take a fallback that copies them to the host). It computes no
row past offsets_E[-1]: those rows (the dropped pairs) hold garbage, which the combine sends to a
dummy token row T that is cut off, and whose weight gradient is masked to zero.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from ..experts import RoutedExperts

grouped_mm = getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)


class DevicePairs(NamedTuple):
    """The T*K (token, expert) pairs sorted by expert, every field a device tensor of fixed size.

    source_N: token each pair reads (always a valid row of x); target_N: row the pair's output is
    added to (T, a dummy row, for dropped pairs); valid_N: False for dropped pairs;
    weight_N: combine weight; offsets_E: int32 end of each expert's rows (the grouped_mm `offs`).
    """

    source_N: torch.Tensor
    target_N: torch.Tensor
    valid_N: torch.Tensor
    weight_N: torch.Tensor
    offsets_E: torch.Tensor


def sort_on_device(indices_TK: torch.Tensor, weights_TK: torch.Tensor, n_experts: int) -> DevicePairs:
    """Group the pairs by expert with a stable sort and find each expert's end by binary search."""
    n_tokens, top_k = indices_TK.shape
    flat_N = indices_TK.reshape(-1)
    keys_N = torch.where(flat_N < 0, n_experts, flat_N)
    sorted_N, order_N = torch.sort(keys_N, stable=True)
    experts_E = torch.arange(n_experts, device=indices_TK.device, dtype=sorted_N.dtype)
    offsets_E = torch.searchsorted(sorted_N, experts_E, right=True, out_int32=True)
    source_N = order_N // top_k
    valid_N = sorted_N < n_experts
    target_N = torch.where(valid_N, source_N, n_tokens)
    return DevicePairs(source_N, target_N, valid_N, weights_TK.reshape(-1).index_select(0, order_N),
                       offsets_E)


def combine(out_NH: torch.Tensor, target_N: torch.Tensor, n_tokens: int) -> torch.Tensor:
    """y_t = sum of the rows whose target is t: one scatter-add into T+1 rows, the dummy row cut off."""
    y_PH = out_NH.new_zeros(n_tokens + 1, out_NH.shape[1])
    return y_PH.index_add_(0, target_N, out_NH)[:n_tokens]


class DeviceGroupedExperts(torch.autograd.Function):
    """The routed experts on expert-sorted pairs with three grouped GEMMs forward, four backward.

    Forward, for the N sorted pairs:
        x_NH = x[source_N];  [g | u] = x_NH @ [gate_e | up_e]^T   (one GEMM, gate and up fused)
        h = silu(g) * u * w_N;  y = scatter-add over target_N of h @ down_e^T
    The combine weight scales the [N, I] activation, not the [N, H] output (the same sum, less work).
    Backward recomputes sigmoid(g) and silu(g) from the saved [g | u] and gathers x again rather
    than saving the [N, H] copy (less memory; the regather is one pass over N*H elements):
        dh = dy[source_N] @ down_e;     dw_N = <dh, silu(g) u>  (0 for dropped pairs)
        d down_e = dy_e^T (w a)_e;      da = w dh
        dg = da * u * (sigmoid(g) + silu(g) (1 - sigmoid(g))),  du = da * silu(g)
        dx = scatter-add of [dg | du] @ [gate_e | up_e];   d [gate_e | up_e] = [dg | du]_e^T x_e
    The weight-gradient GEMMs contract over the sorted pairs with a column-major left operand and a
    row-major right one, the layout in which torch's sm90 kernel accepts experts with no tokens.
    """

    @staticmethod
    def forward(ctx, x_TH, weight_N, source_N, target_N, valid_N, offsets_E, gate_up_EFH, down_EHI):
        x_NH = x_TH.index_select(0, source_N)
        gate_up_NF = grouped_mm(x_NH, gate_up_EFH.transpose(-2, -1), offs=offsets_E)
        gate_NI, up_NI = gate_up_NF.chunk(2, dim=-1)
        hidden_NI = F.silu(gate_NI).mul_(up_NI).mul_(weight_N.unsqueeze(-1))
        out_NH = grouped_mm(hidden_NI, down_EHI.transpose(-2, -1), offs=offsets_E)
        ctx.save_for_backward(x_TH, weight_N, source_N, target_N, valid_N, offsets_E, gate_up_NF,
                              gate_up_EFH, down_EHI)
        return combine(out_NH, target_N, x_TH.shape[0])

    @staticmethod
    def backward(ctx, grad_TH):
        x_TH, weight_N, source_N, target_N, valid_N, offsets_E, gate_up_NF, gate_up_EFH, down_EHI = \
            ctx.saved_tensors
        gate_NI, up_NI = gate_up_NF.chunk(2, dim=-1)
        sig_NI = torch.sigmoid(gate_NI)
        silu_NI = gate_NI * sig_NI
        act_NI = silu_NI * up_NI
        grad_NH = grad_TH.index_select(0, source_N)
        grad_h_NI = grouped_mm(grad_NH, down_EHI, offs=offsets_E)
        grad_weight_N = torch.where(valid_N, (grad_h_NI * act_NI).sum(dim=-1), 0)
        grad_down_EHI = None
        if ctx.needs_input_grad[7]:
            grad_down_EHI = grouped_mm(grad_NH.t(), act_NI.mul_(weight_N.unsqueeze(-1)), offs=offsets_E)
        grad_act_NI = grad_h_NI.mul_(weight_N.unsqueeze(-1))
        grad_gate_up_NF = torch.empty_like(gate_up_NF)
        grad_gate_NI, grad_up_NI = grad_gate_up_NF.chunk(2, dim=-1)
        torch.mul(grad_act_NI, silu_NI, out=grad_up_NI)
        torch.mul(grad_act_NI.mul_(up_NI), torch.addcmul(sig_NI, silu_NI, 1 - sig_NI), out=grad_gate_NI)
        grad_x_TH = None
        if ctx.needs_input_grad[0]:
            grad_x_NH = grouped_mm(grad_gate_up_NF, gate_up_EFH, offs=offsets_E)
            grad_x_TH = combine(grad_x_NH, target_N, x_TH.shape[0])
        grad_gate_up_EFH = None
        if ctx.needs_input_grad[6]:
            x_NH = x_TH.index_select(0, source_N)
            grad_gate_up_EFH = grouped_mm(grad_gate_up_NF.t(), x_NH, offs=offsets_E)
        return grad_x_TH, grad_weight_N, None, None, None, None, grad_gate_up_EFH, grad_down_EHI


def supports(x_TH: torch.Tensor, experts: RoutedExperts) -> bool:
    """Whether grouped_mm takes these operands: float32 or 16-bit, the weights' dtype, every row
    16-byte aligned (widths multiples of 8 in 16-bit, of 4 in float32)."""
    if grouped_mm is None or x_TH.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return False
    if experts.gate_up_proj.dtype != x_TH.dtype:
        return False
    return all(d * x_TH.element_size() % 16 == 0 for d in (experts.d_model, experts.d_expert))


def dispatch_device(x_TH: torch.Tensor, indices_TK: torch.Tensor, weights_TK: torch.Tensor,
                    experts: RoutedExperts) -> torch.Tensor:
    """The routed output [T, H] with no host synchronisation (same signature as `moe_lib.dispatch`)."""
    pairs = sort_on_device(indices_TK, weights_TK.to(x_TH.dtype), experts.n_experts)
    return DeviceGroupedExperts.apply(x_TH, pairs.weight_N, pairs.source_N, pairs.target_N,
                                      pairs.valid_N, pairs.offsets_E, experts.gate_up_proj,
                                      experts.down_proj)
