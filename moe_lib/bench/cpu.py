"""``python -m moe_lib.bench cpu``: the MoE layer on the CPU in float32, our dispatch paths against
transformers' `DeepseekV3MoE` experts implementations, all with the same weights, in one process.
Every repetition visits every implementation in turn (the order rotates), so a slower moment of the
machine hits them all alike; we report medians after warm-up rounds.

- forward: under `torch.no_grad()`, the inference forward.
- forward+backward: the forward, then the backward of a fixed random projection of the output,
  (y * P).sum(), to the input and every parameter.
- dense: a matmul [T, H] @ [H, N] with the layer's FLOPs, timed in the same rounds with both of
  torch's CPU GEMMs (`torch.mm`, MKL here, and oneDNN); "% of dense" is the layer's GFLOP/s over
  the faster dense GFLOP/s of the same mode: this machine's measured peak.
- bound:GEMMs: the layer's GEMMs alone, as our default path issues them (router, each routed expert's
  block of rows, the shared expert; the same BLAS calls on the same workers, `native`'s `gemm_bound`),
  on rows already sorted, without gathers, activation, combine, top-k or sort, writing the weight
  gradients to full buffers and every other product to per-thread scratch: what our path would
  take if everything but its GEMMs and their required results were free, a bound for any
  implementation that runs these GEMMs through the same BLAS. Its speed-up over the best
  transformers implementation is the most the target can get by removing overhead (where it is
  under 1.3x, only faster GEMMs can reach it), and our path's "% of bound" is how close it comes.
- balancing: the loss-free update of one training step (load accumulation and
  `balance.update_bias`), as a share of our default path's forward+backward, timed where a
  training step runs it: right after that forward+backward (untimed), not after whichever task
  the rotation put before it (a 0.05 ms update measured 0.7-1.7 ms there, in caches and threads
  another implementation had left cold).
FLOPs are `accounting.moe_flops_per_token` (2 per activated weight forward, 3x with backward).

Instruction-set levels: each level runs in its own process, `native` as the machine is and `avx2`
with oneDNN, MKL and ATen capped at AVX2 (`LEVELS`); each records what oneDNN, MKL and ATen report
in that process, so one can check that the caps took effect. Shapes: the book's reference layer
(`presets.BOOK`) on 4096 tokens, or `--tokens/--d-model/--d-expert`, or `--sweep` (`SWEEP`).
Targets (issue 11): our default path >= 1.3x the best transformers implementation in both modes,
and >= 75% of the faster dense matmul's GFLOP/s forward+backward.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from tqdm import tqdm

from .. import kernels, native
from ..accounting import moe_flops_per_token
from ..balance import update_bias
from ..config import MoEConfig
from ..dispatch import sort_by_expert
from ..moe import DeepSeekMoE
from ..presets import BOOK
from . import cpu_info

OURS = ("loop", "sorted", "grouped")
TRANSFORMERS = ("eager", "grouped_mm", "batched_mm")
DEFAULT_PATH = "moe_lib:" + MoEConfig().dispatch
PYTHON_TASKS = DEFAULT_PATH + " (Python tasks)"
BOUND = "bound:GEMMs"
MODES = ("forward", "forward_backward")
TARGET_SPEEDUP = 1.3
TARGET_PCT_OF_DENSE = 75.0  # forward+backward
TARGET_BALANCE_PCT = 5.0
LEVELS = {"native": {},
          "avx2": {"ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2",
                   "ATEN_CPU_CAPABILITY": "avx2"}}
SWEEP = ({"tokens": 4096}, {"tokens": 1024}, {"tokens": 16384},
         {"tokens": 4096, "d_model": 512, "d_expert": 256})
FLAGS = ("sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni",
         "avx512_bf16", "amx_tile")
_PROBE = ("import torch; a = torch.randn(64, 64); "
          "torch.ops.mkldnn._linear_pointwise(a, a, None, 'none', [], ''); a @ a")


def machine() -> dict:
    """CPU model and instruction-set flags, cores, torch and transformers versions."""
    import transformers

    model, flags = cpu_info()
    return {"cpu": model, "flags": {f: f in flags for f in FLAGS}, "cores": os.cpu_count(),
            "threads": torch.get_num_threads(), "torch": torch.__version__,
            "transformers": transformers.__version__, "python": platform.python_version()}


def isa_in_effect() -> dict:
    """What this process runs: the capping variables, ATen's CPU capability, and oneDNN's ISA and
    kernel and MKL's banner as their verbose modes print them for one small GEMM (a child process
    with the same environment)."""
    probe = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True, check=True,
                           env={**os.environ, "ONEDNN_VERBOSE": "1", "MKL_VERBOSE": "1"})
    lines = probe.stdout.splitlines()
    onednn_isa = next((ln.split("isa:", 1)[1] for ln in lines if ",isa:" in ln), None)
    onednn_kernel = next((ln.split(",")[5] for ln in lines if ",primitive,exec," in ln), None)
    mkl = next((ln.removeprefix("MKL_VERBOSE ") for ln in lines if ln.startswith("MKL_VERBOSE oneMKL")),
               None)
    ops = native.ops()
    return {"env": {name: os.environ.get(name) for name in LEVELS["avx2"]},
            "native_kernels": {"built": ops is not None, "compiled_for": native.isa(),
                               "error": None if ops is not None else repr(native.build_error())},
            "aten_cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "onednn_isa": onednn_isa, "onednn_kernel": onednn_kernel, "mkl": mkl}


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
    if native.ops() is not None:  # the default path as it was before the C++ kernels, for comparison
        layers[PYTHON_TASKS] = PythonTasks(layers[DEFAULT_PATH])
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


class PythonTasks(torch.nn.Module):
    """A layer run with `moe_lib.native` switched off: the same code path with the tasks issued from
    Python, its routing and sort by torch's operators."""

    def __init__(self, layer: DeepSeekMoE):
        super().__init__()
        self.layer = layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with native.disabled():
            return self.layer(x)


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


