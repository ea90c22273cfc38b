"""Autoregressive generation with the MLA KV cache: greedy, temperature and nucleus (top-p) sampling.

Each step feeds only the newest token; the cache supplies every earlier token's latent and rope key.
"""

from __future__ import annotations

import torch

from .transformer import Transformer, check_ids


def next_token_probs(logits_BV: torch.Tensor, temperature: float, top_p: float | None = None) -> torch.Tensor:
    """The sampling distribution [B, V] for temperature > 0: softmax(logits / temperature), then
    restricted to the smallest set of most likely tokens whose probability reaches top_p
    (Holtzman et al. 2019) and renormalised."""
    probs_BV = torch.softmax(logits_BV.float() / temperature, dim=-1)
    if top_p is None or top_p >= 1.0:
        return probs_BV
    sorted_BV, order_BV = probs_BV.sort(dim=-1, descending=True)
    before_BV = sorted_BV.cumsum(dim=-1) - sorted_BV  # mass of the strictly more likely tokens
    sorted_BV = sorted_BV.masked_fill(before_BV >= top_p, 0.0)
    kept_BV = torch.zeros_like(probs_BV).scatter_(-1, order_BV, sorted_BV)
    return kept_BV / kept_BV.sum(dim=-1, keepdim=True)


def pick_next(logits_BV: torch.Tensor, temperature: float, top_p: float | None,
              generator: torch.Generator | None) -> torch.Tensor:
    """Next ids [B]: argmax at temperature 0, else a sample of `next_token_probs`."""
    if temperature == 0:
        return logits_BV.argmax(dim=-1)
    return torch.multinomial(next_token_probs(logits_BV, temperature, top_p), 1, generator=generator)[:, 0]


def check_generation(model: Transformer, prompt_BS, max_new_tokens: int, temperature: float,
                     top_p: float | None) -> None:
    """Raise a TypeError/ValueError naming the problem unless the arguments of `generate` are valid
    (prompt [B, S])."""
    cfg = model.cfg
    check_ids(prompt_BS, cfg.vocab_size, cfg.max_seq_len)
    if not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens={max_new_tokens!r} is invalid: expected an integer >= 0")
    if prompt_BS.shape[1] + max_new_tokens > cfg.max_seq_len:
        raise ValueError(f"prompt of {prompt_BS.shape[1]} tokens + max_new_tokens={max_new_tokens} = "
                         f"{prompt_BS.shape[1] + max_new_tokens} > max_seq_len={cfg.max_seq_len}")
    if not temperature >= 0:
        raise ValueError(f"temperature={temperature!r} is invalid: expected a number >= 0")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p={top_p!r} is invalid: expected None or a number in (0, 1]")


@torch.no_grad()
def generate(model: Transformer, prompt_ids: torch.Tensor, max_new_tokens: int, temperature: float = 0.0,
             top_p: float | None = None, speculative: bool = False, generator: torch.Generator | None = None,
             seed: int | None = None) -> torch.Tensor:
    """Prompt + `max_new_tokens` generated ids ([S] in, [S + n] out; [B, S] in, [B, S + n] out).

    temperature 0: greedy (argmax, top_p ignored); > 0: sample from softmax(logits / temperature),
    within the top_p nucleus when given, using `generator` (or a fresh one seeded with `seed`).
    Runs the model in eval mode (restored afterwards) with its KV cache.
    speculative=True: the MTP modules draft and the main model verifies, with the same greedy
    output and the same sampling distribution (batch size 1; `speculative.speculative_generate`
    also returns the acceptance statistics and chooses the draft depth).
    """
    if speculative:
        from .speculative import speculative_generate  # it imports this module

        return speculative_generate(model, prompt_ids, max_new_tokens, temperature, top_p,
                                    generator=generator, seed=seed)[0]
    if isinstance(prompt_ids, torch.Tensor) and prompt_ids.dim() == 1:
        return generate(model, prompt_ids.unsqueeze(0), max_new_tokens, temperature, top_p,
                        generator=generator, seed=seed)[0]
    check_generation(model, prompt_ids, max_new_tokens, temperature, top_p)
    if generator is None and seed is not None:
        generator = torch.Generator(device=prompt_ids.device).manual_seed(seed)
    was_training = model.training
    model.eval()
    try:
        ids_BS = prompt_ids.long()
        cache = model.new_cache(ids_BS.shape[0])
        new_ids = ids_BS
        for _ in range(max_new_tokens):
            logits_BV = model(new_ids, cache)[:, -1]
            new_ids = pick_next(logits_BV, temperature, top_p, generator).unsqueeze(1)
            ids_BS = torch.cat((ids_BS, new_ids), dim=1)
        return ids_BS
    finally:
        model.train(was_training)
