"""``python -m moe_lib.bench ep``: expert parallelism on local gloo ranks, per-rank time by phase.

Runs inference forwards of `ExpertParallel` around the book's reference layer (`presets.BOOK`:
H 256, 64 routed experts of width 128 + 1 shared, top-6, float32) on W = 1, 2, 4 local ranks
(processes on this machine, gloo over loopback TCP), every rank with the same tokens per call (weak
scaling), and reports each rank's median time per phase: route (gate and dispatch plan), dispatch
(counts and token all-to-alls), experts (local routed experts), shared (shared expert), combine
(all-to-all back and the sum). The unsharded layer on the same tokens is timed in every rank too.

On the CPU this measures SOFTWARE OVERHEADS, not network speed: all ranks share this machine's cores
and memory, an "all-to-all" is a copy through the kernel's loopback, and with more ranks than cores
the ranks also wait for each other's time slices. It also records how the traffic grows with the
world size: bytes a rank sends to other ranks per token, measured at W = 1, 2, 4 and, for larger W,
computed by the same dispatch plan (`plan_dispatch`) from the same router without running processes.
For what the traffic costs at DeepSeek-V3's scale see `moe_lib.parallel.cost`.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch
import torch.distributed as dist

from ..moe import DeepSeekMoE
from ..parallel import ExpertParallel, LocalRanks
from ..parallel.dispatch import plan_dispatch
from ..presets import BOOK
from .cpu import machine

PHASES = ("route", "dispatch", "experts", "shared", "combine")
NOTE = ("CPU, gloo over loopback on one machine: these times are software overheads (Python, planning, "
        "copies through the kernel, ranks sharing cores), not network bandwidth; see "
        "moe_lib.parallel.cost for communication at DeepSeek-V3's scale")


def build(seed: int) -> DeepSeekMoE:
    torch.manual_seed(seed)
    layer = DeepSeekMoE(BOOK)
    with torch.no_grad():
        layer.gate.correction_bias.normal_(0.0, 0.02)
    return layer.eval()


def bench_rank(tokens: int, reps: int, warmup: int, seed: int) -> dict:
    """On one rank: phase times of `reps` forwards (after `warmup`), the unsharded layer's time and
    the traffic of the last call."""
    unsharded, sharded = build(seed), ExpertParallel(build(seed), stats=False)
    x = torch.randn(tokens, BOOK.d_model, generator=torch.Generator().manual_seed(seed + 1 + dist.get_rank()))
    times = {phase: [] for phase in (*PHASES, "total", "unsharded")}
    with torch.no_grad():
        for rep in range(warmup + reps):
            dist.barrier()
            start = time.perf_counter()
            sharded(x)
            total = time.perf_counter() - start
            start = time.perf_counter()
            unsharded(x)
            alone = time.perf_counter() - start
            if rep >= warmup:
                for phase in PHASES:
                    times[phase].append(sharded.phase_times[phase])
                times["total"].append(total)
                times["unsharded"].append(alone)
        sharded.collect_stats = True
        sharded(x)
    stats = sharded.last_stats
    return {"median_ms": {k: 1e3 * statistics.median(v) for k, v in times.items()},
            "tokens_sent": stats.tokens_RR.tolist(), "dispatch_bytes": stats.dispatch_bytes_RR.tolist(),
            "combine_bytes": stats.combine_bytes_RR.tolist()}


def planned_bytes_per_token(world: int, tokens: int, seed: int) -> float:
    """Dispatch + combine bytes a rank sends to OTHER ranks per token (float32, exact dispatch),
    from the dispatch plan of BOOK's router at world size `world` (no processes)."""
    layer = build(seed)
    x = torch.randn(tokens, BOOK.d_model, generator=torch.Generator().manual_seed(seed + 1))
    with torch.no_grad():
        slots_TK = layer.gate(x).indices
    plan = plan_dispatch(slots_TK, BOOK.n_routed // world, world)
    rows_out = plan.send_R[1:].sum().item()            # rank 0's view: rows to ranks 1..W-1
    row_bytes = 4 * BOOK.d_model + BOOK.top_k * (8 + 4) + 4 * BOOK.d_model   # dispatch + combine
    return rows_out * row_bytes / tokens


def summarize(world: int, results: list[dict]) -> dict:
    per_rank = [r["median_ms"] for r in results]
    tokens_RR = torch.tensor(results[0]["tokens_sent"])
    bytes_RR = torch.tensor(results[0]["dispatch_bytes"]) + torch.tensor(results[0]["combine_bytes"])
    off = ~torch.eye(world, dtype=torch.bool)
    rounded = [{k: round(v, 3) for k, v in r.items()} for r in per_rank]
    return {"world_size": world, "per_rank_median_ms": rounded,
            "max_over_ranks_ms": {k: round(max(r[k] for r in per_rank), 3) for k in per_rank[0]},
            "tokens_sent_matrix": tokens_RR.tolist(),
            "bytes_to_other_ranks_per_rank": round(bytes_RR[off].sum().item() / world),
            "tokens_to_other_ranks_per_rank": round(tokens_RR[off].sum().item() / world, 1)}


def format_table(report: dict) -> str:
    m = report["machine"]
    lines = [f"Expert parallelism on local gloo ranks: {report['tokens_per_rank']} tokens per rank, "
             f"BOOK layer, forward only, median of {report['reps']} reps",
             f"machine: {m['cpu']} ({m['cores']} cores), 1 thread per rank, torch {m['torch']}",
             f"NOTE: {NOTE}", "",
             f"{'W':>3} " + " ".join(f"{p:>9}" for p in (*PHASES, "total", "unsharded"))
             + f" {'bytes out/rank':>15}"]
    for r in report["results"]:
        worst = r["max_over_ranks_ms"]
        cells = " ".join(f"{worst[p]:>9.2f}" for p in (*PHASES, "total", "unsharded"))
        lines.append(f"{r['world_size']:>3} {cells} {r['bytes_to_other_ranks_per_rank']:>15,}")
    lines += ["", "times: ms, the slowest rank of each phase", "",
              "bytes a rank sends to other ranks per token (dispatch + combine), by world size:",
              ", ".join(f"W={w}: {b:.0f}" for w, b in report["bytes_per_token_by_world_size"].items())]
    return "\n".join(lines)


def run_ep(args: argparse.Namespace) -> dict:
    results = []
    for world in args.world_sizes:
        with LocalRanks(world, timeout=120) as ranks:
            results.append(summarize(world, ranks.run(bench_rank, args.tokens, args.reps, args.warmup,
                                                      args.seed)))
    growth = {w: round(planned_bytes_per_token(w, args.tokens, args.seed), 1)
              for w in (1, 2, 4, 8, 16, 32, 64)}
    report = {"benchmark": "ep", "note": NOTE, "machine": {**machine(), "threads": 1},
              "load_average": os.getloadavg()[0], "config": BOOK.to_dict(), "tokens_per_rank": args.tokens,
              "dtype": "float32", "reps": args.reps, "warmup": args.warmup, "results": results,
              "bytes_per_token_by_world_size": growth,
              "command": f"python -m moe_lib.bench ep --tokens {args.tokens} --reps {args.reps} "
                         f"--world-sizes {' '.join(map(str, args.world_sizes))}"}
    print(format_table(report))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")
    return report


def add_parser(commands) -> None:
    """Register `python -m moe_lib.bench ep`."""
    ep = commands.add_parser("ep", help="expert parallelism on local gloo ranks (software overheads)")
    ep.add_argument("--tokens", type=int, default=1024, help="tokens per rank (default 1024)")
    ep.add_argument("--reps", type=int, default=20, help="timed forwards (default 20)")
    ep.add_argument("--warmup", type=int, default=3, help="untimed forwards first (default 3)")
    ep.add_argument("--world-sizes", type=int, nargs="+", default=[1, 2, 4])
    ep.add_argument("--seed", type=int, default=0)
    ep.add_argument("--out", default="benchmarks/ep.json", help="JSON output path")
    ep.set_defaults(run=run_ep)
