"""Compute kernels: GEMM backends and expert strategies chosen by measurement, and a runner that
keeps every core busy.

Three measured facts about CPUs with few cores (`python -m moe_lib.bench cpu`) shape this module:

1. Which float32 GEMM is fastest depends on the CPU, its instruction-set level and the shape:
   torch's `mm` (MKL's sgemm in the x86 wheels) and oneDNN (which torch also ships) trade places
   from one machine to the next. `matmul` times both once per shape class, dtype and thread count,
   and keeps the faster (`gemm_choices()` lists the choices). Both compute the same float32 product.
2. An expert's GEMMs are small (about [400, 256] x [256, 256] at the book's config). Split over all
   cores, each pays a fork/join and a split that leaves each core a thin slice; whole, one per
   core, they pay neither. `run_tasks` hands tasks (whole experts) to `torch.get_num_threads()`
   worker threads that use one intra-op thread each.
3. Each task also pays a fixed cost (a dozen small ops issued from Python), so on small experts
   (few rows, or narrow ones like the tiny model's) one call of torch's grouped GEMM per product,
   split over the intra-op threads, wins instead. `strategy` times both plans once per shape class
   (`strategies()` lists the choices); their forward outputs are bitwise equal wherever the GEMM
   library rounds a product the same on one thread and on several (MKL and oneDNN as they run
   natively on the project's CPUs; not MKL capped at AVX2 on an AVX-512 Xeon, where products of a
   few dozen to a few hundred rows round differently on one thread and on two).

`grouped_mm` (torch's grouped GEMM) also serves the other devices, where one kernel per projection
is the fast way.

On the CPU in float32 the tasks run from C++ (`moe_lib.native`, `csrc/experts_cpu.cpp`): the same
blocks, taken in the same order by one worker per intra-op thread, each running its expert's
whole chain (gather, gate/up GEMM, one fused activation pass, down GEMM; in backward the five
products and one fused pass) with no Python between the operations. The Python tasks below remain
the path for other dtypes, dispatch modes and machines without a C++ compiler (`MOE_LIB_NATIVE=0`
selects them).
"""

from __future__ import annotations

import math
import os
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import _disable_current_modes, is_in_torch_dispatch_mode
from torch.utils.flop_counter import flop_registry, register_flop_formula

from . import native

_LINEAR = getattr(getattr(torch.ops, "mkldnn", None), "_linear_pointwise", None)
ONEDNN = _LINEAR is not None and torch.backends.mkldnn.is_available()
_GROUPED_MM = getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)
HAS_GROUPED_MM = _GROUPED_MM is not None
MARGIN = 1.1  # oneDNN must beat torch.mm by 10% to be chosen: noise does not flip the default


if ONEDNN:
    @register_flop_formula(torch.ops.mkldnn._linear_pointwise)
    def _linear_flops(x_shape, w_shape, *_args, **_kwargs) -> int:
        """2 M K N, so that torch's FlopCounterMode counts oneDNN's linear like aten.mm."""
        return 2 * math.prod(x_shape) * w_shape[0]


_GROUPED_OP = getattr(torch.ops.aten, "_grouped_mm", None)
if _GROUPED_OP is not None and _GROUPED_OP not in flop_registry:
    @register_flop_formula(_GROUPED_OP)
    def _grouped_mm_flops(a_shape, b_shape, *_args, **_kwargs) -> int:
        """2 x the multiply-adds: [N, K] x [E, K, O] is 2 N K O; [K, N] x [N, O] (per-group
        a_e^T b_e) is 2 K N O; 3-D x 3-D (batched) is 2 E M K O."""
        if len(a_shape) == 3:
            return 2 * math.prod(a_shape) * b_shape[-1]
        return 2 * a_shape[0] * a_shape[1] * b_shape[-1]


