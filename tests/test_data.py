"""moe_lib.train.data: corpus split, byte tokens, windows and positions, bigram baseline, synthetic data."""

from __future__ import annotations

import bisect
import math
import random

import pytest
import torch

from moe_lib.train.data import (
    DOC_SEPARATOR,
    DOMAINS,
    Windows,
    bigram_cross_entropy,
    bigram_log_probs,
    decode,
    encode,
    eval_windows,
    in_validation,
    stdlib_corpus,
    synthetic_corpus,
)


def _tree(root, names: list[str]) -> None:
    rng = random.Random(1)
    for name in names:
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(f"# {name}\nx = {rng.randrange(10**6)}\n")


def test_split_is_by_file_deterministic_and_disjoint(tmp_path):
    names = [f"pkg{i % 7}/mod_{i}.py" for i in range(300)]
    _tree(tmp_path / "a", names)
    _tree(tmp_path / "b", list(reversed(names)))  # other creation order, same relative paths
    excluded = ["test/test_x.py", "site-packages/lib.py", "pkg0/tests/t.py", "__pycache__/c.py"]
    _tree(tmp_path / "a", excluded + ["notes.txt"])
    a, b = stdlib_corpus(tmp_path / "a", 0.1), stdlib_corpus(tmp_path / "b", 0.1)
    assert a.train_files == b.train_files and a.val_files == b.val_files
    assert set(a.train_files).isdisjoint(a.val_files)
    assert sorted(a.train_files + a.val_files) == sorted(names)  # excluded dirs and non-.py left out
    assert 10 <= len(a.val_files) <= 50  # ~10% of 300
    val_text = decode(a.val)
    assert all(f"# {name}\n" in val_text for name in a.val_files)
    assert not any(f"# {name}\n" in val_text for name in a.train_files)
    assert a.val.tolist().count(DOC_SEPARATOR) == len(a.val_files) - 1


def test_validation_fraction_of_the_hash_split():
    names = [f"dir/file_{i}.py" for i in range(4000)]
    share = sum(in_validation(n, 0.2) for n in names) / len(names)
    assert abs(share - 0.2) < 0.03
    assert all(in_validation(n, 0.2) <= in_validation(n, 0.4) for n in names)  # nested splits


def test_stdlib_corpus_of_this_machine():
    corpus = stdlib_corpus()
    assert corpus.train.numel() > 10**6 and corpus.val.numel() > 10**4
    assert set(corpus.train_files).isdisjoint(corpus.val_files)
    assert "os.py" in corpus.train_files + corpus.val_files
    assert not any("/test/" in f or f.startswith("test/") for f in corpus.train_files + corpus.val_files)
    assert corpus.describe() == stdlib_corpus().describe()


def test_split_needs_both_sides(tmp_path):
    _tree(tmp_path, ["only.py"])
    with pytest.raises(ValueError, match="both splits need at least one file"):
        stdlib_corpus(tmp_path, 0.5)
    with pytest.raises(ValueError, match="val_fraction"):
        stdlib_corpus(tmp_path, 1.5)


def test_encode_decode_round_trip():
    text = "def f(x):\n    return 'é' + \"ü\"  # ok\n"
    ids = encode(text)
    assert ids.dtype == torch.long and int(ids.max()) < 256 and len(ids) == len(text.encode())
    assert decode(ids) == text
    assert decode(ids[:-8].tolist() + [0xC3]) == text[:-8] + "\ufffd"  # a cut UTF-8 char


def test_random_windows_are_slices_and_resume_exactly():
    tokens = torch.randint(0, 256, (5000,), dtype=torch.uint8)
    starts = Windows(tokens, seq_len=31, batch_size=4, seed=3).next_starts()
    w = Windows(tokens, seq_len=31, batch_size=4, seed=3)
    batch = w.next_batch()
    assert batch.shape == (4, 32) and batch.dtype == torch.long
    for row, start in zip(batch, starts.tolist(), strict=True):
        assert torch.equal(row, tokens[start:start + 32].long())
    assert not torch.equal(w.next_batch(), batch)
    state = w.state_dict()
    expected = [w.next_batch() for _ in range(3)]
    resumed = Windows(tokens, seq_len=31, batch_size=4, seed=99)
    resumed.load_state_dict(state)
    assert all(torch.equal(a, resumed.next_batch()) for a in expected)
    assert resumed.batches == w.batches == 5


