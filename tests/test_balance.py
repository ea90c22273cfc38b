"""Balancing: the loss-free bias update, auxiliary losses, load metrics, state_dict round trip."""

from __future__ import annotations

import io
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import make_layer, tiny_cfg
from torch import nn

from moe_lib import DeepSeekMoE, LoadMonitor, MoEConfig, update_bias
from moe_lib.balance import (
    AddAuxiliaryLoss,
    batch_aux_loss,
    collapse_fraction,
    device_aux_loss,
    expert_aux_loss,
    load_cv,
    loss_free_bias_update,
    max_vio,
    sequence_aux_loss,
)
from moe_lib.synthetic import simulate_loss_free

# ---------------------------------------------------------------- loss-free bias update


def test_loss_free_update_formula():
    bias_E = torch.tensor([0.1, -0.2, 0.0, 0.3])
    load_E = torch.tensor([10, 2, 5, 7])  # mean 6: experts 1 and 2 are underloaded
    new = loss_free_bias_update(bias_E, load_E, 0.01)
    torch.testing.assert_close(new, torch.tensor([0.09, -0.19, 0.01, 0.29]))
    equal = loss_free_bias_update(bias_E, torch.tensor([4, 4, 4, 4]), 0.01)
    assert torch.equal(equal, bias_E)  # sign(0) = 0: a balanced load leaves the bias alone


def test_update_bias_once_per_step_from_loads_of_all_micro_batches():
    layer = make_layer(tiny_cfg(bias_update="step", bias_update_speed=0.01)).train()
    bias_before = layer.gate.correction_bias.clone()
    counts = []
    for _ in range(3):
        layer(torch.randn(2, 6, 16)).sum().backward()
        counts.append(torch.bincount(layer.last_routing.indices.reshape(-1), minlength=8).float())
        assert torch.equal(layer.gate.correction_bias, bias_before)  # no update between micro-batches
    total_E = torch.stack(counts).sum(0)
    assert torch.equal(layer.gate.tokens_per_expert, total_E)
    assert total_E.sum() == 3 * 12 * 3
    assert update_bias(layer) == 1
    expected = bias_before + 0.01 * torch.sign(total_E.mean() - total_E)
    torch.testing.assert_close(layer.gate.correction_bias, expected)
    assert not torch.equal(layer.gate.correction_bias, bias_before)
    assert (layer.gate.tokens_per_expert == 0).all()


def test_update_bias_visits_every_router_and_skips_disabled_ones():
    model = nn.Sequential(DeepSeekMoE(tiny_cfg()), DeepSeekMoE(tiny_cfg()),
                          DeepSeekMoE(tiny_cfg(bias_update="none")))
    model.train()(torch.randn(10, 16))
    assert model[2].gate.tokens_per_expert.sum() == 0  # "none" does not even count
    assert update_bias(model) == 2
    assert (model[0].gate.correction_bias != 0).any() and (model[1].gate.correction_bias != 0).any()
    assert (model[2].gate.correction_bias == 0).all()


def test_bias_is_a_float32_buffer_untouched_by_autograd_and_optimizer():
    layer = make_layer(tiny_cfg(aux_loss="expert", aux_loss_alpha=0.1)).train()
    bias = layer.gate.correction_bias
    assert bias.dtype == torch.float32 and not bias.requires_grad
    assert all(p is not bias for p in layer.parameters())
    assert "gate.correction_bias" in dict(layer.named_buffers())
    opt = torch.optim.AdamW(layer.parameters(), lr=0.1, weight_decay=0.1)
    bias_before, weight_before = bias.clone(), layer.gate.weight.detach().clone()
    layer(torch.randn(12, 16)).pow(2).sum().backward()
    assert layer.gate.weight.grad.abs().sum() > 0 and bias.grad is None
    opt.step()
    assert torch.equal(layer.gate.correction_bias, bias_before)
    assert not torch.equal(layer.gate.weight, weight_before)
    assert layer.to(torch.bfloat16).gate.correction_bias.dtype == torch.float32


