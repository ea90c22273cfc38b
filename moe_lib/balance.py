"""Load balancing: the auxiliary-loss-free bias update, auxiliary losses and load metrics.

Loss-free balancing (Wang et al., arXiv 2408.15664, Alg. 1; DeepSeek-V3 Sec. 2.1.2): after each
optimizer step, with c_i the tokens routed to expert i during that step,

    b_i <- b_i + gamma * sign(mean(c) - c_i)        (underloaded experts get a larger bias)

The bias only enters the top-k selection (see `moe_lib.router`). Loads are counted on the
PREVIOUS step's batch, so no token's routing depends on tokens that come after it.
Wang et al.'s ablation also tries a proportional rule, b_i <- b_i + gamma * (mean(c) - c_i) on the
raw counts (`MoEConfig.bias_update_rule="proportional"`): its step grows with the imbalance.

Auxiliary losses (all of the form alpha * sum_i f_i P_i):
    expert-level (DeepSeekMoE Eqs. 12-14, Switch): f_i = E/(K T) * #tokens choosing i, P_i = mean_t s'_{i,t}
    sequence-wise (DeepSeek-V3 Eqs. 17-20): the same per sequence, averaged over sequences
    batch-wise (DeepSeek-V3 Sec. 4.5.3): the same over the whole batch (the expert-level loss)
    device-level (DeepSeekMoE Sec. 3.3, reused by DeepSeek-V2 Eqs. 31-33):
        f'_d = mean_{i in d} f_i, P'_d = sum_{i in d} P_i
where s' are the scores normalised over all experts (a no-op for softmax scores).

Which tokens "choose" expert i in f_i: V3 Eq. 18 counts 1[s_{i,t} in TopK({s_{j,t}}, K)] on the
UNBIASED scores over ALL routed experts, even though the actual routing adds the correction bias and
the group limit. `unbiased_topk` computes that set; `DeepSeekMoE` passes it to every balance loss
(Megatron-LM likewise runs a separate top-K for its auxiliary loss when the routing is group-limited).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from .router import Router


def loss_free_bias_update(bias_E: torch.Tensor, load_E: torch.Tensor, speed: float) -> torch.Tensor:
    """One loss-free step: b + gamma * sign(mean(c) - c). Returns the new bias (float32)."""
    load_E = load_E.float()
    return bias_E + speed * torch.sign(load_E.mean() - load_E)


def proportional_bias_update(bias_E: torch.Tensor, load_E: torch.Tensor, speed: float) -> torch.Tensor:
    """Proportional variant: b + gamma * (mean(c) - c) on the raw token counts c (float32)."""
    load_E = load_E.float()
    return bias_E + speed * (load_E.mean() - load_E)


BIAS_RULES = {"sign": loss_free_bias_update, "proportional": proportional_bias_update}


@torch.no_grad()
def update_bias(model: nn.Module, group: dist.ProcessGroup | None = None) -> int:
    """Apply the loss-free update to every router in `model` and reset the accumulated loads.

    Call once per optimizer step, after gradient accumulation. Under data or expert parallelism
    the loads are all-reduced over `group` first, so every rank applies the same update.
    Returns the number of routers updated.
    """
    routers = [m for m in model.modules() if isinstance(m, Router) and m.cfg.bias_update != "none"]
    for router in routers:
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(router.tokens_per_expert, group=group)
        apply_bias_update(router)
    return len(routers)


@torch.no_grad()
def apply_bias_update(router: Router) -> None:
    """Update one router's bias from its accumulated loads (no communication) by its
    `bias_update_rule`, then reset the loads."""
    rule = BIAS_RULES[router.cfg.bias_update_rule]
    router.correction_bias.copy_(rule(router.correction_bias, router.tokens_per_expert,
                                      router.cfg.bias_update_speed))
    router.tokens_per_expert.zero_()


def expert_fraction(indices_TK: torch.Tensor, n_experts: int) -> torch.Tensor:
    """f_i = E / (K T) * (number of tokens that selected expert i): 1 for a perfectly even load."""
    n_tokens, top_k = indices_TK.shape
    counts_E = torch.bincount(indices_TK[indices_TK >= 0], minlength=n_experts)
    return counts_E.float() * n_experts / (top_k * n_tokens)


def mean_probability(scores_TE: torch.Tensor) -> torch.Tensor:
    """P_i = (1/T) sum_t s'_{i,t}, with s' the scores normalised over all experts."""
    return (scores_TE / scores_TE.sum(dim=-1, keepdim=True)).mean(dim=0)


def expert_aux_loss(scores_TE: torch.Tensor, indices_TK: torch.Tensor, alpha: float) -> torch.Tensor:
    """Expert-level balance loss alpha * sum_i f_i P_i over all T tokens."""
    f_E = expert_fraction(indices_TK, scores_TE.shape[1])
    return alpha * (f_E * mean_probability(scores_TE)).sum()


def unbiased_topk(scores_TE: torch.Tensor, top_k: int) -> torch.Tensor:
    """[T, K] indices of TopK({s_{j,t}}, K) over all routed experts: no bias, no group limit (V3 Eq. 18)."""
    return scores_TE.detach().topk(top_k, dim=-1).indices


def sequence_aux_loss(scores_BSE: torch.Tensor, indices_BSK: torch.Tensor,
                      alpha: float) -> torch.Tensor:
    """Sequence-wise balance loss (V3 Eqs. 17-20): alpha * sum_i f_i P_i per sequence, mean over B.

    f_{b,i} = E/(K S) * #tokens of sequence b choosing i, P_{b,i} = mean over its S tokens of s'.
    Vectorised over the B sequences (one scatter-add, no Python loop).
    """
    n_seq, seq_len, n_experts = scores_BSE.shape
    top_k = indices_BSK.shape[-1]
    flat_BN = indices_BSK.reshape(n_seq, -1)
    valid_BN = (flat_BN >= 0).to(scores_BSE.dtype)  # -1 marks a dropped pair: counts nothing
    counts_BE = scores_BSE.new_zeros(n_seq, n_experts).scatter_add_(1, flat_BN.clamp(min=0), valid_BN)
    f_BE = counts_BE * n_experts / (top_k * seq_len)
    p_BE = (scores_BSE / scores_BSE.sum(dim=-1, keepdim=True)).mean(dim=1)
    return alpha * (f_BE * p_BE).sum(dim=-1).mean()


def batch_aux_loss(scores_TE: torch.Tensor, indices_TK: torch.Tensor, alpha: float) -> torch.Tensor:
    """Batch-wise balance loss (V3 Sec. 4.5.3): the sequence-wise loss computed over the whole batch.

    It is the expert-level loss of `expert_aux_loss` on all T tokens of the batch; V3 compares it
    with the sequence-wise loss and with loss-free balancing (its Sec. 4.5.3).
    """
    return expert_aux_loss(scores_TE, indices_TK, alpha)


def device_aux_loss(scores_TE: torch.Tensor, indices_TK: torch.Tensor, n_devices: int,
                    alpha: float) -> torch.Tensor:
    """Device-level balance loss (V2): experts split evenly into `n_devices` contiguous groups."""
    n_experts = scores_TE.shape[1]
    f_D = expert_fraction(indices_TK, n_experts).view(n_devices, -1).mean(dim=-1)
    p_D = mean_probability(scores_TE).view(n_devices, -1).sum(dim=-1)
    return alpha * (f_D * p_D).sum()


class AddAuxiliaryLoss(torch.autograd.Function):
    """DeepSeekMoE's trick: return x unchanged, and in backward give the loss a gradient of 1.

    `y = AddAuxiliaryLoss.apply(x, loss)` makes `y.sum().backward()` equal to
    `(x.sum() + loss).backward()` without changing any value of the forward pass.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, loss: torch.Tensor) -> torch.Tensor:
        ctx.loss_dtype, ctx.loss_shape = loss.dtype, loss.shape
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        return grad_output, torch.ones(ctx.loss_shape, dtype=ctx.loss_dtype,
                                       device=grad_output.device)


