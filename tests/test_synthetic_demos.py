"""The training and causality demos of moe_lib.synthetic used by the balancing chapters."""

import math

import pytest
import torch

from moe_lib import MoEConfig
from moe_lib.balance import collapse_fraction, max_vio
from moe_lib.synthetic import ToyTask, future_dependence, train_toy_moe

TOY = MoEConfig(d_model=8, d_expert=8, n_routed=8, n_shared=0, top_k=1, score_func="softmax",
                norm_topk_prob=False, dispatch="sorted", bias_update="none")


def test_toy_task_is_deterministic_and_shaped():
    task = ToyTask.random(8, seed=3)
    x1, y1 = task.batch(5, torch.Generator().manual_seed(0))
    x2, y2 = task.batch(5, torch.Generator().manual_seed(0))
    assert x1.shape == y1.shape == (5, 8)
    assert torch.equal(x1, x2) and torch.equal(y1, y2)


def test_train_toy_moe_history_and_determinism():
    a = train_toy_moe(TOY, steps=20, n_tokens=64)
    b = train_toy_moe(TOY, steps=20, n_tokens=64)
    assert a.load.shape == (20, 8) and a.task_loss.shape == (20,)
    assert torch.equal(a.load, b.load) and torch.equal(a.task_loss, b.task_loss)
    assert (a.load.sum(dim=1) == 64).all()
    assert torch.isnan(a.gate_cosine).all() and (a.aux_loss == 0).all()
    assert a.task_loss[-5:].mean() < a.task_loss[:5].mean()


def test_toy_moe_collapses_without_balancing_and_aux_loss_prevents_it():
    plain = train_toy_moe(TOY.replace(d_model=16, d_expert=16), steps=150)
    balanced = train_toy_moe(TOY.replace(d_model=16, d_expert=16, aux_loss="expert",
                                         aux_loss_alpha=1.0), steps=150)
    assert collapse_fraction(plain.load[-1]) >= 0.25
    assert max_vio(balanced.load[-20:].sum(0)) < 0.5 * max_vio(plain.load[-20:].sum(0))
    assert not math.isnan(balanced.gate_cosine[-1].item())


def test_toy_moe_with_loss_free_bias_balances():
    run = train_toy_moe(TOY.replace(d_model=16, d_expert=16, bias_update="step",
                                    bias_update_speed=0.01), steps=150)
    assert max_vio(run.load[-20:].sum(0)) < 0.3


def test_future_dependence_previous_is_causal_current_is_not():
    assert not future_dependence("previous").any()
    assert future_dependence("current").any()
    with pytest.raises(ValueError, match="source"):
        future_dependence("next")
