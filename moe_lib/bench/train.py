"""``python -m moe_lib.bench train``: training tokens/s of a preset on the CPU, and where a step's
time goes.

Throughput: optimizer steps of the preset on its real data (every micro-batch, the MTP modules,
validation excluded), timed with `time.perf_counter` after warm-up steps; tokens/s is the tokens of
one step over the median step time.

Shares: a few more steps under `torch.profiler`. The time of the thread that runs the step (the
Python thread; CPU backward runs on it too) is split among labelled scopes: each op's time minus
its children's goes to the innermost scope around it. Work that kernels hand to worker threads
counts as the waiting time of the op that started it. The scopes are put in place for the benchmark
only (module hooks and wrapped functions, removed afterwards), plus the loop's own `optimizer` and
`balancing` scopes:

- attention: the MLA modules (projections, rope, scores, softmax, values), in every block.
- routing: the routers (gate GEMM, sigmoid scores, group limit, top-k, combine weights).
- dispatch: the rest of the routed path: sorting (token, expert) pairs by expert, and gathering,
  weighting and scattering tokens where the experts' function does not.
- experts: the routed experts' compute as each dispatch path calls it (`EXPERT_FUNCTIONS`: the
  grouped path's expert kernel with its gather and combine, the sorted and loop paths' per-expert
  SwiGLU), and the shared expert.
- dense_ffn: the dense SwiGLU FFN of the leading layers (and of dense MTP blocks).
- balancing: load counting, auxiliary losses and the loss-free bias update.
- head_and_loss: the output head(s) and the cross-entropy (main and MTP).
- optimizer: gradient clipping, AdamW, zero_grad, the learning-rate schedule.
- other: everything else (embedding, norms, residuals, MTP projections, autograd bookkeeping).
Backward ops are attributed to the scope of the forward op that created their autograd node (the
profiler's sequence numbers link the two). The profiler adds a little time to every op, so the shares
are estimates; the profiled step time is reported next to the unprofiled one.

Experts plan (`--compare-plans N`): N more steps of each, alternating in this process, with the
CPU experts plan measured per shape class (`kernels.strategy`, the default) and forced to the
tasks, so that a slower moment of the machine hits both alike. C++ kernels
(`--compare-native N`): the same with `moe_lib.native` on (the default) and off (the experts' tasks,
top-k and sort issued from Python).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile, record_function

from .. import dispatch, kernels, native
from ..experts import Expert, RoutedExperts
from ..model import Transformer
from ..model.attention import MLA
from ..moe import DeepSeekMoE
from ..router import Router
from ..train import loop
from ..train.loop import Trainer, prepare_data
from ..train.presets import make_config
from . import cpu_info

# The routed experts' compute in each dispatch path: the grouped path's expert kernel, the sorted
# path's per-expert SwiGLU, the loop path's expert forward (labelled where they exist).
EXPERT_FUNCTIONS = ((kernels, "expert_swiglu"), (dispatch, "swiglu"), (RoutedExperts, "expert_forward"))
STEP_SCOPE = "bench::train_step"
CATEGORIES = ("attention", "routing", "dispatch", "experts", "dense_ffn", "balancing", "head_and_loss",
              "optimizer", "other")


def machine() -> dict:
    """CPU model and SIMD flags, cores, threads, torch version, date."""
    model, flags = cpu_info()
    return {"cpu": model, "avx2": "avx2" in flags, "avx512f": "avx512f" in flags,
            "avx512_bf16": "avx512_bf16" in flags, "amx": "amx_tile" in flags, "cores": os.cpu_count(),
            "threads": torch.get_num_threads(), "torch": torch.__version__,
            "python": platform.python_version(), "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
            "date": datetime.date.today().isoformat()}


def _scoped(name: str, fn):
    def wrapper(*args, **kwargs):
        with record_function(name):
            return fn(*args, **kwargs)
    return wrapper


@contextlib.contextmanager
def category_scopes(model: Transformer):
    """Label the model's parts with `record_function` scopes named after CATEGORIES (see module doc)."""
    handles, patches = [], []

    def hook_module(module: torch.nn.Module, name: str) -> None:
        state: list = []
        handles.append(module.register_forward_pre_hook(
            lambda m, a: state.append(record_function(name).__enter__())))
        handles.append(module.register_forward_hook(lambda m, a, o: state.pop().__exit__(None, None, None)))

    def patch(owner, attr: str, name: str) -> None:
        original = getattr(owner, attr)
        patches.append((owner, attr, original))
        setattr(owner, attr, _scoped(name, original))

    for module in model.modules():
        if isinstance(module, MLA):
            hook_module(module, "attention")
        elif isinstance(module, Router):
            hook_module(module, "routing")
        elif isinstance(module, DeepSeekMoE) and module.shared_experts is not None:
            hook_module(module.shared_experts, "experts")
    for block in list(model.layers) + list(model.mtp):
        if isinstance(block.mlp, Expert):
            hook_module(block.mlp, "dense_ffn")
    for key, original in list(dispatch.DISPATCH.items()):
        patches.append((dispatch.DISPATCH, key, original))
        dispatch.DISPATCH[key] = _scoped("dispatch", original)
    for owner, attr in EXPERT_FUNCTIONS:
        if hasattr(owner, attr):
            patch(owner, attr, "experts")
    patch(DeepSeekMoE, "_balance", "balancing")
    patch(DeepSeekMoE, "_record", "balancing")
    patch(Transformer, "head", "head_and_loss")
    patch(Transformer, "mtp_head", "head_and_loss")
    patch(loop, "mtp_objective", "head_and_loss")
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
        for owner, attr, original in reversed(patches):
            if isinstance(owner, dict):
                owner[attr] = original
            else:
                setattr(owner, attr, original)


