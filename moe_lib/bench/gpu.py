"""``python -m moe_lib.bench gpu``: the MoE layer at DeepSeek-V3's shape on one GPU, against this
machine's roofline and against the implementations a user would pick, in one process.

1. Ceilings, measured first: a bf16 matmul [n, n] @ [n, n] (TFLOP/s) and a device-to-device copy
   (GB/s, bytes read plus bytes written).
2. The layer (hidden 7168, expert width 2048, 256 routed + 1 shared, top-8, groups 8/4, bf16) for each
   T, every implementation sharing one set of weights (the same Parameter objects):
   ours: `moe_lib:graph` (`gpu.graphs.GraphedMoE`, forward, CUDA only), `moe_lib:device+stream`
   (`gpu.graphs.moe_forward`, shared expert on a side stream, CUDA only), `moe_lib:device`
   (`moe_forward`), `moe_lib:layer` (`DeepSeekMoE.forward`, whose "grouped" dispatch takes the
   device path on CUDA); peers: `moe_lib:sorted` (host-side counts, one GEMM per expert) and
   transformers' `DeepseekV3MoE` with its `eager` and `grouped_mm` experts.
   Each call is timed alone (device idle before it, CUDA events around it, so launch gaps and host
   syncs count); every round visits every implementation in a rotating order, inputs rotate over R
   sets, medians are taken after warm-up rounds. Forward under no_grad; forward+backward (of
   sum(y * P) to x and every weight) for T >= 1024.
3. TFLOP/s = F/t, GB/s = B/t and the roofline fraction bound/t, bound = max(F / matmul peak,
   B / copy bandwidth) with both ceilings measured above and F, B from `gpu.roofline` with the
   experts the inputs actually hit.
Before timing, outputs (and for forward+backward the input gradient and the weight gradients of
experts 0-7, zero for an expert no token visits) are checked against `gpu.reference.float32_reference`
(forward at every T, backward at 4 tokens and at the first T with backward); an implementation that
disagrees is reported and not timed.

`--dry-run` runs the same code on the CPU at a small shape with the same structure (perf_counter
timings): a check of the code path that measures nothing of interest and never writes
benchmarks/gpu.json.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import subprocess
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch

from ..gpu import roofline
from ..gpu.graphs import GraphedMoE, moe_forward
from ..gpu.reference import float32_reference
from ..gpu.syncs import host_syncs
from ..moe import DeepSeekMoE
from ..presets import DEEPSEEK_V3

LAYER = DEEPSEEK_V3.replace(bias_update="none", aux_loss="none", aux_loss_alpha=0.0)
DRY_LAYER = LAYER.replace(d_model=64, d_expert=32, n_routed=32)
TOKENS, DRY_TOKENS = (1, 16, 128, 1024, 4096, 16384), (1, 16, 64)
OURS = ("moe_lib:graph", "moe_lib:device+stream", "moe_lib:device", "moe_lib:layer")
PEERS = ("moe_lib:sorted", "transformers:eager", "transformers:grouped_mm")
MODES = ("forward", "forward_backward")
TARGET_FRACTION = {"T >= 1024": 0.6, "T <= 128": 0.5}
SAMPLE_EXPERTS = tuple(range(8))
TOLERANCE = {torch.bfloat16: 3e-2, torch.float32: 1e-4}
GPU_JSON = Path("benchmarks/gpu.json")


def machine(device: torch.device) -> dict:
    """Device name, driver, torch/CUDA/transformers versions and the date, recorded with every result."""
    import transformers

    info = {"torch": torch.__version__, "cuda": torch.version.cuda, "transformers": transformers.__version__,
            "python": platform.python_version(),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    if device.type != "cuda":
        return {**info, "device": f"CPU ({platform.processor() or platform.machine()})", "driver": None}
    props = torch.cuda.get_device_properties(device)
    return {**info, "device": props.name, "driver": _driver(), "memory_gib": props.total_memory / 2**30,
            "sm_count": props.multi_processor_count, "capability": f"{props.major}.{props.minor}"}


def _driver() -> str | None:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip().splitlines()[0]


def build_layer(cfg, dtype: torch.dtype, device: torch.device, seed: int) -> DeepSeekMoE:
    """The layer in `dtype` directly on `device` (never a float32 copy: V3's experts are 22.6 GB in
    bf16), initialised as `DeepSeekMoE` does, with a random non-zero correction bias."""
    with torch.device("meta"):
        layer = DeepSeekMoE(cfg).to(dtype)
    layer = layer.to_empty(device=device)
    torch.manual_seed(seed)
    with torch.no_grad():
        for module in layer.modules():
            if module is not layer and hasattr(module, "reset_parameters"):
                module.reset_parameters()
        torch.nn.init.kaiming_uniform_(layer.gate.weight, a=5**0.5)
        layer.gate.correction_bias.normal_(0.0, 0.02)
        layer.gate.tokens_per_expert.zero_()
    return layer.eval()


def sharing(layer: DeepSeekMoE, module: torch.nn.Module, names: dict[str, str | None]) -> torch.nn.Module:
    """`module` (built on the meta device) with `layer`'s Parameter objects and buffers assigned,
    renamed by `names` (None: not assigned)."""
    tensors = dict(layer.named_parameters()) | dict(layer.named_buffers())
    state = {names.get(name, name): t for name, t in tensors.items() if names.get(name, name) is not None}
    module.load_state_dict(state, strict=False, assign=True)
    left = [n for n, t in list(module.named_parameters()) + list(module.named_buffers()) if t.is_meta]
    if left:
        raise RuntimeError(f"{type(module).__name__} kept meta tensors after sharing weights: {left}")
    return module.eval()


def peers(layer: DeepSeekMoE) -> tuple[dict[str, Callable], dict[str, str]]:
    """moe_lib:sorted and transformers' DeepseekV3MoE (eager, grouped_mm), all on `layer`'s weights.
    Returns the callables and {name: reason} for those that could not be built."""
    from ..interop import to_transformers

    with torch.device("meta"):
        sorted_layer = DeepSeekMoE(layer.cfg.replace(dispatch="sorted"))
    impls = {"moe_lib:sorted": sharing(layer, sorted_layer, {})}
    skipped = {}
    for impl in ("eager", "grouped_mm"):
        try:
            with torch.device("meta"):
                hf = to_transformers(DeepSeekMoE(layer.cfg))
            hf = sharing(layer, hf, {"gate.correction_bias": "gate.e_score_correction_bias",
                                     "gate.tokens_per_expert": None})
            hf.config._experts_implementation = impl
            impls["transformers:" + impl] = hf
        except (ImportError, AttributeError, RuntimeError, ValueError) as err:
            skipped["transformers:" + impl] = f"could not be built: {err}"
    return impls, skipped


def ours(layer: DeepSeekMoE, example: torch.Tensor) -> tuple[dict[str, Callable], dict[str, str]]:
    """Our variants; the graph and the side stream exist on CUDA only."""
    impls = {"moe_lib:device": lambda x: moe_forward(layer, x), "moe_lib:layer": layer}
    if example.device.type != "cuda":
        return impls, {"moe_lib:graph": "needs CUDA", "moe_lib:device+stream": "needs CUDA"}
    stream = torch.cuda.Stream()
    impls = {"moe_lib:device+stream": lambda x: moe_forward(layer, x, stream), **impls}
    try:
        return {"moe_lib:graph": GraphedMoE(layer, example), **impls}, {}
    except RuntimeError as err:
        return impls, {"moe_lib:graph": f"capture failed: {type(err).__name__}: {err}"}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def verify(impls: dict[str, Callable], layer: DeepSeekMoE, x: torch.Tensor, proj: torch.Tensor | None,
           tol: float) -> dict[str, dict]:
    """Largest relative errors against float32: y, and with `proj` dx and the sampled experts' weight
    gradients (which must be exactly zero for experts no token visits). An implementation that
    raises is reported with its error instead of stopping the benchmark."""
    ref = float32_reference(layer, x, proj, SAMPLE_EXPERTS if proj is not None else ())
    results = {}
    for name, fn in impls.items():
        try:
            errors = _errors(fn, layer, x, proj, ref)
        except Exception as err:  # a failure, ours or a peer's, is a result to report
            results[name] = {"error": f"{type(err).__name__}: {err}", "ok": False}
            layer.zero_grad(set_to_none=True)
            continue
        results[name] = {**errors, "ok": max(errors.values()) <= tol}
    return results


def _errors(fn: Callable, layer: DeepSeekMoE, x: torch.Tensor, proj: torch.Tensor | None, ref) -> dict:
    if proj is None:
        with torch.no_grad():
            return {"y": rel_err(fn(x), ref.y)}
    layer.zero_grad(set_to_none=True)
    xg = x.detach().clone().requires_grad_()
    y = fn(xg)
    (y.float() * proj.float()).sum().backward()
    errors = {"y": rel_err(y.detach(), ref.y), "dx": rel_err(xg.grad, ref.dx),
              "d_experts": _expert_grad_error(layer, ref.expert_grads)}
    layer.zero_grad(set_to_none=True)
    return errors


def _expert_grad_error(layer: DeepSeekMoE, expected: dict) -> float:
    worst = 0.0
    for e, pair in expected.items():
        for grad, ref in zip((layer.experts.gate_up_proj.grad[e], layer.experts.down_proj.grad[e]), pair,
                             strict=True):
            worst = max(worst, rel_err(grad, ref) if ref.abs().max() > 0 else float(grad.abs().max() > 0))
    return worst


def timed(fn: Callable[[], None], device: torch.device) -> Callable[[], float]:
    """Run fn once, alone on an idle device; returns a function giving its seconds (call after sync)."""
    if device.type != "cuda":
        start = time.perf_counter()
        fn()
        elapsed = time.perf_counter() - start
        return lambda: elapsed
    torch.cuda.synchronize(device)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    return lambda: start.elapsed_time(end) / 1e3


def time_rounds(tasks: dict[str, Callable[[int], None]], reps: int, warmup: int,
                device: torch.device) -> tuple[dict[str, list[float]], dict[str, str]]:
    """Every task once per round (order rotating; the round number selects the input); seconds after
    warm-up. A task that runs out of memory is dropped with the reason."""
    names, failed = list(tasks), {}
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(warmup + reps):
        pending = []
        for i in range(len(names)):
            name = names[(r + i) % len(names)]
            if name in failed:
                continue
            try:
                pending.append((name, timed(lambda name=name, r=r: tasks[name](r), device)))
            except torch.OutOfMemoryError as err:
                failed[name] = f"out of memory: {str(err).splitlines()[0]}"
                _free(device)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if r >= warmup:
            for name, seconds in pending:
                times[name].append(seconds())
    return {n: ts for n, ts in times.items() if n not in failed}, failed


def _free(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()


def forward_task(fn: Callable, inputs: list[torch.Tensor]) -> Callable[[int], None]:
    def run(r: int) -> None:
        with torch.no_grad():
            fn(inputs[r % len(inputs)])
    return run


def forward_backward_task(fn: Callable, inputs: list[torch.Tensor], proj: torch.Tensor,
                          params: list[torch.nn.Parameter]) -> Callable[[int], None]:
    def run(r: int) -> None:
        x = inputs[r % len(inputs)].detach().requires_grad_()
        (fn(x) * proj).sum().backward()
        for p in params:
            p.grad = None
    return run


def ceilings(device: torch.device, dtype: torch.dtype, n: int, copy_bytes: int, reps: int,
             warmup: int) -> dict:
    """This machine's matmul TFLOP/s ([n, n] @ [n, n] in `dtype`) and copy GB/s (read + written)."""
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    src = torch.empty(copy_bytes, dtype=torch.uint8, device=device).random_(0, 255)
    dst = torch.empty_like(src)
    times, _ = time_rounds({"matmul": lambda r: a @ b, "copy": lambda r: dst.copy_(src)}, reps, warmup,
                           device)
    matmul_s, copy_s = statistics.median(times["matmul"]), statistics.median(times["copy"])
    return {"matmul": {"shape": [n, n, n], "dtype": str(dtype).removeprefix("torch."),
                       "median_ms": 1e3 * matmul_s, "tflops": 2 * n**3 / matmul_s / 1e12},
            "copy": {"bytes": copy_bytes, "median_ms": 1e3 * copy_s, "gbps": 2 * copy_bytes / copy_s / 1e9}}


