"""moe_lib.train.loop and CLI: schedules, config checks, learning, balancing per optimizer step,
bit-identical resume, and the `python -m moe_lib.train` / `python -m moe_lib.bench train` quick forms."""

from __future__ import annotations

import json

import pytest
import torch

from moe_lib.train import loop
from moe_lib.train.__main__ import main as train_main
from moe_lib.train.checkpoint import load_train_state
from moe_lib.train.data import synthetic_corpus
from moe_lib.train.loop import TrainConfig, Trainer, load_corpus, lr_factor, mtp_lambda_at, train
from moe_lib.train.presets import make_config


def test_lr_schedule_warmup_then_cosine():
    factors = [lr_factor(s, warmup_steps=10, total_steps=110, min_ratio=0.1) for s in range(120)]
    assert factors[0] == pytest.approx(0.1) and factors[9] == pytest.approx(1.0)
    assert factors[10] == pytest.approx(1.0) and factors[60] == pytest.approx(0.55)
    assert factors[110] == pytest.approx(0.1) and factors[119] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(factors[10:], factors[11:], strict=False))


def test_mtp_lambda_schedule():
    cfg = make_config("test", steps=10, mtp_lambda=0.3, mtp_lambda_final=0.1, mtp_lambda_switch=0.7)
    assert [mtp_lambda_at(s, cfg) for s in (0, 6, 7, 9)] == [0.3, 0.3, 0.1, 0.1]


def test_config_checks_name_the_field():
    cfg = make_config("test")
    with pytest.raises(ValueError, match="model.moe.bias_update='forward'"):
        cfg.replace(model=cfg.model.replace(moe=cfg.model.moe.replace(bias_update="forward")))
    with pytest.raises(ValueError, match="model.moe.aux_loss_inject=True"):
        cfg.replace(model=cfg.model.replace(moe=cfg.model.moe.replace(
            aux_loss="sequence", aux_loss_alpha=0.01, aux_loss_inject=True)))
    with pytest.raises(ValueError, match="TrainConfig.grad_accum=0"):
        cfg.replace(grad_accum=0)
    with pytest.raises(ValueError, match="TrainConfig.corpus='pile'"):
        cfg.replace(corpus="pile")
    assert TrainConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


def test_make_config_overrides():
    cfg = make_config("test", mtp_depth=2, aux_loss="sequence", aux_alpha=1e-3, bias_speed=0.0, seed=4)
    moe = cfg.model.moe
    assert cfg.model.mtp_depth == 2 and cfg.seed == 4
    assert (moe.aux_loss, moe.aux_loss_alpha, moe.aux_loss_inject) == ("sequence", 1e-3, False)
    assert moe.bias_update == "none"
    assert make_config("test", bias_speed=1e-2).model.moe.bias_update == "step"


def test_a_few_steps_lower_the_loss(tmp_path):
    cfg = make_config("test", corpus="synthetic", steps=25, eval_every=25, lr=1e-2, warmup_steps=3)
    summary = train(cfg, tmp_path, progress=False)
    lines = [json.loads(line) for line in (tmp_path / loop.METRICS_FILE).read_text().splitlines()]
    assert [r["step"] for r in lines] == list(range(1, 26))
    first, last = lines[0], lines[-1]
    assert last["ce"] < first["ce"] - 1.0
    assert last["ce_mtp"][0] < first["ce_mtp"][0] - 1.0
    assert summary["validation"]["val_ce"] < first["ce"] - 1.0
    assert set(last["max_vio_batch"]) == {"layers.1.mlp", "mtp.0.mlp"}
    assert 0 < summary["tokens_per_s"] and summary["samples"]["def "]


def test_bias_is_updated_once_per_optimizer_step_under_accumulation(monkeypatch):
    cfg = make_config("test", grad_accum=3, bias_speed=0.01)
    trainer = Trainer.create(cfg, synthetic_corpus(n_documents=300, seed=0))
    calls, micro_loads = [], {name: [] for name in trainer.moe}
    original = loop.update_bias
    monkeypatch.setattr(loop, "update_bias", lambda model: calls.append(1) or original(model))
    for name, layer in trainer.moe.items():
        layer.register_forward_hook(lambda m, i, o, name=name: micro_loads[name].append(m.last_routing.load))
    before = {n: m.gate.correction_bias.clone() for n, m in trainer.moe.items()}
    trainer.train_step()
    assert len(calls) == 1
    for name, layer in trainer.moe.items():
        assert len(micro_loads[name]) == 3
        load_E = torch.stack(micro_loads[name]).sum(dim=0).float()
        expected = before[name] + 0.01 * torch.sign(load_E.mean() - load_E)
        assert torch.equal(layer.gate.correction_bias, expected)
        assert torch.all(layer.gate.tokens_per_expert == 0)
        # per micro-batch updates would have moved some bias by more than one step of 0.01
        assert (layer.gate.correction_bias - before[name]).abs().max() <= 0.01 + 1e-7


