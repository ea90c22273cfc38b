"""moe_lib.train.tokenizer: bytes and the locally trained byte-level BPE; corpora in BPE ids; BPE
training runs, checkpoints and resume."""

from __future__ import annotations

import json
from collections import Counter
from itertools import pairwise

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from moe_lib import load_checkpoint, load_tokenizer
from moe_lib.train import loop
from moe_lib.train.checkpoint import save_checkpoint
from moe_lib.train.data import DOC_SEPARATOR, bytes_per_token, synthetic_corpus
from moe_lib.train.loop import Trainer, prepare_data, train
from moe_lib.train.presets import make_config
from moe_lib.train.tokenizer import (
    BPETokenizer,
    ByteTokenizer,
    chunks,
    save_tokenizer,
    tokenizer_from_dict,
)

SOURCE = b'''import os


class Reader:
    """Read the lines of a file."""

    def __init__(self, path, encoding="utf-8"):
        self.path = path
        self.encoding = encoding

    def read(self):
        with open(self.path, encoding=self.encoding) as f:
            return [line.rstrip() for line in f]
'''


@pytest.fixture(scope="module")
def bpe() -> BPETokenizer:
    return BPETokenizer.train([SOURCE, SOURCE.replace(b"Reader", b"Writer")], 300)


@given(st.binary(max_size=200))
def test_chunks_cover_every_byte(data):
    assert b"".join(chunks(data)) == data


@settings(deadline=None)
@given(st.text(max_size=200))
def test_round_trip_of_any_text(bpe, text):
    for tok in (ByteTokenizer(), bpe):
        ids = tok.encode(text)
        assert ids.dtype == torch.long and (ids.numel() == 0 or int(ids.max()) < tok.vocab_size)
        assert tok.decode(ids) == text


def test_training_merges_the_most_frequent_pair_first_and_is_deterministic(bpe):
    assert bpe.vocab_size == 300 and len(bpe.merges) == 44
    assert BPETokenizer.train([SOURCE, SOURCE.replace(b"Reader", b"Writer")], 300).merges == bpe.merges
    pairs = Counter(p for c in chunks(SOURCE) for p in pairwise(c))
    n_best = max(pairs.values())
    assert pairs[bpe.merges[0]] == n_best
    assert bpe.merges[0] == min(p for p, n in pairs.items() if n == n_best)  # ties: smallest pair
    assert all(bpe.token_bytes(256 + r) == bpe.token_bytes(a) + bpe.token_bytes(b)
               for r, (a, b) in enumerate(bpe.merges))


def test_bpe_compresses_and_uses_its_merges(bpe):
    ids = bpe.encode(SOURCE.decode())
    assert len(ids) < 0.6 * len(SOURCE)
    self_id = next(i for i in range(256, 300) if bpe.token_bytes(i) == b" self")
    assert bpe.encode(" self").tolist() == [self_id]
    assert len(bpe.encode("zqxj")) == 4  # unseen text falls back to bytes


def test_bad_input_is_named(bpe):
    with pytest.raises(ValueError, match="vocab_size=256 is invalid"):
        BPETokenizer.train([SOURCE], 256)
    with pytest.raises(ValueError, match="only 3 pairs to merge"):
        BPETokenizer.train([b"abcd"], 300)
    with pytest.raises(ValueError, match=r"token id\(s\) \[300\] out of range"):
        bpe.decode([1, 300])
    with pytest.raises(ValueError, match="out of range"):
        ByteTokenizer().decode([-1])
    with pytest.raises(TypeError, match="expected text"):
        bpe.encode(b"bytes")
    with pytest.raises(ValueError, match="refers to an id not defined"):
        BPETokenizer([(256, 1)])
    with pytest.raises(ValueError, match="unknown tokenizer kind 'wordpiece'"):
        tokenizer_from_dict({"kind": "wordpiece"})


