"""moe_lib.native: the C++ CPU kernels build here, and each equals the Python path it replaces (the
top-k and the pair sort exactly, the SwiGLU experts within float32 rounding, against float64)."""

from __future__ import annotations

import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from moe_lib import kernels, native
from moe_lib.dispatch import sort_by_expert
from moe_lib.kernels import ExpertSwiGLU

HAS_COMPILER = shutil.which("c++") is not None or shutil.which("g++") is not None


@pytest.fixture
def ops():
    built = native.ops()
    if built is None:
        if HAS_COMPILER and native.enabled():
            raise AssertionError(f"the native kernels did not build: {native.build_error()!r}")
        pytest.skip("no C++ compiler: the native kernels are not built")
    return built


def test_builds_where_there_is_a_compiler(ops):
    assert native.isa() in ("avx2", "default")
    assert native.build_error() is None


def test_switched_off_by_the_environment(monkeypatch, ops):
    monkeypatch.setenv("MOE_LIB_NATIVE", "0")
    assert native.ops() is None and native.ops_for(torch.randn(2, 2)) is None
    monkeypatch.setenv("MOE_LIB_NATIVE", "1")
    assert native.ops_for(torch.randn(2, 2)) is ops
    assert native.ops_for(torch.randn(2, 2, dtype=torch.float64)) is None  # the Python path takes it
    with native.disabled():
        assert native.ops() is None and not native.enabled()
    assert native.ops() is ops


def test_backward_runs_the_kernels_of_its_forward(ops):
    """Switched off between forward and backward (as `bench train --compare-native` alternates): the
    backward still runs the kernels its forward saved for, and matches the Python path."""
    x, gate_up, down, pairs = routed(n_experts=4, top_k=2)
    counts = pairs.counts_E.tolist()
    grads = []
    for forward_native in (True, False):
        leaves = [t.detach().clone().requires_grad_() for t in (x, pairs.weight_N, gate_up, down)]
        plan = kernels.task_plan(counts, pairs.token_N, pairs.position_TK, 1, True)
        with native.disabled() if not forward_native else torch.enable_grad():
            y = ExpertSwiGLU.apply(leaves[0], leaves[1], leaves[2], leaves[3], plan)
        with native.disabled():
            y.sum().backward()
        grads.append([t.grad for t in leaves])
    for got, want in zip(*grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * want.abs().max().item())


@pytest.mark.parametrize("k", [1, 6, 64])
def test_topk_indices_equal_torch_topk(ops, k):
    choice = torch.randn(1000, 64)
    assert torch.equal(ops.topk_indices(choice, k), choice.topk(k, dim=-1).indices)
    masked = choice.masked_fill(torch.rand_like(choice) < 0.5, float("-inf"))  # a group limit's mask
    assert torch.equal(ops.topk_indices(masked, min(k, 8)).sort(dim=-1).values,
                       masked.topk(min(k, 8), dim=-1).indices.sort(dim=-1).values)


