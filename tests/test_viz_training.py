"""moe_lib.viz.training: metrics reading, per-layer columns and the training figures."""

from __future__ import annotations

import json

import pytest

from moe_lib.train.data import eval_windows, synthetic_corpus
from moe_lib.train.loop import Trainer
from moe_lib.train.presets import make_config
from moe_lib.viz import training as vt
from moe_lib.viz.widgets import static_slider


@pytest.fixture(scope="module")
def records():
    corpus = synthetic_corpus(n_documents=300, seed=1)
    cfg = make_config("test", corpus="synthetic", steps=4, grad_accum=1)
    trainer = Trainer.create(cfg, corpus)
    val = eval_windows(corpus.val, cfg.model.max_seq_len, 4)
    out = []
    for _ in range(cfg.steps):
        record = trainer.train_step()
        if trainer.step % 2 == 0:
            record.update(trainer.evaluate(val))
        out.append(record)
    return out


def test_read_metrics_sorts_and_skips_blank_lines(tmp_path, records):
    path = tmp_path / "metrics.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in reversed(records)) + "\n\n")
    assert [r["step"] for r in vt.read_metrics(path)] == [1, 2, 3, 4]


def test_columns(records):
    assert vt.column(records, "val_ce")[0] == [2, 4]
    layers = vt.layer_columns(records, "bias")
    assert list(layers) == ["layers.1.mlp", "mtp.0.mlp"] and vt.main_layers(records) == ["layers.1.mlp"]
    steps, biases = layers["layers.1.mlp"]
    assert steps == [1, 2, 3, 4] and len(biases[0]) == 8


def test_figures(records):
    fig = vt.loss_figure(records, bigram=2.5)
    assert [len(t.x) for t in fig.data] == [4, 2]
    assert len(vt.balance_figure(records).data) == 4
    assert vt.centred_norms([[1.0, 1.0], [2.0, 0.0]]) == [0.0, 2**0.5]
    bias = vt.make_bias_figure("layers.1.mlp", records)
    assert len(bias.data[0].z) == 8 and len(bias.data[0].z[0]) == 4
    assert bias.data[0].zmin == -bias.data[0].zmax
    slider = static_slider(vt.make_bias_figure, "layer", ["layers.1.mlp", "mtp.0.mlp"], records=records)
    assert len(slider.data) == 2


def test_shipped_checkpoint_is_found_or_named(tmp_path, monkeypatch):
    run = tmp_path / "checkpoints" / "mine"
    run.mkdir(parents=True)
    (run / "config.json").write_text("{}")
    monkeypatch.chdir(tmp_path / "checkpoints")
    assert vt.shipped_checkpoint("mine") == run
    with pytest.raises(FileNotFoundError, match="checkpoints/absent"):
        vt.shipped_checkpoint("absent")