def attribute(events, thread: int) -> dict[str, float]:
    """Microseconds per category of the profiled thread's time (see the module doc): each op's time
    minus its children's, to the innermost category scope around it, or for backward ops to the
    scope of the forward op that created their autograd node (same sequence number)."""
    def scope_of(event) -> str | None:
        while event is not None:
            if event.name in CATEGORIES:
                return event.name
            event = event.cpu_parent
        return None

    def backward_node(event):
        while event is not None and not event.name.startswith("autograd::engine::evaluate_function"):
            event = event.cpu_parent
        return event

    events = [e for e in events if e.thread == thread]
    # Forward ops that run before a node is created record the same sequence number; the op that
    # creates the node is the last of them to start.
    creator: dict[int, object] = {}
    for event in events:
        if event.sequence_nr >= 0 and backward_node(event) is None:
            seen = creator.get(event.sequence_nr)
            if seen is None or event.time_range.start >= seen.time_range.start:
                creator[event.sequence_nr] = event
    forward_scope = {seq: scope_of(event) for seq, event in creator.items()}
    totals = dict.fromkeys(CATEGORIES, 0.0)
    for event in events:
        if event.name == STEP_SCOPE:
            continue
        scope = scope_of(event)
        if scope is None:
            node = backward_node(event)
            scope = forward_scope.get(node.sequence_nr) if node is not None else None
        own = event.cpu_time_total - sum(c.cpu_time_total for c in event.cpu_children)
        totals[scope or "other"] += own
    return totals


def run_train_bench(args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads)
    changes = {"steps": 10**6}
    if args.quick:
        changes["batch_size"] = 2
        args.warmup, args.reps, args.profile_steps = 2, 1, 1  # first steps pay one-time set-up
    cfg = make_config(args.preset, **changes)
    load_before = os.getloadavg()
    corpus, tokenizer = prepare_data(cfg)
    trainer = Trainer.create(cfg, corpus, tokenizer)
    for _ in range(args.warmup):
        trainer.train_step()
    times = []
    for _ in range(args.reps):
        start = time.perf_counter()
        trainer.train_step()
        times.append(time.perf_counter() - start)
    step_s = statistics.median(times)
    with category_scopes(trainer.model), profile(activities=[ProfilerActivity.CPU]) as prof:
        start = time.perf_counter()
        for _ in range(args.profile_steps):
            with record_function(STEP_SCOPE):
                trainer.train_step()
        profiled_step_s = (time.perf_counter() - start) / args.profile_steps
    plans = compare_plans(trainer, args.compare_plans) if args.compare_plans else None
    natives = compare_native(trainer, args.compare_native) if args.compare_native else None
    events = prof.events()
    thread = next(e.thread for e in events if e.name == STEP_SCOPE)
    totals = attribute(events, thread)
    total = sum(totals.values())
    n_params = sum(p.numel() for p in trainer.model.parameters())
    report = {"benchmark": "train", "preset": args.preset, "quick": args.quick, "machine": machine(),
              "config": cfg.to_dict(), "parameters": n_params, "tokens_per_step": cfg.tokens_per_step,
              "warmup": args.warmup, "reps": args.reps, "step_ms_median": 1e3 * step_s,
              "step_ms_min": 1e3 * min(times), "tokens_per_s": cfg.tokens_per_step / step_s,
              "profile_steps": args.profile_steps, "profiled_step_ms": 1e3 * profiled_step_s,
              "share_pct": {k: 100 * v / total for k, v in totals.items()},
              "ms_per_step": {k: v / 1e3 / args.profile_steps for k, v in totals.items()},
              "method": __doc__.split("\n\n", 1)[1].strip(),
              "load_average_before_after": [load_before[0], os.getloadavg()[0]],
              "experts_strategy": {"forced": kernels.FORCE_STRATEGY, "measured": kernels.strategies(),
                                   "gemm_backends": kernels.gemm_choices()},
              "compare_plans": plans, "compare_native": natives,
              "command": ("MOE_LIB_EXPERTS=" + kernels.FORCE_STRATEGY + " " if kernels.FORCE_STRATEGY else "")
                         + "python -m moe_lib.bench train" + (" --quick" if args.quick else "")
                         + f" --preset {args.preset} --threads {args.threads}"
                         + (f" --compare-plans {args.compare_plans}" if args.compare_plans else "")
                         + (f" --compare-native {args.compare_native}" if args.compare_native else "")}
    print(format_table(report))
    if plans:
        print(f"experts plan, {plans['steps']} alternating steps each: measured (default) "
              f"{plans['measured_ms']:.0f} ms per step, tasks only {plans['tasks_ms']:.0f} ms "
              f"({plans['tasks_ms'] / plans['measured_ms']:.2f}x)")
    if natives:
        on, off = natives["native_ms"], natives["python_ms"]
        print(f"C++ kernels, {natives['steps']} alternating steps each: on (default) {on:.0f} ms per step, "
              f"off {off:.0f} ms ({off / on:.2f}x)")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")
    return report


