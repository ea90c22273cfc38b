"""Training data: the Python standard library corpus, a synthetic multi-domain corpus, seeded
windows with a resumable position, and the bigram baseline.

Corpora are built as UTF-8 byte streams (`encode(text)` is the UTF-8 encoding), with files joined by
byte 0 (`DOC_SEPARATOR`), which never occurs in Python source; `Corpus.tokenized(tokenizer)`
re-encodes them with a trained BPE (`tokenizer.py`), document by document, keeping id 0 between
documents.

The default corpus is the standard library found on this machine at run time (nothing downloaded,
nothing copied into the repository). The split is by FILE and deterministic: a file is in the
validation split iff a stable hash of its relative path falls below `val_fraction`, so the same
file lands on the same side on every run and every machine.

Bigram baseline: the add-one smoothed bigram model estimated on the train split,

    p(b | a) = (n(a, b) + 1) / (n(a) + V),

and its cross-entropy on validation targets (same tokens) is what a model must clearly beat to have
learned more than which token tends to follow which.
"""

from __future__ import annotations

import hashlib
import os
import random
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import torch

from .tokenizer import ByteTokenizer

VOCAB_SIZE = 256
DOC_SEPARATOR = 0
EXCLUDED_DIRS = frozenset({"site-packages", "dist-packages", "__pycache__", "test", "tests", "idle_test"})
DOMAINS = ("arithmetic", "sorting", "prose", "code")


def encode(text: str) -> torch.Tensor:
    """UTF-8 bytes of `text` as a 1-D int64 tensor of token ids in [0, 256)."""
    return torch.tensor(list(text.encode("utf-8")), dtype=torch.long)


def decode(ids: torch.Tensor | list[int]) -> str:
    """Token ids back to text (invalid UTF-8 sequences, e.g. a cut multi-byte char, become U+FFFD)."""
    ids = ids.tolist() if isinstance(ids, torch.Tensor) else ids
    return bytes(ids).decode("utf-8", errors="replace")


@dataclass(frozen=True)
class Corpus:
    """A token stream split into train and validation.

    train / val: 1-D token streams (uint8 bytes, or int32 ids after `tokenized`).
    train_domains / val_domains: per-token domain index into
    `domains` (synthetic corpus only, else None). train_files / val_files: the documents of each split.
    """

    name: str
    train: torch.Tensor
    val: torch.Tensor
    train_files: tuple[str, ...] = ()
    val_files: tuple[str, ...] = ()
    domains: tuple[str, ...] = ()
    train_domains: torch.Tensor | None = None
    val_domains: torch.Tensor | None = None

    def describe(self) -> dict:
        """Sizes and a fingerprint of the file lists, for run metadata."""
        files = "\n".join(self.train_files) + "\0" + "\n".join(self.val_files)
        return {"corpus": self.name, "train_tokens": int(self.train.numel()),
                "val_tokens": int(self.val.numel()), "train_files": len(self.train_files),
                "val_files": len(self.val_files),
                "files_sha256": hashlib.sha256(files.encode()).hexdigest()[:16]}

    def tokenized(self, tokenizer: ByteTokenizer) -> Corpus:
        """This byte-level corpus with both splits re-encoded by `tokenizer` (itself if bytes).

        Documents (split at byte 0) are encoded one by one and joined by id 0 again; in the synthetic
        corpus every run of one domain is encoded on its own, so each id keeps its domain.
        """
        if tokenizer.kind == "bytes":
            return self
        if self.train.dtype != torch.uint8:
            raise ValueError("Corpus.tokenized expects a byte-level corpus (uint8 streams)")
        train, train_dom = _retokenize(self.train, self.train_domains, tokenizer)
        val, val_dom = _retokenize(self.val, self.val_domains, tokenizer)
        return Corpus(self.name, train, val, self.train_files, self.val_files, self.domains,
                      train_dom, val_dom)

    def documents(self, split: str = "train") -> list[bytes]:
        """The documents of a byte-level split (`train` or `val`) as bytes."""
        return _documents(bytes({"train": self.train, "val": self.val}[split].numpy()))


def _documents(data: bytes) -> list[bytes]:
    return data.split(bytes([DOC_SEPARATOR]))


def _retokenize(stream: torch.Tensor, domains: torch.Tensor | None, tokenizer: ByteTokenizer):
    data = bytes(stream.numpy())
    if domains is None:
        ids: list[int] = []
        for i, doc in enumerate(_documents(data)):
            ids += ([DOC_SEPARATOR] if i else []) + tokenizer.encode_bytes(doc)
        return torch.tensor(ids, dtype=torch.int32), None
    ids, labels = [], []
    change = (torch.nonzero(domains[1:] != domains[:-1]).flatten() + 1).tolist()
    for start, end in zip([0, *change], [*change, len(data)], strict=True):
        run = tokenizer.encode_bytes(data[start:end])
        ids += run
        labels += [int(domains[start])] * len(run)
    return torch.tensor(ids, dtype=torch.int32), torch.tensor(labels, dtype=torch.uint8)