def time_rounds(tasks: dict[str, Callable[[], float | None]], reps: int,
                warmup: int) -> dict[str, list[float]]:
    """Run every task once per round, the order rotating each round; seconds per task after warm-up
    (a task that returns a number has timed its own part: that number is its time)."""
    names = list(tasks)
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in tqdm(range(warmup + reps), desc="rounds", unit="round"):
        for i in range(len(names)):
            name = names[(r + i) % len(names)]
            start = time.perf_counter()
            own = tasks[name]()
            elapsed = time.perf_counter() - start if own is None else own
            if r >= warmup:
                times[name].append(elapsed)
    return times


def cpu_tasks(layers: dict[str, torch.nn.Module], x: torch.Tensor, proj: torch.Tensor,
              dense_w: torch.Tensor) -> dict[str, Callable[[], float | None]]:
    """(name, mode) -> a closure running it once; plus the dense reference and the balancing update."""
    tasks: dict[str, Callable[[], float | None]] = {}
    xg = x.detach().clone().requires_grad_()
    for name, layer in layers.items():
        params = list(layer.parameters())
        tasks[f"{name}|forward"] = _no_grad(layer, x)
        tasks[f"{name}|forward_backward"] = (lambda layer=layer, params=params:
                                             forward_backward(layer, xg, proj, params))
    dense_w = dense_w.detach().clone().requires_grad_()
    dense_proj = torch.randn(x.shape[0], dense_w.shape[1])
    matmuls = {"dense:torch.mm": lambda t: t @ dense_w,
               "dense:oneDNN": lambda t: kernels.linear(t, dense_w.t(), backend="oneDNN")}
    if not kernels.ONEDNN:
        del matmuls["dense:oneDNN"]
    for name, matmul in matmuls.items():
        tasks[f"{name}|forward"] = _no_grad(matmul, x)
        tasks[f"{name}|forward_backward"] = (lambda matmul=matmul:
                                             forward_backward(matmul, xg, dense_proj, [dense_w]))
    bound = gemm_bound_tasks(layers[DEFAULT_PATH], x)
    if bound is not None:
        tasks[f"{BOUND}|forward"], tasks[f"{BOUND}|forward_backward"] = bound
    tasks["balancing|update"] = _balancing_step(layers[DEFAULT_PATH], x, xg, proj)
    return tasks


