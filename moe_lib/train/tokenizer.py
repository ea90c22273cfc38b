"""Tokenizers: UTF-8 bytes (vocab 256), or a byte-level BPE trained locally on the training split.

Both map text to ids whose first 256 values are the bytes themselves, so byte 0 (the document
separator of the corpora) is id 0 under either, and any text is representable.

BPE (Sennrich et al., 2016), byte-level as in GPT-2: the text is first cut into chunks by
`CHUNK_PATTERN` (an identifier or word with at most one leading space, a run of digits, a run of
other symbols, or whitespace), so merges never cross a chunk boundary; then, starting from bytes,
the most frequent adjacent pair of ids over the training chunks is merged into a new id, again and
again, until the vocabulary has `vocab_size` ids. Ties go to the smallest pair, so training is
deterministic. Encoding applies the merges in the order they were learned (lowest rank first).

Why BPE for the tiny model: at the same steps and step cost, a Python byte costs fewer model
positions (about 2.7 bytes per id at vocab 1024 on the standard library), so the same 10 minutes
of training see about 2.7 times more code, and a 256-position window holds about 700 bytes.
"""

from __future__ import annotations

import heapq
import json
import re
from collections import Counter, defaultdict
from collections.abc import Iterable
from itertools import pairwise
from pathlib import Path

import torch

TOKENIZER_FILE = "tokenizer.json"
KINDS = ("bytes", "bpe")
CHUNK_PATTERN = rb" ?[A-Za-z_][A-Za-z_0-9]*| ?[0-9]+| ?[^\sA-Za-z_0-9]+|\s+(?!\S)|\s+"
_CHUNKS = re.compile(CHUNK_PATTERN)


def chunks(data: bytes) -> list[bytes]:
    """`data` cut into the pieces BPE merges within (their concatenation is `data`)."""
    return _CHUNKS.findall(data)


