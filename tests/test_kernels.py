"""moe_lib.kernels: GEMM backends against float64, the measured choice, the task runner, and the
SwiGLU experts over sorted rows against a row-by-row reference (forward, backward, gradcheck)."""

from __future__ import annotations

import os
import threading
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from moe_lib import kernels
from moe_lib.kernels import Block, ExpertSwiGLU, RowPlan, expert_swiglu, plan_rows


@pytest.fixture
def two_threads():
    """Two intra-op threads (the tests otherwise run with one), so that the workers are used."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def operand(rows, cols, transposed, dtype=torch.float32):
    """A random [rows, cols] operand, stored transposed (a .t() view) when asked."""
    return torch.randn(cols, rows, dtype=dtype).t() if transposed else torch.randn(rows, cols, dtype=dtype)


@pytest.mark.parametrize("backend", list(kernels.BACKENDS))
@pytest.mark.parametrize("a_t,b_t", [(False, False), (False, True), (True, False), (True, True)])
def test_every_backend_multiplies_every_layout(backend, a_t, b_t):
    a, b = operand(7, 12, a_t), operand(12, 5, b_t)
    expected = a.double() @ b.double()
    mm = kernels.BACKENDS[backend]
    torch.testing.assert_close(mm(a, b).double(), expected, rtol=1e-5, atol=1e-5)
    out = torch.full((9, 5), float("nan"))
    mm(a, b, out[1:8])  # into a row slice of a larger buffer
    torch.testing.assert_close(out[1:8].double(), expected, rtol=1e-5, atol=1e-5)
    assert out[0].isnan().all() and out[8].isnan().all()


def test_torch_build_has_onednn_and_grouped_mm():
    assert kernels.ONEDNN and set(kernels.BACKENDS) == {"torch.mm", "oneDNN"}
    assert kernels.HAS_GROUPED_MM  # torch 2.13 has torch.nn.functional.grouped_mm


def test_backend_is_measured_once_per_shape_class(monkeypatch):
    monkeypatch.setattr(kernels, "_CHOICES", {})
    calls = []
    measure = kernels._measure
    monkeypatch.setattr(kernels, "_measure", lambda *args: calls.append(args[0]) or measure(*args))
    a, b = torch.randn(300, 32), torch.randn(32, 24)
    choice = kernels.gemm_backend(a, b)
    assert choice in kernels.BACKENDS
    assert kernels.gemm_backend(torch.randn(260, 30), b[:30]) == choice  # same class: 512x32x32
    kernels.gemm_backend(a, torch.randn(24, 32).t())  # another layout of b: another class
    assert len(calls) == 2
    assert list(kernels.gemm_choices()) == ["float32 threads=1 a=n b=n 512x32x32",
                                            "float32 threads=1 a=n b=t 512x32x32"]
    torch.testing.assert_close(kernels.matmul(a, b), a @ b)
    # no choice to make: another dtype, or an empty operand
    assert kernels.gemm_backend(a.double(), b.double()) == "torch.mm"
    assert kernels.gemm_backend(torch.randn(0, 32), b) == "torch.mm"
    assert len(calls) == 2


@pytest.mark.parametrize(("onednn_cost", "chosen"), [(1.0, "torch.mm"), (0.95, "torch.mm"), (0.8, "oneDNN")])
def test_measure_keeps_torch_mm_unless_onednn_is_clearly_faster(monkeypatch, onednn_cost, chosen):
    """The margin logic on a fake clock (each backend call advances it by its cost), so that no
    timing noise enters: equal or 5% faster keeps torch.mm, 20% faster picks oneDNN."""
    key = kernels._key(torch.randn(8, 4), torch.randn(4, 4))
    clock = [0.0]

    def backend(cost):
        def mm(a, b):
            clock[0] += cost
            return torch.mm(a, b)
        return mm

    monkeypatch.setattr(kernels, "BACKENDS", {"torch.mm": backend(1.0), "oneDNN": backend(onednn_cost)})
    monkeypatch.setattr(kernels, "time", SimpleNamespace(perf_counter=lambda: clock[0]))  # kernels' only
    assert kernels._measure(key, torch.float32) == chosen


@pytest.mark.parametrize("backend", [None, *kernels.BACKENDS])
def test_linear_matches_f_linear_with_gradients(backend):
    x1, w1 = torch.randn(2, 9, 12, requires_grad=True), torch.randn(5, 12, requires_grad=True)
    x2, w2 = x1.detach().double().requires_grad_(), w1.detach().double().requires_grad_()
    grad = torch.randn(2, 9, 5)
    y = kernels.linear(x1, w1, backend)
    y.backward(grad)
    F.linear(x2, w2).backward(grad.double())
    torch.testing.assert_close(y.double(), F.linear(x2, w2), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x1.grad.double(), x2.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(w1.grad.double(), w2.grad, rtol=1e-5, atol=1e-5)
    assert kernels.linear(torch.randn(0, 12), w1).shape == (0, 5)


def test_flop_counter_counts_onednn_like_mm():
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        kernels.BACKENDS["oneDNN"](torch.randn(7, 12), torch.randn(12, 5))
    assert counter.get_total_flops() == 2 * 7 * 12 * 5


def test_run_tasks_uses_single_threaded_workers(two_threads):
    seen = {}

    def task(item):
        seen[item] = (threading.current_thread().name, torch.get_num_threads(), torch.is_grad_enabled())

    with torch.no_grad():
        kernels.run_tasks(task, range(40))
    assert sorted(seen) == list(range(40))
    with torch.inference_mode():  # inference tensors written in place by the workers
        buffer = torch.zeros(8)
        kernels.run_tasks(lambda i: buffer[i].add_(i), range(8))
    assert buffer.tolist() == list(range(8))
    assert {name.startswith("moe_lib") for name, _, _ in seen.values()} == {True}
    assert {threads for _, threads, _ in seen.values()} == {1}
    assert {grad for _, _, grad in seen.values()} == {False}  # the caller's grad mode
    assert torch.get_num_threads() == 2
    fresh = []
    thread = threading.Thread(target=lambda: fresh.append(torch.get_num_threads()))
    thread.start()
    thread.join()
    assert fresh == [2]  # the workers' one thread did not become the default of new threads


def test_run_tasks_inline_nested_and_errors(two_threads):
    names = []
    kernels.run_tasks(lambda i: names.append(threading.current_thread().name), [0], inline=False)
    kernels.run_tasks(lambda i: names.append(threading.current_thread().name), [0, 1], inline=True)
    assert names == [threading.current_thread().name] * 3  # one item, or inline: the caller
    inner = []
    kernels.run_tasks(lambda i: kernels.run_tasks(inner.append, [i, i]), range(4))  # no deadlock
    assert sorted(inner) == [0, 0, 1, 1, 2, 2, 3, 3]

    def fail(item):
        raise ValueError(f"task {item}")

    with pytest.raises(ValueError, match="task"):
        kernels.run_tasks(fail, range(3))


def test_plan_rows_covers_every_row_once_and_splits_large_experts(two_threads, monkeypatch):
    monkeypatch.setattr(kernels, "FORCE_STRATEGY", "tasks")
    counts = [700, 0, 30, 100, 1]
    plan = plan_rows(counts, None, None, torch.randn(1, 64), 64)
    assert not plan.inline
    covered = sorted((b.start, b.stop, b.expert) for b in plan.blocks)
    assert covered[0][0] == 0 and covered[-1][1] == sum(counts)
    assert all(prev[1] == nxt[0] for prev, nxt in zip(covered[:-1], covered[1:], strict=True))
    starts = [0, 700, 700, 730, 830]
    assert all(starts[e] <= lo and hi <= starts[e] + counts[e] for lo, hi, e in covered)
    assert max(b.stop - b.start for b in plan.blocks) <= max(64, -(-sum(counts) // 8))
    sizes = [b.stop - b.start for b in plan.blocks]
    assert sizes == sorted(sizes, reverse=True)  # largest first
    assert [(e, first) for e, first, _ in plan.partials] == [(0, 5)]  # only expert 0 is split
    assert sorted(b.slot for b in plan.blocks) == [0, 2, 3, 4, *range(5, plan.n_slots)]
    assert plan_rows([3, 4], None, None, torch.randn(1, 8), 8).inline  # tiny: no hand-off


def reference_swiglu(x, gate_up, down, counts, weight=None, token=None, position=None):
    """Row by row: out_n = w_n * SwiGLU_e(x[token_n]), then y_t = sum of out over position[t]."""
    d_expert, rows, e_of_row = down.shape[-1], [], [e for e, c in enumerate(counts) for _ in range(c)]
    for n, e in enumerate(e_of_row):
        x_n = x[n if token is None else token[n]]
        h = F.silu(gate_up[e, :d_expert] @ x_n) * (gate_up[e, d_expert:] @ x_n)
        rows.append((h if weight is None else weight[n] * h) @ down[e].t())
    out = torch.stack(rows) if rows else x.new_zeros(0, down.shape[1])
    if position is None:
        return out
    padded = torch.cat([out, out.new_zeros(1, out.shape[1])])
    return padded[position].sum(dim=1)


def routed_inputs(n_tokens, n_experts, top_k, d_model, d_expert, n_dropped, dtype):
    """Sorted pairs of a random routing with dropped pairs and an expert that gets no token."""
    from moe_lib.dispatch import sort_by_expert

    scores = torch.rand(n_tokens, n_experts)
    scores[:, min(1, n_experts - 1)] -= 2 * (n_experts > 1)
    indices = scores.topk(top_k, dim=-1).indices
    indices.view(-1)[torch.randperm(n_tokens * top_k)[:n_dropped]] = -1
    pairs = sort_by_expert(indices, torch.rand(n_tokens, top_k, dtype=dtype) + 0.1, n_experts)
    x = torch.randn(n_tokens, d_model, dtype=dtype)
    gate_up = torch.randn(n_experts, 2 * d_expert, d_model, dtype=dtype) / d_model**0.5
    down = torch.randn(n_experts, d_model, d_expert, dtype=dtype) / d_expert**0.5
    return x, gate_up, down, pairs


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("routed", [True, False])
def test_expert_swiglu_matches_reference_forward_and_backward(threads, routed):
    if routed:
        x, gate_up, down, pairs = routed_inputs(200, 6, 2, 64, 48, 30, torch.float64)
        counts, weight, rows = pairs.counts_E.tolist(), pairs.weight_N, (pairs.token_N, pairs.position_TK)
    else:  # the shared expert: one expert over all rows, split into blocks
        x, gate_up, down, _ = routed_inputs(400, 1, 1, 64, 48, 0, torch.float64)
        counts, weight, rows = [400], None, (None, None)
    leaves = [t.requires_grad_() for t in (x, gate_up, down, weight) if t is not None]
    ref = reference_swiglu(*leaves[:3], counts, weight, *rows)  # one thread: tiny ops
    grad = torch.randn_like(ref)
    expected = [ref, *torch.autograd.grad(ref, leaves, grad)]
    torch.set_num_threads(threads)
    try:
        assert plan_rows(counts, *rows, x, 48).inline is False
        ours = expert_swiglu(*leaves[:3], counts, weight, *rows)
        got = [ours, *torch.autograd.grad(ours, leaves, grad)]
    finally:
        torch.set_num_threads(1)
    for mine, theirs in zip(got, expected, strict=True):
        torch.testing.assert_close(mine, theirs)
    if routed:  # expert 1 got no row: zero gradient
        assert got[2][1].abs().sum() == 0 and got[2][0].abs().sum() > 0


def test_expert_swiglu_gradcheck_float64():
    x, gate_up, down, pairs = routed_inputs(9, 4, 2, 6, 5, 3, torch.float64)
    inputs = [t.requires_grad_() for t in (x, pairs.weight_N, gate_up, down)]

    def fn(x, weight, gate_up, down):
        return expert_swiglu(x, gate_up, down, pairs.counts_E.tolist(), weight, pairs.token_N,
                             pairs.position_TK)

    assert torch.autograd.gradcheck(fn, inputs)


def test_expert_swiglu_gradcheck_float64_on_workers(two_threads):
    x, gate_up, down, pairs = routed_inputs(200, 5, 2, 48, 40, 15, torch.float64)
    counts = pairs.counts_E.tolist()
    assert not plan_rows(counts, pairs.token_N, pairs.position_TK, x, 40).inline
    inputs = [t.requires_grad_() for t in (x, pairs.weight_N, gate_up, down)]

    def fn(x, weight, gate_up, down):
        return expert_swiglu(x, gate_up, down, counts, weight, pairs.token_N, pairs.position_TK)

    assert torch.autograd.gradcheck(fn, inputs, fast_mode=True)


def test_grouped_block_matches_per_expert_blocks():
    """The one-block grouped-GEMM path (other devices) computes what the per-expert tasks do."""
    x, gate_up, down, pairs = routed_inputs(40, 4, 2, 16, 8, 5, torch.float32)
    counts = pairs.counts_E.tolist()
    results = []
    for plan in (plan_rows(counts, pairs.token_N, pairs.position_TK, x, 8),
                 RowPlan(counts, pairs.token_N, pairs.position_TK, [Block(None, 0, sum(counts), None)],
                         [], True)):
        leaves = [t.clone().requires_grad_() for t in (x, pairs.weight_N, gate_up, down)]
        y = ExpertSwiGLU.apply(*leaves, plan)
        y.backward(torch.linspace(-1, 1, y.numel()).view_as(y))
        results.append([y, *(t.grad for t in leaves)])
    for grouped, tasks in zip(*results, strict=True):
        torch.testing.assert_close(grouped, tasks, rtol=1e-5, atol=1e-6)


def test_expert_swiglu_zero_rows():
    x = torch.randn(0, 8, requires_grad=True)
    gate_up, down = torch.randn(3, 12, 8, requires_grad=True), torch.randn(3, 8, 6, requires_grad=True)
    y = expert_swiglu(x, gate_up, down, [0, 0, 0], torch.ones(0), torch.zeros(0, dtype=torch.long),
                      torch.zeros(0, 2, dtype=torch.long))
    assert y.shape == (0, 8)
    y.sum().backward()
    assert gate_up.grad.abs().sum() == 0 and down.grad.abs().sum() == 0


def test_first_use_measurement_leaves_the_global_rng_and_flop_counting_alone():
    from torch.utils.flop_counter import FlopCounterMode

    kernels._CHOICES.clear()
    a, b = torch.randn(40, 24), torch.randn(24, 16)
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    with FlopCounterMode(display=False) as counter:
        kernels.matmul(a, b)  # the first product of this shape class measures both backends
    assert counter.get_total_flops() == 2 * 40 * 24 * 16
    assert torch.equal(torch.rand(3), expected)


def test_dispatch_modes_see_every_product(two_threads, monkeypatch):
    """A FlopCounterMode (per thread, like every dispatch mode) counts the experts' GEMMs: the
    tasks run in the caller's thread while a mode is active."""
    from torch.utils.flop_counter import FlopCounterMode

    monkeypatch.setattr(kernels, "FORCE_STRATEGY", "tasks")
    x, gate_up, down, pairs = routed_inputs(200, 6, 2, 64, 48, 0, torch.float32)
    counts = pairs.counts_E.tolist()
    assert not plan_rows(counts, pairs.token_N, pairs.position_TK, x, 48).inline
    with FlopCounterMode(display=False) as counter:
        expert_swiglu(x, gate_up, down, counts, pairs.weight_N, pairs.token_N, pairs.position_TK)
    assert counter.get_total_flops() == 2 * sum(counts) * 64 * 48 * 3