def experts_hit(layer: DeepSeekMoE, x: torch.Tensor) -> int:
    with torch.no_grad():
        return layer.gate(x).indices.unique().numel()


def sync_report(impls: dict[str, Callable], x: torch.Tensor) -> dict[str, dict]:
    """Host-synchronising operations of each of our forwards (and on CUDA torch's own count)."""
    report = {}
    for name, fn in impls.items():
        with torch.no_grad():
            entry = {"operations": host_syncs(fn, x)}
            if x.device.type == "cuda":
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")
                    torch.cuda.set_sync_debug_mode("warn")
                    try:
                        fn(x)
                    finally:
                        torch.cuda.set_sync_debug_mode("default")
                entry["cuda_sync_warnings"] = sum("synchroniz" in str(w.message) for w in caught)
        report[name] = entry
    return report


def implementations(layer: DeepSeekMoE, example: torch.Tensor) -> tuple[dict[str, Callable], dict[str, str]]:
    """Ours and the peers at the shape of `example`, and {name: reason} for those left out."""
    mine, skipped = ours(layer, example)
    others, skipped_peers = peers(layer)
    return {**mine, **others}, {**skipped, **skipped_peers}


def with_backward(impls: dict[str, Callable]) -> dict[str, Callable]:
    """The implementations timed forward+backward (the graph and the side stream are inference only)."""
    return {n: f for n, f in impls.items() if n not in ("moe_lib:graph", "moe_lib:device+stream")}


