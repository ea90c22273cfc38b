"""Synthetic skewed routers and the loss-free bias dynamics on them."""

from __future__ import annotations

import itertools

import pytest
import torch

from moe_lib.balance import load_cv, loss_free_bias_update, max_vio
from moe_lib.router import router_scores
from moe_lib.synthetic import (
    balanced_routing_lp,
    replicate_hot_experts,
    simulate_loss_free,
    skewed_logits,
)


def test_skewed_logits_prefer_the_first_experts():
    gen = torch.Generator().manual_seed(0)
    logits = skewed_logits(4096, 8, skew=2.0, generator=gen)
    assert logits.shape == (4096, 8)
    means = logits.mean(0)
    torch.testing.assert_close(means, 2.0 * torch.linspace(1, -1, 8), atol=0.1, rtol=0)
    assert torch.all(means[:-1] > means[1:])
    torch.testing.assert_close(logits.std(0), torch.ones(8), atol=0.05, rtol=0)


def test_skewed_logits_are_reproducible_with_a_generator():
    a = skewed_logits(10, 4, 1.0, torch.Generator().manual_seed(3))
    b = skewed_logits(10, 4, 1.0, torch.Generator().manual_seed(3))
    assert torch.equal(a, b)


def test_simulation_history_follows_the_update_rule():
    run = simulate_loss_free(n_experts=16, top_k=2, skew=2.0, gamma=0.01, steps=20, n_tokens=256)
    assert run.bias.shape == run.load.shape == (20, 16) and run.cv.shape == run.max_vio.shape == (20,)
    assert (run.bias[0] == 0).all()
    assert (run.load.sum(-1) == 256 * 2).all()
    for s in range(19):  # the load of step s sets the bias of step s+1
        torch.testing.assert_close(run.bias[s + 1], loss_free_bias_update(run.bias[s], run.load[s], 0.01))
    for s in (0, 19):
        assert run.cv[s].item() == pytest.approx(load_cv(run.load[s]))
        assert run.max_vio[s].item() == pytest.approx(max_vio(run.load[s]))


def test_simulation_is_seeded_and_gamma_zero_keeps_the_bias_at_zero():
    kwargs = dict(n_experts=16, top_k=2, steps=5, n_tokens=128)
    first, again, other = (simulate_loss_free(seed=s, **kwargs).load for s in (1, 1, 2))
    assert torch.equal(first, again) and not torch.equal(first, other)
    assert (simulate_loss_free(gamma=0.0, **kwargs).bias == 0).all()


def test_no_skew_is_balanced_and_skew_is_not():
    even = simulate_loss_free(n_experts=16, top_k=2, skew=0.0, gamma=0.0, steps=3, n_tokens=4096)
    skewed = simulate_loss_free(n_experts=16, top_k=2, skew=2.0, gamma=0.0, steps=3, n_tokens=4096)
    assert even.cv.max() < 0.1 and skewed.cv.min() > 1.0


@pytest.mark.parametrize("score_func, gamma", [("sigmoid", 0.01), ("softmax", 0.003)])
@pytest.mark.parametrize("update", ["sign", "proportional"])
def test_sign_and_proportional_updates_balance(score_func, gamma, update):
    # softmax scores are about 1/E in size, so they need a smaller update rate than sigmoid scores
    run = simulate_loss_free(n_experts=16, top_k=2, skew=2.0, gamma=gamma, steps=200, n_tokens=1024,
                             score_func=score_func, update=update)
    assert run.cv[0] > 1.0 and run.cv[-20:].mean() < 0.25


def test_unknown_update_rule_raises():
    with pytest.raises(ValueError, match="update='multiplicative' is invalid"):
        simulate_loss_free(update="multiplicative", steps=1)


