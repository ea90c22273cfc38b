"""Redundant experts: placement from loads, token split between copies (no processes)."""

from __future__ import annotations

import pytest
import torch

from moe_lib.parallel.redundant import Placement, plan_redundant


def test_contiguous_placement_is_the_identity():
    placement = Placement.contiguous(16, 4)
    indices = torch.randint(0, 16, (50, 3))
    indices[3, 1] = -1
    assert torch.equal(placement.assign(indices), indices)
    assert placement.slots_per_rank == 4 and placement.n_copies == 0


def check_valid(placement: Placement, n_experts: int, per_rank: int):
    expert_RS, share_RS = placement.expert_RS, placement.share_RS
    assert torch.equal(expert_RS[:, :per_rank].flatten(), torch.arange(n_experts))  # originals stay
    for rank in range(expert_RS.shape[0]):
        held = [e for e in expert_RS[rank].tolist() if e >= 0]
        assert len(held) == len(set(held))                                           # no duplicates
    share_E = torch.zeros(n_experts, dtype=torch.float64).index_add_(
        0, expert_RS.clamp(min=0).flatten(), (share_RS * (expert_RS >= 0)).flatten())
    torch.testing.assert_close(share_E, torch.ones(n_experts, dtype=torch.float64))
    assert (share_RS >= 0).all()


def test_one_hot_expert_is_spread_until_every_rank_carries_the_mean():
    load = torch.full((16,), 10.0)
    load[2] = 400.0
    placement = plan_redundant(load, n_ranks=4, extra_slots=1)
    check_valid(placement, 16, 4)
    before = Placement.contiguous(16, 4).rank_load(load)
    after = placement.rank_load(load)
    assert before.max() == 430.0
    assert after.max().item() == pytest.approx(load.sum().item() / 4, rel=1e-6)  # the lower bound
    assert set(placement.expert_RS[:, 4].tolist()) == {-1, 2}           # only expert 2 is copied


def test_random_loads_improve_and_copies_stay_on_their_node():
    generator = torch.Generator().manual_seed(0)
    load = torch.distributions.Exponential(1.0).sample((64,)) * 100 + torch.rand(64, generator=generator)
    for ranks_per_node in (None, 4):
        placement = plan_redundant(load, n_ranks=16, extra_slots=1, ranks_per_node=ranks_per_node)
        check_valid(placement, 64, 4)
        before, after = Placement.contiguous(64, 16).rank_load(load), placement.rank_load(load)
        assert after.max() < 0.8 * before.max()
        torch.testing.assert_close(after.sum(), load.double().sum())
        if ranks_per_node:
            for rank in range(16):
                copies = [e for e in placement.expert_RS[rank, 4:].tolist() if e >= 0]
                assert all(e // 4 // ranks_per_node == rank // ranks_per_node for e in copies)


def test_assign_splits_an_experts_tokens_by_the_shares():
    load = torch.full((8,), 5.0)
    load[0] = 100.0
    placement = plan_redundant(load, n_ranks=4, extra_slots=1)
    indices = torch.zeros(1000, 1, dtype=torch.long)                      # 1000 tokens of expert 0
    slots = placement.assign(indices)
    logical = placement.expert_RS.flatten()[slots]
    assert (logical == 0).all()
    counts = torch.bincount(slots.flatten(), minlength=placement.expert_RS.numel()).double()
    expected = 1000 * placement.share_RS.flatten() * (placement.expert_RS.flatten() == 0)
    assert (counts - expected).abs().max() <= 1.0


def test_assign_keeps_dropped_pairs_and_other_experts():
    placement = plan_redundant(torch.tensor([50.0, 1, 1, 1]), n_ranks=2, extra_slots=1)
    indices = torch.tensor([[0, 1], [2, -1], [3, 0]])
    slots = placement.assign(indices)
    assert slots[1, 1] == -1
    assert torch.equal(placement.expert_RS.flatten()[slots[slots >= 0]], indices[indices >= 0])


def test_indivisible_experts_are_refused():
    with pytest.raises(ValueError, match="6 experts do not split evenly over 4 ranks"):
        plan_redundant(torch.ones(6), n_ranks=4, extra_slots=1)
