"""Looking inside a trained model: the routing of a text per token and layer, the Python token class
of every byte, and how much the routing tells about those classes.

Token classes come from the standard library's `tokenize` (keywords, identifiers, strings, comments,
numbers, operators) plus the whitespace the tokenizer skips (indentation at the start of a line,
spaces between tokens, newlines), first per UTF-8 byte (`token_classes`); a model that reads BPE ids
gives each id the class most of its bytes have (`classes_of_tokens`).

Specialisation is measured as the mutual information between a label (token class, corpus domain)
and the experts a token is sent to, over all (token, selected expert) pairs of one layer:

    I(C; E) = sum_{c,e} p(c, e) log2( p(c, e) / (p(c) p(e)) )                       [bits]

and, to ask whether routing knows more than the token itself, conditioned on the token id G:

    I(C; E | G) = sum_{g,c,e} p(g, c, e) log2( p(g, c, e) p(g) / (p(g, c) p(g, e)) ).

Finite samples make both positive even for independent labels; `shuffle_labels` gives the baseline
(labels permuted across tokens, within each token id when conditioning).
"""

from __future__ import annotations

import io
import keyword
import tokenize
from dataclasses import dataclass

import torch

from .model import Transformer

TOKEN_CLASSES = ("keyword", "identifier", "string", "comment", "number", "operator", "indentation",
                 "space", "newline", "other")
_CLASS = {name: i for i, name in enumerate(TOKEN_CLASSES)}
_STRING_TYPES = {tokenize.STRING} | {getattr(tokenize, n) for n in ("FSTRING_START", "FSTRING_MIDDLE",
                                                                      "FSTRING_END") if hasattr(tokenize, n)}


def _token_class(tok: tokenize.TokenInfo) -> int | None:
    if tok.type == tokenize.NAME:
        return _CLASS["keyword" if keyword.iskeyword(tok.string) else "identifier"]
    if tok.type in _STRING_TYPES:
        return _CLASS["string"]
    return {tokenize.COMMENT: _CLASS["comment"], tokenize.NUMBER: _CLASS["number"],
            tokenize.OP: _CLASS["operator"]}.get(tok.type)


def token_classes(source: str) -> torch.Tensor:
    """The class (index into TOKEN_CLASSES) of every UTF-8 byte of `source`, int64 [n_bytes].

    Whitespace first: leading blanks of a line are indentation, other blanks space, '\\n' newline;
    then every token of `tokenize` labels its characters (so blanks inside strings are string).
    Text that does not tokenize (unterminated string, bad dedent) keeps the labels found before
    the error; the rest is whitespace or 'other'.
    """
    labels = []
    line_start = True
    for ch in source:
        if ch == "\n":
            labels.append(_CLASS["newline"])
            line_start = True
        elif ch in " \t\f\r":
            labels.append(_CLASS["indentation" if line_start else "space"])
        else:
            labels.append(_CLASS["other"])
            line_start = False
    line_offsets = [0] + [i + 1 for i, ch in enumerate(source) if ch == "\n"]
    try:
        for tok in tokenize.generate_tokens(io.StringIO(source).readline):
            cls = _token_class(tok)
            if cls is not None:
                start = line_offsets[tok.start[0] - 1] + tok.start[1]
                end = line_offsets[tok.end[0] - 1] + tok.end[1]
                labels[start:end] = [cls] * (end - start)
    except (tokenize.TokenError, SyntaxError):
        pass
    widths = torch.tensor([len(ch.encode("utf-8")) for ch in source], dtype=torch.long)
    return torch.tensor(labels, dtype=torch.long).repeat_interleave(widths)


def token_offsets(ids_T: torch.Tensor, tokenizer) -> torch.Tensor:
    """Byte offset [T + 1] where each token of `ids_T` starts in the decoded bytes (last: the end)."""
    lengths = [len(tokenizer.token_bytes(int(i))) for i in ids_T.tolist()]
    return torch.tensor([0] + lengths, dtype=torch.long).cumsum(0)


def token_at(ids_T: torch.Tensor, tokenizer, byte_offset: int) -> int:
    """The index of the token of `ids_T` that covers byte `byte_offset` of its text."""
    offsets = token_offsets(ids_T, tokenizer)
    if not 0 <= byte_offset < int(offsets[-1]):
        raise ValueError(f"byte offset {byte_offset} is outside the {int(offsets[-1])} bytes of the tokens")
    return int(torch.searchsorted(offsets, byte_offset, right=True)) - 1


def classes_of_tokens(byte_classes: torch.Tensor, ids_T: torch.Tensor, tokenizer) -> torch.Tensor:
    """One class per token from the classes of its bytes: the class most of its bytes have (ties: the
    one that comes first in the token), e.g. ' return' is a keyword, '\n        ' indentation."""
    offsets = token_offsets(ids_T, tokenizer)
    if int(offsets[-1]) != byte_classes.numel():
        raise ValueError(f"the tokens cover {int(offsets[-1])} bytes but {byte_classes.numel()} byte "
                         "classes were given")
    out = []
    for start, end in zip(offsets[:-1].tolist(), offsets[1:].tolist(), strict=True):
        span = byte_classes[start:end].tolist()
        out.append(max(span, key=lambda c, span=span: (span.count(c), -span.index(c))))
    return torch.tensor(out, dtype=torch.long)