def test_forward_mode_updates_after_each_training_forward_but_not_in_eval():
    layer = make_layer(tiny_cfg(bias_update="forward", bias_update_speed=0.01))
    x = torch.randn(20, 16)
    bias0 = layer.gate.correction_bias.clone()
    out_eval = layer.eval()(x)
    assert torch.equal(layer.gate.correction_bias, bias0)
    assert layer.gate.tokens_per_expert.sum() == 0
    out_train = layer.train()(x)
    assert torch.equal(out_train, out_eval)  # this batch was routed with the previous bias
    load_E = layer.last_routing.load.float()
    torch.testing.assert_close(layer.gate.correction_bias, bias0 + 0.01 * torch.sign(load_E.mean() - load_E))
    assert layer.gate.tokens_per_expert.sum() == 0
    bias1 = layer.gate.correction_bias.clone()
    layer.train()(torch.randn(20, 16))
    assert not torch.equal(layer.gate.correction_bias, bias1)


# ---------------------------------------------------------------- balancing a skewed router

SIM = dict(n_experts=64, top_k=6, skew=2.0, steps=350, n_tokens=2048, seed=0)


def test_simulated_loss_free_bias_balances_a_skewed_router_within_300_steps():
    balanced = simulate_loss_free(gamma=1e-3, **SIM)
    skewed = simulate_loss_free(gamma=0.0, **SIM)
    assert balanced.cv[0] > 1.0 and balanced.max_vio[0] > 3.0  # starts skewed
    # over steps 300-349: every step's CV < 0.2, and MaxVio_batch (mean per-step MaxVio) < 0.3
    assert balanced.cv[300:].max() < 0.2 and balanced.max_vio[300:].mean() < 0.3
    assert balanced.max_vio[300:].max() < 0.4
    assert skewed.cv.min() > 1.0 and skewed.max_vio.min() > 3.0
    assert (skewed.bias == 0).all()


def skewed_layer_run(gamma: float, steps: int = 200, micro_batches: int = 2, n_tokens: int = 1024):
    """A real DeepSeekMoE trained (bias only) on inputs x = noise + 2u, with gate rows tilted along u.

    Expert e gets an extra logit of about 2 * tilt_e, tilt falling linearly from +1 to -1: without
    correction the first experts take most tokens. Returns per-step CV and MaxVio (over micro-batches).
    """
    torch.manual_seed(0)
    cfg = MoEConfig(d_model=16, d_expert=4, n_routed=16, n_shared=0, top_k=2, dispatch="sorted",
                    bias_update="step", bias_update_speed=gamma)
    layer = DeepSeekMoE(cfg).train()
    u_H = F.normalize(torch.randn(16), dim=0)
    with torch.no_grad():
        layer.gate.weight += torch.linspace(1.0, -1.0, 16)[:, None] * u_H
    cvs, vios = [], []
    for _ in range(steps):
        load_E = torch.zeros(16)
        for _ in range(micro_batches):
            with torch.no_grad():
                layer(torch.randn(n_tokens, 16) + 2 * u_H)
            load_E += layer.last_routing.load
        update_bias(layer)
        cvs.append(load_cv(load_E))
        vios.append(max_vio(load_E))
    return torch.tensor(cvs), torch.tensor(vios)


def test_real_layer_loss_free_bias_balances_a_skewed_gate_within_150_steps():
    cv, vio = skewed_layer_run(gamma=3e-3)
    assert cv[0] > 1.0 and vio[0] > 3.0
    # over steps 150-199: every step's CV < 0.2, and MaxVio_batch (mean per-step MaxVio) < 0.3
    assert cv[150:].max() < 0.2 and vio[150:].mean() < 0.3 and vio[150:].max() < 0.4
    cv0, vio0 = skewed_layer_run(gamma=0.0)
    assert cv0.min() > 1.0 and vio0.min() > 3.0


# ---------------------------------------------------------------- auxiliary losses