def gemm_bound_tasks(layer: DeepSeekMoE, x: torch.Tensor) -> tuple[Callable[[], None], ...] | None:
    """The layer's GEMMs alone (see `bound:GEMMs` above), forward and forward+backward, for this x's
    routing, in the tasks plan (the layer's own plan wherever the run's `experts_strategies` say
    'tasks' for native kernels, as in every committed run); None where the C++ kernels are not built."""
    ops = native.ops_for(x)
    if ops is None:
        return None
    with torch.no_grad():
        layer(x)
    pairs = sort_by_expert(layer.last_routing.indices, layer.last_routing.weights, layer.cfg.n_routed)
    x_NH = x.index_select(0, pairs.token_N).contiguous()
    threads = torch.get_num_threads()
    routed = kernels.task_plan(pairs.counts_E.tolist(), None, None, threads)
    experts = layer.experts
    gate_up, down = experts.gate_up_proj.detach().contiguous(), experts.down_proj.detach().contiguous()
    expert_calls = [(x_NH, gate_up, down, kernels._block_table(routed), not routed.inline)]
    if layer.shared_experts is not None:
        gate_up, down = (w.detach().contiguous() for w in layer.shared_experts.stacked_weights())
        plan = kernels.task_plan([x.shape[0]], None, None, threads)
        expert_calls.append((x.contiguous(), gate_up, down, kernels._block_table(plan), not plan.inline))
    w_EH = layer.gate.weight.detach()
    logits_TE = x.new_empty(x.shape[0], w_EH.shape[0])
    grad_x_TH, grad_w_EH = torch.empty_like(x), torch.empty_like(w_EH)

    def run(backward: bool) -> None:
        torch.mm(x, w_EH.t(), out=logits_TE)
        for call in expert_calls:
            ops.gemm_bound(*call[:4], backward, call[4])
        if backward:  # the router's two gradient GEMMs
            torch.mm(logits_TE, w_EH, out=grad_x_TH)
            torch.mm(logits_TE.t(), x, out=grad_w_EH)

    return (lambda: run(False)), (lambda: run(True))


def _no_grad(fn: Callable, x: torch.Tensor) -> Callable[[], None]:
    def run() -> None:
        with torch.no_grad():
            fn(x)
    return run


def _balancing_step(layer: DeepSeekMoE, x: torch.Tensor, xg: torch.Tensor,
                    proj: torch.Tensor) -> Callable[[], float]:
    """One training step's loss-free work, where a training step runs it: after the layer's
    forward+backward on xg (untimed), accumulate this batch's loads, then update the bias. The
    closure returns the seconds of that update alone."""
    with torch.no_grad():
        layer(x)
    indices_TK = layer.last_routing.indices
    bias = layer.gate.correction_bias.clone()
    params = list(layer.parameters())

    def run() -> float:
        forward_backward(layer, xg, proj, params)
        start = time.perf_counter()
        layer.gate.accumulate_load(indices_TK)
        update_bias(layer)
        elapsed = time.perf_counter() - start
        layer.gate.correction_bias.copy_(bias)  # keep the benchmarked routing fixed
        return elapsed
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
    ours = results[DEFAULT_PATH]
    balance_pct = 100 * balance_ms / ours["forward_backward"]["median_ms"]
    if BOUND in results:  # how close our path comes to its GEMMs alone
        for mode in MODES:
            bound_ms = results[BOUND][mode]["median_ms"]
            ours[mode]["pct_of_gemm_bound"] = 100 * bound_ms / ours[mode]["median_ms"]
    met = {mode: ours[mode]["speedup_vs_best_transformers"] >= TARGET_SPEEDUP for mode in MODES}
    met["pct_of_dense_forward_backward"] = ours["forward_backward"]["pct_of_dense"] >= TARGET_PCT_OF_DENSE
    return {"flops": flops, "results": results, "best_transformers": best, "dense_peak": peak,
            "balancing": {"median_ms": balance_ms, "pct_of_forward_backward": balance_pct,
                          "target_pct": TARGET_BALANCE_PCT, "met": balance_pct < TARGET_BALANCE_PCT},
            "target": {"speedup": TARGET_SPEEDUP, "pct_of_dense_forward_backward": TARGET_PCT_OF_DENSE,
                       "path": DEFAULT_PATH, "met": met}}


