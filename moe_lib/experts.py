"""Experts: SwiGLU feed-forward networks, ``down(silu(gate(x)) * up(x))``, without biases.

`Expert` is one MLP (the shared experts, and the dense FFN of the leading layers).
`RoutedExperts` stores all E routed experts as stacked weights, in the layout of Hugging Face
transformers v5 (`gate_up_proj` [E, 2I, H] with the gate half first, `down_proj` [E, H, I]), so
the fast dispatch paths run one batched GEMM per projection and state dicts stay simple.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .kernels import expert_swiglu, linear


def swiglu(x_NH: torch.Tensor, gate_up_FH: torch.Tensor, down_HI: torch.Tensor) -> torch.Tensor:
    """SwiGLU with a fused gate/up weight: [N, H] -> [N, H] (F = 2I, gate rows first)."""
    gate_NI, up_NI = linear(x_NH, gate_up_FH).chunk(2, dim=-1)
    return linear(F.silu(gate_NI) * up_NI, down_HI)


class Expert(nn.Module):
    """One SwiGLU MLP of width `d_ff`: the shared experts (width n_shared * d_expert) or a dense FFN."""

    def __init__(self, d_model: int, d_ff: int):
        super().__init__()
        self.gate_proj = nn.Linear(d_model, d_ff, bias=False)
        self.up_proj = nn.Linear(d_model, d_ff, bias=False)
        self.down_proj = nn.Linear(d_ff, d_model, bias=False)

    def stacked_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(gate_up [1, 2I, H], down [1, H, I]): this expert in RoutedExperts' stacked layout."""
        gate_up_1FH = torch.cat([self.gate_proj.weight, self.up_proj.weight]).unsqueeze(0)
        return gate_up_1FH, self.down_proj.weight.unsqueeze(0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # one expert over all rows; on the CPU moe_lib.kernels runs blocks of rows, one per core
        x_TH = x.reshape(-1, x.shape[-1])
        y_TH = expert_swiglu(x_TH, *self.stacked_weights(), [x_TH.shape[0]])
        return y_TH.view(*x.shape[:-1], y_TH.shape[-1])


class RoutedExperts(nn.Module):
    """E routed SwiGLU experts as stacked weights.

    Parameters:
        gate_up_proj: [E, 2I, H], rows [:I] the gate projection, rows [I:] the up projection.
        down_proj:    [E, H, I].
    """

    def __init__(self, n_experts: int, d_model: int, d_expert: int):
        super().__init__()
        self.n_experts, self.d_model, self.d_expert = n_experts, d_model, d_expert
        self.gate_up_proj = nn.Parameter(torch.empty(n_experts, 2 * d_expert, d_model))
        self.down_proj = nn.Parameter(torch.empty(n_experts, d_model, d_expert))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """nn.Linear's default initialisation, expert by expert: U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
        nn.init.uniform_(self.gate_up_proj, -1 / math.sqrt(self.d_model), 1 / math.sqrt(self.d_model))
        nn.init.uniform_(self.down_proj, -1 / math.sqrt(self.d_expert), 1 / math.sqrt(self.d_expert))

    def expert_forward(self, e: int, x_NH: torch.Tensor) -> torch.Tensor:
        """Run expert `e` on the tokens [N, H] routed to it."""
        return swiglu(x_NH, self.gate_up_proj[e], self.down_proj[e])

    def extra_repr(self) -> str:
        return f"n_experts={self.n_experts}, d_model={self.d_model}, d_expert={self.d_expert}"
