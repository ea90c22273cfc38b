"""ExpertParallel on real gloo process groups: equality with the unsharded layer, statistics, FP8,
loss-free loads, redundant experts, and clear errors instead of hangs.

One pool of 4 local ranks serves the whole module (starting processes is the slow part); the
2-rank cases run on the subgroup {0, 1} of that pool. Each worker builds the same layer on every
rank, runs the unsharded reference on every rank's tokens (data-parallel semantics: the loss is the
sum of the ranks' losses) and compares. Errors are max |a - b| / max |b| over a tensor.
"""

from __future__ import annotations

import time

import pytest
import torch
import torch.distributed as dist

from moe_lib import DeepSeekMoE, MoEConfig, update_bias
from moe_lib.balance import apply_bias_update
from moe_lib.parallel import ExpertParallel, LocalRanks, RankError, run_local
from moe_lib.parallel.dispatch import plan_dispatch

TOLERANCE = 1e-6
_GROUPS: dict[int, dist.ProcessGroup] = {}


def tiny(**changes) -> MoEConfig:
    base = dict(d_model=16, d_expert=8, n_routed=8, n_shared=1, top_k=3, score_func="sigmoid",
                route_scale=2.5, dispatch="sorted", bias_update="none")
    return MoEConfig(**{**base, **changes})


def build(cfg: MoEConfig, seed: int = 0, bias: float = 0.1, hot: tuple[int, ...] = ()) -> DeepSeekMoE:
    """The same layer on every rank: random weights, a random bias, +5 on the `hot` experts."""
    torch.manual_seed(seed)
    layer = DeepSeekMoE(cfg)
    with torch.no_grad():
        layer.gate.correction_bias.normal_(0.0, bias)
        layer.gate.correction_bias[list(hot)] += 5.0
    return layer


def group_of(size: int) -> dist.ProcessGroup | None:
    """The first `size` ranks as a group (created once per worker; every rank must call this)."""
    if size == dist.get_world_size():
        return None
    if size not in _GROUPS:
        _GROUPS[size] = dist.new_group(list(range(size)))
    return _GROUPS[size]


def inputs(tokens: list[int], d_model: int, seed: int = 1):
    generator = torch.Generator().manual_seed(seed)
    xs = [torch.randn(t, d_model, generator=generator) for t in tokens]
    projections = [torch.randn(t, d_model, generator=generator) for t in tokens]
    return xs, projections


def rel_err(a: torch.Tensor | None, b: torch.Tensor | None) -> float:
    a = torch.zeros_like(b) if a is None else a
    if b.numel() == 0 or b.abs().max() == 0:
        return float((a - b).abs().max()) if a.numel() else 0.0
    return ((a - b).abs().max() / b.abs().max()).item()


# --- workers: module-level so that the ranks can import them ----------------------------------------