def _iqr(ts: list[float]) -> float:
    if len(ts) < 4:
        return 0.0
    q = statistics.quantiles(ts, n=4)
    return q[2] - q[0]


def format_table(run: dict, level: str) -> str:
    """One run (one level, one shape) as text."""
    c = run["config"]
    lines = [f"[{level}] MoE layer, {run['tokens']} tokens, {run['dtype']}, d_model {c['d_model']}, "
             f"d_expert {c['d_expert']}, {c['n_routed']} routed + {c['n_shared']} shared, top-{c['top_k']}, "
             f"{run['threads']} threads; median of {run['reps']} interleaved reps, load average "
             f"{run['load_average_before_after'][0]:.2f} -> {run['load_average_before_after'][1]:.2f}"]
    for mode in MODES:
        lines += ["", f"{mode.replace('_', '+')}:",
                  f"{'implementation':32s} {'ms':>8s} {'tokens/s':>10s} {'GFLOP/s':>8s} "
                  f"{'% dense':>8s} {'vs best HF':>10s}"]
        for name, r in run["results"].items():
            e = r[mode]
            lines.append(f"{name:32s} {e['median_ms']:8.2f} {e['tokens_per_s']:10.0f} {e['gflops']:8.1f} "
                         f"{e['pct_of_dense']:7.1f}% {e['speedup_vs_best_transformers']:9.2f}x")
    for name, reason in run["skipped"].items():
        lines.append(f"skipped {name}: {reason}")
    b, t = run["balancing"], run["target"]
    verdict = {key: "met" if ok else "MISSED" for key, ok in t["met"].items()}
    lines += ["", f"best transformers: forward {run['best_transformers']['forward']}, "
                  f"forward+backward {run['best_transformers']['forward_backward']}; % dense is of "
                  f"{run['dense_peak']['forward']} (forward), {run['dense_peak']['forward_backward']} "
                  f"(forward+backward)",
              f"targets for {t['path']}: {t['speedup']}x forward {verdict['forward']}, forward+backward "
              f"{verdict['forward_backward']}; {t['pct_of_dense_forward_backward']:.0f}% of dense "
              f"forward+backward {verdict['pct_of_dense_forward_backward']}",
              f"loss-free balancing update: {b['median_ms']:.3f} ms = {b['pct_of_forward_backward']:.2f}% "
              f"of a {t['path']} forward+backward (target < {b['target_pct']:.0f}%)"]
    bound, ours = run["results"].get(BOUND), run["results"][t["path"]]
    if bound:
        x_hf = [bound[mode]["speedup_vs_best_transformers"] for mode in MODES]
        pct = [ours[mode]["pct_of_gemm_bound"] for mode in MODES]
        lines.append(f"{BOUND} (the layer's GEMMs alone): {x_hf[0]:.2f}x / {x_hf[1]:.2f}x the best "
                     f"transformers (forward / forward+backward); {t['path']} at {pct[0]:.0f}% / "
                     f"{pct[1]:.0f}% of its speed")
    return "\n".join(lines)