def _torch_mm(a_MK: torch.Tensor, b_KN: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    return torch.mm(a_MK, b_KN) if out is None else torch.mm(a_MK, b_KN, out=out)


def _onednn_mm(a_MK: torch.Tensor, b_KN: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    result_MN = _LINEAR(a_MK, b_KN.t(), None, "none", [], "")
    return result_MN if out is None else out.copy_(result_MN)


BACKENDS: dict[str, Callable[..., torch.Tensor]] = {"torch.mm": _torch_mm}
if ONEDNN:
    BACKENDS["oneDNN"] = _onednn_mm
_CHOICES: dict[tuple, str] = {}
_CHOICES_LOCK = threading.Lock()


def _key(a_MK: torch.Tensor, b_KN: torch.Tensor) -> tuple:
    """Shape class of a @ b: dtype, threads, operand layouts, and M, K, N each rounded up to a power
    of two between 8 and 1024."""
    m, k, n = (min(1024, max(8, 1 << (d - 1).bit_length())) for d in (*a_MK.shape, b_KN.shape[1]))
    return (str(a_MK.dtype).removeprefix("torch."), torch.get_num_threads(), a_MK.stride(0) == 1,
            b_KN.stride(0) == 1, m, k, n)


def _random_like_layout(rows: int, cols: int, transposed: bool, dtype: torch.dtype,
                        generator: torch.Generator) -> torch.Tensor:
    if transposed:
        return torch.randn(cols, rows, dtype=dtype, generator=generator).t()
    return torch.randn(rows, cols, dtype=dtype, generator=generator)


def _measured_once(cache: dict, lock: threading.Lock, key: tuple, measure: Callable, dtype: torch.dtype):
    """cache[key], filled by measure(key, dtype) the first time any thread asks for it.

    Invisible to the caller: a measurement draws its operands from a private generator (the global
    RNG, and so seeded notebooks and training runs, are untouched) and runs outside any active
    dispatch mode (a FlopCounterMode around the first call counts the caller's work, not the timings).
    """
    if key not in cache:
        with lock:
            if key not in cache:
                with _disable_current_modes():
                    cache[key] = measure(key, dtype)
    return cache[key]


@torch.no_grad()
def _measure(key: tuple, dtype: torch.dtype) -> str:
    """The faster GEMM backend on random operands of this shape class: best of 4 interleaved rounds."""
    _, _, a_t, b_t, rows, k, n = key
    generator = torch.Generator().manual_seed(0)
    a_MK = _random_like_layout(rows, k, a_t, dtype, generator)
    b_KN = _random_like_layout(k, n, b_t, dtype, generator)
    calls = max(1, min(20, int(5e7 // (2 * rows * k * n))))  # about a millisecond per timing
    best = dict.fromkeys(BACKENDS, math.inf)
    for _ in range(4):
        for name, mm in BACKENDS.items():
            start = time.perf_counter()
            for _ in range(calls):
                mm(a_MK, b_KN)
            best[name] = min(best[name], time.perf_counter() - start)
    return "oneDNN" if best["oneDNN"] * MARGIN < best["torch.mm"] else "torch.mm"


def gemm_backend(a_MK: torch.Tensor, b_KN: torch.Tensor) -> str:
    """The backend `matmul` uses for a @ b: measured once per shape class, torch.mm where there is
    no choice (no oneDNN, another dtype or device, an empty operand)."""
    if not (ONEDNN and a_MK.device.type == "cpu" and a_MK.dtype == torch.float32 and a_MK.numel()
            and b_KN.numel()):
        return "torch.mm"
    return _measured_once(_CHOICES, _CHOICES_LOCK, _key(a_MK, b_KN), _measure, a_MK.dtype)


def gemm_choices() -> dict[str, str]:
    """The measured choices so far, as 'dtype threads=T a=(n|t) b=(n|t) MxKxN' -> backend."""
    return {f"{dtype} threads={threads} a={'t' if a_t else 'n'} b={'t' if b_t else 'n'} "
            f"{rows}x{k}x{n}": name
            for (dtype, threads, a_t, b_t, rows, k, n), name in sorted(_CHOICES.items())}


def matmul(a_MK: torch.Tensor, b_KN: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """a @ b for 2-D operands (either may be a transposed view), written into `out` when given, by
    the backend measured fastest for this shape class (no autograd)."""
    return BACKENDS[gemm_backend(a_MK, b_KN)](a_MK, b_KN, out)


class _Linear(torch.autograd.Function):
    """x @ w^T on 2-D x, every product by `matmul`: dx = g @ w, dw = g^T @ x."""

    @staticmethod
    def forward(ctx, x_MK, w_NK, backend):
        ctx.save_for_backward(x_MK, w_NK)
        ctx.mm = BACKENDS[backend] if backend else matmul
        return ctx.mm(x_MK, w_NK.t())

    @staticmethod
    def backward(ctx, grad_MN):
        x_MK, w_NK = ctx.saved_tensors
        grad_x = ctx.mm(grad_MN, w_NK) if ctx.needs_input_grad[0] else None
        grad_w = ctx.mm(grad_MN.t(), x_MK) if ctx.needs_input_grad[1] else None
        return grad_x, grad_w, None


def linear(x: torch.Tensor, weight_NK: torch.Tensor, backend: str | None = None) -> torch.Tensor:
    """`F.linear(x, weight)` without bias, for x [..., K] -> [..., N]; on the CPU in float32 by the
    measured backend, or by `backend` (a key of BACKENDS) when given."""
    if not (ONEDNN and x.device.type == "cpu" and x.dtype == torch.float32 and x.numel()):
        return F.linear(x, weight_NK)
    out_MN = _Linear.apply(x.reshape(-1, x.shape[-1]), weight_NK, backend)
    return out_MN.view(*x.shape[:-1], weight_NK.shape[0])


_LOCAL = threading.local()
_POOLS: dict[tuple[int, int], ThreadPoolExecutor] = {}
_POOLS_LOCK = threading.Lock()


def _single_threaded() -> None:
    _LOCAL.worker = True
    torch.get_num_threads()  # torch's lazy per-thread set-up first, or it would undo the next line
    torch.set_num_threads(1)


def _workers() -> ThreadPoolExecutor:
    """torch.get_num_threads() started worker threads with one intra-op thread each (one pool per
    process and thread count: a forked child starts its own)."""
    n = torch.get_num_threads()
    key = (os.getpid(), n)
    with _POOLS_LOCK:
        if key not in _POOLS:
            pool = ThreadPoolExecutor(n, thread_name_prefix="moe_lib", initializer=_single_threaded)
            barrier = threading.Barrier(n)
            for started in [pool.submit(barrier.wait) for _ in range(n)]:
                started.result()
            torch.set_num_threads(n)  # a worker's set_num_threads(1) also set new threads' default
            _POOLS[key] = pool
    return _POOLS[key]


def run_tasks(task: Callable, items: Sequence, inline: bool = False) -> None:
    """task(item) for every item, on torch.get_num_threads() worker threads with one intra-op
    thread each; a free worker takes the next item (so give the largest first).

    Runs in the calling thread, with its threads, when `inline`, with one thread or one item, when
    called from a worker, or under a dispatch mode (FlopCounterMode, fake tensors: modes are
    per thread). Tasks run in the caller's grad and inference modes; exceptions propagate.
    """
    n = min(torch.get_num_threads(), len(items))
    if inline or n <= 1 or getattr(_LOCAL, "worker", False) or is_in_torch_dispatch_mode():
        for item in items:
            task(item)
        return
    queue, lock = iter(items), threading.Lock()
    grad, inference = torch.is_grad_enabled(), torch.is_inference_mode_enabled()

    def drain() -> None:
        with torch.inference_mode(inference), torch.set_grad_enabled(grad):
            while True:
                with lock:
                    item = next(queue, None)
                if item is None:
                    return
                task(item)

    pool = _workers()
    for done in [pool.submit(drain) for _ in range(n)]:
        done.result()


def use_grouped_mm(x: torch.Tensor, *dims: int) -> bool:
    """Whether torch's grouped_mm takes x: float32 or a 16-bit type, with every dim a multiple of
    16 bytes (its rows must be 16-byte aligned: 4 float32 or 8 16-bit elements)."""
    if not HAS_GROUPED_MM or x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return False
    return all(d * x.element_size() % 16 == 0 for d in dims)


def grouped_mm(a: torch.Tensor, b: torch.Tensor, counts_E: list[int]) -> torch.Tensor:
    """torch's grouped GEMM over rows sorted by group: [N, K] x [E, K, O] -> [N, O], or, with a
    transposed [K, N] first operand, [K, N] x [N, O] -> [E, K, O] (per-group a_e^T b_e)."""
    offsets = torch.tensor(counts_E, device=a.device).cumsum(0).to(torch.int32)
    return _GROUPED_MM(a, b, offs=offsets)


class Block(NamedTuple):
    """Rows [start, stop) of one expert, one task; expert None: all rows, grouped GEMMs.
    slot: where its weight gradients go (slot == expert, or a partial sum added to the expert's)."""

    expert: int | None
    start: int
    stop: int
    slot: int | None


class RowPlan(NamedTuple):
    """The rows of one `expert_swiglu` call, sorted by expert, and the blocks they run in.

    counts_E: rows per expert. token_N: the row of x each row reads (None: row n reads row n).
    position_TK: for each output row, the K rows summed into it (n_rows: a zero row, for dropped
    pairs); None: row n is output row n. blocks: the tasks, largest first. partials: (expert, first,
    stop): the extra slots [first, stop) that hold partial weight gradients of a split expert.
    inline: too little work for the workers.
    """

    counts_E: list[int]
    token_N: torch.Tensor | None
    position_TK: torch.Tensor | None
    blocks: list[Block]
    partials: list[tuple[int, int, int]]
    inline: bool

    @property
    def n_rows(self) -> int:
        return sum(self.counts_E)

    @property
    def n_slots(self) -> int:
        return max([len(self.counts_E)] + [stop for _, _, stop in self.partials])


def plan_rows(counts_E: list[int], token_N: torch.Tensor | None, position_TK: torch.Tensor | None,
              x_TH: torch.Tensor, d_expert: int, training: bool = False) -> RowPlan:
    """How to run the experts: one grouped block (torch's grouped GEMM, split over the intra-op
    threads) on other devices, and on the CPU where `strategy` measured it faster; otherwise
    whole experts as tasks on the workers, those larger than a quarter of one worker's share
    split so that the workers finish together. `training`: whether a backward will follow (the
    CPU plan is measured separately for inference and training)."""
    n_rows = sum(counts_E)
    inline = 6 * n_rows * x_TH.shape[1] * d_expert < 1 << 22  # under ~4 MFLOP: not worth the hand-off
    if use_grouped_mm(x_TH, x_TH.shape[1], d_expert) and (
            x_TH.device.type != "cpu"
            or (not inline and strategy(counts_E, x_TH, d_expert, training) == "grouped")):
        return grouped_plan(counts_E, token_N, position_TK)
    return task_plan(counts_E, token_N, position_TK, 1 if inline else torch.get_num_threads(), inline)


def grouped_plan(counts_E: list[int], token_N: torch.Tensor | None,
                 position_TK: torch.Tensor | None) -> RowPlan:
    """One block over every row: one grouped GEMM per product, in the calling thread."""
    return RowPlan(counts_E, token_N, position_TK, [Block(None, 0, sum(counts_E), None)], [], True)


def task_plan(counts_E: list[int], token_N: torch.Tensor | None, position_TK: torch.Tensor | None,
              threads: int, inline: bool = False) -> RowPlan:
    """Whole experts as tasks for `threads` workers, the large ones split (see `plan_rows`)."""
    n_rows, n_experts = sum(counts_E), len(counts_E)
    most = max(1, n_rows) if threads == 1 else max(64, math.ceil(n_rows / (4 * threads)))
    blocks, partials, start, extra = [], [], 0, n_experts
    for e, count in enumerate(counts_E):
        pieces = math.ceil(count / most)
        for i in range(pieces):
            slot = e if i == 0 else extra + i - 1
            blocks.append(Block(e, start + count * i // pieces, start + count * (i + 1) // pieces, slot))
        if pieces > 1:
            partials.append((e, extra, extra + pieces - 1))
            extra += pieces - 1
        start += count
    blocks.sort(key=lambda b: b.start - b.stop)
    return RowPlan(counts_E, token_N, position_TK, blocks, partials, inline)


_STRATEGIES: dict[tuple, str] = {}
_STRATEGIES_LOCK = threading.Lock()
# 'tasks' or 'grouped' for every CPU call instead of measuring (e.g. for identical gradients on
# every machine); read at import from MOE_LIB_EXPERTS, or set here
FORCE_STRATEGY: str | None = os.environ.get("MOE_LIB_EXPERTS") or None
# how much faster grouped must be to be chosen: in training by a wide margin, so that noise does
# not flip a close call from run to run (the two plans' weight gradients differ in rounding); in
# inference the outputs are bitwise equal either way (where the GEMM library is; see the docstring)
STRATEGY_MARGIN = {"training": 1.15, "inference": 1.05}
MEASURE_MAX_MACS = 1 << 31  # larger shape classes are not timed: the tasks, measured faster there


def _half_octave(n: int) -> int:
    """n rounded up to the next 2^k or 3 * 2^(k-1) (..., 64, 96, 128, 192, 256, ...)."""
    power = 1 << (max(1, n) - 1).bit_length()
    return 3 * power // 4 if n <= 3 * power // 4 and power >= 4 else power


def _strategy_key(counts_E: list[int], x_TH: torch.Tensor, d_expert: int, training: bool) -> tuple:
    """Shape class of an experts call: training or inference, dtype, threads, experts (rounded up to
    a power of two), rows per expert (rounded up to a half octave: 96 and 128 rows differ), H, I."""
    groups = max(1, len(counts_E))
    rows = max(1, math.ceil(sum(counts_E) / groups))
    runner = "native" if x_TH.dtype == torch.float32 and native.ops() is not None else "python"
    return ("training" if training else "inference", str(x_TH.dtype).removeprefix("torch."),
            torch.get_num_threads(), 1 << (groups - 1).bit_length(), _half_octave(rows), x_TH.shape[1],
            d_expert, runner)


def strategy(counts_E: list[int], x_TH: torch.Tensor, d_expert: int, training: bool = False) -> str:
    """'tasks' or 'grouped' for a CPU experts call, measured once per shape class (`strategies()`):
    the forward alone for inference, forward + backward when `training`.

    Which is faster depends on the machine and on the work per expert, as for the GEMM backends:
    tasks (one expert per core) win on large experts; torch's grouped GEMM, split over the intra-op
    threads, wins on small ones, where a task's fixed cost (a dozen small ops in Python) dominates.
    The forward outputs of both are bitwise equal (the same GEMMs, where the GEMM library gives the
    same bits on one thread and on several: see the module's docstring); weight gradients may differ in
    rounding (split experts' partial sums, and how the intra-op threads split the row reduction).
    """
    if FORCE_STRATEGY is not None:
        if FORCE_STRATEGY not in ("tasks", "grouped"):
            raise ValueError(f"MOE_LIB_EXPERTS / kernels.FORCE_STRATEGY={FORCE_STRATEGY!r} is invalid: "
                             "expected 'tasks' or 'grouped'")
        return FORCE_STRATEGY
    return _measured_once(_STRATEGIES, _STRATEGIES_LOCK, _strategy_key(counts_E, x_TH, d_expert, training),
                          _time_strategies, x_TH.dtype)


def strategies() -> dict[str, str]:
    """The measured strategies so far, as 'mode dtype threads=T E experts x R rows, H x I, tasks in
    (native|python)' -> strategy."""
    return {f"{mode} {dtype} threads={threads} {groups} experts x {rows} rows, {h} x {i}, tasks in {runner}":
            name for (mode, dtype, threads, groups, rows, h, i, runner), name in sorted(_STRATEGIES.items())}


def _time_strategies(key: tuple, dtype: torch.dtype) -> str:
    """The faster plan, forward (+ backward when training), on random operands of the shape class:
    best of 3 interleaved rounds after one untimed round each."""
    mode, _, threads, groups, rows, d_model, d_expert, _ = key
    if groups * rows * d_model * d_expert * (3 if mode == "training" else 1) > MEASURE_MAX_MACS:
        return "tasks"
    generator = torch.Generator().manual_seed(0)
    counts = [rows] * groups
    plans = {"tasks": task_plan(counts, None, None, threads),
             "grouped": grouped_plan(counts, None, None)}
    with torch.inference_mode(False), torch.enable_grad():
        x = torch.randn(groups * rows, d_model, dtype=dtype, generator=generator).requires_grad_()
        gate_up = torch.randn(groups, 2 * d_expert, d_model, dtype=dtype, generator=generator)
        down = torch.randn(groups, d_model, d_expert, dtype=dtype, generator=generator)
        leaves = [x, gate_up.div_(d_model**0.5).requires_grad_(), down.div_(d_expert**0.5).requires_grad_()]

        def run(plan: RowPlan) -> float:
            start = time.perf_counter()
            if mode == "training":
                y = ExpertSwiGLU.apply(leaves[0], None, leaves[1], leaves[2], plan)
                torch.autograd.grad(y.sum(), leaves)
            else:
                with torch.no_grad():
                    ExpertSwiGLU.apply(leaves[0], None, leaves[1], leaves[2], plan, False)
            return time.perf_counter() - start

        for plan in plans.values():  # untimed: first-use work (GEMM backends, allocations)
            run(plan)
        best = dict.fromkeys(plans, math.inf)
        for _ in range(3):  # interleaved: a slower moment of the machine hits both plans
            for name, plan in plans.items():
                best[name] = min(best[name], run(plan))
    return "grouped" if best["grouped"] * STRATEGY_MARGIN[mode] < best["tasks"] else "tasks"


def _rows(x_TH: torch.Tensor, token_N: torch.Tensor | None, rows: slice) -> torch.Tensor:
    return x_TH[rows] if token_N is None else x_TH.index_select(0, token_N[rows])


def _nt(a, w_EOK, block: Block, plan: RowPlan, out):
    """Per expert: a @ w_e^T into out."""
    if block.expert is None:
        return out.copy_(grouped_mm(a, w_EOK.transpose(-2, -1), plan.counts_E))
    return matmul(a, w_EOK[block.expert].t(), out)


def _nn(a, w_EOK, block: Block, plan: RowPlan, out=None):
    """Per expert: a @ w_e (into out when given)."""
    if block.expert is None:
        result = grouped_mm(a, w_EOK, plan.counts_E)
        return result if out is None else out.copy_(result)
    return matmul(a, w_EOK[block.expert], out)


def _tn(a, b, block: Block, plan: RowPlan, out_SOK) -> None:
    """Per expert: a_e^T @ b_e (a weight gradient) into its slot of out."""
    if block.expert is None:
        out_SOK.copy_(grouped_mm(a.t(), b, plan.counts_E))
    else:
        matmul(a.t(), b, out_SOK[block.slot])


class ExpertSwiGLU(torch.autograd.Function):
    """SwiGLU experts on rows sorted by expert, each block of rows one task (`RowPlan`):

        h_n = w_n * silu(x_n gate_e^T) * (x_n up_e^T),   out_n = h_n down_e^T      (row n, expert e)
        y_t = sum of out_n over the rows n of token t (position_TK), or y = out

    gate_up_EFH [E, 2I, H] (gate rows first) and down_EHI [E, H, I] are HF's stacked layout. A task
    runs its expert's whole chain (gather, gate/up GEMM, activation, down GEMM) on blocks that stay
    in cache; the combine is one gather-and-sum (`embedding_bag`, or the C++ ops' own pass with the
    same bits, forward and for dx), no scatter. Saves x and, when training, the [N, 2I] gate/up
    product. Backward per block, with a = silu(g) * u:
        dh = dy_n down_e;  dw_n = <dh, a>;  d down_e += dy_n^T (w a);  du = w dh silu(g);
        dg = w dh u silu'(g);  dx_n = [dg, du] gate_up_e;  d gate_up_e += [dg, du]^T x_n
    """

    @staticmethod
    def forward(ctx, x_TH, weight_N, gate_up_EFH, down_EHI, plan: RowPlan, training: bool | None = None,
                shared_gate_up_1FH=None, shared_down_1HI=None, shared_plan: RowPlan | None = None):
        d_expert, n_rows = down_EHI.shape[-1], plan.n_rows
        ctx.plan, ctx.shared_plan = plan, shared_plan
        # whether a backward may follow (the caller's grad mode: inside forward it is always off,
        # and needs_input_grad ignores it); without one the C++ tasks keep no [N, 2I] product and
        # reuse a per-thread buffer that stays in cache
        needs = ctx.needs_input_grad
        ctx.training = any(needs[:4] + needs[6:8]) if training is None else training
        # the same tasks run from C++ (moe_lib.native); kept for the backward, which runs the same
        # kernels even if they are switched off in between
        ctx.ops = _native_ops(x_TH, plan)
        if shared_plan is not None and (ctx.ops is None or plan.position_TK is None
                                        or _native_ops(x_TH, shared_plan) is None):
            raise ValueError("the shared expert runs in the routed experts' call only in the C++ tasks plan "
                             "with position_TK (see fused_shared)")
        if ctx.ops is not None:
            ctx.blocks = _block_table(plan)
            ctx.shared_blocks = None if shared_plan is None else _block_table(shared_plan)
            shared = (() if shared_plan is None else
                      (shared_gate_up_1FH.contiguous(), shared_down_1HI.contiguous(), ctx.shared_blocks))
            # with position_TK the C++ op also sums each token's rows (as _combine does), and adds the
            # shared expert's row to each token's sum
            out_TH, gate_up_NF, shared_gate_up_TF = ctx.ops.swiglu_forward(
                x_TH.contiguous(), plan.token_N, None if weight_N is None else weight_N.contiguous(),
                gate_up_EFH.contiguous(), down_EHI.contiguous(), ctx.blocks, n_rows,
                None if plan.position_TK is None else plan.position_TK.contiguous(), ctx.training,
                not (plan.inline and (shared_plan is None or shared_plan.inline)), *shared)
            ctx.save_for_backward(x_TH, weight_N, gate_up_EFH, down_EHI, gate_up_NF, shared_gate_up_1FH,
                                  shared_down_1HI, shared_gate_up_TF)
            return out_TH
        gate_up_NF = x_TH.new_empty(n_rows, 2 * d_expert)
        out_NH = _row_buffer(x_TH, plan)

        def task(block: Block) -> None:
            rows = slice(block.start, block.stop)
            gate_up_nF = _nt(_rows(x_TH, plan.token_N, rows), gate_up_EFH, block, plan, gate_up_NF[rows])
            h_nI = _activation(gate_up_nF, None if weight_N is None else weight_N[rows])
            _nt(h_nI, down_EHI, block, plan, out_NH[rows])

        run_tasks(task, plan.blocks, plan.inline)
        ctx.save_for_backward(x_TH, weight_N, gate_up_EFH, down_EHI, gate_up_NF, None, None, None)
        return _combine(out_NH, plan)

    @staticmethod
    def backward(ctx, grad_TH):
        (x_TH, weight_N, gate_up_EFH, down_EHI, gate_up_NF, shared_gate_up_1FH, shared_down_1HI,
         shared_gate_up_TF) = ctx.saved_tensors
        plan: RowPlan = ctx.plan
        shared_plan: RowPlan | None = ctx.shared_plan
        grad_TH = grad_TH.contiguous()  # the gradient of a sum arrives expanded; grouped_mm needs strides
        need_x, need_w, need_gate_up, need_down = ctx.needs_input_grad[:4]
        need_shared_gate_up, need_shared_down = (ctx.needs_input_grad + (False,) * 8)[6:8]
        if ctx.ops is not None:  # unrequested gradients come back empty
            shared = (() if shared_plan is None else
                      (shared_gate_up_1FH.contiguous(), shared_down_1HI.contiguous(), shared_gate_up_TF,
                       ctx.shared_blocks, shared_plan.n_slots, need_shared_gate_up, need_shared_down))
            grad_x_NH, grad_w_N, grad_gate_up_SFH, grad_down_SHI, grad_shared_gate_up, grad_shared_down = (
                ctx.ops.swiglu_backward(
                    grad_TH, x_TH.contiguous(), plan.token_N,
                    None if weight_N is None else weight_N.contiguous(), gate_up_EFH.contiguous(),
                    down_EHI.contiguous(), gate_up_NF, ctx.blocks, plan.n_rows, plan.n_slots,
                    None if plan.position_TK is None else plan.position_TK.contiguous(), need_x, need_w,
                    need_gate_up, need_down,
                    not (plan.inline and (shared_plan is None or shared_plan.inline)), *shared))
            # with position_TK the C++ op has summed each token's rows of dx (and the shared expert's
            # dx) already, and each weight gradient comes per expert (split experts' partials added)
            return (grad_x_NH if need_x else None, grad_w_N if need_w else None,
                    grad_gate_up_SFH if need_gate_up else None, grad_down_SHI if need_down else None,
                    None, None, grad_shared_gate_up if need_shared_gate_up else None,
                    grad_shared_down if need_shared_down else None, None)
        d_expert = down_EHI.shape[-1]
        grad_x_NH = _row_buffer(x_TH, plan) if need_x else None
        grad_w_N = weight_N.new_empty(plan.n_rows) if need_w else None
        grad_gate_up_SFH = gate_up_EFH.new_empty(plan.n_slots, *gate_up_EFH.shape[1:])
        grad_down_SHI = down_EHI.new_empty(plan.n_slots, *down_EHI.shape[1:])

        def task(block: Block) -> None:
            rows = slice(block.start, block.stop)
            grad_nH, x_nH = _rows(grad_TH, plan.token_N, rows), _rows(x_TH, plan.token_N, rows)
            gate_nI, up_nI = gate_up_NF[rows, :d_expert], gate_up_NF[rows, d_expert:]
            grad_h_nI = _nn(grad_nH, down_EHI, block, plan)
            silu_nI = F.silu(gate_nI)
            act_nI = silu_nI * up_nI
            if weight_N is not None:
                if need_w:
                    torch.linalg.vecdot(grad_h_nI, act_nI, out=grad_w_N[rows])
                act_nI.mul_(weight_N[rows, None])
                grad_h_nI.mul_(weight_N[rows, None])
            if need_down:
                _tn(grad_nH, act_nI, block, plan, grad_down_SHI)
            grad_gate_up_nF = torch.empty_like(gate_up_NF[rows])
            torch.mul(grad_h_nI, silu_nI, out=grad_gate_up_nF[:, d_expert:])
            torch.ops.aten.silu_backward.grad_input(grad_h_nI.mul_(up_nI), gate_nI,
                                                    grad_input=grad_gate_up_nF[:, :d_expert])
            if need_x:
                _nn(grad_gate_up_nF, gate_up_EFH, block, plan, grad_x_NH[rows])
            if need_gate_up:
                _tn(grad_gate_up_nF, x_nH, block, plan, grad_gate_up_SFH)

        run_tasks(task, plan.blocks, plan.inline)
        return _finish_backward(plan, grad_x_NH, grad_w_N, grad_gate_up_SFH if need_gate_up else None,
                                grad_down_SHI if need_down else None)


def _finish_backward(plan: RowPlan, grad_x_NH, grad_w_N, grad_gate_up_SFH, grad_down_SHI) -> tuple:
    """Adds split experts' partial weight gradients into their own slots, zeroes those of experts
    without rows (as the C++ backward does), and sums each token's rows of dx."""
    grad_x = grad_x_NH if grad_x_NH is None else _combine(grad_x_NH, plan)
    return (grad_x, grad_w_N, _reduce_slots(plan, grad_gate_up_SFH), _reduce_slots(plan, grad_down_SHI),
            None, None)


def _reduce_slots(plan: RowPlan, grad_SOK: torch.Tensor | None) -> torch.Tensor | None:
    """A weight gradient per slot -> per expert: split experts' partial sums added into their own
    slots, experts without rows zeroed."""
    if grad_SOK is None:
        return None
    for e, first, stop in plan.partials:
        grad_SOK[e] += grad_SOK[first:stop].sum(dim=0)
    for e, count in enumerate(plan.counts_E):
        if count == 0:
            grad_SOK[e].zero_()
    return grad_SOK[:len(plan.counts_E)]


def _native_ops(x_TH: torch.Tensor, plan: RowPlan):
    """moe_lib.native's operators where they run this call (`native.ops_for`) and the plan is
    whole-expert tasks (not the grouped plan)."""
    return None if any(b.expert is None for b in plan.blocks) else native.ops_for(x_TH)


def _block_table(plan: RowPlan) -> torch.Tensor:
    """The blocks as an int64 [B, 4] table of (expert, start, stop, slot) for the C++ kernels."""
    return torch.tensor([[b.expert, b.start, b.stop, b.slot] for b in plan.blocks],
                        dtype=torch.int64).reshape(-1, 4)


def _activation(gate_up_nF: torch.Tensor, weight_n: torch.Tensor | None) -> torch.Tensor:
    """h = w * silu(gate) * up from the [n, 2I] gate/up product: by the C++ kernel where it runs (so
    that the grouped plan's outputs equal the C++ tasks' bitwise), else by torch's ops."""
    ops = native.ops_for(gate_up_nF) if gate_up_nF.is_contiguous() else None
    if ops is not None:
        return ops.swiglu_act(gate_up_nF, None if weight_n is None else weight_n.contiguous())
    d_expert = gate_up_nF.shape[-1] // 2
    h_nI = F.silu(gate_up_nF[:, :d_expert]).mul_(gate_up_nF[:, d_expert:])
    return h_nI if weight_n is None else h_nI.mul_(weight_n[:, None])


def _row_buffer(x_TH: torch.Tensor, plan: RowPlan) -> torch.Tensor:
    """[N, H] rows, plus a zero row N that dropped pairs read when rows are summed per token."""
    if plan.position_TK is None:
        return x_TH.new_empty(plan.n_rows, x_TH.shape[1])
    rows_NH = x_TH.new_empty(plan.n_rows + 1, x_TH.shape[1])
    rows_NH[plan.n_rows].zero_()
    return rows_NH


def _combine(rows_NH: torch.Tensor, plan: RowPlan) -> torch.Tensor:
    """y_t = sum_k rows[position_tk]: one fused gather-and-sum (embedding_bag), or the rows."""
    if plan.position_TK is None:
        return rows_NH
    return F.embedding_bag(plan.position_TK, rows_NH, mode="sum")


def expert_swiglu(x_TH: torch.Tensor, gate_up_EFH: torch.Tensor, down_EHI: torch.Tensor,
                  counts_E: list[int], weight_N: torch.Tensor | None = None,
                  token_N: torch.Tensor | None = None,
                  position_TK: torch.Tensor | None = None,
                  shared: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """SwiGLU experts on rows sorted by expert (`ExpertSwiGLU`): counts_E rows per expert, row n
    reading x[token_N[n]] (x's own rows when None) and scaled by weight_N[n] (1 when None); the
    output sums the rows position_TK[t] into row t (the rows themselves when None).

    shared: a shared expert's (gate_up [1, 2I_s, H], down [1, H, I_s]) run on every row of x and
    added to the output (y + shared(x)): in the same C++ call as the routed experts where
    `fused_shared` allows (its blocks fill the routed blocks' tail, its rows are added in the
    combine), else as a second call and an add."""
    leaves = (x_TH, weight_N, gate_up_EFH, down_EHI) + (() if shared is None else shared)
    training = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in leaves)
    plan = plan_rows(counts_E, token_N, position_TK, x_TH, down_EHI.shape[-1], training)
    if shared is None:
        return ExpertSwiGLU.apply(x_TH, weight_N, gate_up_EFH, down_EHI, plan, training)
    shared_plan = plan_rows([x_TH.shape[0]], None, None, x_TH, shared[1].shape[-1], training)
    if fused_shared(x_TH, plan, shared_plan):
        return ExpertSwiGLU.apply(x_TH, weight_N, gate_up_EFH, down_EHI, plan, training, *shared, shared_plan)
    return (ExpertSwiGLU.apply(x_TH, weight_N, gate_up_EFH, down_EHI, plan, training)
            + ExpertSwiGLU.apply(x_TH, None, *shared, shared_plan, training))


# whether a shared expert may run in the routed experts' C++ call (`fused_shared`): read at import
# from MOE_LIB_FUSE_SHARED ('0' switches it off, e.g. to compare), or set here
FUSE_SHARED: bool = os.environ.get("MOE_LIB_FUSE_SHARED", "1") != "0"


def fused_shared(x_TH: torch.Tensor, plan: RowPlan, shared_plan: RowPlan) -> bool:
    """Whether the shared expert runs in the routed experts' call: both plans are C++ tasks (not the
    grouped plan, not the Python tasks), the routed rows are summed per token (position_TK), there are
    tokens, and FUSE_SHARED is on."""
    return (FUSE_SHARED and x_TH.shape[0] > 0 and plan.position_TK is not None
            and _native_ops(x_TH, plan) is not None and _native_ops(x_TH, shared_plan) is not None)