def bytes_per_token(windows_NL: torch.Tensor, tokenizer: ByteTokenizer) -> float:
    """Mean UTF-8 bytes per next-token target of `windows_NL` (1.0 for bytes): CE per token divided by
    it is CE per byte, comparable across tokenizers."""
    targets = windows_NL[:, 1:].reshape(-1).tolist()
    lengths = {t: len(tokenizer.token_bytes(t)) for t in set(targets)}
    return sum(lengths[t] for t in targets) / len(targets)


def in_validation(rel_path: str, val_fraction: float) -> bool:
    """Whether a file belongs to the validation split: sha256(path) read as a fraction < val_fraction."""
    digest = hashlib.sha256(rel_path.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < val_fraction


def stdlib_root() -> Path:
    """The directory of this interpreter's standard library."""
    return Path(sysconfig.get_paths()["stdlib"])


def python_files(root: Path) -> list[str]:
    """Relative POSIX paths of the *.py files under `root`, sorted, without tests and site-packages."""
    files = []
    for folder, dirs, names in os.walk(root):
        dirs[:] = [d for d in dirs if d not in EXCLUDED_DIRS]
        rel = Path(folder).relative_to(root)
        files += [(rel / n).as_posix() for n in names if n.endswith(".py") and (Path(folder) / n).is_file()]
    return sorted(files)


def stdlib_corpus(root: Path | str | None = None, val_fraction: float = 0.05) -> Corpus:
    """The Python files under `root` (default: the standard library), split by file.

    Raises ValueError if there are no files or either split would be empty.
    """
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction={val_fraction!r} is invalid: expected a number in (0, 1)")
    root = Path(root) if root is not None else stdlib_root()
    files = python_files(root)
    val_files = [f for f in files if in_validation(f, val_fraction)]
    train_files = [f for f in files if not in_validation(f, val_fraction)]
    if not train_files or not val_files:
        raise ValueError(f"{len(files)} Python file(s) under {root} give {len(train_files)} train and "
                         f"{len(val_files)} validation file(s) at val_fraction={val_fraction}: "
                         "both splits need at least one file")
    return Corpus("python-stdlib", _join(root, train_files), _join(root, val_files),
                  tuple(train_files), tuple(val_files))


def _join(root: Path, files: list[str]) -> torch.Tensor:
    data = bytes([DOC_SEPARATOR]).join((root / f).read_bytes() for f in files)
    return torch.frombuffer(bytearray(data), dtype=torch.uint8)


# --- synthetic multi-domain corpus -----------------------------------------------------------------

_ADJECTIVES = ("quiet", "small", "bright", "old", "green", "happy", "tired", "clever")
_NOUNS = ("cat", "river", "teacher", "garden", "robot", "village", "bird", "painter")
_VERBS = ("watches", "follows", "finds", "paints", "visits", "remembers", "helps", "greets")
_PLACES = ("the market", "the hill", "the old bridge", "the library", "the sea", "the forest")
_NAMES = ("total", "count", "value", "item", "result", "score")


def _arithmetic(rng: random.Random) -> str:
    a, b = rng.randrange(100), rng.randrange(100)
    op = rng.choice("+-*")
    return f"{a}{op}{b}={a + b if op == '+' else a - b if op == '-' else a * b}\n"


def _sorting(rng: random.Random) -> str:
    values = [rng.randrange(100) for _ in range(rng.randint(3, 8))]
    return f"sort {' '.join(map(str, values))} -> {' '.join(map(str, sorted(values)))}\n"


def _prose(rng: random.Random) -> str:
    return (f"the {rng.choice(_ADJECTIVES)} {rng.choice(_NOUNS)} {rng.choice(_VERBS)} the "
            f"{rng.choice(_NOUNS)} near {rng.choice(_PLACES)}.\n")


def _code(rng: random.Random) -> str:
    name, n = rng.choice(_NAMES), rng.randint(1, 9)
    templates = (f"def add_{n}({name}):\n    return {name} + {n}\n",
                 f"for i in range({n}):\n    {name} = {name} * i\n",
                 f"if {name} > {n}:\n    {name} -= {n}\n",
                 f"{name} = [x * {n} for x in range(10)]\n")
    return rng.choice(templates)


_GENERATORS = (_arithmetic, _sorting, _prose, _code)


def synthetic_documents(n_documents: int, seed: int) -> list[tuple[int, str]]:
    """(domain index, text) pairs, each domain drawn uniformly, from a seeded generator."""
    rng = random.Random(seed)
    docs = []
    for _ in range(n_documents):
        domain = rng.randrange(len(DOMAINS))
        docs.append((domain, _GENERATORS[domain](rng)))
    return docs


def synthetic_corpus(n_documents: int = 20000, seed: int = 0, val_every: int = 20) -> Corpus:
    """Documents of four domains (arithmetic, sorted lists, templated prose, code snippets) with the
    domain of every token; every `val_every`-th document goes to the validation split."""
    docs = synthetic_documents(n_documents, seed)
    val = [d for i, d in enumerate(docs) if i % val_every == 0]
    train = [d for i, d in enumerate(docs) if i % val_every != 0]
    (train_ids, train_dom), (val_ids, val_dom) = _stream(train), _stream(val)
    return Corpus("synthetic", train_ids, val_ids, domains=DOMAINS, train_domains=train_dom,
                  val_domains=val_dom)


def _stream(docs: list[tuple[int, str]]) -> tuple[torch.Tensor, torch.Tensor]:
    ids, labels = bytearray(), bytearray()
    for domain, text in docs:
        data = text.encode("utf-8")
        ids += data
        labels += bytes([domain]) * len(data)
    return (torch.frombuffer(ids, dtype=torch.uint8).clone(),
            torch.frombuffer(labels, dtype=torch.uint8).clone())


# --- windows ---------------------------------------------------------------------------------------

class Windows:
    """Batches [B, seq_len + 1] of windows of a token stream: random starts from a seeded generator,
    or consecutive windows (`sequential=True`) wrapping around the stream.

    The position in the data is `state_dict()` (generator state, cursor and batches drawn); loading
    it makes the following batches identical to those of an uninterrupted run.
    """

    def __init__(self, tokens: torch.Tensor, seq_len: int, batch_size: int, seed: int,
                 sequential: bool = False):
        if tokens.dim() != 1 or tokens.numel() < seq_len + 2:
            raise ValueError(f"a 1-D stream of at least seq_len + 2 = {seq_len + 2} tokens is needed "
                             f"for windows of {seq_len + 1}, got shape {tuple(tokens.shape)}")
        self.tokens, self.seq_len, self.batch_size = tokens, seq_len, batch_size
        self.sequential = sequential
        self.n_starts = tokens.numel() - seq_len  # starts 0 .. N - S - 1 fit a window of S + 1
        self.generator = torch.Generator().manual_seed(seed)
        self.cursor = 0
        self.batches = 0

    def next_starts(self) -> torch.Tensor:
        """Start offsets [B] of the next batch (advances the position)."""
        if self.sequential:
            starts_B = (self.cursor + torch.arange(self.batch_size) * (self.seq_len + 1)) % self.n_starts
            self.cursor = int(starts_B[-1] + self.seq_len + 1) % self.n_starts
        else:
            starts_B = torch.randint(self.n_starts, (self.batch_size,), generator=self.generator)
        self.batches += 1
        return starts_B

    def next_batch(self) -> torch.Tensor:
        """The next batch of windows as int64 token ids [B, seq_len + 1]."""
        return gather_windows(self.tokens, self.next_starts(), self.seq_len + 1)

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state(), "cursor": self.cursor, "batches": self.batches}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])
        self.cursor, self.batches = int(state["cursor"]), int(state["batches"])


