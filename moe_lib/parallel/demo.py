"""The check that `python -m moe_lib.parallel` (and chapter 8) runs on every rank.

Every rank builds the same layer from one seed and the inputs of ALL ranks from another, shards the
layer with `ExpertParallel`, runs its own tokens forward and backward, and compares with the
unsharded layer run on every rank's tokens (the reference loss is the sum of the ranks' losses).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist

from ..config import MoEConfig
from ..moe import DeepSeekMoE
from .layer import ExpertParallel
from .stats import format_matrix


def build_layer(cfg: MoEConfig, seed: int, device: torch.device | str = "cpu") -> DeepSeekMoE:
    """The layer every rank builds: seeded weights and a small random correction bias."""
    torch.manual_seed(seed)
    layer = DeepSeekMoE(cfg)
    with torch.no_grad():
        layer.gate.correction_bias.normal_(0.0, 0.05)
    return layer.to(device)


def rank_inputs(tokens: Sequence[int], d_model: int, seed: int, device) -> list[tuple[torch.Tensor, ...]]:
    """(x, projection) of every rank: the loss of rank r is sum(y_r * projection_r)."""
    generator = torch.Generator().manual_seed(seed + 1)
    return [(torch.randn(t, d_model, generator=generator).to(device),
             torch.randn(t, d_model, generator=generator).to(device)) for t in tokens]


def max_rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b| (0 for empty tensors)."""
    if b.numel() == 0:
        return 0.0
    return ((a - b).abs().max() / b.abs().max().clamp(min=1e-30)).item()


def check_against_unsharded(cfg: MoEConfig | dict, tokens: Sequence[int], ranks_per_node: int | None = None,
                            seed: int = 0, fp8_dispatch: bool = False) -> dict:
    """On this rank: errors of the sharded layer's output and gradients, and the call's `EPStats`.

    Returns {"rank", "tokens", "output error", "gradient error" (the worst of the input and every
    parameter), "stats"}; errors are max |a - b| / max |b|.
    """
    cfg = MoEConfig(**cfg) if isinstance(cfg, dict) else cfg
    rank = dist.get_rank()
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
    reference = build_layer(cfg, seed, device)
    sharded = ExpertParallel(build_layer(cfg, seed, device), ranks_per_node=ranks_per_node,
                             fp8_dispatch=fp8_dispatch)
    data = rank_inputs(tokens, cfg.d_model, seed, device)
    xs = [x.clone().requires_grad_() for x, _ in data]
    outputs = [reference(x) for x in xs]
    sum((y * p).sum() for y, (_, p) in zip(outputs, data, strict=True)).backward()
    x = data[rank][0].clone().requires_grad_()
    y = sharded(x)
    (y * data[rank][1]).sum().backward()
    sharded.all_reduce_grads()
    per_rank = cfg.n_routed // dist.get_world_size()
    block = slice(rank * per_rank, (rank + 1) * per_rank)
    expected = dict(reference.named_parameters())
    errors = [max_rel(x.grad, xs[rank].grad)]
    for name, p in sharded.moe.named_parameters():
        want = expected[name].grad[block] if name.startswith("experts.") else expected[name].grad
        errors.append(max_rel(p.grad, want))
    return {"rank": rank, "tokens": tokens[rank], "output error": max_rel(y.detach(), outputs[rank].detach()),
            "gradient error": max(errors), "stats": sharded.last_stats}


def run_demo(tokens: int = 64, ranks_per_node: int | None = None, max_nodes: int | None = None,
             fp8_dispatch: bool = False, experts: int = 16, top_k: int = 4, d_model: int = 64,
             seed: int = 0) -> dict:
    """The demo on this rank: rank r holds (r + 1) * tokens // W tokens (uneven on purpose); with
    `max_nodes` the router is node-limited (V3) over the group's W / ranks_per_node nodes."""
    world = dist.get_world_size()
    cfg = MoEConfig(d_model=d_model, d_expert=d_model // 2, n_routed=experts, n_shared=1, top_k=top_k,
                    route_scale=2.5, dispatch="sorted")
    if max_nodes is not None:
        cfg = cfg.replace(route_limit="node", limit_units=world // (ranks_per_node or world),
                          limit_max=max_nodes)
    counts = [(r + 1) * tokens // world for r in range(world)]
    return {**check_against_unsharded(cfg, counts, ranks_per_node, seed, fp8_dispatch), "fp8": fp8_dispatch}


def report(results: list[dict]) -> str:
    """A text report of every rank's errors and the traffic of the call."""
    stats = results[0]["stats"]
    lines = [f"{'rank':>4} {'tokens':>6} {'output err':>11} {'grad err':>10}"]
    lines += [f"{r['rank']:>4} {r['tokens']:>6} {r['output error']:>11.1e} {r['gradient error']:>10.1e}"
              for r in results]
    lines += ["", "tokens sent, rank i (row) -> rank j (column):", format_matrix(stats.tokens_RR), "",
              "summary: " + ", ".join(f"{k} {v}" for k, v in stats.summary().items())]
    worst = max(max(r["output error"], r["gradient error"]) for r in results)
    if results[0]["fp8"]:
        lines.append(f"FP8 dispatch: worst relative error {worst:.1e} (the rounding of e4m3)")
    else:
        lines.append(f"{'PASS' if worst < 1e-5 else 'FAIL'}: worst relative error {worst:.1e}")
    return "\n".join(lines)


def check_redundant(cfg: MoEConfig | dict, tokens: Sequence[int], hot: Sequence[int], extra_slots: int = 1,
                    ranks_per_node: int | None = None, seed: int = 0) -> dict:
    """On this rank: inference with and without redundant experts, against the unsharded layer.

    The experts `hot` get a large correction bias (every token picks them), the loads of one call
    are all-reduced and `ExpertParallel.place_redundant` plans and fetches the copies. Returns the
    output errors before/after, the busiest/mean rank load before/after (measured) and the placement.
    """
    cfg = MoEConfig(**cfg) if isinstance(cfg, dict) else cfg
    layers = [build_layer(cfg, seed).eval() for _ in range(2)]
    with torch.no_grad():
        for layer in layers:
            layer.gate.correction_bias[list(hot)] += 3.0
    reference, sharded = layers[0], ExpertParallel(layers[1], ranks_per_node=ranks_per_node).eval()
    x = rank_inputs(tokens, cfg.d_model, seed, "cpu")[dist.get_rank()][0]
    with torch.no_grad():
        expected, before = reference(x), sharded(x)
        stats_before = sharded.last_stats
        load_E = sharded.moe.last_routing.load.double()
        dist.all_reduce(load_E)
        placement = sharded.place_redundant(load_E, extra_slots)
        after = sharded(x)
    stats_after = sharded.last_stats
    return {"error before": max_rel(before, expected), "error after": max_rel(after, expected),
            "imbalance before": stats_before.load_imbalance, "imbalance after": stats_after.load_imbalance,
            "rank load before": stats_before.rank_load, "rank load after": stats_after.rank_load,
            "load": load_E, "placement": placement}