@dataclass(frozen=True)
class RoutingTrace:
    """The routing of one token stream in every MoE layer of a model.

    layers: the model's layer numbers of the MoE layers (the first n_dense_layers are dense).
    indices [L, T, K]: selected experts per MoE layer and token; weights [L, T, K]: their gates;
    scores [L, T, E]: the unbiased affinities.
    """

    layers: tuple[int, ...]
    indices: torch.Tensor
    weights: torch.Tensor
    scores: torch.Tensor


@torch.no_grad()
def routing_trace(model: Transformer, ids_T: torch.Tensor, batch_size: int = 16) -> RoutingTrace:
    """Route the 1-D stream `ids_T` through `model` (eval mode, restored afterwards) in consecutive
    windows of max_seq_len tokens, each read from its own start (`batch_size` windows per forward
    pass), and record every MoE layer."""
    if not isinstance(ids_T, torch.Tensor) or ids_T.dim() != 1 or ids_T.numel() == 0:
        raise ValueError("routing_trace expects a non-empty 1-D tensor of token ids")
    moe = model.moe_layers()
    if not moe:
        raise ValueError("the model has no MoE layer (n_dense_layers == n_layers)")
    seq = model.cfg.max_seq_len
    n_full = ids_T.numel() // seq
    batches = list(ids_T[:n_full * seq].long().view(n_full, seq).split(batch_size)) if n_full else []
    if ids_T.numel() % seq:
        batches.append(ids_T[n_full * seq:].long().unsqueeze(0))
    records: list[list] = [[] for _ in moe]
    was_training = model.training
    model.eval()
    try:
        for batch_BS in batches:  # routing stats are in token order: window by window
            model(batch_BS)
            for layer_records, layer in zip(records, moe, strict=True):
                r = layer.last_routing
                layer_records.append((r.indices, r.weights, r.scores))
    finally:
        model.train(was_training)
    stacked = [torch.stack([torch.cat([rec[i] for rec in layer_records]) for layer_records in records])
               for i in range(3)]
    first = model.cfg.n_dense_layers
    return RoutingTrace(tuple(range(first, first + len(moe))), *stacked)


def class_expert_counts(indices_TK: torch.Tensor, labels_T: torch.Tensor, n_labels: int,
                        n_experts: int) -> torch.Tensor:
    """Counts [n_labels, n_experts] of (token, selected expert) pairs by the token's label."""
    k = indices_TK.shape[1]
    pairs = labels_T.long().repeat_interleave(k) * n_experts + indices_TK.reshape(-1).long()
    return torch.bincount(pairs, minlength=n_labels * n_experts).view(n_labels, n_experts)


def mutual_information(indices_TK: torch.Tensor, labels_T: torch.Tensor,
                       given_T: torch.Tensor | None = None) -> float:
    """I(C; E) in bits between labels and selected experts over the (token, expert) pairs, or
    I(C; E | G) when `given_T` (e.g. the byte of each token) is passed (module docstring)."""
    if indices_TK.shape[0] != labels_T.shape[0]:
        raise ValueError(f"{indices_TK.shape[0]} routed tokens but {labels_T.shape[0]} labels")
    given_T = torch.zeros_like(labels_T) if given_T is None else given_T
    _, g = torch.unique(given_T, return_inverse=True)
    _, c = torch.unique(labels_T, return_inverse=True)
    _, e = torch.unique(indices_TK, return_inverse=True)
    n_g, n_c, n_e = int(g.max()) + 1, int(c.max()) + 1, int(e.max()) + 1
    k = indices_TK.shape[1]
    flat = (g.repeat_interleave(k) * n_c + c.repeat_interleave(k)) * n_e + e.reshape(-1)
    p_GCE = torch.bincount(flat, minlength=n_g * n_c * n_e).view(n_g, n_c, n_e).double()
    p_GCE /= p_GCE.sum()
    p_G, p_GC, p_GE = p_GCE.sum((1, 2)), p_GCE.sum(2), p_GCE.sum(1)
    ratio = p_GCE * p_G[:, None, None] / (p_GC[:, :, None] * p_GE[:, None, :])
    nonzero = p_GCE > 0
    return (p_GCE[nonzero] * ratio[nonzero].log2()).sum().item()


def shuffle_labels(labels_T: torch.Tensor, generator: torch.Generator,
                   given_T: torch.Tensor | None = None) -> torch.Tensor:
    """`labels_T` randomly permuted across tokens (within each value of `given_T` when passed): the
    same label frequencies, no link to the routing; the baseline of `mutual_information`."""
    if given_T is None:
        return labels_T[torch.randperm(labels_T.numel(), generator=generator)]
    out = labels_T.clone()
    for value in torch.unique(given_T):
        where = (given_T == value).nonzero().flatten()
        out[where] = labels_T[where[torch.randperm(where.numel(), generator=generator)]]
    return out
