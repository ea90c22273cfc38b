"""``python -m moe_lib.bench cpu``: the MoE layer at the book's reference config (`presets.BOOK`) on T
tokens in float32, our dispatch paths against transformers' `DeepseekV3MoE` experts implementations, all with the same
weights, in one process. Every repetition visits every implementation in turn (the order rotates),
so a slower moment of the machine hits them all alike; we report medians after warm-up rounds.

- forward: under `torch.no_grad()`, the inference forward.
- forward+backward: the forward, then the backward of a fixed random projection of the output,
  (y * P).sum(), to the input and every parameter.
- dense: a matmul [T, H] @ [H, N] with the layer's FLOPs, timed in the same rounds with both of
  torch's CPU GEMMs (`torch.mm`, MKL here, and oneDNN via `moe_lib.kernels`); "% of dense" is the
  layer's GFLOP/s over the faster dense GFLOP/s of the same mode: this machine's measured peak.
- balancing: the loss-free update of one training step (load accumulation and
  `balance.update_bias`), as a share of our default path's forward+backward.
FLOPs are `accounting.moe_flops_per_token` (2 per activated weight forward, 3x with backward).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from tqdm import tqdm

from .. import kernels
from ..accounting import moe_flops_per_token
from ..balance import update_bias
from ..config import MoEConfig
from ..moe import DeepSeekMoE
from ..presets import BOOK

OURS = ("loop", "sorted", "grouped")
TRANSFORMERS = ("eager", "grouped_mm", "batched_mm")
DEFAULT_PATH = "moe_lib:" + MoEConfig().dispatch
MODES = ("forward", "forward_backward")
TARGET_SPEEDUP = 1.3
TARGET_BALANCE_PCT = 5.0


def machine() -> dict:
    """CPU model, cores, torch and transformers versions, as recorded with every result."""
    import transformers

    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), platform.processor())
    return {"cpu": model, "cores": os.cpu_count(), "threads": torch.get_num_threads(),
            "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version()}


def build_layers(cfg: MoEConfig, tokens: int, seed: int) -> tuple[dict[str, torch.nn.Module], dict]:
    """Our three dispatch paths and transformers' implementations, all with one set of weights.

    The correction bias is random and non-zero so that it takes part in the selection.
    Returns the layers (eval mode) and {name: reason} for implementations left out.
    """
    from ..interop import to_transformers

    torch.manual_seed(seed)
    reference = DeepSeekMoE(cfg)
    reference.gate.correction_bias.normal_(0.0, 0.02)
    layers: dict[str, torch.nn.Module] = {}
    for dispatch in OURS:
        layer = DeepSeekMoE(cfg.replace(dispatch=dispatch))
        layer.load_state_dict(reference.state_dict())
        layers["moe_lib:" + dispatch] = layer.eval()
    skipped = {}
    for impl in TRANSFORMERS:
        reason = _batched_mm_too_big(cfg, tokens) if impl == "batched_mm" else None
        if reason:
            skipped["transformers:" + impl] = reason
            continue
        hf = to_transformers(reference)
        hf.config._experts_implementation = impl
        layers["transformers:" + impl] = hf.eval()
    return layers, skipped


def _batched_mm_too_big(cfg: MoEConfig, tokens: int) -> str | None:
    """batched_mm gathers one copy of the expert weights per (token, expert) pair: skip it if the
    copies for forward+backward (weights and their gradients) would exceed a quarter of free memory."""
    copy_bytes = tokens * cfg.top_k * 3 * cfg.d_model * cfg.d_expert * 4
    available = _mem_available_bytes()
    if available is None or 2 * copy_bytes <= available / 4:
        return None
    return (f"gathers one weight copy per (token, expert) pair: {copy_bytes / 2**30:.1f} GiB forward, "
            f"about twice that with backward; {available / 2**30:.1f} GiB available")


def _mem_available_bytes() -> int | None:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return None


def dense_width(cfg: MoEConfig) -> int:
    """N such that a [T, H] @ [H, N] matmul has the layer's forward FLOPs (2 H N per token)."""
    return round(moe_flops_per_token(cfg) / (2 * cfg.d_model))


def forward_backward(layer: Callable, x: torch.Tensor, proj: torch.Tensor, params: list) -> None:
    for p in params:
        p.grad = None
    x.grad = None
    (layer(x) * proj).sum().backward()


