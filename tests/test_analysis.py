"""moe_lib.analysis: token classes of Python source, routing traces, mutual information."""

from __future__ import annotations

import math
from collections import Counter

import pytest
import torch
from model_utils import make_model, tiny_model_cfg

from moe_lib.analysis import (
    TOKEN_CLASSES,
    class_expert_counts,
    classes_of_tokens,
    mutual_information,
    routing_trace,
    shuffle_labels,
    token_at,
    token_classes,
)
from moe_lib.train.tokenizer import BPETokenizer, ByteTokenizer


def _spans(source: str) -> list[tuple[str, bytes]]:
    labels, data = token_classes(source).tolist(), source.encode()
    spans, start = [], 0
    for i in range(1, len(labels) + 1):
        if i == len(labels) or labels[i] != labels[start]:
            spans.append((TOKEN_CLASSES[labels[start]], data[start:i]))
            start = i
    return spans


def test_token_classes_of_a_snippet():
    source = 'def f(x):  # note\n    """doc é\n    more"""\n    return x + 10\n'
    assert _spans(source) == [
        ("keyword", b"def"), ("space", b" "), ("identifier", b"f"), ("operator", b"("), ("identifier", b"x"),
        ("operator", b"):"), ("space", b"  "), ("comment", b"# note"), ("newline", b"\n"),
        ("indentation", b"    "), ("string", '"""doc é\n    more"""'.encode()), ("newline", b"\n"),
        ("indentation", b"    "), ("keyword", b"return"), ("space", b" "), ("identifier", b"x"),
        ("space", b" "), ("operator", b"+"), ("space", b" "), ("number", b"10"), ("newline", b"\n")]


def test_token_classes_cover_every_byte_and_survive_broken_code():
    for source in ("x = 'é ü'\n", 'x = """never closed\n  y = 1\n', "  bad\n dedent\n", ""):
        labels = token_classes(source)
        assert labels.shape == (len(source.encode()),)
        assert labels.dtype == torch.long and (labels < len(TOKEN_CLASSES)).all()


def test_classes_of_bpe_tokens_follow_most_of_their_bytes():
    source = "def f(x):\n    return x + 10\n"
    tok = BPETokenizer.train([source.encode() * 4, b"x = 10 + 10 return x return y return z return" * 4], 275)
    ids = tok.encode(source)
    names = [TOKEN_CLASSES[c] for c in classes_of_tokens(token_classes(source), ids, tok).tolist()]
    texts = [tok.token_bytes(i) for i in ids.tolist()]
    assert dict(zip(texts, names, strict=True))[b" return"] == "keyword"  # 6 keyword bytes, 1 space
    assert dict(zip(texts, names, strict=True))[b" 10"] == "number"
    assert len(names) == len(ids) < len(source)
    assert texts[token_at(ids, tok, source.index("return"))] == b" return"
    assert token_at(torch.tensor(list(b"abc")), ByteTokenizer(), 2) == 2
    with pytest.raises(ValueError, match="cover 3 bytes but 2 byte classes"):
        classes_of_tokens(torch.zeros(2, dtype=torch.long), torch.tensor(list(b"abc")), ByteTokenizer())
    with pytest.raises(ValueError, match="outside the 3 bytes"):
        token_at(torch.tensor(list(b"abc")), ByteTokenizer(), 3)


def test_routing_trace_matches_the_layers_and_spans_windows():
    cfg = tiny_model_cfg()
    model = make_model(cfg).train()
    bias_before = [m.gate.tokens_per_expert.clone() for m in model.moe_layers()]
    ids = torch.randint(0, cfg.vocab_size, (2 * cfg.max_seq_len + 7,))
    trace = routing_trace(model, ids, batch_size=1)
    assert torch.equal(routing_trace(model, ids).indices, trace.indices), "batched windows route alike"
    assert model.training, "the model's mode is restored"
    assert all(torch.equal(m.gate.tokens_per_expert, b)
               for m, b in zip(model.moe_layers(), bias_before, strict=True))
    n_moe = cfg.n_layers - cfg.n_dense_layers
    assert trace.layers == tuple(range(cfg.n_dense_layers, cfg.n_layers))
    assert trace.indices.shape == (n_moe, ids.numel(), cfg.moe.top_k)
    assert trace.scores.shape == (n_moe, ids.numel(), cfg.moe.n_routed)
    model.eval()
    with torch.no_grad():  # the second window is read from its own start
        model(ids[cfg.max_seq_len:2 * cfg.max_seq_len].unsqueeze(0))
    for layer, moe in enumerate(model.moe_layers()):
        second = trace.indices[layer, cfg.max_seq_len:2 * cfg.max_seq_len]
        assert torch.equal(second, moe.last_routing.indices)
    short = routing_trace(model, ids[:5])  # shorter than one window
    assert torch.equal(short.indices, trace.indices[:, :5])
    with pytest.raises(ValueError, match="1-D"):
        routing_trace(model, ids.view(1, -1))


def test_class_expert_counts_by_loop():
    gen = torch.Generator().manual_seed(1)
    indices = torch.randint(0, 6, (50, 3), generator=gen)
    labels = torch.randint(0, 4, (50,), generator=gen)
    counts = class_expert_counts(indices, labels, 4, 6)
    expected = torch.zeros(4, 6, dtype=torch.long)
    for t in range(50):
        for e in indices[t]:
            expected[labels[t], e] += 1
    assert torch.equal(counts, expected)


def _mi_by_counting(indices, labels, given):
    triples = Counter((int(g), int(c), int(e))
                      for g, c, row in zip(given, labels, indices, strict=True) for e in row)
    n = sum(triples.values())
    p_g, p_gc, p_ge = Counter(), Counter(), Counter()
    for (g, c, e), k in triples.items():
        p_g[g] += k / n
        p_gc[g, c] += k / n
        p_ge[g, e] += k / n
    return sum(k / n * math.log2((k / n) * p_g[g] / (p_gc[g, c] * p_ge[g, e]))
               for (g, c, e), k in triples.items())


def test_mutual_information_against_counting_and_limits():
    gen = torch.Generator().manual_seed(2)
    indices = torch.randint(0, 5, (300, 2), generator=gen)
    labels = (indices[:, 0] + torch.randint(0, 2, (300,), generator=gen)) % 3
    given = torch.randint(0, 4, (300,), generator=gen)
    assert mutual_information(indices, labels) == pytest.approx(_mi_by_counting(indices, labels, [0] * 300))
    expected = _mi_by_counting(indices, labels, given)
    assert mutual_information(indices, labels, given) == pytest.approx(expected)
    four = torch.arange(400) % 4                      # the expert is a function of the label: I = H(C)
    assert mutual_information(four.view(-1, 1), four) == pytest.approx(2.0)
    assert mutual_information(four.view(-1, 1), four, four) == pytest.approx(0.0, abs=1e-12)
    with pytest.raises(ValueError, match="labels"):
        mutual_information(indices, labels[:-1])


def test_shuffled_labels_keep_counts_and_lose_the_information():
    gen = torch.Generator().manual_seed(3)
    labels = torch.arange(2000) % 4
    given = torch.randint(0, 3, (2000,), generator=gen)
    indices = labels.view(-1, 1)
    for g in (None, given):
        shuffled = shuffle_labels(labels, torch.Generator().manual_seed(0), g)
        assert torch.equal(shuffled.sort().values, labels.sort().values)
        assert mutual_information(indices, shuffled, g) < 0.02
    within = shuffle_labels(labels, torch.Generator().manual_seed(0), given)
    for value in range(3):
        assert torch.equal(within[given == value].sort().values, labels[given == value].sort().values)