def reference_expert_loss(scores_TE, indices_TK, alpha):
    T, E = scores_TE.shape
    K = indices_TK.shape[1]
    total = 0.0
    for i in range(E):
        f_i = E / (K * T) * sum(int(i in row) for row in indices_TK.tolist())
        p_i = sum(float(scores_TE[t, i] / scores_TE[t].sum()) for t in range(T)) / T
        total += f_i * p_i
    return alpha * total


def reference_device_loss(scores_TE, indices_TK, n_devices, alpha):
    T, E = scores_TE.shape
    K, per = indices_TK.shape[1], E // n_devices
    f = [E / (K * T) * sum(int(i in row) for row in indices_TK.tolist()) for i in range(E)]
    p = [sum(float(scores_TE[t, i] / scores_TE[t].sum()) for t in range(T)) / T for i in range(E)]
    return alpha * sum(sum(f[d * per:(d + 1) * per]) / per * sum(p[d * per:(d + 1) * per])
                       for d in range(n_devices))


def random_routing(T, E, K, score_func="sigmoid"):
    logits = torch.randn(T, E, dtype=torch.float64)
    scores = logits.sigmoid() if score_func == "sigmoid" else logits.softmax(-1)
    return scores, scores.topk(K, dim=-1).indices


@pytest.mark.parametrize("score_func", ["sigmoid", "softmax"])
def test_expert_aux_loss_matches_hand_computation(score_func):
    scores, indices = random_routing(12, 8, 3, score_func)
    loss = expert_aux_loss(scores, indices, 0.01)
    assert math.isclose(loss.item(), reference_expert_loss(scores, indices, 0.01), rel_tol=1e-6)


def test_expert_aux_loss_is_alpha_for_a_perfectly_balanced_router():
    scores = torch.full((4, 4), 0.25)
    indices = torch.tensor([[0, 1], [2, 3], [0, 2], [1, 3]])
    assert math.isclose(expert_aux_loss(scores, indices, 0.3).item(), 0.3, rel_tol=1e-6)


def test_sequence_aux_loss_averages_per_sequence_losses():
    scores, indices = random_routing(15, 8, 2)
    scores_BSE, indices_BSK = scores.view(3, 5, 8), indices.view(3, 5, 2)
    expected = sum(reference_expert_loss(s, i, 1e-4)
                   for s, i in zip(scores_BSE, indices_BSK, strict=True)) / 3
    assert math.isclose(sequence_aux_loss(scores_BSE, indices_BSK, 1e-4).item(), expected, rel_tol=1e-6)
    assert not math.isclose(expected, reference_expert_loss(scores, indices, 1e-4), rel_tol=1e-3)


@pytest.mark.parametrize("n_devices", [1, 2, 4])
def test_device_aux_loss_matches_hand_computation(n_devices):
    scores, indices = random_routing(10, 8, 2)
    loss = device_aux_loss(scores, indices, n_devices, 0.05)
    assert math.isclose(loss.item(), reference_device_loss(scores, indices, n_devices, 0.05), rel_tol=1e-6)


@pytest.mark.parametrize("aux_loss", ["expert", "batch", "sequence", "device"])
def test_layer_aux_loss_value_and_unchanged_forward(aux_loss):
    cfg = tiny_cfg(aux_loss=aux_loss, aux_loss_alpha=0.1, aux_loss_devices=2)
    layer = make_layer(cfg).train()
    plain = DeepSeekMoE(cfg.replace(aux_loss="none"))
    plain.load_state_dict(layer.state_dict())
    x = torch.randn(3, 5, 16)
    out = layer(x)
    assert torch.equal(out, plain.train()(x))  # forward output is unchanged by the injection
    scores = layer.last_routing.scores.double()
    indices = scores.topk(cfg.top_k, dim=-1).indices  # f_i counts the unbiased top-K (V3 Eq. 18)
    if aux_loss in ("expert", "batch"):
        expected = reference_expert_loss(scores, indices, 0.1)
    elif aux_loss == "device":
        expected = reference_device_loss(scores, indices, 2, 0.1)
    else:
        expected = sum(reference_expert_loss(scores[5 * b:5 * b + 5], indices[5 * b:5 * b + 5], 0.1)
                       for b in range(3)) / 3
    assert math.isclose(layer.aux_loss.item(), expected, rel_tol=1e-5)