def run_shape(cfg: MoEConfig, tokens: int, reps: int, warmup: int, seed: int) -> dict:
    """Verify and time every implementation on one shape, in this process."""
    load_before = os.getloadavg()
    layers, skipped = build_layers(cfg, tokens, seed)
    x = torch.randn(tokens, cfg.d_model)
    proj = torch.randn(tokens, cfg.d_model)
    errors = verify(layers, x, proj)
    n_dense = dense_width(cfg)
    tasks = cpu_tasks(layers, x, proj, torch.randn(cfg.d_model, n_dense) / cfg.d_model**0.5)
    times = time_rounds(tasks, reps, warmup)
    return {"config": cfg.to_dict(), "tokens": tokens, "dtype": "float32", "threads": torch.get_num_threads(),
            "reps": reps, "warmup": warmup, "dense_shape": [tokens, cfg.d_model, n_dense],
            "max_rel_error_vs_loop": errors, "skipped": skipped, **summarize(times, cfg, tokens, n_dense),
            "gemm_choices": kernels.gemm_choices(), "experts_strategies": kernels.strategies(),
            "experts_forced": kernels.FORCE_STRATEGY,
            "load_average_before_after": [load_before[0], os.getloadavg()[0]]}


def shapes(args: argparse.Namespace) -> list[dict]:
    """The shapes to run: the sweep, or the one given (the reference by default)."""
    if args.sweep:
        return [dict(s) for s in SWEEP]
    return [{"tokens": args.tokens, "d_model": args.d_model or BOOK.d_model,
             "d_expert": args.d_expert or BOOK.d_expert}]


def run_level(args: argparse.Namespace) -> dict:
    """Every shape at this process's instruction-set level; reps scale down with a shape's work
    (at least 5) so that large shapes take about as long as the reference."""
    torch.set_num_threads(args.threads)
    runs = []
    for shape in shapes(args):
        cfg = BOOK.replace(d_model=shape.get("d_model", BOOK.d_model),
                           d_expert=shape.get("d_expert", BOOK.d_expert))
        work = shape["tokens"] * cfg.d_model * cfg.d_expert / (4096 * BOOK.d_model * BOOK.d_expert)
        reps = max(5, round(args.reps / max(1.0, work)))
        runs.append(run_shape(cfg, shape["tokens"], reps, args.warmup, args.seed))
        print(format_table(runs[-1], args.level), flush=True)
    return {"isa": isa_in_effect(), "runs": runs}


def run_cpu(args: argparse.Namespace) -> dict:
    """Each level in a child process with its environment, then one JSON with all of them."""
    if args.level:  # a child: one level, in this process
        Path(args.out).write_text(json.dumps(run_level(args), indent=2) + "\n")
        return {}
    report = {"benchmark": "cpu", "machine": machine(), "command": " ".join(["python -m moe_lib.bench cpu",
                                                                              *sys.argv[2:]]),
              "levels": {}}
    for level in args.levels:
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "level.json"
            child = [sys.executable, "-m", "moe_lib.bench", "cpu", "--level", level, "--out", str(out),
                     "--tokens", str(args.tokens), "--reps", str(args.reps), "--warmup", str(args.warmup),
                     "--threads", str(args.threads), "--seed", str(args.seed)]
            child += ["--d-model", str(args.d_model)] if args.d_model else []
            child += ["--d-expert", str(args.d_expert)] if args.d_expert else []
            child += ["--sweep"] if args.sweep else []
            # native: without any cap the caller's environment may hold; avx2: with the caps
            env = {k: v for k, v in os.environ.items() if k not in LEVELS["avx2"]} | LEVELS[level]
            subprocess.run(child, check=True, env=env)
            report["levels"][level] = {"env": LEVELS[level], **json.loads(out.read_text())}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(markdown(report))
    print(f"wrote {args.out}")
    return report


