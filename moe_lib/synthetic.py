"""Synthetic routers for balancing experiments: skewed logits, and the loss-free bias dynamics on them.

A skewed router prefers some experts for every token: logits = noise + skew * preference_E with
preference falling linearly from +1 (expert 0) to -1 (expert E-1). With skew = 0 the load is even
up to noise; with skew around 2 a plain top-k router starves half of the experts.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .balance import load_cv, loss_free_bias_update, max_vio
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