def verify_small(layer: DeepSeekMoE, n_tokens: int, device, dtype) -> dict:
    """Forward and backward at a few tokens: most experts get none, so their gradients must be zero."""
    x = torch.randn(n_tokens, layer.cfg.d_model, device=device, dtype=dtype)
    proj = torch.randn_like(x)
    impls, _ = implementations(layer, x)
    return {"forward": verify(impls, layer, x, None, TOLERANCE[dtype]),
            "forward_backward": verify(with_backward(impls), layer, x, proj, TOLERANCE[dtype])}


def run_tokens(layer, n_tokens: int, args, device, dtype, peaks: dict, verify_backward: bool) -> dict:
    """Verify and time every implementation at one T; the figures of `summarize_tokens`."""
    cfg = layer.cfg
    inputs = [torch.randn(n_tokens, cfg.d_model, device=device, dtype=dtype) for _ in range(args.rotations)]
    proj = torch.randn(n_tokens, cfg.d_model, device=device, dtype=dtype)
    impls, skipped = implementations(layer, inputs[0])
    checks = {"forward": verify(impls, layer, inputs[0], None, TOLERANCE[dtype])}
    if verify_backward:
        checks["forward_backward"] = verify(with_backward(impls), layer, inputs[0], proj, TOLERANCE[dtype])
    tasks = {f"{n}|forward": forward_task(f, inputs) for n, f in impls.items() if checks["forward"][n]["ok"]}
    if n_tokens >= args.backward_from and args.backward_skip is None:
        params = list(layer.parameters())
        tasks.update({f"{n}|forward_backward": forward_backward_task(f, inputs, proj, params)
                      for n, f in with_backward(impls).items()
                      if checks.get("forward_backward", {}).get(n, {"ok": True})["ok"]})
    elif n_tokens >= args.backward_from:
        skipped["forward_backward"] = args.backward_skip
    times, failed = time_rounds(tasks, args.reps, args.warmup, device)
    hits = statistics.mean(experts_hit(layer, x) for x in inputs)
    entry = summarize_tokens(cfg, n_tokens, times, hits, peaks)
    entry.update(verification=checks, skipped={**skipped, **failed})
    del impls, tasks
    _free(device)
    return entry