def test_strategy_is_measured_once_per_shape_class_invisibly(two_threads, monkeypatch):
    """The first CPU call of a shape class times both plans: no global RNG draw, no FLOPs counted;
    later calls of the class reuse the choice; the choice can be forced."""
    from torch.utils.flop_counter import FlopCounterMode

    monkeypatch.setattr(kernels, "_STRATEGIES", {})
    x, gate_up, down, pairs = routed_inputs(400, 8, 2, 64, 48, 0, torch.float32)
    counts = pairs.counts_E.tolist()
    torch.manual_seed(7)
    expected = torch.rand(3)
    torch.manual_seed(7)
    with FlopCounterMode(display=False) as counter:
        expert_swiglu(x, gate_up, down, counts, pairs.weight_N, pairs.token_N, pairs.position_TK)
    assert counter.get_total_flops() == 2 * sum(counts) * 64 * 48 * 3
    assert torch.equal(torch.rand(3), expected)
    assert len(kernels.strategies()) == 1 and set(kernels.strategies().values()) <= {"tasks", "grouped"}
    fewer = [counts[0] - 1, *counts[1:]]
    expert_swiglu(torch.randn(sum(fewer), 64), gate_up, down, fewer)
    assert len(kernels.strategies()) == 1  # the same class: no new measurement
    assert list(kernels.strategies())[0].startswith("inference ")
    expert_swiglu(x.requires_grad_(), gate_up, down, counts, pairs.weight_N, pairs.token_N, pairs.position_TK)
    assert sorted(k.split()[0] for k in kernels.strategies()) == ["inference", "training"]
    for forced in ("tasks", "grouped"):
        monkeypatch.setattr(kernels, "FORCE_STRATEGY", forced)
        plan = plan_rows(counts, pairs.token_N, pairs.position_TK, x, 48)
        assert (plan.blocks[0].expert is None) == (forced == "grouped")
    monkeypatch.setattr(kernels, "FORCE_STRATEGY", "fast")
    with pytest.raises(ValueError, match="MOE_LIB_EXPERTS"):
        plan_rows(counts, pairs.token_N, pairs.position_TK, x, 48)


