"""moe_lib.viz.routing: byte labels, the gate matrix, text routing, lift and specialisation figures."""

from __future__ import annotations

import torch
from model_utils import make_model, tiny_model_cfg

from moe_lib.analysis import routing_trace
from moe_lib.viz import routing as vr
from moe_lib.viz.widgets import static_slider


def _byte_model():
    return make_model(tiny_model_cfg(vocab_size=256))


def test_byte_labels():
    assert vr.byte_labels(torch.tensor([100, 32, 10, 9, 0, 200])) == ["d", "␣", "↵", "⇥", "·", "·"]


def test_gate_matrix_holds_the_selected_weights():
    model = _byte_model()
    ids = torch.randint(0, 256, (30,))
    trace = routing_trace(model, ids)
    gates = vr.gate_matrix(trace, model.cfg.moe.n_routed)
    assert gates.shape == (2, 8, 30)
    assert ((gates > 0).sum(1) == model.cfg.moe.top_k).all()
    assert torch.allclose(gates.sum(1), trace.weights.sum(-1).float())
    assert gates[0, trace.indices[0, 5, 1], 5] == trace.weights[0, 5, 1]


def test_text_routing_figure_one_trace_per_layer_for_any_text():
    model = _byte_model()
    fig = static_slider(lambda text: vr.make_text_routing_figure(text, model, max_tokens=20), "text",
                        ["def f(x):\n    return x", "é", ""])
    assert len(fig.data) == 3 * 2
    assert list(fig.layout.xaxis2.ticktext)[:4] == ["d", "e", "f", "␣"]
    assert len(fig.data[0].z[0]) == 20


def test_lift_figure_marks_preferences():
    counts = torch.tensor([[30, 10], [10, 30], [0, 0]])
    fig = vr.lift_figure({"a": counts}, ["x", "y", "none"])
    z = fig.data[0].z
    assert z[0][0] > 0 > z[0][1] and z[1][1] > 0 and list(z[2]) == [0.0, 0.0]


def test_specialisation_figure():
    fig = vr.specialisation_figure({"trained": [0.5, 0.25], "shuffled": [0.01, 0.02]}, ["l1", "l2"])
    assert len(fig.data) == 2 and list(fig.data[0].x) == ["l1", "l2"]


def test_text_routing_figure_in_bpe_tokens():
    from moe_lib.train.tokenizer import BPETokenizer

    tok = BPETokenizer.train([b"def f(x):\n    return x\n" * 3, b"    return y\n"], 270)
    model = make_model(tiny_model_cfg(vocab_size=270))
    fig = vr.make_text_routing_figure("def f(x):\n    return x", model, tokenizer=tok)
    ids = tok.encode("def f(x):\n    return x")
    assert len(fig.data[0].z[0]) == len(ids) < 20
    labels = list(fig.layout.xaxis2.ticktext)
    assert "".join(labels) == "def␣f(x):↵␣␣␣␣return␣x" and "␣return" in labels
    assert "tokens" in fig.layout.title.text
    try:
        vr.make_text_routing_figure("x", _byte_model(), tokenizer=tok)
    except ValueError as err:
        assert "270 ids but the model reads 256" in str(err)
    else:
        raise AssertionError("a tokenizer of another vocabulary must be refused")