def compare_native(trainer: Trainer, steps: int) -> dict:
    """Median step time with `moe_lib.native` on (the default) and off, alternating steps in this
    process after one untimed step of each."""
    times: dict[bool, list[float]] = {True: [], False: []}

    def step(on: bool) -> float:
        with contextlib.nullcontext() if on else native.disabled():
            start = time.perf_counter()
            trainer.train_step()
            return time.perf_counter() - start

    for on in times:
        step(on)
    for i in range(steps):
        for on in ([True, False] if i % 2 == 0 else [False, True]):
            times[on].append(step(on))
    return {"steps": steps, "native_built": native.ops() is not None,
            "native_ms": 1e3 * statistics.median(times[True]),
            "python_ms": 1e3 * statistics.median(times[False]),
            "native_ms_all": [1e3 * t for t in times[True]], "python_ms_all": [1e3 * t for t in times[False]]}


def compare_plans(trainer: Trainer, steps: int) -> dict:
    """Median step time with the experts plan measured (the default) and forced to the tasks,
    alternating steps in this process after one untimed step of each."""
    forced, times = kernels.FORCE_STRATEGY, {None: [], "tasks": []}
    try:
        for plan in times:
            kernels.FORCE_STRATEGY = plan
            trainer.train_step()
        for i in range(steps):
            for plan in ([None, "tasks"] if i % 2 == 0 else ["tasks", None]):
                kernels.FORCE_STRATEGY = plan
                start = time.perf_counter()
                trainer.train_step()
                times[plan].append(time.perf_counter() - start)
    finally:
        kernels.FORCE_STRATEGY = forced
    return {"steps": steps, "measured_ms": 1e3 * statistics.median(times[None]),
            "tasks_ms": 1e3 * statistics.median(times["tasks"]),
            "measured_ms_all": [1e3 * t for t in times[None]],
            "tasks_ms_all": [1e3 * t for t in times["tasks"]]}


def format_table(report: dict) -> str:
    m, model = report["machine"], report["config"]["model"]
    lines = [f"training step of preset {report['preset']!r}{' (quick)' if report['quick'] else ''}: "
             f"{report['parameters'] / 1e6:.2f}M parameters, d_model {model['d_model']}, {model['n_layers']} "
             f"layers, {model['moe']['n_routed']} routed experts top-{model['moe']['top_k']}, MTP depth "
             f"{model['mtp_depth']}, {report['tokens_per_step']} tokens per step",
             f"machine: {m['cpu']} (avx2 {m['avx2']}, avx512f {m['avx512f']}), {m['threads']} threads, "
             f"torch {m['torch']}, {m['date']}, load average {report['load_average_before_after'][0]:.2f}",
             f"tokens/s: {report['tokens_per_s']:.0f} (median step {report['step_ms_median']:.0f} ms of "
             f"{report['reps']}, after {report['warmup']} warm-up steps)",
             f"share of step time (profiled, {report['profiled_step_ms']:.0f} ms per step; the step thread's "
             "time per labelled scope, backward ops to the scope of their forward op):",
             f"{'part':14s} {'share':>7s} {'ms/step':>9s}"]
    for name in CATEGORIES:
        lines.append(f"{name:14s} {report['share_pct'][name]:6.1f}% "
                     f"{report['ms_per_step'][name]:9.1f}")
    return "\n".join(lines)


def add_parser(commands) -> None:
    """Register `python -m moe_lib.bench train`."""
    bench = commands.add_parser("train", help="training tokens/s of a preset and the share of each part")
    bench.add_argument("--preset", default="tiny", help="training preset (default tiny)")
    bench.add_argument("--quick", action="store_true",
                       help="2 windows per step, 2 warm-up, 1 timed and 1 profiled step: a smoke test")
    bench.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    bench.add_argument("--warmup", type=int, default=2, help="untimed steps first (default 2)")
    bench.add_argument("--reps", type=int, default=5, help="timed steps (default 5)")
    bench.add_argument("--profile-steps", type=int, default=2, help="profiled steps (default 2)")
    bench.add_argument("--compare-plans", type=int, default=0, metavar="N",
                       help="N alternating steps each with the experts plan measured and forced to "
                            "the tasks (default 0: off)")
    bench.add_argument("--compare-native", type=int, default=0, metavar="N",
                       help="N alternating steps each with the C++ kernels on and off (default 0: off)")
    bench.add_argument("--out", default="benchmarks/train.json", help="JSON output path")
    bench.set_defaults(run=run_train_bench)