def _dual(scores_TE, bias_E, top_k):
    """g(b) = sum_t (sum of the top-k of s_t + b) - (T k / E) sum_i b_i, written out per token."""
    n_tokens, n_experts = scores_TE.shape
    total = 0.0
    for row in (scores_TE + bias_E).tolist():
        total += sum(sorted(row, reverse=True)[:top_k])
    return total - n_tokens * top_k / n_experts * float(bias_E.sum())


@pytest.mark.parametrize("n_tokens, n_experts, top_k", [(6, 3, 1), (4, 4, 2)])
def test_balanced_routing_lp_is_the_best_balanced_routing_by_enumeration(n_tokens, n_experts, top_k):
    scores = torch.rand(n_tokens, n_experts, generator=torch.Generator().manual_seed(n_experts),
                        dtype=torch.float64)
    fair = n_tokens * top_k // n_experts
    choices = list(itertools.combinations(range(n_experts), top_k))
    best = max(sum(float(scores[t, list(c)].sum()) for t, c in enumerate(routing))
               for routing in itertools.product(choices, repeat=n_tokens)
               if all(sum(i in c for c in routing) == fair for i in range(n_experts)))
    lp = balanced_routing_lp(scores, top_k)
    assert lp.value == pytest.approx(best, abs=1e-9)
    x = lp.assignment
    assert torch.allclose(x, x.round(), atol=1e-9), "a transportation LP has a 0/1 optimum"
    assert torch.allclose(x.sum(1), torch.full((n_tokens,), float(top_k), dtype=x.dtype))
    assert torch.allclose(x.sum(0), torch.full((n_experts,), float(fair), dtype=x.dtype))
    assert float((x * scores).sum()) == pytest.approx(lp.value, abs=1e-9)


def test_balanced_routing_lp_prices_close_the_duality_gap():
    gen = torch.Generator().manual_seed(0)
    scores = router_scores(skewed_logits(64, 8, skew=2.0, generator=gen), "sigmoid").double()
    lp = balanced_routing_lp(scores, top_k=2)
    assert _dual(scores, lp.prices, 2) == pytest.approx(lp.value, rel=1e-9)      # strong duality
    assert _dual(scores, lp.prices + 0.3, 2) == pytest.approx(lp.value, rel=1e-9)  # shift-invariant
    assert _dual(scores, -lp.prices, 2) > lp.value + 1.0                         # the sign matters
    for _ in range(20):                                                          # weak duality
        assert _dual(scores, 0.2 * torch.randn(8, generator=gen, dtype=torch.float64), 2) >= lp.value - 1e-9


def test_balanced_routing_lp_rejects_an_uneven_fair_share():
    with pytest.raises(ValueError, match="top_k=1 is invalid"):
        balanced_routing_lp(torch.rand(5, 3), top_k=1)


def test_replicate_hot_experts_splits_the_busiest_expert_first():
    load = torch.tensor([8.0, 4.0, 2.0])
    assert torch.equal(replicate_hot_experts(load, 0), load.double())
    halves = torch.tensor([4.0, 4.0, 4.0, 2.0], dtype=torch.float64)
    assert torch.allclose(replicate_hot_experts(load, 1), halves)
    # second copy: experts 0 and 1 both run instances of 4; the first one is split again
    third = 8.0 / 3
    assert torch.allclose(replicate_hot_experts(load, 2),
                          torch.tensor([third, third, third, 4.0, 2.0], dtype=torch.float64))


def test_replicate_hot_experts_keeps_the_tokens_and_never_raises_the_peak():
    load = torch.randint(1, 100, (16,), generator=torch.Generator().manual_seed(0)).float()
    peaks = []
    for n in range(0, 20):
        inst = replicate_hot_experts(load, n)
        assert inst.shape == (16 + n,) and inst.sum().item() == pytest.approx(load.sum().item())
        peaks.append(inst.max().item())
    assert all(a >= b for a, b in zip(peaks, peaks[1:], strict=False)) and peaks[-1] < peaks[0]
    with pytest.raises(ValueError, match="n_copies=-1 is invalid"):
        replicate_hot_experts(load, -1)
