"""Synthetic skewed routers and the loss-free bias dynamics on them."""

from __future__ import annotations

import pytest
import torch

from moe_lib.balance import load_cv, loss_free_bias_update, max_vio
from moe_lib.synthetic import simulate_loss_free, skewed_logits


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