def verify(layers: dict[str, torch.nn.Module], x: torch.Tensor, proj: torch.Tensor,
           tol: float = 1e-5) -> dict[str, float]:
    """Check every layer's output and input gradient against `moe_lib:loop`; largest relative error."""
    results = {}
    for name, layer in layers.items():
        xg = x.detach().clone().requires_grad_()
        y = layer(xg)
        (y * proj).sum().backward()
        results[name] = (y.detach(), xg.grad)
        layer.zero_grad(set_to_none=True)
    ref_y, ref_dx = results["moe_lib:loop"]
    errors = {}
    for name, (y, dx) in results.items():
        errors[name] = max(_rel_err(y, ref_y), _rel_err(dx, ref_dx))
        if errors[name] > tol:
            raise SystemExit(f"{name} disagrees with moe_lib:loop (relative error {errors[name]:.2e} "
                             f"> {tol:.0e}); refusing to time it")
    return errors


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def time_rounds(tasks: dict[str, Callable[[], None]], reps: int, warmup: int) -> dict[str, list[float]]:
    """Run every task once per round, the order rotating each round; seconds per task after warm-up."""
    names = list(tasks)
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in tqdm(range(warmup + reps), desc="rounds", unit="round"):
        for i in range(len(names)):
            name = names[(r + i) % len(names)]
            start = time.perf_counter()
            tasks[name]()
            elapsed = time.perf_counter() - start
            if r >= warmup:
                times[name].append(elapsed)
    return times


def cpu_tasks(layers: dict[str, torch.nn.Module], x: torch.Tensor, proj: torch.Tensor,
              dense_w: torch.Tensor) -> dict[str, Callable[[], None]]:
    """(name, mode) -> a closure running it once; plus the dense reference and the balancing update."""
    tasks: dict[str, Callable[[], None]] = {}
    xg = x.detach().clone().requires_grad_()
    for name, layer in layers.items():
        params = list(layer.parameters())
        tasks[f"{name}|forward"] = _no_grad(layer, x)
        tasks[f"{name}|forward_backward"] = (lambda layer=layer, params=params:
                                             forward_backward(layer, xg, proj, params))
    dense_w = dense_w.detach().clone().requires_grad_()
    dense_proj = torch.randn(x.shape[0], dense_w.shape[1])
    matmuls = {"dense:torch.mm": lambda t: t @ dense_w,
               "dense:oneDNN": lambda t: kernels.linear(t, dense_w.t())}
    if not kernels.ONEDNN:
        del matmuls["dense:oneDNN"]
    for name, matmul in matmuls.items():
        tasks[f"{name}|forward"] = _no_grad(matmul, x)
        tasks[f"{name}|forward_backward"] = (lambda matmul=matmul:
                                             forward_backward(matmul, xg, dense_proj, [dense_w]))
    tasks["balancing|update"] = _balancing_step(layers[DEFAULT_PATH], x)
    return tasks


def _no_grad(fn: Callable, x: torch.Tensor) -> Callable[[], None]:
    def run() -> None:
        with torch.no_grad():
            fn(x)
    return run


def _balancing_step(layer: DeepSeekMoE, x: torch.Tensor) -> Callable[[], None]:
    """One training step's loss-free work: accumulate this batch's loads, then update the bias."""
    with torch.no_grad():
        layer(x)
    indices_TK = layer.last_routing.indices
    bias = layer.gate.correction_bias.clone()

    def run() -> None:
        layer.gate.accumulate_load(indices_TK)
        update_bias(layer)
        layer.gate.correction_bias.copy_(bias)  # keep the benchmarked routing fixed
    return run


def summarize(times: dict[str, list[float]], cfg: MoEConfig, tokens: int, n_dense: int) -> dict:
    """Medians, tokens/s, GFLOP/s, % of dense, speedup over the best transformers implementation."""
    flops = {"forward": moe_flops_per_token(cfg) * tokens,
             "forward_backward": moe_flops_per_token(cfg, backward=True) * tokens}
    dense_flops = {"forward": 2 * tokens * cfg.d_model * n_dense}
    dense_flops["forward_backward"] = 3 * dense_flops["forward"]
    results: dict[str, dict] = {}
    for key, ts in times.items():
        name, mode = key.split("|")
        median = statistics.median(ts)
        entry = {"median_ms": 1e3 * median, "min_ms": 1e3 * min(ts),
                 "iqr_ms": 1e3 * _iqr(ts), "reps": len(ts)}
        if mode in MODES:
            work = dense_flops[mode] if name.startswith("dense") else flops[mode]
            entry.update(tokens_per_s=tokens / median, gflops=work / median / 1e9)
        results.setdefault(name, {})[mode] = entry
    best, peak = {}, {}
    for mode in MODES:
        hf = {n: r[mode]["tokens_per_s"] for n, r in results.items() if n.startswith("transformers:")}
        best[mode] = max(hf, key=hf.get)
        dense = {n: r[mode]["gflops"] for n, r in results.items() if n.startswith("dense")}
        peak[mode] = max(dense, key=dense.get)
        for r in results.values():
            if mode in r:
                r[mode]["pct_of_dense"] = 100 * r[mode]["gflops"] / dense[peak[mode]]
                r[mode]["speedup_vs_best_transformers"] = r[mode]["tokens_per_s"] / hf[best[mode]]
    balance_ms = results.pop("balancing")["update"]["median_ms"]
    fb_ms = results[DEFAULT_PATH]["forward_backward"]["median_ms"]
    return {"flops": flops, "results": results, "best_transformers": best, "dense_peak": peak,
            "balancing": {"median_ms": balance_ms, "pct_of_forward_backward": 100 * balance_ms / fb_ms,
                          "target_pct": TARGET_BALANCE_PCT,
                          "met": 100 * balance_ms / fb_ms < TARGET_BALANCE_PCT},
            "target": {"speedup": TARGET_SPEEDUP, "path": DEFAULT_PATH,
                       "met": {mode: results[DEFAULT_PATH][mode]["speedup_vs_best_transformers"]
                               >= TARGET_SPEEDUP for mode in MODES}}}