# Capping MKL's instruction set below the CPU's (as `bench cpu`'s avx2 level does) breaks the bitwise
# agreement: on an AVX-512 Xeon with MKL_ENABLE_INSTRUCTIONS=AVX2, torch.mm of 75 or 150 rows gives
# other bits on one thread than on two. Natively (the project's AMD EPYC and Intel Xeon) it holds.
MKL_CAPPED = bool(os.environ.get("MKL_ENABLE_INSTRUCTIONS"))


@pytest.mark.parametrize("routed", [True, False])
def test_both_strategies_agree_forward_bitwise_and_backward_closely(two_threads, routed):
    """Tasks and one grouped block: the same forward bits, gradients within rounding, also for the
    expanded gradient that y.sum() sends back (grouped_mm needs real strides)."""
    if routed:
        x, gate_up, down, pairs = routed_inputs(600, 8, 2, 64, 48, 40, torch.float32)
        args = (pairs.counts_E.tolist(), pairs.weight_N, pairs.token_N, pairs.position_TK)
    else:
        x, gate_up, down, _ = routed_inputs(600, 1, 1, 64, 48, 0, torch.float32)
        args = ([600], None, None, None)
    results = []
    for plan in (kernels.task_plan(args[0], args[2], args[3], 2),
                 kernels.grouped_plan(args[0], args[2], args[3])):
        leaves = [t.clone().requires_grad_() for t in (x, gate_up, down)]
        weight = None if args[1] is None else args[1].clone().requires_grad_()
        y = ExpertSwiGLU.apply(leaves[0], weight, leaves[1], leaves[2], plan)
        y.sum().backward()
        results.append([y.detach(), *(t.grad for t in leaves), *([] if weight is None else [weight.grad])])
    if not MKL_CAPPED:
        assert torch.equal(results[0][0], results[1][0])
    else:  # MKL itself rounds differently on 1 and 2 threads there
        torch.testing.assert_close(results[1][0], results[0][0], rtol=1e-6, atol=1e-6)
    for tasks, grouped in zip(results[0][1:], results[1][1:], strict=True):  # float32 sums of ~100 rows
        torch.testing.assert_close(grouped, tasks, rtol=1e-5, atol=1e-6 * tasks.abs().max().item())