def memory_plan(cfg, device: torch.device, want_backward: bool) -> str | None:
    """None if the weights and their gradients fit in free device memory, else why forward+backward
    is skipped; exits if the weights alone do not fit."""
    if device.type != "cuda":
        return None
    free, _ = torch.cuda.mem_get_info(device)
    weights = roofline.expert_bytes(cfg, 0, experts_hit=cfg.n_routed)
    if weights > 0.9 * free:
        raise SystemExit(f"the layer's weights need {weights / 2**30:.1f} GiB, {free / 2**30:.1f} GiB free")
    if want_backward and 2 * weights > 0.8 * free:
        return (f"weights and their gradients need {2 * weights / 2**30:.1f} GiB, "
                f"{free / 2**30:.1f} GiB free")
    return None


def summarize_tokens(cfg, n_tokens: int, times: dict[str, list[float]], hits: float, peaks: dict) -> dict:
    """Medians, TFLOP/s, GB/s, roofline fraction; the best of ours and its speed-up over each peer."""
    entry: dict = {"tokens": n_tokens, "experts_hit": hits, "modes": {}}
    for mode in MODES:
        backward = mode == "forward_backward"
        flops = roofline.expert_flops(cfg, n_tokens, backward)
        n_bytes = roofline.expert_bytes(cfg, n_tokens, hits, backward=backward)
        bound = roofline.time_bound(flops, n_bytes, peaks["flops"], peaks["bandwidth"])
        results = {}
        for key, ts in times.items():
            name, m = key.split("|")
            if m == mode:
                median = statistics.median(ts)
                results[name] = {"median_ms": 1e3 * median, "min_ms": 1e3 * min(ts), "reps": len(ts),
                                 "tflops": flops / median / 1e12, "gbps": n_bytes / median / 1e9,
                                 "roofline_fraction": bound / median}
        if not results:
            continue
        best = min((n for n in results if n in OURS), key=lambda n: results[n]["median_ms"], default=None)
        mode_entry = {"flops": flops, "bytes": n_bytes, "bound_ms": 1e3 * bound,
                      "bound_by": "compute" if flops / peaks["flops"] >= n_bytes / peaks["bandwidth"]
                      else "bandwidth", "results": results, "best_ours": best}
        if best is not None:
            mode_entry["speedup_vs_peers"] = {p: results[p]["median_ms"] / results[best]["median_ms"]
                                              for p in PEERS if p in results}
        entry["modes"][mode] = mode_entry
    return entry