class ByteTokenizer:
    """Token ids are the UTF-8 bytes of the text (vocab 256): nothing to train or ship."""

    kind = "bytes"
    vocab_size = 256

    def encode(self, text: str) -> torch.Tensor:
        """Token ids of `text` as a 1-D int64 tensor."""
        return torch.tensor(self.encode_bytes(_utf8(text)), dtype=torch.long)

    def encode_bytes(self, data: bytes) -> list[int]:
        return list(data)

    def decode(self, ids: torch.Tensor | Iterable[int]) -> str:
        """Ids back to text (an invalid UTF-8 sequence, e.g. a cut multi-byte char, becomes U+FFFD)."""
        return b"".join(self.token_bytes(i) for i in _ids(ids, self.vocab_size)).decode(
            "utf-8", errors="replace")

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes that id `token_id` stands for."""
        return bytes([token_id])

    def to_dict(self) -> dict:
        return {"kind": self.kind}

    def __eq__(self, other) -> bool:
        return type(other) is type(self) and other.to_dict() == self.to_dict()

    def __repr__(self) -> str:
        return f"{type(self).__name__}(vocab_size={self.vocab_size})"


class BPETokenizer(ByteTokenizer):
    """Byte-level BPE: ids 0-255 are bytes, id 256 + r is the r-th merge `merges[r] = (a, b)`."""

    kind = "bpe"

    def __init__(self, merges: Iterable[tuple[int, int]]):
        self.merges = [(int(a), int(b)) for a, b in merges]
        self.vocab_size = 256 + len(self.merges)
        self._rank = {}
        self._bytes = [bytes([i]) for i in range(256)]
        for r, (a, b) in enumerate(self.merges):
            if not (0 <= a < 256 + r and 0 <= b < 256 + r):
                raise ValueError(f"merge {r} = ({a}, {b}) refers to an id not defined before it "
                                 f"(ids below {256 + r} are)")
            self._rank[(a, b)] = r
            self._bytes.append(self._bytes[a] + self._bytes[b])
        self._cache: dict[bytes, list[int]] = {}

    @classmethod
    def train(cls, documents: Iterable[bytes], vocab_size: int) -> BPETokenizer:
        """Learn `vocab_size - 256` merges from the chunks of `documents` (module docstring).

        Raises ValueError if vocab_size <= 256 or the documents run out of pairs to merge first.
        """
        if not isinstance(vocab_size, int) or vocab_size <= 256:
            raise ValueError(f"vocab_size={vocab_size!r} is invalid for BPE: expected an integer > 256 "
                             "(ids 0-255 are the bytes)")
        counts = Counter(c for doc in documents for c in chunks(doc))
        words = [list(c) for c in counts]
        freqs = list(counts.values())
        pair_count: dict[tuple[int, int], int] = defaultdict(int)
        where: dict[tuple[int, int], set[int]] = defaultdict(set)
        for i, (word, f) in enumerate(zip(words, freqs, strict=True)):
            for pair in pairwise(word):
                pair_count[pair] += f
                where[pair].add(i)
        heap = [(-n, pair) for pair, n in pair_count.items()]
        heapq.heapify(heap)
        merges = []
        while len(merges) < vocab_size - 256:
            while heap and (-heap[0][0] != pair_count.get(heap[0][1], 0) or heap[0][0] == 0):
                heapq.heappop(heap)  # stale entry: the pair's count changed since it was pushed
            if not heap:
                raise ValueError(f"the documents have only {len(merges)} pairs to merge: "
                                 f"vocab_size {vocab_size} needs {vocab_size - 256}")
            _, pair = heapq.heappop(heap)
            new_id = 256 + len(merges)
            merges.append(pair)
            changed = set()
            for i in sorted(where.pop(pair)):
                word, f = words[i], freqs[i]
                merged = _merge(word, pair, new_id)
                if len(merged) == len(word):
                    continue  # stale index: the pair left this word in an earlier merge
                for p in pairwise(word):
                    pair_count[p] -= f
                    changed.add(p)
                for p in pairwise(merged):
                    pair_count[p] += f
                    where[p].add(i)
                    changed.add(p)
                words[i] = merged
            pair_count.pop(pair, None)
            for p in changed:
                if pair_count.get(p, 0) > 0:
                    heapq.heappush(heap, (-pair_count[p], p))
        return cls(merges)

    def encode_bytes(self, data: bytes) -> list[int]:
        out: list[int] = []
        for chunk in chunks(data):
            ids = self._cache.get(chunk)
            if ids is None:
                ids = self._cache[chunk] = self._encode_chunk(chunk)
            out += ids
        return out

    def _encode_chunk(self, chunk: bytes) -> list[int]:
        ids = list(chunk)
        rank = self._rank
        while len(ids) > 1:
            best = min(pairwise(ids), key=lambda p: rank.get(p, len(rank)))
            if best not in rank:
                break
            ids = _merge(ids, best, 256 + rank[best])
        return ids

    def token_bytes(self, token_id: int) -> bytes:
        return self._bytes[token_id]

    def to_dict(self) -> dict:
        return {"kind": self.kind, "chunk_pattern": CHUNK_PATTERN.decode("ascii"),
                "merges": [list(m) for m in self.merges]}


def _merge(ids: list[int], pair: tuple[int, int], new_id: int) -> list[int]:
    out, i, n = [], 0, len(ids)
    a, b = pair
    while i < n:
        if i + 1 < n and ids[i] == a and ids[i + 1] == b:
            out.append(new_id)
            i += 2
        else:
            out.append(ids[i])
            i += 1
    return out


def _utf8(text) -> bytes:
    if not isinstance(text, str):
        raise TypeError(f"expected text (str), got {type(text).__name__}")
    return text.encode("utf-8")


def _ids(ids, vocab_size: int) -> list[int]:
    ids = ids.tolist() if isinstance(ids, torch.Tensor) else list(ids)
    bad = [i for i in ids if not isinstance(i, int) or not 0 <= i < vocab_size]
    if bad:
        raise ValueError(f"token id(s) {bad[:5]} out of range: the vocabulary has ids 0..{vocab_size - 1}")
    return ids


def tokenizer_from_dict(data: dict) -> ByteTokenizer:
    """The tokenizer that `to_dict()` described."""
    kind = data.get("kind")
    if kind == "bytes":
        return ByteTokenizer()
    if kind == "bpe":
        if data.get("chunk_pattern", CHUNK_PATTERN.decode("ascii")) != CHUNK_PATTERN.decode("ascii"):
            raise ValueError("this BPE was trained with a different chunk pattern than this moe_lib uses")
        return BPETokenizer(data["merges"])
    raise ValueError(f"unknown tokenizer kind {kind!r}: expected one of {KINDS}")


def save_tokenizer(tokenizer: ByteTokenizer, directory: str | Path) -> Path:
    """Write `directory/tokenizer.json`; returns its path."""
    path = Path(directory) / TOKENIZER_FILE
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(tokenizer.to_dict()) + "\n")
    tmp.replace(path)
    return path


def load_tokenizer(directory: str | Path) -> ByteTokenizer:
    """The tokenizer of the checkpoint in `directory`: its `tokenizer.json`, or bytes if it has none
    (checkpoints of byte-level models need no file)."""
    path = Path(directory) / TOKENIZER_FILE
    if not Path(directory).is_dir():
        raise FileNotFoundError(f"checkpoint directory {directory} does not exist")
    if not path.exists():
        return ByteTokenizer()
    try:
        tokenizer = tokenizer_from_dict(json.loads(path.read_text()))
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
        raise ValueError(f"{path} does not hold a valid tokenizer: {err}") from err
    config = Path(directory) / "config.json"
    if config.exists():
        try:
            vocab = json.loads(config.read_text()).get("vocab_size")
        except json.JSONDecodeError:
            vocab = None  # load_checkpoint names that file's problem
        if vocab is not None and vocab != tokenizer.vocab_size:
            raise ValueError(f"{path} has {tokenizer.vocab_size} ids but {config} says vocab_size "
                             f"{vocab}: the files belong to different checkpoints")
    return tokenizer