def test_files_round_trip_and_mismatches_are_refused(tmp_path, bpe):
    assert load_tokenizer(save_tokenizer(bpe, tmp_path).parent) == bpe
    (tmp_path / "tokenizer.json").write_text('{"kind": "bpe", "merges": [[1, 2]')
    with pytest.raises(ValueError, match="tokenizer.json does not hold a valid tokenizer"):
        load_tokenizer(tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_tokenizer(tmp_path / "missing")
    model = Trainer.create(make_config("test"), synthetic_corpus(n_documents=50)).model
    save_checkpoint(tmp_path / "ckpt", model)
    assert load_tokenizer(tmp_path / "ckpt") == ByteTokenizer()  # no file: bytes
    with pytest.raises(ValueError, match="the tokenizer has 300 ids but the model's vocab_size is 256"):
        save_checkpoint(tmp_path / "ckpt", model, tokenizer=bpe)
    save_tokenizer(bpe, tmp_path / "ckpt")
    with pytest.raises(ValueError, match="300 ids but .*vocab_size 256"):
        load_tokenizer(tmp_path / "ckpt")


def test_corpus_in_bpe_ids_keeps_documents_and_domains():
    corpus = synthetic_corpus(n_documents=400, seed=0)
    tok = BPETokenizer.train(corpus.documents("train"), 320)
    bpe_corpus = corpus.tokenized(tok)
    assert bpe_corpus.train.numel() < 0.7 * corpus.train.numel()
    assert tok.decode(bpe_corpus.train).encode() == bytes(corpus.train.numpy())
    assert bpe_corpus.train_domains.shape == bpe_corpus.train.shape
    # every id keeps the domain of its bytes
    starts = torch.tensor([0] + [len(tok.token_bytes(int(i))) for i in bpe_corpus.val[:-1]]).cumsum(0)
    assert torch.equal(bpe_corpus.val_domains.long(), corpus.val_domains[starts].long())
    assert corpus.tokenized(ByteTokenizer()) is corpus
    windows = bpe_corpus.val[:65].long().view(1, -1)
    assert bytes_per_token(windows, tok) == pytest.approx(
        sum(len(tok.token_bytes(int(i))) for i in windows[0, 1:]) / 64)


def test_config_ties_the_vocabulary_to_the_tokenizer():
    cfg = make_config("test")
    with pytest.raises(ValueError, match="model.vocab_size=256 is invalid: expected more than 256"):
        cfg.replace(tokenizer="bpe")
    with pytest.raises(ValueError, match="model.vocab_size=300 is invalid: expected 256"):
        cfg.replace(model=cfg.model.replace(vocab_size=300))
    with pytest.raises(ValueError, match="TrainConfig.tokenizer='sentencepiece'"):
        cfg.replace(tokenizer="sentencepiece")
    with pytest.raises(ValueError, match="the tokenizer has 256 ids but model.vocab_size is 300"):
        Trainer.create(cfg.replace(tokenizer="bpe", model=cfg.model.replace(vocab_size=300)),
                       synthetic_corpus(n_documents=50))


def test_a_bpe_run_saves_its_tokenizer_and_resumes_bit_identically(tmp_path):
    cfg = make_config("test", corpus="synthetic", steps=4, eval_every=2)
    cfg = cfg.replace(tokenizer="bpe", model=cfg.model.replace(vocab_size=320))
    corpus, tok = prepare_data(cfg)
    assert tok.vocab_size == 320 and corpus.train.dtype == torch.int32
    assert int(corpus.train.max()) >= 256  # merged ids are used
    summary = train(cfg, tmp_path / "straight", progress=False)
    assert summary["tokenizer"] == "bpe" and summary["val_bytes_per_token"] > 1.5
    assert summary["validation"]["val_ce_per_byte"] == pytest.approx(
        summary["validation"]["val_ce"] / summary["val_bytes_per_token"])
    assert load_tokenizer(tmp_path / "straight") == tok
    assert load_checkpoint(tmp_path / "straight").cfg.vocab_size == 320
    train(cfg, tmp_path / "resumed", progress=False, stop_after=2)
    train(cfg, tmp_path / "resumed", progress=False, resume=True)
    from safetensors.torch import load_file

    wa, wb = (load_file(tmp_path / d / "model.safetensors") for d in ("straight", "resumed"))
    assert all(torch.equal(wa[n], wb[n]) for n in wa)
    (tmp_path / "resumed" / "tokenizer.json").write_text(
        json.dumps(BPETokenizer(tok.merges[:-1] + [(1, 2)]).to_dict()))
    with pytest.raises(ValueError, match="its tokenizer.json differs from the tokenizer trained now"):
        train(cfg, tmp_path / "resumed", progress=False, resume=True)
    lines = (tmp_path / "straight" / loop.METRICS_FILE).read_text().splitlines()
    assert len(lines) == 4 and DOC_SEPARATOR == 0