def targets(entries: list[dict]) -> dict:
    """The issue's targets for the best of ours: roofline fraction and faster than every peer."""
    met = {}
    for entry in entries:
        for mode, m in entry["modes"].items():
            if m["best_ours"] is None:
                continue
            t = entry["tokens"]
            floor = TARGET_FRACTION["T >= 1024"] if t >= 1024 else TARGET_FRACTION["T <= 128"]
            fraction = m["results"][m["best_ours"]]["roofline_fraction"]
            faster = all(s > 1 for s in m["speedup_vs_peers"].values())
            met[f"{t}|{mode}"] = {"best_ours": m["best_ours"], "roofline_fraction": fraction,
                                  "fraction_target": floor, "fraction_met": fraction >= floor,
                                  "faster_than_every_peer": faster}
    return met


def format_table(report: dict) -> str:
    m, c = report["machine"], report["ceilings"]
    lines = [("DRY RUN on the CPU (small shape; not a GPU measurement)" if report["dry_run"] else
              f"{m['device']}, driver {m['driver']}, torch {m['torch']} (CUDA {m['cuda']}), "
              f"transformers {m['transformers']}, {m['date']}"),
             f"ceilings: matmul {c['matmul']['tflops']:.1f} TFLOP/s, copy {c['copy']['gbps']:.0f} GB/s; "
             f"crossover T* = {report['crossover_tokens']:.0f} tokens"]
    for entry in report["results"]:
        for mode, me in entry["modes"].items():
            lines += ["", f"T = {entry['tokens']}, {mode.replace('_', '+')}: bound {me['bound_ms']:.3f} ms "
                          f"({me['bound_by']}), {entry['experts_hit']:.0f} experts hit",
                      f"{'implementation':24s} {'ms':>9s} {'TFLOP/s':>8s} {'GB/s':>7s} {'roofline':>8s}"]
            for name, r in me["results"].items():
                lines.append(f"{name:24s} {r['median_ms']:9.3f} {r['tflops']:8.1f} {r['gbps']:7.0f} "
                             f"{r['roofline_fraction']:7.0%}")
        for name, reason in entry["skipped"].items():
            lines.append(f"skipped {name}: {reason}")
    return "\n".join(lines)