@pytest.mark.parametrize(("n_experts", "k"), [(64, 6), (256, 8), (40, 4), (32, 16), (12, 3)])
def test_both_topk_paths_give_the_insertion_order(ops, n_experts, k):
    """Rows take k passes of max and find-first (AVX2 builds, E a multiple of 8, small k) or the
    insertion (the reference order: largest first, NaN largest, ties to the lower index). Rows with
    ties, NaN, -inf masks and picks among -inf, all in one call, against the insertion row by row."""
    gen = torch.Generator().manual_seed(n_experts + k)
    choice = (torch.randint(0, 6, (400, n_experts), generator=gen) / 4.0)  # many ties
    choice[100:200] = torch.randn(100, n_experts, generator=gen)
    mask = torch.rand(100, n_experts, generator=gen) < 0.5  # a group limit's mask
    choice[200:300] = choice[200:300].masked_fill(mask, float("-inf"))
    choice[300:320, 1:] = float("-inf")  # fewer finite values than k: picks among -inf
    choice[320:340, n_experts // 2] = float("nan")
    want = torch.stack([_insertion_topk(row.tolist(), k) for row in choice])
    assert torch.equal(ops.topk_indices(choice, k), want)
    finite = choice[100:200]
    assert torch.equal(ops.topk_indices(finite, k), finite.topk(k, dim=-1).indices)


def _insertion_topk(row: list[float], k: int) -> torch.Tensor:
    """The order by definition: NaN first, then larger values, then the lower index."""
    def key(e: int) -> tuple:
        return (0, 0.0, e) if math.isnan(row[e]) else (1, -row[e], e)

    order = sorted(range(len(row)), key=key)
    return torch.tensor(order[:k])


def test_topk_indices_nan_first_ties_to_the_lower_index(ops):
    choice = torch.tensor([[0.5, float("nan"), 0.9, 0.5], [0.2, 0.2, 0.2, 0.1]])
    assert ops.topk_indices(choice, 2).tolist() == [[1, 2], [0, 1]]
    with pytest.raises(RuntimeError, match="k must be"):
        ops.topk_indices(choice, 5)


def test_sort_pairs_equals_the_stable_argsort(ops, monkeypatch):
    indices = torch.randint(0, 16, (300, 4))
    indices[torch.rand(300, 4) < 0.1] = -1  # pairs dropped by capacity
    weights = torch.rand(300, 4)
    fast = sort_by_expert(indices, weights, 16)
    monkeypatch.setenv("MOE_LIB_NATIVE", "0")
    slow = sort_by_expert(indices, weights, 16)
    for a, b in zip(fast, slow, strict=True):
        assert torch.equal(a, b)
    with pytest.raises(RuntimeError, match="out of range"):
        ops.sort_pairs(torch.tensor([[0, 16]]), 16)


def test_activation_is_silu_times_up_to_float32_rounding(ops):
    gate = torch.cat([torch.linspace(-100, 100, 2001), torch.randn(2047) * 4])
    up, weight = torch.randn_like(gate), torch.rand(1)
    h = ops.swiglu_act(torch.stack([gate, up], 0).reshape(1, -1), weight)
    expected = F.silu(gate.double()) * up.double() * weight.double()
    # atol: exp(-g) is clamped for g < -87, where silu is below 1e-35 anyway
    torch.testing.assert_close(h.reshape(-1).double(), expected, rtol=4e-7, atol=1e-30)


def routed(n_tokens=700, n_experts=12, top_k=3, d_model=64, d_expert=48):
    x = torch.randn(n_tokens, d_model)
    gate_up = torch.randn(n_experts, 2 * d_expert, d_model) / d_model**0.5
    down = torch.randn(n_experts, d_model, d_expert) / d_expert**0.5
    indices = torch.rand(n_tokens, n_experts).topk(top_k, dim=-1).indices
    indices[:5, 0] = -1  # dropped pairs read the zero row
    pairs = sort_by_expert(indices, torch.rand(n_tokens, top_k), n_experts)
    return x, gate_up, down, pairs


@pytest.mark.parametrize("threads", [1, 2])
def test_native_experts_match_float64_forward_and_backward(ops, monkeypatch, threads):
    """The C++ tasks (split experts included: few threads, many rows) against the Python tasks in
    float64, every input's gradient."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        x, gate_up, down, pairs = routed(n_experts=4, top_k=2)
        counts = pairs.counts_E.tolist()
        grad_y = torch.randn_like(x)
        results = {}
        for name, dtype in (("native", torch.float32), ("reference", torch.float64)):
            leaves = [t.detach().to(dtype).requires_grad_() for t in (x, pairs.weight_N, gate_up, down)]
            plan = kernels.task_plan(counts, pairs.token_N, pairs.position_TK, threads)
            assert len(plan.blocks) > len(counts) or threads == 1  # an expert is split
            y = ExpertSwiGLU.apply(leaves[0], leaves[1], leaves[2], leaves[3], plan)
            assert kernels._native_ops(leaves[0], plan) is (ops if name == "native" else None)
            y.backward(grad_y.to(dtype))
            results[name] = [y.detach(), *(t.grad for t in leaves)]
        for got, want in zip(results["native"], results["reference"], strict=True):
            torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5 * want.abs().max().item())
    finally:
        torch.set_num_threads(before)


def test_native_experts_without_routing_and_inputs_that_need_no_gradient(ops, monkeypatch):
    monkeypatch.setattr(kernels, "FORCE_STRATEGY", "tasks")  # the plan the C++ kernels run
    x = torch.randn(300, 32, requires_grad=True)
    gate_up, down = torch.randn(1, 40, 32) / 6, torch.randn(1, 32, 20) / 4
    assert kernels._native_ops(x, kernels.plan_rows([300], None, None, x, 20, True)) is ops
    y = kernels.expert_swiglu(x, gate_up, down, [300])
    gate, up = (x @ gate_up[0].t()).chunk(2, dim=-1)
    torch.testing.assert_close(y, (F.silu(gate) * up) @ down[0].t(), rtol=1e-5, atol=1e-5)
    y.sum().backward()
    expected = torch.autograd.grad(((F.silu(gate) * up) @ down[0].t()).sum(), x)[0]
    torch.testing.assert_close(x.grad, expected, rtol=1e-5, atol=1e-5)


def test_native_checks_its_inputs(ops):
    x = torch.randn(4, 8)
    blocks = torch.tensor([[0, 0, 4, 0]])
    with pytest.raises(RuntimeError, match="do not match"):
        ops.swiglu_forward(x, None, None, torch.randn(1, 6, 8), torch.randn(1, 8, 4), blocks, 4, None, False,
                           False)
    with pytest.raises(RuntimeError, match="blocks must be"):
        ops.swiglu_forward(x, None, None, torch.randn(1, 8, 8), torch.randn(1, 8, 4), blocks[0], 4, None,
                           False, False)


def test_inference_forward_equals_the_training_forward(ops, monkeypatch):
    """Under no_grad the C++ tasks keep no [N, 2I] gate/up product (a per-thread buffer instead):
    the same output, bitwise."""
    monkeypatch.setattr(kernels, "FORCE_STRATEGY", "tasks")  # the plan the C++ kernels run
    x, gate_up, down, pairs = routed()
    gate_up.requires_grad_()
    args = (x, gate_up, down, pairs.counts_E.tolist(), pairs.weight_N, pairs.token_N, pairs.position_TK)
    trained = kernels.expert_swiglu(*args)
    assert trained.requires_grad
    with torch.no_grad():
        inferred = kernels.expert_swiglu(*args)
    assert torch.equal(trained.detach(), inferred)


def test_wide_experts_match_float64(ops):
    """d_expert 300: the activation passes run in chunks of 256 columns (forward and backward)."""
    x, gate_up, down, pairs = routed(n_tokens=200, n_experts=3, top_k=2, d_model=32, d_expert=300)
    counts = pairs.counts_E.tolist()
    results = []
    for dtype in (torch.float32, torch.float64):
        leaves = [t.detach().to(dtype).requires_grad_() for t in (x, pairs.weight_N, gate_up, down)]
        plan = kernels.task_plan(counts, pairs.token_N, pairs.position_TK, 1, True)
        y = ExpertSwiGLU.apply(leaves[0], leaves[1], leaves[2], leaves[3], plan)
        y.backward(torch.ones_like(y))
        results.append([y.detach(), *(t.grad for t in leaves)])
    for got, want in zip(*results, strict=True):
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5 * want.abs().max().item())


@pytest.mark.parametrize("threads", [1, 2])
def test_direct_blas_calls_give_the_bits_of_at_mm(ops, threads):
    """The kernels call BLAS's sgemm directly with the arguments at::mm_out would pass: every output and
    gradient equals, bitwise, the same kernels running their GEMMs through at::mm_out (blocks of one
    row and experts without rows included)."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for n_tokens in (700, 12):
            x, gate_up, down, pairs = routed(n_tokens=n_tokens, n_experts=24, top_k=3)
            plan = kernels.task_plan(pairs.counts_E.tolist(), pairs.token_N, pairs.position_TK, threads)
            if n_tokens == 12:  # the edge cases of the leading dimensions
                assert 0 in pairs.counts_E.tolist() and min(b.stop - b.start for b in plan.blocks) == 1
            results = []
            for direct in (True, False):
                previous = ops.direct_blas(direct)
                try:
                    leaves = [t.detach().clone().requires_grad_() for t in (x, pairs.weight_N, gate_up, down)]
                    y = ExpertSwiGLU.apply(leaves[0], leaves[1], leaves[2], leaves[3], plan)
                    y.backward(torch.randn_like(y, generator=torch.Generator().manual_seed(1)))
                    results.append([y.detach(), *(t.grad for t in leaves)])
                finally:
                    ops.direct_blas(previous)
            for got, want in zip(*results, strict=True):
                assert torch.equal(got, want)
            empty = pairs.counts_E == 0  # their weight gradients are zeros, in reused (dirty) buffers
            assert results[0][3][empty].abs().sum() == 0 and results[0][4][empty].abs().sum() == 0
    finally:
        torch.set_num_threads(before)


def test_combined_rows_equal_embedding_bag(ops):
    """With `position` the C++ forward sums each token's rows itself (into a buffer it reuses from call
    to call): bitwise what F.embedding_bag gives on the rows, dropped pairs included, call after call."""
    x, gate_up, down, pairs = routed()
    plan = kernels.task_plan(pairs.counts_E.tolist(), pairs.token_N, pairs.position_TK, 2)
    args = (x, pairs.token_N, pairs.weight_N, gate_up, down, kernels._block_table(plan), plan.n_rows)
    rows, _, _ = ops.swiglu_forward(*args, None, False, True)
    expected = F.embedding_bag(pairs.position_TK, torch.cat([rows, rows.new_zeros(1, rows.shape[1])]),
                               mode="sum")
    for _ in range(2):
        combined, _, _ = ops.swiglu_forward(*args, pairs.position_TK, False, True)
        assert torch.equal(combined, expected)
    with pytest.raises(RuntimeError, match="out of range"):
        ops.swiglu_forward(*args, pairs.position_TK + 1, False, True)


def test_backward_sums_each_tokens_rows_of_dx_as_embedding_bag(ops):
    """With `position` the C++ backward sums each token's rows of dx itself (rows in a kept buffer):
    bitwise F.embedding_bag over the rows it returns without `position`; the weight gradients alike."""
    x, gate_up, down, pairs = routed()
    plan = kernels.task_plan(pairs.counts_E.tolist(), pairs.token_N, pairs.position_TK, 2)
    blocks = kernels._block_table(plan)
    _, gu, _ = ops.swiglu_forward(x, pairs.token_N, pairs.weight_N, gate_up, down, blocks, plan.n_rows,
                               pairs.position_TK, True, True)
    grad = torch.randn_like(x)

    def backward(position):
        return ops.swiglu_backward(grad, x, pairs.token_N, pairs.weight_N, gate_up, down, gu, blocks,
                                   plan.n_rows, plan.n_slots, position, True, True, True, True, True)

    rows = backward(None)
    expected = F.embedding_bag(pairs.position_TK, torch.cat([rows[0], rows[0].new_zeros(1, x.shape[1])]),
                               mode="sum")
    for _ in range(2):
        combined = backward(pairs.position_TK)
        assert torch.equal(combined[0], expected)
        for got, want in zip(combined[1:], rows[1:], strict=True):
            assert torch.equal(got, want)
    with pytest.raises(RuntimeError, match="out of range"):
        backward(pairs.position_TK + 1)


def test_large_buffers_come_back_from_the_pool(ops):
    """Buffers of 1 MB and more (the saved gate/up product, weight gradients, dx) are kept when freed
    and taken again by the next call of the same shape: the pool does not grow from call to call,
    reused (dirty) buffers give the same bits, gradients accumulate in them, and pool_trim frees them."""
    x, gate_up, down, pairs = routed(n_tokens=4096, n_experts=8, top_k=3, d_model=64, d_expert=128)
    plan = kernels.task_plan(pairs.counts_E.tolist(), pairs.token_N, pairs.position_TK, 2)
    assert plan.n_rows * 2 * 128 * 4 >= 2**20  # the gate/up product comes from the pool
    grad_y = torch.randn_like(x)

    def step(times=1):
        leaves = [t.detach().clone().requires_grad_() for t in (x, pairs.weight_N, gate_up, down)]
        for _ in range(times):
            ExpertSwiGLU.apply(*leaves, plan).backward(grad_y)
        return [t.grad for t in leaves]

    ops.pool_trim()
    assert ops.pool_cached() == 0
    first = step()
    after_first = ops.pool_cached()  # the gate/up product, freed after the backward
    assert after_first >= plan.n_rows * 2 * 128 * 4
    del first
    cached = ops.pool_cached()
    assert cached > after_first  # the gradients, freed
    first = step()
    assert ops.pool_cached() == after_first  # the gradients took their buffers back
    for got, want in zip(step(), first, strict=True):
        assert torch.equal(got, want)
    for got, want in zip(step(times=2), first, strict=True):
        assert torch.equal(got, 2 * want)  # accumulated in place
    del first
    cached = ops.pool_cached()
    assert ops.pool_trim() == cached and ops.pool_cached() == 0


def test_release_pool_frees_what_the_pool_holds(ops):
    x, gate_up, down, pairs = routed(n_tokens=4096, n_experts=8, top_k=3, d_model=64, d_expert=128)
    plan = kernels.task_plan(pairs.counts_E.tolist(), pairs.token_N, pairs.position_TK, 2)
    x.requires_grad_()
    ExpertSwiGLU.apply(x, pairs.weight_N, gate_up, down, plan).sum().backward()
    held = ops.pool_cached()
    assert held > 0 and native.release_pool() == held and ops.pool_cached() == 0


def test_gemm_bound_runs_the_forward_and_backward_gemms(ops):
    """`gemm_bound` (the benchmark's GEMMs-alone row) runs the kernels' GEMMs on sorted rows, split
    experts included, on the workers or the calling thread, through BLAS directly or at::mm_out, and
    checks its inputs like the kernels. Its weight gradients, summed over each expert's slots, are the
    products it stands in for: d down_e = x_e^T h with h = 0.25, d gate_up_e = (x_e gate_up_e^T)^T x_e."""
    x, gate_up, down, pairs = routed(n_experts=6)
    counts = pairs.counts_E.tolist()
    plan = kernels.task_plan(counts, None, None, 2)
    assert plan.partials  # an expert is split over slots
    rows, blocks = x.index_select(0, pairs.token_N), kernels._block_table(plan)
    want_down, want_gate_up = [], []
    for e, x_e in enumerate(rows.double().split(counts)):
        want_down.append((0.25 * x_e.sum(dim=0))[:, None].expand(-1, down.shape[2]))
        want_gate_up.append((x_e @ gate_up[e].double().t()).t() @ x_e)
    for direct in (True, False):
        previous = ops.direct_blas(direct)
        try:
            for parallel in (False, True):
                grad_gate_up, grad_down = ops.gemm_bound(rows, gate_up, down, blocks, False, parallel)
                assert grad_gate_up.numel() == 0 and grad_down.numel() == 0
                grad_gate_up, grad_down = ops.gemm_bound(rows, gate_up, down, blocks, True, parallel)
                for got_S, want_E in ((grad_gate_up, want_gate_up), (grad_down, want_down)):
                    got_S = got_S.double().clone()
                    for e, first, stop in plan.partials:
                        got_S[e] += got_S[first:stop].sum(dim=0)
                    for e, want in enumerate(want_E):
                        scale = want.abs().max().item()
                        torch.testing.assert_close(got_S[e], want, rtol=1e-4, atol=1e-4 * scale)
        finally:
            ops.direct_blas(previous)
    with pytest.raises(RuntimeError, match="do not match"):
        ops.gemm_bound(rows, gate_up[:, :, :8].contiguous(), down, blocks, False, False)
    with pytest.raises(RuntimeError, match="contiguous float32"):
        ops.gemm_bound(rows.double(), gate_up, down, blocks, False, False)


def test_pool_cap_from_the_environment(ops):
    """MOE_LIB_POOL_MB caps what waits in the pool (read when the pool is first used): at 0 nothing
    is kept, and the results are the same."""
    script = (
        "import torch; from moe_lib import kernels, native; from moe_lib.kernels import ExpertSwiGLU;"
        "from tests.test_native import routed;"
        "torch.manual_seed(0); x, gate_up, down, pairs = routed(4096, 8, 3, 64, 128);"
        "plan = kernels.task_plan(pairs.counts_E.tolist(), pairs.token_N, pairs.position_TK, 2);"
        "x.requires_grad_(); ExpertSwiGLU.apply(x, pairs.weight_N, gate_up, down, plan).sum().backward();"
        "print(native.ops().pool_cached(), float(x.grad.double().sum()))")
    outputs = []
    for cap in ("0", "1024"):
        env = {**os.environ, "MOE_LIB_POOL_MB": cap}
        done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True,
                              cwd=Path(__file__).resolve().parents[1], timeout=600)
        assert done.returncode == 0, done.stderr[-2000:]
        outputs.append(done.stdout.split())
    assert outputs[0][0] == "0" and int(outputs[1][0]) > 0
    assert outputs[0][1] == outputs[1][1]


