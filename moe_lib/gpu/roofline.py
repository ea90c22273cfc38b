"""The roofline of an MoE layer: how fast it can possibly run on a machine of given peak and bandwidth.

A kernel that does F floating-point operations and must move B bytes to or from memory needs at
least (Williams et al.'s roofline model)

    t >= max(F / P, B / W)          P: peak FLOP/s, W: memory bandwidth in bytes/s

For the routed and shared experts of an MoE layer on T tokens (E routed experts of width I, K active,
S shared experts of the same width, hidden size H, b bytes per parameter, bf16: b = 2):

    F(T) = 2 * 3 * T * (K + S) * H * I                     (3 matrices, 2 FLOPs per multiply-add)
    B(T) = b * (3 H I * (hit(T) + S) + 2 T H)              (weights of the experts hit, x read, y written)
    hit(T) = E * (1 - (1 - K/E)^T)                         (expected distinct routed experts hit)

hit(T) assumes each token picks K distinct experts uniformly (a balanced router); the benchmark
counts the experts actually hit instead. With backward (weights read twice and their gradients
written; x read twice, y written, dy read, dx written): F x 3 and B = b (9 H I (hit + S) + 5 T H).
The router (2 T E H FLOPs, E H weights: 0.5% of V3's layer) is left out, as in the issue's formula.

Once every expert is hit, B barely grows with T while F grows linearly: the layer is bandwidth-bound
below the crossover

    T* = b (E/D + S) * P / (2 (K + S) * W)                 (activations neglected: ~1% at T*)

and compute-bound above it. Under expert parallelism of degree D each GPU holds E/D routed experts and
still receives about T*K pairs from the T tokens per GPU, so its weight bytes shrink D-fold and T*
with them; each expert then sees D*T*K/E tokens instead of T*K/E.
"""

from __future__ import annotations

from ..config import MoEConfig

#: Vendor data-sheet figures (dense bf16 FLOP/s without sparsity, HBM bandwidth in bytes/s): for
#: illustration only, never a measurement. Measured peaks are lower (see `python -m moe_lib.bench gpu`).
DATA_SHEET = {"H100 SXM": (989e12, 3.35e12), "H200 SXM": (989e12, 4.8e12)}


def expert_flops(cfg: MoEConfig, n_tokens: float, backward: bool = False) -> float:
    """F(T) = 2 * 3 * T * (K + S) * H * I, times 3 with the backward pass."""
    forward = 6 * n_tokens * (cfg.top_k + cfg.n_shared) * cfg.d_model * cfg.d_expert
    return 3 * forward if backward else forward


def expected_experts_hit(n_tokens: float, n_experts: int, top_k: int) -> float:
    """E (1 - (1 - K/E)^T): routed experts that at least one of T uniformly routed tokens picks."""
    return n_experts * (1 - (1 - top_k / n_experts) ** n_tokens)


def expert_bytes(cfg: MoEConfig, n_tokens: float, experts_hit: float | None = None,
                 bytes_per_param: int = 2, backward: bool = False) -> float:
    """B(T): bytes of the hit experts' weights (and the shared ones) plus the layer's input and output.

    experts_hit: routed experts actually hit (None: the expected number for a balanced router).
    """
    if experts_hit is None:
        experts_hit = expected_experts_hit(n_tokens, cfg.n_routed, cfg.top_k)
    weights = 3 * cfg.d_model * cfg.d_expert * (experts_hit + cfg.n_shared)
    activations = n_tokens * cfg.d_model
    if backward:
        return bytes_per_param * (3 * weights + 5 * activations)
    return bytes_per_param * (weights + 2 * activations)


def time_bound(flops: float, n_bytes: float, peak_flops: float, bandwidth: float) -> float:
    """The roofline: max(F / P, B / W) seconds."""
    return max(flops / peak_flops, n_bytes / bandwidth)


def crossover_tokens(cfg: MoEConfig, peak_flops: float, bandwidth: float, ep_degree: int = 1,
                     bytes_per_param: int = 2) -> float:
    """T* = b (E/D + S) P / (2 (K + S) W): tokens per GPU where compute time overtakes weight reads
    (all local experts hit, activations neglected)."""
    local = cfg.n_routed / ep_degree + cfg.n_shared
    return bytes_per_param * local * peak_flops / (2 * (cfg.top_k + cfg.n_shared) * bandwidth)


def tokens_per_expert(cfg: MoEConfig, n_tokens: float, ep_degree: int = 1) -> float:
    """D T K / E: tokens each routed expert processes when D GPUs each bring T tokens."""
    return ep_degree * n_tokens * cfg.top_k / cfg.n_routed


def ep_bound(cfg: MoEConfig, n_tokens: float, peak_flops: float, bandwidth: float, ep_degree: int = 1,
             bytes_per_param: int = 2) -> float:
    """Roofline time per GPU for T tokens per GPU under D-way expert parallelism (communication
    excluded): T (K + S) pairs of work, the E/D local experts' weights, each local expert hit with
    probability 1 - (1 - K/E)^(D T)."""
    hit = expected_experts_hit(ep_degree * n_tokens, cfg.n_routed, cfg.top_k) / ep_degree
    return time_bound(expert_flops(cfg, n_tokens),
                      expert_bytes(cfg, n_tokens, hit, bytes_per_param), peak_flops, bandwidth)
