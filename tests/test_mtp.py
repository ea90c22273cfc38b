"""Multi-Token Prediction: shapes, causality at every depth, the loss, the incremental MTP path."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from model_utils import make_model, rel_err, tiny_model_cfg

from moe_lib.model import mtp_loss, mtp_objective


def test_forward_with_mtp_shapes_and_main_logits():
    model = make_model(tiny_model_cfg(mtp_depth=2, q_lora_rank=12))
    ids = torch.randint(0, 61, (3, 12))
    logits, depth_logits = model.forward_with_mtp(ids)
    torch.testing.assert_close(logits, model(ids))
    assert [tuple(d.shape) for d in depth_logits] == [(3, 11, 61), (3, 10, 61)]
    assert len(model.moe_layers()) == 2 and len(model.moe_layers(include_mtp=True)) == 4


@pytest.mark.parametrize("j", [3, 8])
def test_causality_at_every_depth(j):
    """Depth k at position i sees tokens <= i + k; changing token j moves position j - k first."""
    model = make_model(tiny_model_cfg(mtp_depth=3))
    ids = torch.randint(0, 61, (2, 14))
    changed = ids.clone()
    changed[:, j] = (ids[:, j] + 5) % 61
    changed[:, j + 1:] = torch.randint(0, 61, (2, 13 - j))
    _, before = model.forward_with_mtp(ids)
    _, after = model.forward_with_mtp(changed)
    for k, (a, b) in enumerate(zip(before, after, strict=True), start=1):
        torch.testing.assert_close(a[:, :j - k], b[:, :j - k], rtol=0, atol=1e-6)
        assert (a[:, j - k] - b[:, j - k]).abs().max() > 1e-4, k


def test_mtp_objective_matches_explicit_positions():
    B, S, V, D = 2, 7, 11, 2
    logits = torch.randn(B, S, V, dtype=torch.float64)
    depth_logits = [torch.randn(B, S - k, V, dtype=torch.float64) for k in range(1, D + 1)]
    tokens = torch.randint(0, V, (B, S + 1))  # inputs tokens[:, :S], targets tokens[:, 1:]
    loss, ce_main, ce_depths = mtp_objective(logits, depth_logits, tokens[:, 1:], mtp_lambda=0.3)

    def nll(row, token):
        return -torch.log_softmax(row, -1)[token]

    main = torch.stack([nll(logits[b, i], tokens[b, i + 1]) for b in range(B) for i in range(S)]).mean()
    depths = [torch.stack([nll(depth_logits[k - 1][b, i], tokens[b, i + k + 1])  # predicts t_{i+k+1}
                           for b in range(B) for i in range(S - k)]).mean() for k in range(1, D + 1)]
    torch.testing.assert_close(ce_main, main.float())
    torch.testing.assert_close(torch.stack(ce_depths), torch.stack(depths).float())
    torch.testing.assert_close(loss, (main + 0.3 / D * sum(depths)).float())


def test_mtp_loss_and_gradients_reach_every_parameter():
    model = make_model(tiny_model_cfg(mtp_depth=2, q_lora_rank=12)).train()
    ids = torch.randint(0, 61, (3, 13))
    loss, ce_main, ce_depths = mtp_loss(model, ids, mtp_lambda=0.2)
    logits, depth_logits = model.forward_with_mtp(ids[:, :-1])
    expected = F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].reshape(-1))
    torch.testing.assert_close(ce_main, expected)
    torch.testing.assert_close(ce_depths[1], F.cross_entropy(depth_logits[1].flatten(0, 1),
                                                             ids[:, 3:].reshape(-1)))
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    with pytest.raises(ValueError, match="longer than mtp_depth=2"):
        model.forward_with_mtp(ids[:, :2])
    with pytest.raises(ValueError, match="do not match"):
        mtp_loss(model, ids, ids[:, :-1])


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float64, 1e-12)])
def test_incremental_mtp_with_its_own_cache_equals_training_path(dtype, tol):
    """Chained depths 1 and 2, each with a one-layer cache, fed in chunks as a drafter would."""
    model = make_model(tiny_model_cfg(mtp_depth=2, q_lora_rank=12), dtype)
    ids = torch.randint(0, 61, (2, 15))
    _, depth_logits = model.forward_with_mtp(ids)
    h0 = model.forward_hidden(ids)
    caches = [model.new_mtp_cache(2), model.new_mtp_cache(2)]
    out1, out2 = [], []
    for a, b in [(0, 5), (5, 6), (6, 7), (7, 11), (11, 12), (12, 13)]:
        h1 = model.mtp_forward(1, h0[:, a:b], ids[:, a + 1:b + 1], caches[0])
        out1.append(model.mtp_head(1, h1))
        h2 = model.mtp_forward(2, h1, ids[:, a + 2:b + 2], caches[1])
        out2.append(model.mtp_head(2, h2))
    assert rel_err(torch.cat(out1, 1), depth_logits[0][:, :13]) < tol
    assert rel_err(torch.cat(out2, 1), depth_logits[1]) < tol
    caches[0].truncate(4)  # roll back and redo: the same logits
    h1 = model.mtp_forward(1, h0[:, 4:9], ids[:, 5:10], caches[0])
    assert rel_err(model.mtp_head(1, h1), depth_logits[0][:, 4:9]) < tol
    with pytest.raises(ValueError, match="depth 3 is invalid"):
        model.mtp_forward(3, h0, ids, None)
    with pytest.raises(ValueError, match="KVCache does not fit"):
        model.mtp_forward(1, h0, ids, model.new_cache(2))


def test_eh_proj_takes_the_embedding_first():
    """cat[enorm(emb), hnorm(h)]: zeroing eh_proj's second half leaves only the embedding's input."""
    model = make_model(tiny_model_cfg(mtp_depth=1))
    with torch.no_grad():
        model.mtp[0].eh_proj.weight[:, 32:] = 0
    ids = torch.randint(0, 61, (2, 6))
    h, other_h = torch.randn(2, 6, 32), torch.randn(2, 6, 32)
    torch.testing.assert_close(model.mtp_forward(1, h, ids), model.mtp_forward(1, other_h, ids))
    assert (model.mtp_forward(1, h, ids) - model.mtp_forward(1, h, (ids + 1) % 61)).abs().max() > 1e-3