def _with_shared(fused: bool, threads: int, x, gate_up, down, pairs, shared, grad_y):
    """expert_swiglu with a shared expert, the shared expert fused into the routed call or not:
    (y, grads of x, the routing weights, the routed and the shared weights)."""
    before, fuse_before = torch.get_num_threads(), kernels.FUSE_SHARED
    torch.set_num_threads(threads)
    kernels.FUSE_SHARED = fused
    try:
        leaves = [t.detach().clone().requires_grad_() for t in (x, pairs.weight_N, gate_up, down, *shared)]
        y = kernels.expert_swiglu(leaves[0], leaves[2], leaves[3], pairs.counts_E.tolist(), leaves[1],
                                  pairs.token_N, pairs.position_TK, (leaves[4], leaves[5]))
        y.backward(grad_y)
        return [y.detach(), *(t.grad for t in leaves)]
    finally:
        torch.set_num_threads(before)
        kernels.FUSE_SHARED = fuse_before


@pytest.mark.parametrize("threads", [1, 2])
def test_shared_expert_in_the_routed_call_equals_a_separate_call(ops, threads, monkeypatch):
    """The shared expert's blocks run in the routed experts' C++ call, its rows added last in the
    combine (forward) and to each token's dx (backward): bitwise the separate call plus an add, every
    gradient (floating-point addition commutes), tokens with every pair dropped included; and both
    within float32 rounding of float64."""
    monkeypatch.setattr(kernels, "FORCE_STRATEGY", "tasks")
    x, gate_up, down, pairs = routed(n_tokens=900, n_experts=12, top_k=3)
    indices = torch.rand(900, 12).topk(3, dim=-1).indices
    indices[:5, 0] = -1
    indices[5:9] = -1  # tokens without a routed row: their output is the shared row alone
    pairs = sort_by_expert(indices, torch.rand(900, 3), 12)
    shared = (torch.randn(1, 192, 64) / 8, torch.randn(1, 64, 96) / 96**0.5)  # I_s = 96, not I = 48
    grad_y = torch.randn_like(x)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        plan = kernels.plan_rows(pairs.counts_E.tolist(), pairs.token_N, pairs.position_TK, x, 48, True)
        shared_plan = kernels.plan_rows([900], None, None, x, 96, True)
    finally:
        torch.set_num_threads(before)
    assert kernels.fused_shared(x, plan, shared_plan)
    assert threads == 1 or len(shared_plan.blocks) > 1  # split: partial weight gradients are summed
    fused = _with_shared(True, threads, x, gate_up, down, pairs, shared, grad_y)
    separate = _with_shared(False, threads, x, gate_up, down, pairs, shared, grad_y)
    for got, want in zip(fused, separate, strict=True):
        assert torch.equal(got, want)
    with native.disabled():  # the Python tasks in float64
        reference = _with_shared(False, threads, x.double(), gate_up.double(), down.double(),
                                 pairs._replace(weight_N=pairs.weight_N.double()),
                                 [t.double() for t in shared], grad_y.double())
    for got, want in zip(fused, reference, strict=True):
        torch.testing.assert_close(got, want.float(), rtol=1e-4, atol=1e-5 * want.abs().max().item())
    assert fused[0][5:9].abs().sum() > 0