def load_cv(load_E: torch.Tensor) -> float:
    """Coefficient of variation of the expert loads: std / mean (0 = perfectly balanced)."""
    load_E = load_E.float()
    return (load_E.std(unbiased=False) / load_E.mean()).item()


def max_vio(load_E: torch.Tensor) -> float:
    """MaxVio = (max_i load_i - mean load) / mean load (Loss-Free Balancing, Sec. 4.1)."""
    load_E = load_E.float()
    return ((load_E.max() - load_E.mean()) / load_E.mean()).item()


def collapse_fraction(load_E: torch.Tensor, threshold: float = 0.1) -> float:
    """Share of experts receiving less than `threshold` x the mean load (routing collapse)."""
    load_E = load_E.float()
    return (load_E < threshold * load_E.mean()).float().mean().item()


class LoadMonitor:
    """Accumulates expert loads over many batches for MaxVio_batch and MaxVio_global.

    `update(load_E)` once per batch; `max_vio_batch` is the mean of the per-batch MaxVio,
    `max_vio_global` the MaxVio of the loads summed over every batch seen.
    """

    def __init__(self, n_experts: int):
        self.total_E = torch.zeros(n_experts, dtype=torch.float64)
        self.batch_vios: list[float] = []

    def update(self, load_E: torch.Tensor) -> None:
        load_E = load_E.detach().double().cpu()
        self.total_E += load_E
        self.batch_vios.append(max_vio(load_E))

    @property
    def max_vio_batch(self) -> float:
        return sum(self.batch_vios) / max(len(self.batch_vios), 1)

    @property
    def max_vio_global(self) -> float:
        return max_vio(self.total_E)

    @property
    def cv_global(self) -> float:
        return load_cv(self.total_E)