def markdown(report: dict) -> str:
    """The README's tables: every implementation at the first shape, then our default path against
    the best transformers implementation at every shape, each level side by side."""
    levels = list(report["levels"])
    runs = list(zip(*(report["levels"][lv]["runs"] for lv in levels), strict=True))
    cols = [f"{lv} {mode.replace('_', '+')}" for lv in levels for mode in MODES]
    lines = ["| implementation | " + " | ".join(f"{c} tokens/s" for c in cols) + " |",
             "|" + "---|" * (1 + len(cols))]
    for name in runs[0][0]["results"]:
        cells = []
        for run in runs[0]:
            for mode in MODES:
                e = run["results"][name][mode]
                extra = (f" ({e['speedup_vs_best_transformers']:.2f}x, {e['pct_of_dense']:.0f}% dense)"
                         if name == DEFAULT_PATH else "")
                cells.append(f"{e['tokens_per_s']:,.0f}{extra}")
        label = f"{name} (default)" if name == DEFAULT_PATH else name
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines += ["", "| shape | " + " | ".join(f"{c}: ours (x best HF, % dense)" for c in cols) + " |",
              "|" + "---|" * (1 + len(cols))]
    for per_level in runs:
        c = per_level[0]["config"]
        ours = [run["results"][DEFAULT_PATH][mode] for run in per_level for mode in MODES]
        cells = [f"{e['tokens_per_s']:,.0f} ({e['speedup_vs_best_transformers']:.2f}x, "
                 f"{e['pct_of_dense']:.0f}%)" for e in ours]
        lines.append(f"| {per_level[0]['tokens']} tokens, H {c['d_model']}, I {c['d_expert']} | "
                     + " | ".join(cells) + " |")
    return "\n".join(lines)


def target_lines(report: dict) -> list[str]:
    """One line per level and shape: the default path's speed-up over the best transformers
    implementation in each mode and its share of dense forward+backward, each with its target's
    verdict, and the same speed-ups with the tasks issued from Python where they were timed."""
    lines = []
    for level, data in report["levels"].items():
        for run in data["runs"]:
            c, t, ours = run["config"], run["target"], run["results"][run["target"]["path"]]
            verdict = {key: "met" if ok else "missed" for key, ok in t["met"].items()}
            bound = run["results"].get(BOUND)
            line = (f"{level}, {run['tokens']} tokens, H {c['d_model']}, I {c['d_expert']}: "
                    f"forward {ours['forward']['speedup_vs_best_transformers']:.2f}x ({verdict['forward']}), "
                    f"forward+backward {ours['forward_backward']['speedup_vs_best_transformers']:.2f}x "
                    f"({verdict['forward_backward']}), "
                    f"{ours['forward_backward']['pct_of_dense']:.0f}% of dense "
                    f"({verdict['pct_of_dense_forward_backward']})")
            python = run["results"].get(PYTHON_TASKS)
            if python:
                line += (f"; Python tasks {python['forward']['speedup_vs_best_transformers']:.2f}x / "
                         f"{python['forward_backward']['speedup_vs_best_transformers']:.2f}x")
            if bound:
                line += (f"; GEMMs alone {bound['forward']['speedup_vs_best_transformers']:.2f}x / "
                         f"{bound['forward_backward']['speedup_vs_best_transformers']:.2f}x, ours at "
                         f"{ours['forward']['pct_of_gemm_bound']:.0f}% / "
                         f"{ours['forward_backward']['pct_of_gemm_bound']:.0f}% of their speed")
            lines.append(line)
    return lines


def add_parser(commands) -> None:
    """Register `python -m moe_lib.bench cpu`."""
    cpu = commands.add_parser("cpu", help="the MoE layer on CPU against transformers' DeepseekV3MoE")
    cpu.add_argument("--tokens", type=int, default=4096, help="tokens per forward (default 4096)")
    cpu.add_argument("--d-model", type=int, help=f"hidden size H (default {BOOK.d_model})")
    cpu.add_argument("--d-expert", type=int, help=f"expert width I (default {BOOK.d_expert})")
    cpu.add_argument("--sweep", action="store_true",
                     help="every shape of SWEEP: 4096, 1024 and 16384 tokens, and H 512 / I 256")
    cpu.add_argument("--levels", nargs="+", choices=list(LEVELS), default=list(LEVELS),
                     help="instruction-set levels, each in its own process (default: all)")
    cpu.add_argument("--level", choices=list(LEVELS), help=argparse.SUPPRESS)  # a child's level
    cpu.add_argument("--reps", type=int, default=20, help="timed rounds (default 20)")
    cpu.add_argument("--warmup", type=int, default=3, help="untimed rounds first (default 3)")
    cpu.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    cpu.add_argument("--seed", type=int, default=0)
    cpu.add_argument("--out", default="benchmarks/cpu.json", help="JSON output path")
    cpu.set_defaults(run=run_cpu)