def gather_windows(tokens: torch.Tensor, starts_B: torch.Tensor, length: int) -> torch.Tensor:
    """tokens[start : start + length] for every start, as int64 [B, length]."""
    return tokens[starts_B[:, None] + torch.arange(length)].long()


def eval_windows(tokens: torch.Tensor, seq_len: int, n_windows: int | None = None) -> torch.Tensor:
    """Fixed validation windows [N, seq_len + 1]: all non-overlapping windows (n_windows=None), or
    `n_windows` evenly spaced over the stream, so every part of the split is represented."""
    n_starts = tokens.numel() - seq_len
    every = torch.arange(0, n_starts, seq_len + 1)
    if n_windows is None or n_windows >= every.numel():
        return gather_windows(tokens, every, seq_len + 1)
    starts = torch.linspace(0, n_starts - 1, n_windows).long()
    return gather_windows(tokens, starts, seq_len + 1)


# --- bigram baseline -------------------------------------------------------------------------------

def bigram_log_probs(train: torch.Tensor, vocab_size: int = VOCAB_SIZE,
                     smoothing: float = 1.0) -> torch.Tensor:
    """log p(b | a) [V, V] of the add-`smoothing` bigram model of the stream `train`."""
    pairs = train[:-1].long() * vocab_size + train[1:].long()
    counts_VV = torch.bincount(pairs, minlength=vocab_size**2).view(vocab_size, vocab_size).double()
    counts_VV += smoothing
    return (counts_VV / counts_VV.sum(dim=1, keepdim=True)).log()


def bigram_cross_entropy(train: torch.Tensor, windows_NL: torch.Tensor,
                         smoothing: float = 1.0, vocab_size: int = VOCAB_SIZE) -> float:
    """Mean cross-entropy (nats per token) of the bigram model of `train` on the next-token targets of
    `windows_NL` (token j+1 predicted from token j): the same targets a language model is scored on."""
    log_p = bigram_log_probs(train, vocab_size=vocab_size, smoothing=smoothing)
    prev, nxt = windows_NL[:, :-1].long(), windows_NL[:, 1:].long()
    return -log_p[prev, nxt].mean().item()