def v3_sequence_loss_eqs_17_to_20(x_BSH: torch.Tensor, gate_EH: torch.Tensor, top_k: int,
                                  alpha: float) -> float:
    """DeepSeek-V3 Eqs. 17-20 written out in float64, token by token, from the input and gate weight."""
    total = 0.0
    n_experts = gate_EH.shape[0]
    for x_SH in x_BSH.double():
        s = torch.sigmoid(x_SH @ gate_EH.double().t())  # [S, E] unbiased affinities
        seq_len = s.shape[0]
        loss = 0.0
        for i in range(n_experts):
            chosen = sum(1.0 for t in range(seq_len) if i in set(s[t].topk(top_k).indices.tolist()))
            f_i = n_experts / (top_k * seq_len) * chosen                     # Eq. 18
            p_i = sum((s[t, i] / s[t].sum()).item() for t in range(seq_len)) / seq_len  # Eqs. 19-20
            loss += f_i * p_i
        total += alpha * loss                                               # Eq. 17
    return total / x_BSH.shape[0]


def test_sequence_loss_is_v3_eq_17_to_20_on_unbiased_scores_despite_a_large_bias_and_groups():
    cfg = tiny_cfg(n_routed=16, top_k=4, n_groups=4, topk_groups=2, aux_loss="sequence",
                   aux_loss_alpha=1e-4, aux_loss_inject=False)
    layer = make_layer(cfg, bias_scale=0.5).train()
    x = torch.randn(4, 24, 16)
    layer(x)
    expected = v3_sequence_loss_eqs_17_to_20(x, layer.gate.weight.detach(), cfg.top_k, 1e-4)
    assert math.isclose(layer.aux_loss.item(), expected, rel_tol=1e-5)
    # the bias and the group limit do change the routing, so counting the routed experts would differ
    routed = layer.last_routing.indices.view(4, 24, cfg.top_k)
    biased = sequence_aux_loss(layer.last_routing.scores.double().view(4, 24, -1), routed, 1e-4).item()
    assert abs(biased - expected) / expected > 0.01


def test_sequence_aux_loss_counts_dropped_pairs_as_nothing():
    scores, indices = random_routing(12, 8, 2)
    dropped = indices.clone()
    dropped[3, 1] = -1
    expected = (reference_expert_loss(scores[:6], dropped[:6], 1.0)
                + reference_expert_loss(scores[6:], dropped[6:], 1.0)) / 2
    loss = sequence_aux_loss(scores.view(2, 6, 8), dropped.view(2, 6, 2), 1.0)
    assert math.isclose(loss.item(), expected, rel_tol=1e-6)


def test_batch_aux_loss_is_the_loss_over_the_whole_batch():
    scores, indices = random_routing(20, 8, 2)
    assert math.isclose(batch_aux_loss(scores, indices, 0.01).item(),
                        reference_expert_loss(scores, indices, 0.01), rel_tol=1e-6)
    assert not math.isclose(batch_aux_loss(scores, indices, 0.01).item(),
                            sequence_aux_loss(scores.view(4, 5, 8), indices.view(4, 5, 2), 0.01).item(),
                            rel_tol=1e-3)