def test_sequential_windows_are_consecutive_and_wrap():
    tokens = torch.arange(100, dtype=torch.uint8)
    w = Windows(tokens, seq_len=9, batch_size=3, seed=0, sequential=True)
    first, second = w.next_batch(), w.next_batch()
    assert first[:, 0].tolist() == [0, 10, 20] and second[:, 0].tolist() == [30, 40, 50]
    assert torch.equal(first[0], torch.arange(10))
    for _ in range(5):
        batch = w.next_batch()
        assert torch.equal(batch, tokens[batch[:, :1] + torch.arange(10)].long())  # always valid slices


def test_windows_reject_short_streams():
    with pytest.raises(ValueError, match="at least seq_len"):
        Windows(torch.zeros(10, dtype=torch.uint8), seq_len=16, batch_size=2, seed=0)


def test_eval_windows_all_or_evenly_spaced():
    tokens = torch.randint(0, 256, (1000,), dtype=torch.uint8)
    every = eval_windows(tokens, 9, None)
    assert every.shape == (1000 // 10, 10)
    assert torch.equal(every.reshape(-1), tokens[:1000].long())
    spaced = eval_windows(tokens, 9, 5)
    assert spaced.shape == (5, 10)
    assert torch.equal(spaced[0], tokens[:10].long()) and torch.equal(spaced[-1], tokens[-10:].long())


def test_bigram_matches_the_entropy_rate_of_a_markov_chain():
    gen = torch.Generator().manual_seed(0)
    vocab = 8
    transition = torch.softmax(2 * torch.randn(vocab, vocab, generator=gen), dim=1)
    cumulative = transition.cumsum(dim=1).tolist()
    stream = [0]
    for u in torch.rand(200_000, generator=gen).tolist():
        stream.append(min(bisect.bisect(cumulative[stream[-1]], u), vocab - 1))
    tokens = torch.tensor(stream, dtype=torch.uint8)
    train, val = tokens[:150_000], tokens[150_000:]
    stationary = torch.bincount(train.long(), minlength=vocab).double() / len(train)
    entropy_rate = -(stationary[:, None] * transition * transition.log()).sum().item()
    log_p = bigram_log_probs(train, vocab_size=vocab)
    assert torch.allclose(log_p.exp().sum(dim=1), torch.ones(vocab, dtype=torch.float64))
    ce = -log_p[val[:-1].long(), val[1:].long()].mean().item()
    assert abs(ce - entropy_rate) < 0.02
    unigram = -(stationary * stationary.log()).sum().item()
    assert ce < unigram - 0.1


def test_bigram_cross_entropy_on_windows():
    tokens = torch.tensor(list(b"abcd" * 500), dtype=torch.uint8)
    windows = eval_windows(tokens, 15, None)
    ce = bigram_cross_entropy(tokens, windows)
    # add-one smoothing leaves (n(a, b) + 1) / (n(a) + 256) on the one successor of each byte
    assert ce == pytest.approx(-math.log(501 / (500 + 256)), abs=1e-3)


def test_synthetic_corpus_labels_and_content():
    corpus = synthetic_corpus(n_documents=400, seed=5)
    assert corpus.domains == DOMAINS
    assert corpus.train_domains.shape == corpus.train.shape and corpus.val_domains.shape == corpus.val.shape
    assert set(corpus.train_domains.tolist()) == set(range(len(DOMAINS)))
    text, labels = decode(corpus.train), corpus.train_domains.tolist()
    pos = 0
    for line in text.splitlines(keepends=True):
        span = set(labels[pos:pos + len(line)])
        assert len(span) == 1
        domain = DOMAINS[span.pop()]
        if domain == "arithmetic":
            lhs, rhs = line.strip().split("=")
            assert eval(lhs) == int(rhs)  # noqa: S307 - our own generated digits and operators
        elif domain == "sorting":
            given, result = line[5:].split(" -> ")
            assert sorted(map(int, given.split())) == list(map(int, result.split()))
        pos += len(line)
    again = synthetic_corpus(n_documents=400, seed=5)
    assert torch.equal(again.train, corpus.train) and torch.equal(again.val, corpus.val)
    assert not torch.equal(synthetic_corpus(n_documents=400, seed=6).train[:200], corpus.train[:200])