def test_auxiliary_loss_is_added_and_reaches_the_gate():
    cfg = make_config("test", aux_loss="sequence", aux_alpha=0.1, bias_speed=0.0)
    trainer = Trainer.create(cfg, synthetic_corpus(n_documents=300, seed=0))
    record = trainer.train_step()
    assert record["aux"] > 0 and record["loss"] > record["ce"]
    assert all(torch.all(m.gate.correction_bias == 0) for m in trainer.moe.values())


def test_resume_is_bit_identical(tmp_path):
    cfg = make_config("test", steps=5, eval_every=2)
    train(cfg, tmp_path / "straight", progress=False)
    train(cfg, tmp_path / "resumed", progress=False, stop_after=2)
    assert load_train_state(tmp_path / "resumed")["step"] == 2
    train(cfg, tmp_path / "resumed", progress=False, resume=True)
    a, b = load_train_state(tmp_path / "straight"), load_train_state(tmp_path / "resumed")
    assert a["step"] == b["step"] == 5
    # moe_lib.kernels draws random operands from the global torch RNG when it first times a GEMM
    # shape, at different moments in the two runs; the loop's own restore of it is checked below
    torch_a, torch_b = a["rng"].pop("torch"), b["rng"].pop("torch")
    _assert_identical(a, b)
    assert torch_a.shape == torch_b.shape
    trainer = Trainer.create(cfg, load_corpus(cfg))
    torch.manual_seed(1234)
    trainer.resume(tmp_path / "resumed")
    assert torch.equal(torch.get_rng_state(), torch_b)
    assert trainer.step == 5 and trainer.windows.batches == 5 * cfg.grad_accum
    from safetensors.torch import load_file

    wa, wb = (load_file(tmp_path / d / "model.safetensors") for d in ("straight", "resumed"))
    assert wa.keys() == wb.keys()
    for name in wa:
        assert torch.equal(wa[name], wb[name]), name
    assert any(torch.any(wa[n] != 0) for n in wa if n.endswith("correction_bias"))
    la, lb = ([{k: v for k, v in json.loads(line).items() if k != "tokens_per_s"}
               for line in (tmp_path / d / loop.METRICS_FILE).read_text().splitlines()]
              for d in ("straight", "resumed"))
    assert la == lb and len(la) == 5


def _assert_identical(a, b, path="state"):
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b), path
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for k in a:
            _assert_identical(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, list | tuple):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _assert_identical(x, y, f"{path}[{i}]")
    else:
        assert a == b, path


def test_resume_with_another_config_names_the_fields(tmp_path):
    cfg = make_config("test", steps=2)
    train(cfg, tmp_path, progress=False, stop_after=1)
    with pytest.raises(ValueError, match=r"lr: checkpoint 0.003, now 0.001"):
        train(cfg.replace(lr=1e-3), tmp_path, progress=False, resume=True)
    other = make_config("test", steps=2, mtp_depth=0)
    with pytest.raises(ValueError, match=r"model.mtp_depth: checkpoint 1, now 0"):
        train(other, tmp_path, progress=False, resume=True)


def test_cli_quick(tmp_path, capsys):
    summary = train_main(["--quick", "--out", str(tmp_path), "--steps", "3", "--no-progress",
                          "--bias-speed", "0.02"])
    out = capsys.readouterr().out
    assert "validation cross-entropy" in out and "bigram baseline" in out
    assert summary["steps_done"] == 3 and summary["config"]["model"]["moe"]["bias_update_speed"] == 0.02
    assert summary["command"].startswith("python -m moe_lib.train --quick")
    assert {p.name for p in tmp_path.iterdir()} >= {"config.json", "model.safetensors", "train_state.pt",
                                                    "metrics.jsonl", "summary.json", "train_config.json"}


def test_bench_train_quick(tmp_path, capsys):
    from moe_lib.bench import main as bench_main
    from moe_lib.bench.train import CATEGORIES

    out = tmp_path / "train.json"
    from moe_lib import kernels, native

    bench_main(["train", "--quick", "--preset", "test", "--threads", "1", "--compare-plans", "1",
                "--compare-native", "1", "--out", str(out)])
    report = json.loads(out.read_text())
    assert report["tokens_per_s"] > 0 and report["machine"]["threads"] == 1
    plans = report["compare_plans"]
    assert plans["steps"] == 1 and plans["measured_ms"] > 0 and plans["tasks_ms"] > 0
    assert kernels.FORCE_STRATEGY is None
    assert report["command"].endswith("--compare-plans 1 --compare-native 1")
    natives = report["compare_native"]
    assert natives["steps"] == 1 and natives["native_ms"] > 0 and natives["python_ms"] > 0
    assert native.enabled()  # switched back on after the comparison
    assert set(report["share_pct"]) == set(CATEGORIES)
    assert sum(report["share_pct"].values()) == pytest.approx(100.0)
    for part in ("attention", "routing", "dispatch", "experts", "optimizer", "head_and_loss"):
        assert report["share_pct"][part] > 0, part
    assert "tokens/s" in capsys.readouterr().out