def test_aux_loss_gradient_reaches_the_gate_only_through_the_aux_loss():
    x = torch.randn(24, 16)
    base = make_layer(tiny_cfg(aux_loss="expert", aux_loss_alpha=0.0)).train()
    grads = {}
    for alpha in (0.0, 0.5):
        layer = DeepSeekMoE(base.cfg.replace(aux_loss_alpha=alpha)).train()
        layer.load_state_dict(base.state_dict())
        (0.0 * layer(x)).sum().backward()  # the task loss contributes no gradient at all
        grads[alpha] = layer.gate.weight.grad.clone()
        assert layer.experts.gate_up_proj.grad.abs().sum() == 0
    assert (grads[0.0] == 0).all()
    assert grads[0.5].abs().sum() > 0
    reference = DeepSeekMoE(base.cfg.replace(aux_loss_alpha=0.5, aux_loss_inject=False)).train()
    reference.load_state_dict(base.state_dict())
    reference(x)
    (aux_grad,) = torch.autograd.grad(reference.aux_loss, reference.gate.weight)
    torch.testing.assert_close(grads[0.5], aux_grad)


def test_injected_aux_loss_equals_adding_it_to_the_loss():
    x = torch.randn(2, 8, 16)
    cfg = tiny_cfg(aux_loss="sequence", aux_loss_alpha=0.2)
    injected = make_layer(cfg).train()
    explicit = DeepSeekMoE(cfg.replace(aux_loss_inject=False)).train()
    explicit.load_state_dict(injected.state_dict())
    injected(x).pow(2).sum().backward()
    out = explicit(x)
    (out.pow(2).sum() + explicit.aux_loss).backward()
    for (name, p), q in zip(injected.named_parameters(), explicit.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, msg=name)
    without = DeepSeekMoE(cfg.replace(aux_loss_inject=False)).train()
    without.load_state_dict(injected.state_dict())
    without(x).pow(2).sum().backward()
    assert not torch.allclose(without.gate.weight.grad, injected.gate.weight.grad)


def test_add_auxiliary_loss_function():
    x = torch.randn(4, 3, requires_grad=True)
    p = torch.randn(5, requires_grad=True)
    g = torch.randn(4, 3)
    y = AddAuxiliaryLoss.apply(x, (p ** 2).sum())
    assert torch.equal(y, x)
    (y * g).sum().backward()
    torch.testing.assert_close(x.grad, g)
    torch.testing.assert_close(p.grad, 2 * p.detach())


# ---------------------------------------------------------------- metrics


def test_load_metrics():
    assert load_cv(torch.tensor([5, 5, 5, 5])) == 0.0
    assert math.isclose(load_cv(torch.tensor([4, 0, 0, 0])), math.sqrt(3), rel_tol=1e-6)
    assert math.isclose(load_cv(torch.tensor([1, 3])), 0.5, rel_tol=1e-6)
    assert max_vio(torch.tensor([2, 2, 2, 2])) == 0.0
    assert math.isclose(max_vio(torch.tensor([4, 0, 0, 0])), 3.0, rel_tol=1e-6)
    assert math.isclose(max_vio(torch.tensor([6, 2, 4, 4])), 0.5, rel_tol=1e-6)
    assert collapse_fraction(torch.tensor([10.0, 10.0, 0.5, 10.0])) == 0.25
    assert collapse_fraction(torch.tensor([10.0, 10.0, 0.5, 10.0]), threshold=0.01) == 0.0
    assert collapse_fraction(torch.tensor([40, 0, 0, 0])) == 0.75


def test_load_monitor_global_vs_batch_max_vio():
    monitor = LoadMonitor(2)
    monitor.update(torch.tensor([3, 1]))
    monitor.update(torch.tensor([1, 3]))
    assert math.isclose(monitor.max_vio_batch, 0.5)  # each batch alone is unbalanced
    assert monitor.max_vio_global == 0.0 and monitor.cv_global == 0.0  # together they balance
    monitor.update(torch.tensor([4, 0]))
    assert math.isclose(monitor.max_vio_batch, 2 / 3)
    assert math.isclose(monitor.max_vio_global, 1 / 3, rel_tol=1e-6)
    assert torch.equal(monitor.total_E, torch.tensor([8.0, 4.0], dtype=torch.float64))


# ---------------------------------------------------------------- state_dict


