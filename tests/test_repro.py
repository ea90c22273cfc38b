"""Reproductions: both --quick sweeps run end to end through the CLI; their JSON has the schema the
chapter reads, finite numbers, seeds and variants in the order the code defines, summaries that
agree with the runs, and equal expert parameters in the architecture ablation. No paper's conclusion
is asserted: at this size and these few steps the numbers say nothing about it."""

from __future__ import annotations

import json
import math

import pytest
import torch

from moe_lib.repro import architecture, balancing, main, runner
from moe_lib.viz import repro as viz


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("repro")
    main(["balancing", "--quick", "--out", str(out / "balancing.json")])
    main(["architecture", "--quick", "--out", str(out / "architecture.json")])
    return {name: json.loads((out / f"{name}.json").read_text()) for name in ("balancing", "architecture")}


def finite(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def check_common(data: dict, name: str, n_variants: int) -> None:
    assert data["reproduction"] == name and data["complete"] is True
    assert data["command"].startswith(f"python -m moe_lib.repro {name} --quick")
    for key in ("cpu", "simd_flags", "torch_threads", "torch", "load_average_1_5_15", "date"):
        assert key in data["machine"], key
    assert data["machine"]["torch_threads"] == 1 and data["machine"]["torch"] == torch.__version__
    seeds, names = data["setup"]["seeds"], list(data["setup"]["variants"])
    assert seeds == [0, 1] and len(names) == n_variants
    # seeds outer, variants inner, in the order the module defines them
    assert [(r["seed"], r["variant"]) for r in data["runs"]] == [(s, v) for s in seeds for v in names]
    steps = data["setup"]["sizes"]["scale"]["steps"]
    every = data["setup"]["sizes"]["scale"]["eval_every"]
    for r in data["runs"]:
        assert [p["step"] for p in r["curve"]] == list(range(every, steps + 1, every))
        assert all(finite(p[k]) for p in r["curve"] for k in ("train_ce", "val_ce"))
        assert r["curve"][-1]["val_ce"] == r["val_ce"]
        assert 0 < r["val_ce"] < math.log(256) + 0.5  # byte-level CE near or below uniform
    for variant in names:
        values = [r["val_ce"] for r in data["runs"] if r["variant"] == variant]
        assert data["summary"][variant]["val_ce"]["values"] == values
        assert data["summary"][variant]["val_ce"]["mean"] == pytest.approx(sum(values) / len(values))


def test_balancing_quick_schema_and_values(quick):
    data = quick["balancing"]
    check_common(data, "balancing", 9)
    names = list(data["setup"]["variants"])
    assert names == ["none", "seq-aux 0.001", "seq-aux 0.01", "batch-aux 0.001", "batch-aux 0.01",
                     "loss-free 0.0001", "loss-free 0.001", "loss-free 0.01", "proportional"]
    for r in data["runs"]:
        for key in ("max_vio_global", "max_vio_batch", "train_max_vio_batch_tail"):
            assert finite(r[key]) and r[key] >= 0, (r["variant"], key)
        # MaxVio of the summed loads never exceeds the mean per-batch MaxVio (max is subadditive)
        assert r["max_vio_global"] <= r["max_vio_batch"] + 1e-9
        layers = r["per_layer"]["max_vio_global"]
        assert len(layers) == 2 and r["max_vio_global"] == pytest.approx(sum(layers.values()) / 2)
    diff = data["summary"]["none"]["minus_loss_free_1e-3"]["val_ce"]
    ref = [r["val_ce"] for r in data["runs"] if r["variant"] == "loss-free 0.001"]
    own = [r["val_ce"] for r in data["runs"] if r["variant"] == "none"]
    assert diff["mean"] == pytest.approx(sum(a - b for a, b in zip(own, ref, strict=True)) / 2)
    assert "minus_loss_free_1e-3" not in data["summary"]["loss-free 0.001"]
    # the proportional rate: u_p * mean count = the sign rule's 1e-3
    sizes = data["setup"]["sizes"]
    mean_count = sizes["scale"]["batch_size"] * sizes["scale"]["seq_len"] * sizes["top_k"] / sizes["n_routed"]
    assert data["setup"]["variants"]["proportional"]["bias_update_speed"] * mean_count == pytest.approx(1e-3)
    assert data["papers"]["loss_free_table2"]["rows"][0]["max_vio_global"] == 0.72


def test_architecture_quick_schema_equal_parameters_and_ablation(quick):
    data = quick["architecture"]
    check_common(data, "architecture", 3)
    moe = data["setup"]["variants"]
    assert [(m["n_routed"], m["top_k"], m["n_shared"]) for m in moe.values()] == [(8, 2, 0), (32, 8, 0),
                                                                                 (31, 7, 1)]
    counts = list(data["setup"]["parameters"].values())
    assert len({c["expert_total_per_layer"] for c in counts}) == 1
    assert len({c["expert_active_per_layer"] for c in counts}) == 1
    # whole models differ only by their routers: (E - E_gshard) rows of d_model per MoE layer
    d, layers = data["setup"]["sizes"]["scale"]["d_model"], data["setup"]["sizes"]["scale"]["n_layers"]
    for c, m in zip(counts, moe.values(), strict=True):
        assert c["model_total"] - counts[0]["model_total"] == layers * d * (m["n_routed"] - 8)
    ablated = [r for r in data["runs"] if r["variant"] == "fine + shared"]
    assert len(ablated) == 2 and all("eval_ablation" not in r for r in data["runs"] if r not in ablated)
    for r in ablated:
        a = r["eval_ablation"]
        assert list(a) == ["as trained", "shared off", "shared off, +1 routed"]
        assert a["as trained"] == pytest.approx(r["val_ce"], abs=1e-6) and all(map(finite, a.values()))
    change = data["summary"]["eval_ablation"]["change"]
    assert change["mean"] == pytest.approx(sum(r["eval_ablation"]["shared off, +1 routed"] - r["val_ce"]
                                               for r in ablated) / 2, abs=1e-6)


def test_without_shared_expert_keeps_every_other_weight():
    cfg = architecture.layers(architecture.QUICK)["fine + shared"]
    train_cfg = runner.train_config(architecture.QUICK.scale, cfg)
    from moe_lib.train.data import synthetic_corpus
    from moe_lib.train.loop import Trainer

    trainer = Trainer.create(train_cfg, synthetic_corpus(n_documents=50, seed=1))
    ablated = architecture.without_shared_expert(trainer, 1)
    assert ablated.model.cfg.moe.n_shared == 0 and ablated.model.cfg.moe.top_k == cfg.top_k + 1
    old = trainer.model.state_dict()
    new = ablated.model.state_dict()
    assert set(old) - set(new) == {k for k in old if ".shared_experts." in k} != set()
    assert all(torch.equal(new[k], old[k]) for k in new)
    x = torch.randint(0, 256, (2, 8))
    assert not torch.allclose(ablated.model(x), trainer.model(x))  # the output does change


def test_paired_difference_interval():
    d = runner.paired_difference([1.0, 2.0, 3.6], [0.1, 1.0, 2.5])  # diffs 0.9, 1.0, 1.1: std 0.1
    assert d["mean"] == pytest.approx(1.0)
    assert d["half_width"] == pytest.approx(4.302653 * 0.1 / math.sqrt(3), rel=1e-5)  # t(0.975, 2)
    assert d["resolved"] is True
    wide = runner.paired_difference([1.0, 2.0, 3.5], [0.5, 1.0, 2.0])  # diffs 0.5, 1, 1.5: +-1.24
    assert wide["mean"] == pytest.approx(1.0) and wide["resolved"] is False
    assert runner.paired_difference([1.0, 2.0], [2.0, 1.0])["resolved"] is False
    assert runner.spread([2.0])["std"] is None


def test_viz_reads_the_quick_results(quick):
    bal, arch = quick["balancing"], quick["architecture"]
    rows = viz.summary_rows(bal, ["val_ce", "max_vio_global"])
    assert [r["variant"] for r in rows] == list(bal["setup"]["variants"])
    assert viz.markdown_table(rows).count("\n") == len(rows) + 1
    assert len(viz.difference_rows(arch, "minus_gshard", ["val_ce"])) == 2
    assert len(viz.metric_bars(bal, "max_vio_global").data) == 1 + 2
    assert len(viz.tradeoff_figure(bal).data) == 9
    assert len(viz.curves_figure(arch).data) == 2 * 3
    assert len(viz.ablation_figure(arch).data) == 2


def test_balancing_variants_change_only_the_balancing_fields():
    base = balancing.base_config(balancing.FULL)
    assert (base.model.moe.aux_loss, base.model.moe.bias_update, base.model.moe.score_func) == (
        "none", "none", "sigmoid")
    allowed = {"aux_loss", "aux_loss_alpha", "bias_update", "bias_update_speed", "bias_update_rule"}
    for name, changes in balancing.variants(balancing.FULL).items():
        cfg = balancing.variant_config(base, changes, seed=2)
        assert cfg.seed == 2 and cfg.replace(seed=0, model=base.model) == base, name
        changed = {k for k, v in cfg.model.moe.to_dict().items() if v != base.model.moe.to_dict()[k]}
        assert changed <= allowed and (changed or name == "none"), (name, changed)
