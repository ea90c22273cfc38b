"""Speculative decoding with the MTP modules as the draft and the main model as the verifier.

One step, with tokens x_0 .. x_m generated so far and the main model's KV cache holding 0 .. m-1:

    draft:   depth k = 1..D at position m-1 takes h_{k-1} and Emb(x_{m+k-1}) (a draft for k >= 2)
             and proposes d_k for token m+k; d_1..d_D come from D chained one-block steps.
    verify:  ONE main-model forward of the chunk [x_m, d_1, .., d_D] (positions m .. m+D, cached),
             whose logits at position m+k-1 are the main model's distribution p_k of token m+k.
    accept:  d_1, d_2, .. while they pass; at the first rejection the main model's own token
             replaces it; if all D pass, p_{D+1} gives one more (bonus) token. So 1 .. D+1 tokens
             per main-model forward.

Greedy (temperature 0): d_k = argmax q_k passes iff it equals argmax p_k, so the output is exactly
plain greedy decoding. Sampling (Leviathan et al. 2023; Chen et al. 2023): d_k ~ q_k passes with
probability min(1, p_k(d_k) / q_k(d_k)); at the first rejection the token is drawn from the residual
norm(max(p_k - q_k, 0)); every token then has exactly the main model's distribution.

Caches: the main cache and one one-layer cache per depth (filled on the prompt too). A depth-k
entry at position i depends on tokens up to i+k, so after accepting j drafts at step m every cache
is rolled back (`KVCache.truncate`) to the positions whose inputs are all accepted: main m+j+1,
depth k m+j+1-k. The hidden states h_k of each depth are kept per position next to its cache, so a
depth recomputes only the positions it lost, as one chunk. Batch size 1 only.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .generate import check_generation, next_token_probs, pick_next
from .transformer import Transformer


@dataclass
class SpeculationStats:
    """What one speculative generation did.

    depth: draft depth D; steps: verification forwards of the main model (the prompt's forward,
    which yields the first token, is not counted); new_tokens: tokens generated;
    drafted[k-1] / accepted[k-1]: drafts proposed / accepted at draft position k; a draft is
    accepted only if every draft before it in its step was (near the end, fewer positions are drafted).
    reached[k-1]: drafts at position k whose predecessors were all accepted, so that it was tested.
    sources: per generated token, k if it is an accepted draft of position k, 0 if the main model
    chose it (the first token, a correction after a rejection, or the bonus token).
    """

    depth: int
    steps: int = 0
    new_tokens: int = 0
    drafted: list[int] = field(default_factory=list)
    accepted: list[int] = field(default_factory=list)
    reached: list[int] = field(default_factory=list)
    sources: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.drafted = self.drafted or [0] * self.depth
        self.accepted = self.accepted or [0] * self.depth
        self.reached = self.reached or [0] * self.depth

    @property
    def acceptance(self) -> list[float]:
        """Accepted / drafted at each draft position: the probability that a step's k-th draft is
        accepted (so that E = 1 + sum_k acceptance[k]); nan where nothing was drafted."""
        return [a / d if d else float("nan") for a, d in zip(self.accepted, self.drafted, strict=True)]

    @property
    def conditional_acceptance(self) -> list[float]:
        """Accepted / reached at each draft position: the rate a_k of position k given that
        positions 1..k-1 were accepted (the rates of `expected_tokens`)."""
        return [a / r if r else float("nan") for a, r in zip(self.accepted, self.reached, strict=True)]

    def __add__(self, other: SpeculationStats) -> SpeculationStats:
        """The statistics of two generations together (same depth)."""
        if other.depth != self.depth:
            raise ValueError(f"cannot add SpeculationStats of depths {self.depth} and {other.depth}")

        def add(a: list[int], b: list[int]) -> list[int]:
            return [x + y for x, y in zip(a, b, strict=True)]

        return SpeculationStats(self.depth, self.steps + other.steps, self.new_tokens + other.new_tokens,
                                add(self.drafted, other.drafted), add(self.accepted, other.accepted),
                                add(self.reached, other.reached), self.sources + other.sources)

    @property
    def tokens_per_step(self) -> float:
        """Tokens per verification forward: 1 from the main model plus the accepted drafts (the
        first token of a generation, from the prompt's forward, is not counted)."""
        return 1 + sum(self.accepted) / self.steps if self.steps else float("nan")

    def to_dict(self) -> dict:
        return {"depth": self.depth, "steps": self.steps, "new_tokens": self.new_tokens,
                "drafted": self.drafted, "accepted": self.accepted, "reached": self.reached,
                "acceptance": self.acceptance, "conditional_acceptance": self.conditional_acceptance,
                "tokens_per_step": self.tokens_per_step}


def expected_tokens(acceptance: float | list[float], depth: int | None = None) -> float:
    """Expected tokens per verification step (one main-model forward).

    With one acceptance rate a for every draft position (accepted drafts i.i.d.):
        E = 1 + a + a^2 + .. + a^D = (1 - a^(D+1)) / (1 - a)
    With the rate a_k of draft position k given that positions 1..k-1 passed (a list):
        E = 1 + a_1 + a_1 a_2 + .. + a_1 a_2 .. a_D
    """
    if isinstance(acceptance, (int, float)):
        if depth is None:
            raise ValueError("expected_tokens: give the depth D with a single acceptance rate")
        rates = [acceptance] * depth
    else:
        rates = list(acceptance)
    expected, passed = 1.0, 1.0
    for rate in rates:
        passed *= rate
        expected += passed
    return expected


def predicted_speedup(acceptance: float | list[float], depth: int, draft_cost: float,
                      verify_cost: float = 1.0) -> float:
    """Tokens/s of speculative over plain decoding: speedup = E / (v + D c).

    c: the time of one MTP module step over one main-model step (draft cost ratio); v: the time of
    the main model verifying D+1 tokens in one forward over its one-token step (1 when the chunk
    costs no more than one token, as on a GPU far from its compute limit).
    """
    return expected_tokens(acceptance, depth) / (verify_cost + depth * draft_cost)


def greedy_verify(target_K: torch.Tensor, drafts_D: torch.Tensor) -> tuple[int, torch.Tensor]:
    """Greedy acceptance: target_K [D+1] are the main model's argmax tokens at the chunk's positions.
    Returns (n accepted = length of the agreeing prefix of drafts, the next token target[n] [1])."""
    n = int((target_K[:-1] == drafts_D).cumprod(0).sum())
    return n, target_K[n:n + 1]


def residual_probs(p_V: torch.Tensor, q_V: torch.Tensor) -> torch.Tensor:
    """norm(max(p - q, 0)): where a rejected draft's token is drawn from (Leviathan et al. 2023,
    Alg. 1). p itself where p <= q everywhere (p == q up to rounding: no rejection can happen)."""
    r_V = (p_V - q_V).clamp_min(0.0)
    total = r_V.sum()
    return r_V / total if total > 0 else p_V


def rejection_verify(p_KV: torch.Tensor, q_DV: torch.Tensor, drafts_D: torch.Tensor,
                     generator: torch.Generator | None = None) -> tuple[int, torch.Tensor]:
    """Speculative sampling: draft d_k ~ q_k passes with probability min(1, p_k(d_k) / q_k(d_k)),
    in order, until the first rejection. p_KV [D+1, V]: main model; q_DV [D, V]: draft.
    Returns (n accepted, the next token [1]): drawn from norm(max(p_n - q_n, 0)) after a rejection
    at position n, from p_{D+1} (the bonus) when all D drafts pass."""
    n_drafts = drafts_D.shape[0]
    p_D = p_KV[:-1].gather(1, drafts_D[:, None])[:, 0]
    q_D = q_DV.gather(1, drafts_D[:, None])[:, 0]
    u_D = torch.rand(n_drafts, generator=generator, dtype=p_D.dtype, device=p_D.device)
    n = int((u_D * q_D < p_D).cumprod(0).sum())  # u < p/q with probability min(1, p/q)
    probs_V = p_KV[n] if n == n_drafts else residual_probs(p_KV[n], q_DV[n])
    return n, torch.multinomial(probs_V, 1, generator=generator)


class Speculator:
    """The state of one speculative generation: token buffer, caches and hidden states per depth.

    seq [max_seq_len]: x_0 .. x_m, then the drafts of the current step. h[k] [max_seq_len, H]: the
    hidden states of depth k (h[0]: the main model's, before its final norm) at the positions that
    its cache holds (and, for h[0], the last verified chunk).
    """

    def __init__(self, model: Transformer, depth: int, temperature: float, top_p: float | None,
                 generator: torch.Generator | None):
        cfg, weight = model.cfg, model.embed_tokens.weight
        self.model, self.depth, self.temperature, self.top_p, self.generator = (
            model, depth, temperature, top_p, generator)
        self.seq = torch.zeros(1, cfg.max_seq_len, dtype=torch.long, device=weight.device)
        self.h = [weight.new_zeros(1, cfg.max_seq_len, cfg.d_model) for _ in range(depth + 1)]
        self.cache = model.new_cache(1)
        self.mtp_caches = [model.new_mtp_cache(1) for _ in range(depth)]
        self.m = 0  # index of the newest token, which the main cache does not hold yet
        self.stats = SpeculationStats(depth)

    def prefill(self, prompt_S: torch.Tensor) -> None:
        """The prompt's forward (filling the main cache) and the first new token."""
        n = prompt_S.shape[0]
        self.seq[0, :n] = prompt_S
        h_1SH = self.model.forward_hidden(self.seq[:, :n], self.cache)
        self.h[0][:, :n] = h_1SH
        self.seq[0, n] = pick_next(self.model.head(h_1SH[:, -1]), self.temperature, self.top_p,
                                   self.generator)[0]
        self.m = n
        self.stats.new_tokens = 1
        self.stats.sources.append(0)

    def draft(self, n_drafts: int) -> torch.Tensor:
        """Drafts d_1..d_n into seq[m+1 .. m+n]; returns the draft probabilities q [n, V] when
        sampling (empty when greedy).

        Depth k first (re)computes its positions from its cache length up to m-1 as one chunk."""
        m, model, q = self.m, self.model, []
        for k in range(1, n_drafts + 1):
            start = self.mtp_caches[k - 1].length
            h_1SH = model.mtp_forward(k, self.h[k - 1][:, start:m], self.seq[:, start + k:m + k],
                                      self.mtp_caches[k - 1])
            self.h[k][:, start:m] = h_1SH
            logits_1V = model.mtp_head(k, h_1SH[:, -1])
            if self.temperature == 0:
                self.seq[0, m + k] = logits_1V[0].argmax()
            else:
                q.append(next_token_probs(logits_1V, self.temperature, self.top_p)[0])
                self.seq[0, m + k] = torch.multinomial(q[-1], 1, generator=self.generator)[0]
        return torch.stack(q) if q else self.h[0].new_zeros(0, self.model.cfg.vocab_size)

    def step(self, n_drafts: int) -> None:
        """Draft n tokens, verify them with one main-model forward of n+1 tokens, roll back."""
        m = self.m
        q_DV = self.draft(n_drafts)
        h_1KH = self.model.forward_hidden(self.seq[:, m:m + n_drafts + 1], self.cache)
        self.h[0][:, m:m + n_drafts + 1] = h_1KH
        logits_KV = self.model.head(h_1KH)[0]
        drafts_D = self.seq[0, m + 1:m + n_drafts + 1]
        if self.temperature == 0:
            n, token = greedy_verify(logits_KV.argmax(-1), drafts_D)
        else:
            p_KV = next_token_probs(logits_KV, self.temperature, self.top_p)
            n, token = rejection_verify(p_KV, q_DV, drafts_D, self.generator)
        self.seq[0, m + n + 1] = token[0]
        self.m = m + n + 1
        self.cache.truncate(self.m)
        for k, cache in enumerate(self.mtp_caches, start=1):
            cache.truncate(max(0, min(cache.length, self.m - k)))
        stats = self.stats
        stats.steps += 1
        stats.new_tokens += n + 1
        stats.sources += [*range(1, n + 1), 0]
        for k in range(n_drafts):
            stats.drafted[k] += 1
            stats.reached[k] += k <= n
            stats.accepted[k] += k < n


@torch.no_grad()
def speculative_generate(model: Transformer, prompt_ids: torch.Tensor, max_new_tokens: int,
                         temperature: float = 0.0, top_p: float | None = None, depth: int | None = None,
                         generator: torch.Generator | None = None,
                         seed: int | None = None) -> tuple[torch.Tensor, SpeculationStats]:
    """Prompt + `max_new_tokens` ids ([S] or [1, S] in, same rank out) and the `SpeculationStats`.

    The MTP modules 1..depth (default all mtp_depth of them) draft, the main model verifies. Greedy
    output equals `generate`'s; sampled output has the main model's distribution (see module doc).
    Batch size 1 only: the sequences of a batch would accept different numbers of drafts.
    """
    one_dim = isinstance(prompt_ids, torch.Tensor) and prompt_ids.dim() == 1
    prompt_BS = prompt_ids.unsqueeze(0) if one_dim else prompt_ids
    check_generation(model, prompt_BS, max_new_tokens, temperature, top_p)
    cfg = model.cfg
    if prompt_BS.shape[0] != 1:
        raise ValueError(f"speculative decoding supports batch size 1 only, got a batch of "
                         f"{prompt_BS.shape[0]} prompts (shape {tuple(prompt_BS.shape)}): call it per prompt")
    if cfg.mtp_depth == 0:
        raise ValueError("speculative decoding needs MTP modules as the draft, but the model has "
                         "mtp_depth=0")
    depth = cfg.mtp_depth if depth is None else depth
    if isinstance(depth, bool) or not isinstance(depth, int) or not 1 <= depth <= cfg.mtp_depth:
        raise ValueError(f"depth={depth!r} is invalid: expected an integer in 1..mtp_depth={cfg.mtp_depth}")
    if generator is None and seed is not None:
        generator = torch.Generator(device=prompt_BS.device).manual_seed(seed)
    was_training = model.training
    if was_training:  # (train() walks every module: skip it when already in eval mode)
        model.eval()
    try:
        spec = Speculator(model, depth, temperature, top_p, generator)
        if max_new_tokens == 0:
            return prompt_ids.long().clone(), spec.stats
        end = prompt_BS.shape[1] + max_new_tokens  # length of the output
        spec.prefill(prompt_BS[0].long())
        while spec.m + 1 < end:
            spec.step(min(depth, end - spec.m - 2))  # a step yields at most n_drafts + 1 tokens
        out_1S = spec.seq[:, :end].clone()
        return (out_1S[0] if one_dim else out_1S), spec.stats
    finally:
        if was_training:
            model.train()
