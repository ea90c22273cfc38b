"""generate(): greedy = argmax of the full forward, sampling, top-p, shapes and bad input."""

from __future__ import annotations

import pytest
import torch
from model_utils import make_model, tiny_model_cfg

from moe_lib import generate
from moe_lib.model.generate import next_token_probs


@pytest.mark.parametrize("q_lora_rank", [0, 12])
def test_greedy_equals_argmax_of_full_forward(q_lora_rank):
    model = make_model(tiny_model_cfg(q_lora_rank=q_lora_rank))
    prompt = torch.randint(0, 61, (3, 6))
    out = generate(model, prompt, 12)
    ids = prompt
    for _ in range(12):
        ids = torch.cat([ids, model(ids)[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(out, ids)
    assert len(set(out[0, 6:].tolist())) > 1


def test_one_dim_prompt_and_edge_lengths():
    model = make_model(tiny_model_cfg())
    prompt = torch.randint(0, 61, (5,))
    out = generate(model, prompt, 3)
    assert out.shape == (8,) and torch.equal(out[:5], prompt)
    assert torch.equal(generate(model, prompt, 0), prompt)
    full = generate(model, prompt[:1], 39)  # prompt of length 1 up to max_seq_len
    assert full.shape == (40,)
    model.train()
    generate(model, prompt, 1)
    assert model.training  # restored


def test_sampling_is_seeded_and_follows_the_distribution():
    model = make_model(tiny_model_cfg())
    prompt = torch.randint(0, 61, (1, 4))
    a = generate(model, prompt, 8, temperature=1.0, seed=3)
    assert torch.equal(a, generate(model, prompt, 8, temperature=1.0, seed=3))
    assert not torch.equal(a, generate(model, prompt, 8, temperature=1.0, seed=4))
    greedy = generate(model, prompt, 8)
    assert torch.equal(generate(model, prompt, 8, temperature=1.0, top_p=1e-6, seed=0), greedy)
    n = 4000  # the first sampled token's frequencies match softmax(logits / T)
    draws = generate(model, prompt.expand(n, -1), 1, temperature=0.5, seed=1)[:, -1]
    probs = torch.softmax(model(prompt)[0, -1] / 0.5, -1)
    freq = torch.bincount(draws, minlength=61).float() / n
    assert (freq - probs).abs().max() < 4 * (probs * (1 - probs) / n).sqrt().max() + 1e-3


def test_top_p_keeps_the_smallest_nucleus():
    probs = torch.tensor([[0.1, 0.5, 0.05, 0.35]])
    logits = probs.log()
    torch.testing.assert_close(next_token_probs(logits, 1.0, 0.7),
                               torch.tensor([[0.0, 0.5 / 0.85, 0.0, 0.35 / 0.85]]))
    torch.testing.assert_close(next_token_probs(logits, 1.0, 0.9),
                               torch.tensor([[0.1 / 0.95, 0.5 / 0.95, 0.0, 0.35 / 0.95]]))
    torch.testing.assert_close(next_token_probs(logits, 1.0, None), probs)
    torch.testing.assert_close(next_token_probs(logits, 2.0), torch.softmax(logits / 2, -1))


def test_bad_arguments():
    model = make_model(tiny_model_cfg())
    prompt = torch.randint(0, 61, (1, 30))
    with pytest.raises(ValueError, match="speculative decoding needs MTP modules"):
        generate(model, prompt, 2, speculative=True)
    with pytest.raises(ValueError, match="prompt of 30 tokens \\+ max_new_tokens=11 = 41 > max_seq_len=40"):
        generate(model, prompt, 11)
    with pytest.raises(ValueError, match="max_new_tokens=-1"):
        generate(model, prompt, -1)
    with pytest.raises(ValueError, match="temperature=-0.5"):
        generate(model, prompt, 2, temperature=-0.5)
    with pytest.raises(ValueError, match="top_p=1.5"):
        generate(model, prompt, 2, temperature=1.0, top_p=1.5)
    with pytest.raises(ValueError, match="out of range"):
        generate(model, torch.tensor([3, 99]), 2)
    with pytest.raises(TypeError, match="integer tensor"):
        generate(model, prompt.float(), 2)
    with pytest.raises(ValueError, match="empty"):
        generate(model, prompt[:, :0], 2)