def test_shared_expert_needs_summed_rows_and_valid_blocks(ops):
    x, gate_up, down, pairs = routed(n_tokens=64, n_experts=4, top_k=2)
    plan = kernels.task_plan(pairs.counts_E.tolist(), pairs.token_N, pairs.position_TK, 2)
    args = (x, pairs.token_N, pairs.weight_N, gate_up, down, kernels._block_table(plan), plan.n_rows)
    shared_gate_up, shared_down = torch.randn(1, 32, 64), torch.randn(1, 64, 16)
    whole = torch.tensor([[0, 0, 64, 0]])
    with pytest.raises(RuntimeError, match="only with position"):
        ops.swiglu_forward(*args, None, False, True, shared_gate_up, shared_down, whole)
    with pytest.raises(RuntimeError, match="out of range"):
        ops.swiglu_forward(*args, pairs.position_TK, False, True, shared_gate_up, shared_down,
                           torch.tensor([[0, 0, 65, 0]]))
    with pytest.raises(RuntimeError, match="do not match"):
        ops.swiglu_forward(*args, pairs.position_TK, False, True, shared_gate_up, torch.randn(1, 64, 8),
                           whole)
    with pytest.raises(RuntimeError, match="needs shared_gate_up"):
        ops.swiglu_forward(*args, pairs.position_TK, False, True, shared_gate_up)
    with pytest.raises(RuntimeError, match="out of range"):  # routed blocks are checked too
        ops.swiglu_forward(x, pairs.token_N, pairs.weight_N, gate_up, down, torch.tensor([[4, 0, 1, 0]]),
                           plan.n_rows, pairs.position_TK, False, True)
    with pytest.raises(ValueError, match="shared expert runs in the routed"):
        kernels.ExpertSwiGLU.apply(x, pairs.weight_N, gate_up, down, plan._replace(position_TK=None), False,
                                   shared_gate_up, shared_down, kernels.task_plan([64], None, None, 2))
