"""`python -m moe_lib.bench mtp --quick` on a small random checkpoint with two MTP modules."""

from __future__ import annotations

import json

import pytest
import torch
from model_utils import make_model, tiny_model_cfg

from moe_lib.bench import main
from moe_lib.bench.mtp import teacher_forced
from moe_lib.train.checkpoint import save_checkpoint


def test_quick_benchmark_prints_and_writes(tmp_path, capsys):
    model = make_model(tiny_model_cfg(mtp_depth=2, vocab_size=256, max_seq_len=48))
    save_checkpoint(tmp_path / "ckpt", model)
    main(["mtp", "--checkpoint", str(tmp_path / "ckpt"), "--quick", "--out", str(tmp_path / "mtp.json")])
    lines = capsys.readouterr().out.splitlines()
    acceptance = next(ln for ln in lines if ln.startswith("acceptance: "))
    speedup = next(ln for ln in lines if ln.startswith("speedup: "))
    report = json.loads((tmp_path / "mtp.json").read_text())
    one = report["generation"]["speculative"]["1"]
    assert float(acceptance.split()[1]) == pytest.approx(one["acceptance"][0], abs=1e-3)
    assert float(speedup.split()[1]) == pytest.approx(one["speedup"], abs=5e-3)
    assert set(report["generation"]["speculative"]) == {"1", "2"}
    for g in report["generation"]["speculative"].values():
        assert g["outputs_differing_from_plain"] == 0
        assert g["new_tokens"] == 2 * report["settings"]["new_tokens"]
    assert report["machine"]["cpu"] and report["machine"]["date"] and "--quick" in report["command"]
    assert set(report["costs"]["ms"]) == {"main_step", "mtp_step", "verify_2", "verify_3"}
    assert report["prediction"]["draft_cost_c"] > 0


def test_teacher_forced_counts_against_explicit_positions():
    model = make_model(tiny_model_cfg(mtp_depth=2))
    ids = torch.randint(0, 61, (3, 12))
    result = teacher_forced(model, ids, batch=2)
    logits, depth_logits = model.forward_with_mtp(ids)
    main = logits.argmax(-1)
    for k, row in enumerate(result["depths"], start=1):
        draft = depth_logits[k - 1].argmax(-1)
        agree = [draft[b, i] == main[b, i + k] for b in range(3) for i in range(12 - k)]
        true = [draft[b, i] == ids[b, i + k + 1] for b in range(3) for i in range(11 - k)]
        assert row["agrees_with_main"] == pytest.approx(sum(agree).item() / len(agree))
        assert row["equals_true_token"] == pytest.approx(sum(true).item() / len(true))
    assert result["main_accuracy"] == pytest.approx((main[:, :-1] == ids[:, 1:]).float().mean().item())