def _iqr(ts: list[float]) -> float:
    if len(ts) < 4:
        return 0.0
    q = statistics.quantiles(ts, n=4)
    return q[2] - q[0]


def format_table(report: dict) -> str:
    m = report["machine"]
    lines = [f"MoE layer, {report['tokens']} tokens, {report['dtype']}, config: d_model "
             f"{report['config']['d_model']}, d_expert {report['config']['d_expert']}, "
             f"{report['config']['n_routed']} routed + {report['config']['n_shared']} shared, "
             f"top-{report['config']['top_k']}",
             f"machine: {m['cpu']} ({m['cores']} cores), {m['threads']} threads, torch {m['torch']}, "
             f"transformers {m['transformers']}; median of {report['reps']} interleaved reps"]
    for mode in MODES:
        lines += ["", f"{mode.replace('_', '+')}:",
                  f"{'implementation':26s} {'ms':>8s} {'tokens/s':>10s} {'GFLOP/s':>8s} "
                  f"{'% dense':>8s} {'vs best HF':>10s}"]
        for name, r in report["results"].items():
            e = r[mode]
            lines.append(f"{name:26s} {e['median_ms']:8.2f} {e['tokens_per_s']:10.0f} {e['gflops']:8.1f} "
                         f"{e['pct_of_dense']:7.1f}% {e['speedup_vs_best_transformers']:9.2f}x")
    for name, reason in report["skipped"].items():
        lines.append(f"skipped {name}: {reason}")
    b, t = report["balancing"], report["target"]
    lines += ["", f"best transformers: forward {report['best_transformers']['forward']}, "
                  f"forward+backward {report['best_transformers']['forward_backward']}",
              f"% dense is of the faster dense matmul: forward {report['dense_peak']['forward']}, "
              f"forward+backward {report['dense_peak']['forward_backward']}",
              f"target {t['speedup']}x for {t['path']}: "
              + ", ".join(f"{mode} {'met' if ok else 'MISSED'}" for mode, ok in t["met"].items()),
              f"loss-free balancing update: {b['median_ms']:.3f} ms = {b['pct_of_forward_backward']:.2f}% "
              f"of a {t['path']} forward+backward (target < {b['target_pct']:.0f}%)"]
    return "\n".join(lines)


def run_cpu(args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads)
    cfg = BOOK
    load_before = os.getloadavg()
    layers, skipped = build_layers(cfg, args.tokens, args.seed)
    x = torch.randn(args.tokens, cfg.d_model)
    proj = torch.randn(args.tokens, cfg.d_model)
    errors = verify(layers, x, proj)
    n_dense = dense_width(cfg)
    tasks = cpu_tasks(layers, x, proj, torch.randn(cfg.d_model, n_dense) / cfg.d_model**0.5)
    times = time_rounds(tasks, args.reps, args.warmup)
    report = {"benchmark": "cpu", "machine": machine(), "config": cfg.to_dict(), "tokens": args.tokens,
              "dtype": "float32", "reps": args.reps, "warmup": args.warmup,
              "dense_shape": [args.tokens, cfg.d_model, n_dense],
              "max_rel_error_vs_loop": errors, "skipped": skipped,
              **summarize(times, cfg, args.tokens, n_dense),
              "load_average_before_after": [load_before[0], os.getloadavg()[0]],
              "command": f"python -m moe_lib.bench cpu --tokens {args.tokens} --reps {args.reps} "
                         f"--threads {args.threads}"}
    print(format_table(report))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")
    return report


def add_parser(commands) -> None:
    """Register `python -m moe_lib.bench cpu`."""
    cpu = commands.add_parser("cpu", help="the MoE layer on CPU against transformers' DeepseekV3MoE")
    cpu.add_argument("--tokens", type=int, default=4096, help="tokens per forward (default 4096)")
    cpu.add_argument("--reps", type=int, default=20, help="timed rounds (default 20)")
    cpu.add_argument("--warmup", type=int, default=3, help="untimed rounds first (default 3)")
    cpu.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    cpu.add_argument("--seed", type=int, default=0)
    cpu.add_argument("--out", default="benchmarks/cpu.json", help="JSON output path")
    cpu.set_defaults(run=run_cpu)