DEFAULTS = {"reps": (20, 2), "warmup": (3, 1), "rotations": (4, 2), "backward_from": (1024, 16),
            "matmul_size": (8192, 128), "copy_mib": (1024, 4)}
"""(GPU, dry run) defaults of the options left unset."""


def run_gpu(args: argparse.Namespace) -> dict:
    device = torch.device("cpu" if args.dry_run else "cuda")
    if not args.dry_run and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: `python -m moe_lib.bench gpu --dry-run` runs the code on the CPU")
    out = Path(args.out or (Path(tempfile.gettempdir()) / "moe_lib_gpu_dry_run.json" if args.dry_run
                            else GPU_JSON))
    if args.dry_run and out.resolve() == GPU_JSON.resolve():
        raise SystemExit(f"a dry run never writes {GPU_JSON}: that file holds GPU measurements only")
    for name, (gpu_value, dry_value) in DEFAULTS.items():
        if getattr(args, name) is None:
            setattr(args, name, dry_value if args.dry_run else gpu_value)
    cfg, dtype = (DRY_LAYER if args.dry_run else LAYER), torch.bfloat16
    tokens = args.tokens or (DRY_TOKENS if args.dry_run else TOKENS)
    ceiling = ceilings(device, dtype, args.matmul_size, args.copy_mib * 2**20, args.reps, args.warmup)
    peaks = {"flops": ceiling["matmul"]["tflops"] * 1e12, "bandwidth": ceiling["copy"]["gbps"] * 1e9}
    args.backward_skip = memory_plan(cfg, device, any(t >= args.backward_from for t in tokens))
    layer = build_layer(cfg, dtype, device, args.seed)
    first_backward = min((t for t in tokens if t >= args.backward_from), default=None)
    small = verify_small(layer, 4, device, dtype)
    entries = [run_tokens(layer, t, args, device, dtype, peaks, verify_backward=t == first_backward)
               for t in tokens]
    x16 = torch.randn(16, cfg.d_model, device=device, dtype=dtype)
    report = {"benchmark": "gpu", "dry_run": args.dry_run, "machine": machine(device),
              "config": cfg.to_dict(), "dtype": "bfloat16", "ceilings": ceiling,
              "crossover_tokens": roofline.crossover_tokens(cfg, peaks["flops"], peaks["bandwidth"]),
              "reps": args.reps, "warmup": args.warmup, "rotations": args.rotations,
              "backward_from": args.backward_from, "verification_4_tokens": small, "results": entries,
              "targets": targets(entries), "host_syncs_16_tokens": sync_report(ours(layer, x16)[0], x16),
              "command": "python -m moe_lib.bench gpu" + (" --dry-run" if args.dry_run else "")}
    print(format_table(report))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")
    return report


def add_parser(commands) -> None:
    """Register `python -m moe_lib.bench gpu`."""
    gpu = commands.add_parser("gpu", help="the V3-shaped MoE layer on one GPU: roofline and peers")
    gpu.add_argument("--dry-run", action="store_true",
                     help="run the same code on the CPU at a small shape (checks the code, measures nothing)")
    gpu.add_argument("--tokens", type=int, nargs="+",
                     help=f"token counts (default {TOKENS}; dry run {DRY_TOKENS})")
    gpu.add_argument("--reps", type=int, help="timed rounds (default 20; dry run 2)")
    gpu.add_argument("--warmup", type=int, help="untimed rounds first (default 3; dry run 1)")
    gpu.add_argument("--rotations", type=int, help="input sets rotated over rounds (default 4; dry run 2)")
    gpu.add_argument("--backward-from", type=int,
                     help="time forward+backward from this many tokens (default 1024; dry run 16)")
    gpu.add_argument("--matmul-size", type=int, help="n of the n x n x n ceiling matmul (default 8192)")
    gpu.add_argument("--copy-mib", type=int, help="MiB copied for the bandwidth ceiling (default 1024)")
    gpu.add_argument("--seed", type=int, default=0)
    gpu.add_argument("--out", help=f"JSON output path (default {GPU_JSON}; dry run: a temporary file)")
    gpu.set_defaults(run=run_gpu)