def equal_to_unsharded(cfg_kw: dict, tokens: list[int], ranks_per_node: int, bias: float = 0.1,
                       train: bool = False, hot: tuple[int, ...] = (), **ep_kwargs) -> dict | None:
    """Errors of the outputs and of every gradient, the stats, and the reference routing's counts."""
    group = group_of(len(tokens))
    rank = dist.get_rank()
    if rank >= len(tokens):
        return None
    cfg, world = MoEConfig(**cfg_kw), len(tokens)
    ref = build(cfg, bias=bias, hot=hot)
    ep = ExpertParallel(build(cfg, bias=bias, hot=hot), group, ranks_per_node, **ep_kwargs)
    ref.train(train)
    ep.train(train)
    xs, projections = inputs(tokens, cfg.d_model)
    xs = [x.requires_grad_() for x in xs]
    outputs, indices = [], []
    for x in xs:
        outputs.append(ref(x))
        indices.append(ref.last_routing.indices)
    sum((y * p).sum() for y, p in zip(outputs, projections, strict=True)).backward()
    x = xs[rank].detach().clone().requires_grad_()
    y = ep(x)
    (y * projections[rank]).sum().backward()
    ep.all_reduce_grads()
    per_rank = cfg.n_routed // world
    block = slice(rank * per_rank, (rank + 1) * per_rank)
    errors = {"output": rel_err(y, outputs[rank]), "input grad": rel_err(x.grad, xs[rank].grad)}
    for name, p in ep.moe.named_parameters():
        expected = dict(ref.named_parameters())[name].grad
        errors[name] = rel_err(p.grad, expected[block] if name.startswith("experts.") else expected)
    hits_RR = torch.stack([torch.stack([((i // per_rank) == j).any(dim=1).sum() for j in range(world)])
                           for i in indices])
    pairs_RR = torch.stack([torch.bincount(i[i >= 0].flatten() // per_rank, minlength=world)
                            for i in indices])
    return {"errors": errors, "stats": ep.last_stats, "tokens_RR": hits_RR, "pairs_RR": pairs_RR,
            "indices": torch.cat(indices)}


def fp8_error(tokens: list[int]) -> dict:
    """Output error of an FP8 dispatch against the exact one, and the bytes both sent."""
    cfg = tiny(d_model=256, d_expert=32)
    exact, quantized = ExpertParallel(build(cfg)), ExpertParallel(build(cfg), fp8_dispatch=True,
                                                                   combine_dtype=torch.bfloat16)
    x = inputs(tokens, cfg.d_model)[0][dist.get_rank()]
    with torch.no_grad():
        y_exact, y_fp8 = exact(x), quantized(x)
    error = ((y_fp8 - y_exact).norm() / y_exact.norm()).item()
    return {"error": error, "exact bytes": exact.last_stats.dispatch_bytes_RR.sum().item(),
            "fp8 bytes": quantized.last_stats.dispatch_bytes_RR.sum().item()}


def bias_after_update(tokens: list[int]) -> dict | None:
    """Loss-free update under EP (loads all-reduced over the group) against one process."""
    group = group_of(len(tokens))
    rank = dist.get_rank()
    if rank >= len(tokens):
        return None
    cfg = tiny(bias_update="step", bias_update_speed=0.01)
    ref, ep = build(cfg).train(), ExpertParallel(build(cfg), group).train()
    local = build(cfg).train()
    xs, _ = inputs(tokens, cfg.d_model)
    for x in xs:
        ref(x)
    ep(xs[rank])
    local(xs[rank])
    update_bias(ep, group=group)
    apply_bias_update(ref.gate)       # the reference has every token: no communication
    apply_bias_update(local.gate)     # what a rank would do without the all-reduce
    return {"ep": ep.moe.gate.correction_bias.clone(), "reference": ref.gate.correction_bias.clone(),
            "local only": local.gate.correction_bias.clone(),
            "loads reset": bool((ep.moe.gate.tokens_per_expert == 0).all())}


def redundant_round_trip(tokens: list[int], ranks_per_node: int) -> dict:
    """Outputs and busiest-rank loads before and after placing redundant experts."""
    cfg = tiny(n_routed=16, top_k=2, n_shared=0)
    ref = build(cfg, bias=0.0).eval()
    ep = ExpertParallel(build(cfg, bias=0.0), ranks_per_node=ranks_per_node).eval()
    with torch.no_grad():                       # make experts 0 and 1 (both on rank 0) hot
        for layer in (ref, ep.moe):
            layer.gate.correction_bias[[0, 1]] = 3.0
    x = inputs(tokens, cfg.d_model)[0][dist.get_rank()]
    with torch.no_grad():
        y_ref, y_before = ref(x), ep(x)
        before = ep.last_stats
        load_E = ep.moe.last_routing.load.double()
        dist.all_reduce(load_E)
        placement = ep.place_redundant(load_E, extra_slots=1)
        y_after = ep(x)
        after = ep.last_stats
    ep.train()
    try:
        ep(x)
        training_error = ""
    except RuntimeError as err:
        training_error = str(err)
    ep.eval().clear_redundant()
    with torch.no_grad():
        y_cleared = ep(x)
    return {"before": rel_err(y_before, y_ref), "after": rel_err(y_after, y_ref),
            "cleared": rel_err(y_cleared, y_ref), "imbalance before": before.load_imbalance,
            "imbalance after": after.load_imbalance, "planned": placement.rank_load(load_E),
            "measured": after.rank_load, "expert_RS": placement.expert_RS,
            "training error": training_error}


def build_mismatched(kind: str) -> str:
    """Build an ExpertParallel layer that is wrong on some ranks; return each rank's error."""
    rank, cfg, seed = dist.get_rank(), tiny(), 0
    if kind == "config" and rank == 1:
        cfg = cfg.replace(top_k=2)
    if kind == "weights" and rank == 2:
        seed = 1
    if kind == "experts":
        cfg = cfg.replace(n_routed=6)
    if kind == "nodes":
        cfg = cfg.replace(route_limit="node", limit_units=4, limit_max=2)
    try:
        ExpertParallel(build(cfg, seed), ranks_per_node=2)
    except ValueError as err:
        return str(err)
    return "built"


def fail_on_rank(rank: int) -> int:
    if dist.get_rank() == rank:
        raise ZeroDivisionError("rank failed on purpose")
    return dist.get_rank() * 10


def skip_forward_on_rank_1() -> str:
    ep = ExpertParallel(build(tiny()))
    if dist.get_rank() == 1:
        return "skipped"
    try:
        ep(torch.randn(4, 16))
    except RuntimeError as err:
        return f"{type(err).__name__}: {err}"
    return "no error"


# --- tests -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ranks():
    with LocalRanks(4, timeout=20) as pool:
        yield pool


CONFIGS = {
    "plain": dict(),
    "grouped GEMM": dict(dispatch="grouped"),
    "loop, no shared": dict(dispatch="loop", n_shared=0),
    "groups 4/2": dict(n_groups=4, topk_groups=2),
    "node-limited M=1": dict(route_limit="node", limit_units=2, limit_max=1),
    "device-limited M=2": dict(route_limit="device", limit_units=-1, limit_max=2),
    "softmax, capacity": dict(score_func="softmax", norm_topk_prob=False, capacity_factor=1.0),
    "sequence aux loss": dict(aux_loss="sequence", aux_loss_alpha=0.1),
}


@pytest.mark.parametrize("tokens", [[7, 0], [5, 0, 17, 3]], ids=["2 ranks", "4 ranks"])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_outputs_and_gradients_equal_the_unsharded_layer(ranks, name, tokens):
    changes = dict(CONFIGS[name])
    if changes.get("limit_units") == -1:          # one unit per device (rank)
        changes["limit_units"] = len(tokens)
    results = ranks.run(equal_to_unsharded, tiny(**changes).to_dict(), tokens, ranks_per_node=1 if
                        len(tokens) == 2 else 2, train="aux_loss" in changes)[:len(tokens)]
    for rank, result in enumerate(results):
        worst = max(result["errors"].items(), key=lambda kv: kv[1])
        assert worst[1] < TOLERANCE, (name, rank, result["errors"])
    stats = results[0]["stats"]            # tokens and pairs per rank pair, as the reference routed them
    assert torch.equal(stats.tokens_RR, results[0]["tokens_RR"])
    assert torch.equal(stats.pairs_RR, results[0]["pairs_RR"])
    assert stats.tokens_RR[1].sum() == 0 and stats.pairs_RR.sum() == results[0]["indices"].ge(0).sum()
    if name.startswith("node-limited"):
        assert stats.max_nodes_per_token == 1


def test_extreme_skew_every_token_to_one_rank_and_from_one_rank(ranks):
    cfg = tiny(n_routed=8, top_k=2).to_dict()
    results = ranks.run(equal_to_unsharded, cfg, [0, 0, 40, 0], ranks_per_node=2, bias=0.0)
    assert max(max(r["errors"].values()) for r in results) < TOLERANCE
    stats = results[0]["stats"]
    assert stats.tokens_RR[[0, 1, 3]].sum() == 0 and stats.pairs_RR[2].sum() == 40 * 2
    # a bias of +5 on experts 0 and 1 (rank 0's block) sends every token to rank 0
    results = ranks.run(equal_to_unsharded, cfg, [9, 30, 0, 4], ranks_per_node=2, hot=(0, 1))
    assert max(max(r["errors"].values()) for r in results) < TOLERANCE
    stats = results[0]["stats"]
    assert stats.rank_load.tolist() == [2 * 43, 0, 0, 0]
    assert stats.load_imbalance == pytest.approx(4.0)


def test_fp8_dispatch_error_is_bounded_and_halves_the_bytes(ranks):
    results = ranks.run(fp8_error, [64, 32, 0, 48])
    errors = [r["error"] for r in results if r["error"] == r["error"]]  # rank 2 has no tokens: nan
    assert all(0 < e < 0.05 for e in errors), errors
    exact, fp8 = results[0]["exact bytes"], results[0]["fp8 bytes"]
    assert fp8 < 0.6 * exact


@pytest.mark.parametrize("tokens", [[12, 0], [5, 30, 0, 9]], ids=["2 ranks", "4 ranks"])
def test_loss_free_loads_are_all_reduced_over_the_group(ranks, tokens):
    results = [r for r in ranks.run(bias_after_update, tokens) if r is not None]
    for r in results:
        assert torch.equal(r["ep"], r["reference"]) and r["loads reset"]
    assert any(not torch.equal(r["local only"], r["reference"]) for r in results)


def test_redundant_experts_even_the_load_and_keep_the_output(ranks):
    results = ranks.run(redundant_round_trip, [40, 25, 0, 31], ranks_per_node=2)
    for r in results:
        assert max(r["before"], r["after"], r["cleared"]) < TOLERANCE
        assert "inference" in r["training error"]
    r = results[0]
    assert r["imbalance after"] < 0.8 * r["imbalance before"], (r["imbalance before"], r["imbalance after"])
    expert_RS = r["expert_RS"]
    for rank in range(4):                          # copies stay on their expert's node
        copies = expert_RS[rank, 4:]
        assert all(e // 4 // 2 == rank // 2 for e in copies.tolist() if e >= 0)
    planned = r["planned"]
    assert (r["measured"].double() - planned).abs().max() <= 0.1 * planned.max()


@pytest.mark.parametrize("kind, message, failing", [
    ("config", "config differ", 4), ("weights", "weights differ", 4),
    ("experts", "n_routed=6 experts cannot be split evenly over 4 ranks", 4),
    ("nodes", "limit_units=4, but the group has 2 nodes", 4)])
def test_bad_setups_raise_a_clear_error_on_every_rank(ranks, kind, message, failing):
    start = time.perf_counter()
    results = ranks.run(build_mismatched, kind)
    assert sum(message in r for r in results) == failing, results
    assert time.perf_counter() - start < 30


def test_errors_come_back_with_their_rank_and_traceback(ranks):
    with pytest.raises(RankError, match=r"1 rank\(s\) failed: \[2\]") as err:
        ranks.run(fail_on_rank, 2)
    assert "ZeroDivisionError: rank failed on purpose" in err.value.errors[2]
    assert ranks.run(fail_on_rank, -1) == [0, 10, 20, 30]


def test_a_rank_that_never_joins_fails_fast_instead_of_hanging():
    start = time.perf_counter()
    with pytest.raises(RankError, match="did not form within 3 s"):
        LocalRanks(2, timeout=3, ranks=[0])
    assert time.perf_counter() - start < 30


def test_a_rank_that_skips_the_forward_times_out_the_others():
    start = time.perf_counter()
    waiting, skipped = run_local(skip_forward_on_rank_1, 2, timeout=3)
    assert skipped == "skipped"
    assert "every rank of the group must call forward" in waiting and "Timed out" in waiting, waiting
    assert time.perf_counter() - start < 30


# --- the dispatch plan (no processes) ----------------------------------------------------------------


def test_plan_sends_a_token_once_per_rank_with_its_local_experts():
    slots_TK = torch.tensor([[0, 1, 5], [7, 6, -1], [2, 4, 0]])   # 2 ranks of 4 slots
    plan = plan_dispatch(slots_TK, slots_per_rank=4, n_ranks=2)
    assert plan.token_N.tolist() == [0, 2, 0, 1, 2]            # rank 0 gets tokens 0, 2; rank 1 0, 1, 2
    assert plan.send_R.tolist() == [2, 3]
    assert plan.local_NK.tolist() == [[0, 1, -1], [2, -1, 0], [-1, -1, 1], [3, 2, -1], [-1, 0, -1]]
    assert plan.pairs_RS.tolist() == [[2, 1, 1, 0], [1, 1, 1, 1]]


def test_plan_handles_no_tokens():
    plan = plan_dispatch(torch.empty(0, 3, dtype=torch.long), slots_per_rank=2, n_ranks=4)
    assert plan.send_R.tolist() == [0, 0, 0, 0] and plan.local_NK.shape == (0, 3)


# --- the demo and the benchmark's pieces -------------------------------------------------------------


def test_demo_report_passes_and_shows_the_traffic(ranks):
    from moe_lib.parallel.demo import report, run_demo

    results = ranks.run(run_demo, tokens=24, ranks_per_node=2, max_nodes=1)
    text = report(results)
    assert "PASS" in text and results[0]["stats"].max_nodes_per_token == 1
    assert [r["tokens"] for r in results] == [6, 12, 18, 24]


def test_bench_rank_times_every_phase(ranks):
    from moe_lib.bench.ep import PHASES, bench_rank, planned_bytes_per_token

    results = ranks.run(bench_rank, 32, 1, 0, 0)
    assert set(results[0]["median_ms"]) == {*PHASES, "total", "unsharded"}
    assert all(v > 0 for v in results[0]["median_ms"].values())
    tokens_RR = torch.tensor(results[0]["tokens_sent"])
    assert tokens_RR.shape == (4, 4) and (tokens_RR.sum(dim=1) >= 32).all()
    growth = [planned_bytes_per_token(w, 64, 0) for w in (1, 2, 4, 8)]
    assert growth[0] == 0 and growth == sorted(growth)