def test_state_dict_round_trip_keeps_bias_and_accumulated_loads():
    cfg = tiny_cfg(bias_update_speed=0.01)
    layer = make_layer(cfg).train()
    layer(torch.randn(30, 16))
    update_bias(layer)
    layer(torch.randn(30, 16))  # loads accumulated since the update
    assert layer.gate.tokens_per_expert.sum() == 90
    buffer = io.BytesIO()
    torch.save(layer.state_dict(), buffer)
    buffer.seek(0)
    fresh = DeepSeekMoE(cfg)
    assert (fresh.gate.correction_bias == 0).all()
    fresh.load_state_dict(torch.load(buffer))
    assert torch.equal(fresh.gate.correction_bias, layer.gate.correction_bias)
    assert torch.equal(fresh.gate.tokens_per_expert, layer.gate.tokens_per_expert)
    x = torch.randn(10, 16)
    assert torch.equal(fresh.eval()(x), layer.eval()(x))
    update_bias(fresh), update_bias(layer)
    assert torch.equal(fresh.gate.correction_bias, layer.gate.correction_bias)


# ---------------------------------------------------------------- proportional bias update (ablation)


def test_proportional_update_formula_on_raw_counts():
    from moe_lib.balance import proportional_bias_update

    bias_E = torch.tensor([0.1, -0.2, 0.0, 0.3])
    load_E = torch.tensor([10, 2, 5, 7])  # mean 6: errors mean - c = [-4, 4, 1, -1]
    new = proportional_bias_update(bias_E, load_E, 0.01)
    torch.testing.assert_close(new, torch.tensor([0.06, -0.16, 0.01, 0.29]))
    assert new.dtype == torch.float32
    # unlike the sign rule, the step scales with the counts: doubling them doubles the step
    doubled = proportional_bias_update(bias_E, 2 * load_E, 0.01)
    torch.testing.assert_close(doubled - bias_E, 2 * (new - bias_E))


def test_update_bias_applies_each_routers_rule_on_its_accumulated_loads():
    torch.manual_seed(3)
    model = nn.Sequential(
        make_layer(tiny_cfg(bias_update="step", bias_update_speed=1e-3, bias_update_rule="proportional")),
        make_layer(tiny_cfg(bias_update="step", bias_update_speed=1e-3))).train()
    before = [m.gate.correction_bias.clone() for m in model]
    counts = [torch.zeros(8) for _ in model]
    for _ in range(2):
        x = torch.randn(40, 16)
        for i, m in enumerate(model):
            x = x + m(x)
            counts[i] += m.last_routing.load.float()
    assert update_bias(model) == 2
    err_prop, err_sign = counts[0].mean() - counts[0], counts[1].mean() - counts[1]
    assert err_prop.abs().max() > 1  # an uneven load, so the two rules differ
    torch.testing.assert_close(model[0].gate.correction_bias, before[0] + 1e-3 * err_prop)
    torch.testing.assert_close(model[1].gate.correction_bias, before[1] + 1e-3 * torch.sign(err_sign))
    assert all((m.gate.tokens_per_expert == 0).all() for m in model)


def test_proportional_rule_balances_a_skewed_gate():
    torch.manual_seed(0)
    cfg = MoEConfig(d_model=16, d_expert=4, n_routed=16, n_shared=0, top_k=2, dispatch="sorted",
                    bias_update="step", bias_update_speed=3e-3 / 256, bias_update_rule="proportional")
    layer = DeepSeekMoE(cfg).train()  # 2048 tokens x top-2 / 16 experts: mean count 256 per step
    u_H = F.normalize(torch.randn(16), dim=0)
    with torch.no_grad():
        layer.gate.weight += torch.linspace(1.0, -1.0, 16)[:, None] * u_H
    vios = []
    for _ in range(150):
        with torch.no_grad():
            layer(torch.randn(2048, 16) + 2 * u_H)
        vios.append(max_vio(layer.last_routing.load))
        update_bias(layer)
    assert vios[0] > 3.0 and sum(vios[100:]) / 50 < 0.3
