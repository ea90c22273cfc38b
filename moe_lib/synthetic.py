"""Synthetic routers for balancing experiments: skewed logits, and the loss-free bias dynamics on them.

A skewed router prefers some experts for every token: logits = noise + skew * preference_E with
preference falling linearly from +1 (expert 0) to -1 (expert E-1). With skew = 0 the load is even
up to noise; with skew around 2 a plain top-k router starves half of the experts.

Training demos: `train_toy_moe` trains one `DeepSeekMoE` layer on a small regression teacher
(`ToyTask`) and records the expert loads, to show routing collapse and its cures.
`future_dependence` shows why the loss-free bias is computed from the previous batch's load.
`balanced_routing_lp` solves the relaxed balanced routing exactly, for the dual reading of the bias;
`replicate_hot_experts` spreads the load of the busiest experts over redundant copies (inference).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from .balance import load_cv, loss_free_bias_update, max_vio, update_bias
from .config import MoEConfig
from .moe import DeepSeekMoE
from .router import router_scores, select_experts


def skewed_logits(n_tokens: int, n_experts: int, skew: float,
                  generator: torch.Generator | None = None) -> torch.Tensor:
    """Router logits [T, E]: standard-normal noise plus a fixed per-expert preference."""
    preference_E = torch.linspace(1.0, -1.0, n_experts)
    return torch.randn(n_tokens, n_experts, generator=generator) + skew * preference_E


@dataclass
class BiasDynamics:
    """Per-step history of a loss-free run: bias [S, E], load [S, E], MaxVio [S], CV [S]."""

    bias: torch.Tensor
    load: torch.Tensor
    max_vio: torch.Tensor
    cv: torch.Tensor


def simulate_loss_free(n_experts: int = 64, top_k: int = 6, skew: float = 2.0, gamma: float = 1e-3,
                       steps: int = 200, n_tokens: int = 2048, score_func: str = "sigmoid",
                       update: str = "sign", seed: int = 0) -> BiasDynamics:
    """Route a fresh skewed batch each step and apply the loss-free update from ITS load.

    The load of step s sets the bias used at step s+1 (previous-batch load, no leakage).
    `update` is "sign" (the paper's rule) or "proportional" (b += gamma * (mean(c) - c) / mean(c)).
    gamma = 0 gives the unbalanced baseline.
    """
    if update not in ("sign", "proportional"):
        raise ValueError(f"update={update!r} is invalid: expected 'sign' or 'proportional'")
    generator = torch.Generator().manual_seed(seed)
    bias_E = torch.zeros(n_experts)
    history = {"bias": [], "load": [], "max_vio": [], "cv": []}
    for _ in range(steps):
        scores_TE = router_scores(skewed_logits(n_tokens, n_experts, skew, generator), score_func)
        indices_TK = select_experts(scores_TE, bias_E, top_k)
        load_E = torch.bincount(indices_TK.reshape(-1), minlength=n_experts).float()
        history["bias"].append(bias_E.clone())
        history["load"].append(load_E)
        history["max_vio"].append(max_vio(load_E))
        history["cv"].append(load_cv(load_E))
        if update == "sign":
            bias_E = loss_free_bias_update(bias_E, load_E, gamma)
        else:
            bias_E = bias_E + gamma * (load_E.mean() - load_E) / load_E.mean()
    return BiasDynamics(torch.stack(history["bias"]), torch.stack(history["load"]),
                        torch.tensor(history["max_vio"]), torch.tensor(history["cv"]))


@dataclass
class ToyTask:
    """A regression teacher for training demos: y = scale * tanh(x W1) W2, with x ~ N(0, I).

    Every token needs the same smooth function, so any expert could learn it: an uneven load is the
    router's choice, not the task's.
    """

    w1: torch.Tensor  # [H, H]
    w2: torch.Tensor  # [H, H]
    scale: float = 3.0

    @classmethod
    def random(cls, d_model: int, seed: int = 0) -> ToyTask:
        generator = torch.Generator().manual_seed(seed)
        return cls(torch.randn(d_model, d_model, generator=generator) / d_model**0.5,
                   torch.randn(d_model, d_model, generator=generator) / d_model**0.5)

    def batch(self, n_tokens: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs [T, H] and targets [T, H]."""
        x_TH = torch.randn(n_tokens, self.w1.shape[0], generator=generator)
        return x_TH, self.scale * torch.tanh(x_TH @ self.w1) @ self.w2


@dataclass
class ToyRun:
    """Per-step history of `train_toy_moe`: load [S, E], task_loss [S], aux_loss [S] and
    gate_cosine [S], the cosine between the task and auxiliary gradients on the gate weight
    (NaN when the layer has no auxiliary loss)."""

    load: torch.Tensor
    task_loss: torch.Tensor
    aux_loss: torch.Tensor
    gate_cosine: torch.Tensor


def train_toy_moe(cfg: MoEConfig, steps: int = 300, n_tokens: int = 512, lr: float = 1e-2,
                  seed: int = 0) -> ToyRun:
    """Train one `DeepSeekMoE` layer with Adam on a `ToyTask` (MSE), a fresh batch every step.

    The auxiliary loss (if `cfg.aux_loss` is not "none") is added to the task loss explicitly
    (`aux_loss_inject=False`) so that the two gradients on the gate can be measured apart; the
    total gradient is the same as with injection. Deterministic for a fixed seed and thread count.
    """
    torch.manual_seed(seed)
    layer = DeepSeekMoE(cfg.replace(aux_loss_inject=False))
    task = ToyTask.random(cfg.d_model, seed)
    generator = torch.Generator().manual_seed(seed + 1)
    optimizer = torch.optim.Adam(layer.parameters(), lr=lr)
    history = {"load": [], "task_loss": [], "aux_loss": [], "gate_cosine": []}
    for _ in range(steps):
        x_TH, y_TH = task.batch(n_tokens, generator)
        task_loss = (layer(x_TH) - y_TH).pow(2).mean()
        aux_loss = layer.aux_loss
        cosine = float("nan")
        if aux_loss.requires_grad:
            (g_task,) = torch.autograd.grad(task_loss, layer.gate.weight, retain_graph=True)
            (g_aux,) = torch.autograd.grad(aux_loss, layer.gate.weight, retain_graph=True)
            cosine = F.cosine_similarity(g_task.flatten(), g_aux.flatten(), dim=0).item()
        optimizer.zero_grad()
        (task_loss + aux_loss).backward()
        optimizer.step()
        update_bias(layer)
        history["load"].append(layer.last_routing.load.float())
        history["task_loss"].append(task_loss.item())
        history["aux_loss"].append(aux_loss.item())
        history["gate_cosine"].append(cosine)
    return ToyRun(torch.stack(history["load"]), torch.tensor(history["task_loss"]),
                  torch.tensor(history["aux_loss"]), torch.tensor(history["gate_cosine"]))


def future_dependence(source: str, n_tokens: int = 512, n_experts: int = 16, top_k: int = 2,
                      skew: float = 2.0, gamma: float = 0.01, iters: int = 20,
                      seed: int = 0) -> torch.Tensor:
    """Which tokens of the FIRST half change experts when only the SECOND half is redrawn. [T/2] bool.

    The bias comes either from a previous, independent batch (`source="previous"`: `iters` loss-free
    steps on earlier batches) or from the current sequence itself (`source="current"`: `iters`
    steps on this sequence's own load, so the bias of token 0 depends on the tokens after it).
    """
    if source not in ("previous", "current"):
        raise ValueError(f"source={source!r} is invalid: expected 'previous' or 'current'")
    generator = torch.Generator().manual_seed(seed)
    earlier_TE = skewed_logits(n_tokens, n_experts, skew, generator).sigmoid()
    scores_TE = skewed_logits(n_tokens, n_experts, skew, generator).sigmoid()
    redrawn_TE = scores_TE.clone()
    redrawn_TE[n_tokens // 2:] = skewed_logits(n_tokens - n_tokens // 2, n_experts, skew,
                                               generator).sigmoid()

    def first_half_choice(batch_TE: torch.Tensor) -> torch.Tensor:
        bias_E = torch.zeros(n_experts)
        balanced_on = earlier_TE if source == "previous" else batch_TE
        for _ in range(iters):
            load_E = torch.bincount(select_experts(balanced_on, bias_E, top_k).reshape(-1),
                                    minlength=n_experts)
            bias_E = loss_free_bias_update(bias_E, load_E, gamma)
        chosen_TK = select_experts(batch_TE[: n_tokens // 2], bias_E, top_k)
        return chosen_TK.sort(dim=-1).values

    return (first_half_choice(scores_TE) != first_half_choice(redrawn_TE)).any(dim=-1)


@dataclass
class BalancedRouting:
    """The optimum of the relaxed balanced routing: value, assignment x [T, E], prices b [E]."""

    value: float
    assignment: torch.Tensor
    prices: torch.Tensor


def balanced_routing_lp(scores_TE: torch.Tensor, top_k: int) -> BalancedRouting:
    """Best routing of T tokens to K experts each with every expert at exactly T K / E tokens.

        max_x  sum_{t,i} x_{i,t} s_{i,t}
        s.t.   sum_i x_{i,t} = K  (each token),   sum_t x_{i,t} = T K / E  (each expert),   0 <= x <= 1

    a transportation LP, solved with HiGHS (`scipy.optimize.linprog`). Its constraint matrix is totally
    unimodular, so the optimal x is 0/1: the LP value is the best balanced routing itself.
    `prices` are the multipliers b of the expert constraints (defined up to a common shift): by strong
    duality the dual function g(b) = sum_t TopKSum(s_t + b) - (T K / E) sum_i b_i equals `value` there.
    Meant for small instances (a few hundred tokens); scipy is imported here, not at module level.
    """
    from scipy.optimize import linprog
    from scipy.sparse import coo_matrix, vstack

    n_tokens, n_experts = scores_TE.shape
    if not 0 < top_k <= n_experts or (n_tokens * top_k) % n_experts:
        raise ValueError(f"top_k={top_k!r} is invalid: expected 0 < top_k <= {n_experts} with "
                         f"T*top_k divisible by E (T={n_tokens}, E={n_experts})")
    pairs = np.arange(n_tokens * n_experts)  # pair (t, i) is column t * E + i
    ones = np.ones(pairs.size)
    a_eq = vstack([coo_matrix((ones, (pairs // n_experts, pairs)), shape=(n_tokens, pairs.size)),
                   coo_matrix((ones, (pairs % n_experts, pairs)), shape=(n_experts, pairs.size))])
    b_eq = np.concatenate([np.full(n_tokens, top_k), np.full(n_experts, n_tokens * top_k // n_experts)])
    scores = scores_TE.detach().double().cpu().numpy().reshape(-1)
    result = linprog(-scores, A_eq=a_eq.tocsr(), b_eq=b_eq, bounds=(0, 1), method="highs")
    if result.status != 0:
        raise RuntimeError(f"the balanced-routing LP was not solved: {result.message}")
    return BalancedRouting(value=-result.fun,
                           assignment=torch.from_numpy(result.x.reshape(n_tokens, n_experts)),
                           prices=torch.from_numpy(result.eqlin.marginals[n_tokens:].copy()))


def replicate_hot_experts(load_E: torch.Tensor, n_copies: int) -> torch.Tensor:
    """Per-instance loads [E + n_copies] after adding `n_copies` redundant expert copies.

    Copies are added one at a time, each to the expert whose instances are busiest, and an expert's
    tokens are split evenly over its instances (DeepSeek-V3 Sec. 3.4 duplicates high-load experts at
    inference). Instances are listed expert by expert, copies next to their expert.
    """
    if n_copies < 0:
        raise ValueError(f"n_copies={n_copies!r} is invalid: expected a non-negative integer")
    load_E = load_E.double()
    instances_E = torch.ones(load_E.shape[0], dtype=torch.long)
    for _ in range(n_copies):
        instances_E[torch.argmax(load_E / instances_E)] += 1
    return (load_E / instances_E).repeat_interleave(instances_E)
