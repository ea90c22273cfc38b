"""Speculative decoding with the MTP modules: greedy output equals plain greedy decoding, the draft's
caches equal an uncached reference, and sampling has exactly the main model's distribution."""

from __future__ import annotations

import itertools

import pytest
import torch
from model_utils import make_model, tiny_model_cfg
from scipy.stats import chi2

import moe_lib.model.speculative as spec
from moe_lib import generate, load_checkpoint
from moe_lib.model.generate import next_token_probs
from moe_lib.model.speculative import (
    greedy_verify,
    rejection_verify,
    residual_probs,
    speculative_generate,
)
from moe_lib.train.data import decode, encode
from moe_lib.viz.training import shipped_checkpoint


def agreeing_model(mtp_depth: int, seed: int = 0, noise: float = 0.05):
    """A random model whose drafts are right part of the time: small block weights (init_std 0.05)
    next to unit-scale embeddings make the main model's next token mostly a function of the current
    one, and eh_proj = [I, 0] + noise passes the looked-ahead token's embedding to the same head."""
    torch.manual_seed(seed)
    model = make_model(tiny_model_cfg(mtp_depth=mtp_depth, n_layers=2, init_std=0.05))
    H = model.cfg.d_model
    with torch.no_grad():
        model.embed_tokens.weight.normal_(0.0, 1.0)
        for module in model.mtp:
            module.eh_proj.weight.copy_(torch.eye(H, 2 * H) + noise * torch.randn(H, 2 * H))
    return model


def prompts(n: int, vocab: int, max_len: int):
    """n random prompts whose lengths cycle through 1, short, middle and up to max_seq_len - 1."""
    lengths = [1, 2, 5, 11, 20, max_len - 6, max_len - 3, max_len - 2, max_len - 1]
    return [torch.randint(0, vocab, (lengths[i % len(lengths)],)) for i in range(n)]


@pytest.mark.parametrize("mtp_depth,depth,n_prompts", [(2, 2, 50), (2, 1, 18), (3, 3, 18)])
def test_greedy_equals_plain_greedy(mtp_depth, depth, n_prompts):
    """Prompts of length 1 up to max_seq_len - 1; the longest generate up to max_seq_len exactly."""
    model = agreeing_model(mtp_depth)
    cfg, total = model.cfg, None
    by_length: dict[int, list[torch.Tensor]] = {}
    for prompt in prompts(n_prompts, cfg.vocab_size, cfg.max_seq_len):
        by_length.setdefault(len(prompt), []).append(prompt)
    for length, group in by_length.items():
        n_new = min(10, cfg.max_seq_len - length)
        plain = generate(model, torch.stack(group), n_new)  # plain greedy, one batch per length
        for prompt, expected in zip(group, plain, strict=True):
            out, stats = speculative_generate(model, prompt, n_new, depth=depth)
            assert torch.equal(out, expected), prompt.tolist()
            assert stats.new_tokens == n_new and sum(stats.accepted) + stats.steps + 1 == n_new
            assert all(a <= d for a, d in zip(stats.accepted, stats.drafted, strict=True))
            assert len(stats.sources) == n_new and stats.sources.count(0) == stats.steps + 1
            assert [stats.sources.count(k) for k in range(1, depth + 1)] == stats.accepted
            total = stats if total is None else total + stats
    assert 0.3 < total.acceptance[0] < 0.9, total  # partial acceptance: rollback is exercised
    assert all(a > 0 for a in total.accepted), total
    assert depth == 1 or total.drafted[-1] < total.drafted[0]  # later positions follow acceptances
    assert 1.2 < total.tokens_per_step < depth + 1
    assert total.tokens_per_step == pytest.approx((total.new_tokens - n_prompts) / total.steps)
    assert all(r <= a for r, a in zip(total.reached[1:], total.accepted, strict=False))


def test_greedy_on_the_shipped_checkpoint():
    """The trained model (MTP depth 2): identical outputs, and drafts that are mostly accepted."""
    model = load_checkpoint(shipped_checkpoint("tiny"))
    code = "    def __init__(self, name, value=None):\n        self.name = name\n"
    prompts = [encode(t) for t in ("d", "import os\n", "class Parser:\n", code)]
    prompts.append(encode(code * 8)[:model.cfg.max_seq_len - 5])  # stops at max_seq_len
    for depth in (1, 2):
        total = None
        for prompt in prompts:
            n_new = min(32, model.cfg.max_seq_len - len(prompt))
            out, stats = speculative_generate(model, prompt, n_new, depth=depth)
            assert torch.equal(out, generate(model, prompt, n_new)), (depth, decode(prompt))
            total = stats if total is None else total + stats
        assert total.acceptance[0] > 0.5, total


def uncached_reference(model, prompt: torch.Tensor, n_new: int, depth: int) -> tuple[list, list, int]:
    """Greedy speculative decoding with no cache at all: every step recomputes the main model and
    the drafts from scratch. Returns (drafted, accepted per position, steps)."""
    seq, end = prompt.tolist(), len(prompt) + n_new
    seq.append(int(model(prompt[None])[0, -1].argmax()))
    drafted, accepted, steps = [0] * depth, [0] * depth, 0
    while len(seq) < end:
        n_drafts = min(depth, end - len(seq) - 1)
        m = len(seq) - 1
        h = model.forward_hidden(torch.tensor([seq[:m]]))
        draft = list(seq)
        for k in range(1, n_drafts + 1):
            h = model.mtp_forward(k, h, torch.tensor([draft[k:m + k]]))
            draft.append(int(model.mtp_head(k, h)[0, -1].argmax()))
        target = model(torch.tensor([draft[:m + n_drafts + 1]]))[0, m:].argmax(-1).tolist()
        n = next((i for i in range(n_drafts) if draft[m + 1 + i] != target[i]), n_drafts)
        seq += target[:n + 1]
        steps += 1
        for k in range(n_drafts):
            drafted[k] += 1
            accepted[k] += k < n
    return drafted, accepted, steps


@pytest.mark.parametrize("mtp_depth", [2, 3])
def test_draft_caches_and_rollback_match_an_uncached_reference(mtp_depth):
    """The greedy output does not depend on the drafts, so test the drafts themselves: the MTP
    caches (filled on the prompt, rolled back after rejections) must give the uncached drafts."""
    model = agreeing_model(mtp_depth, seed=1)
    for prompt in prompts(9, model.cfg.vocab_size, model.cfg.max_seq_len):
        n_new = min(10, model.cfg.max_seq_len - len(prompt))
        _, stats = speculative_generate(model, prompt, n_new)
        assert (stats.drafted, stats.accepted, stats.steps) == uncached_reference(model, prompt, n_new,
                                                                                 mtp_depth)


def test_verification_rules():
    assert greedy_verify(torch.tensor([4, 2, 7]), torch.tensor([4, 2])) == (2, torch.tensor([7]))
    n, token = greedy_verify(torch.tensor([4, 2, 7]), torch.tensor([4, 5]))
    assert n == 1 and token.tolist() == [2]
    p, q = torch.tensor([0.5, 0.3, 0.2, 0.0]), torch.tensor([0.2, 0.6, 0.1, 0.1])
    torch.testing.assert_close(residual_probs(p, q), torch.tensor([0.75, 0.0, 0.25, 0.0]))
    torch.testing.assert_close(residual_probs(p, p), p)
    g = torch.Generator().manual_seed(0)  # one draft ~ q, then the emitted token ~ p exactly
    first = torch.zeros(4)
    for _ in range(2000):
        draft = torch.multinomial(q, 1, generator=g)
        n, token = rejection_verify(torch.stack([p, q]), q[None], draft, g)
        first[int(draft) if n == 1 else int(token)] += 1
    assert (first / 2000 - p).abs().max() < 0.035 and first[3] == 0


def exact_joint(model, prompt: torch.Tensor, n_tokens: int, temperature: float, top_p: float | None):
    """P(t_1 .. t_n | prompt) of the main model by enumeration, as a [V] * n tensor."""
    V = model.cfg.vocab_size
    heads = torch.tensor(list(itertools.product(range(V), repeat=n_tokens - 1)))
    ids = torch.cat([prompt.expand(len(heads), -1), heads], 1)
    with torch.no_grad():
        p_NSV = next_token_probs(model(ids).flatten(0, 1), temperature, top_p).view(len(heads), -1, V)
    p_NSV = p_NSV[:, len(prompt) - 1:]  # position j predicts t_{j+1}
    head_probs_N = p_NSV[:, :-1].gather(2, heads[:, :, None])[:, :, 0].prod(1)
    return (head_probs_N[:, None] * p_NSV[:, -1]).view([V] * n_tokens)


def chi2_pvalue(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """Pearson's chi-square test of counts against probs, cells with expectation < 5 pooled."""
    expected = probs.flatten() * counts.sum()
    counts, keep = counts.flatten(), expected >= 5
    observed = torch.cat([counts[keep], counts[~keep].sum().view(1)])
    expected = torch.cat([expected[keep], expected[~keep].sum().view(1)])
    return float(chi2.sf(float(((observed - expected) ** 2 / expected).sum()), len(observed) - 1))


def argmax_acceptance(p_KV, q_DV, drafts_D, generator=None):
    """WRONG: accept a draft when it is the main model's argmax, then sample from p."""
    n = int((p_KV[:-1].argmax(-1) == drafts_D).cumprod(0).sum())
    return n, torch.multinomial(p_KV[n], 1, generator=generator)


def no_residual(p_KV, q_DV, drafts_D, generator=None):
    """WRONG: the min(1, p/q) rule, but after a rejection sample from p instead of the residual."""
    p_D, q_D = (x[:len(drafts_D)].gather(1, drafts_D[:, None])[:, 0] for x in (p_KV, q_DV))
    u_D = torch.rand(len(drafts_D), generator=generator)
    n = int((u_D * q_D < p_D).cumprod(0).sum())
    return n, torch.multinomial(p_KV[n], 1, generator=generator)


def sampled_pair_pvalues(model, prompt, n_samples, temperature, top_p, joint, seed):
    """p-values of the pairs (t1, t2), (t2, t3), (t3, t4) of n_samples speculative generations."""
    g = torch.Generator().manual_seed(seed)
    counts = torch.zeros(joint.shape)
    for _ in range(n_samples):
        out, _ = speculative_generate(model, prompt, 4, temperature, top_p, generator=g)
        counts[tuple(out[len(prompt):].tolist())] += 1
    assert counts[joint == 0].sum() == 0  # nothing outside the top-p nucleus
    return [chi2_pvalue(counts.sum(dims), joint.sum(dims)) for dims in ((2, 3), (0, 3), (0, 1))]


def test_sampling_has_the_main_models_distribution(monkeypatch):
    """Vocabulary 8, D = 2: the first step after the prompt drafts t2, t3 and verifies up to t4.
    The joint distribution of (t1..t4) is enumerated exactly from the main model; pairs of
    consecutive tokens are chi-square tested. The same test rejects two wrong rules with half the
    samples."""
    torch.manual_seed(0)
    model = make_model(tiny_model_cfg(vocab_size=8, n_layers=1, n_dense_layers=1, mtp_depth=2, mtp_moe=False,
                                      max_seq_len=8, init_std=0.5))
    prompt, temperature, top_p = torch.tensor([3, 5]), 0.9, 0.97
    joint = exact_joint(model, prompt, 4, temperature, top_p)
    assert (joint == 0).any()  # the nucleus cuts tokens
    assert min(sampled_pair_pvalues(model, prompt, 400, temperature, top_p, joint, seed=1)) > 1e-3
    for wrong in (argmax_acceptance, no_residual):
        monkeypatch.setattr(spec, "rejection_verify", wrong)
        assert min(sampled_pair_pvalues(model, prompt, 200, temperature, top_p, joint, seed=2)) < 1e-4, wrong


def test_generate_speculative_and_edge_cases():
    model = agreeing_model(2)
    prompt = torch.randint(0, 61, (6,))
    out = generate(model, prompt, 9, speculative=True)
    assert torch.equal(out, generate(model, prompt, 9))
    assert torch.equal(generate(model, prompt[None], 9, speculative=True), out[None])
    sampled = generate(model, prompt, 9, temperature=1.0, speculative=True, seed=5)
    assert torch.equal(sampled, generate(model, prompt, 9, temperature=1.0, speculative=True, seed=5))
    assert torch.equal(speculative_generate(model, prompt, 0)[0], prompt)
    out, stats = speculative_generate(model, prompt[:1], 1)
    assert out.shape == (2,) and stats.steps == 0 and stats.new_tokens == 1
    model.train()
    speculative_generate(model, prompt, 2)
    assert model.training


def test_bad_arguments():
    model = agreeing_model(2)
    prompt = torch.randint(0, 61, (1, 30))
    with pytest.raises(ValueError, match="batch size 1 only, got a batch of 2"):
        speculative_generate(model, prompt.expand(2, -1), 3)
    with pytest.raises(ValueError, match="depth=3 is invalid: expected an integer in 1..mtp_depth=2"):
        speculative_generate(model, prompt, 3, depth=3)
    with pytest.raises(ValueError, match="depth=0"):
        speculative_generate(model, prompt, 3, depth=0)
    with pytest.raises(ValueError, match="mtp_depth=0"):
        speculative_generate(make_model(tiny_model_cfg()), prompt, 3)
    with pytest.raises(ValueError, match="30 tokens \\+ max_new_tokens=11 = 41 > max_seq_len=40"):
        speculative_generate(model, prompt, 11)
    with pytest.raises(ValueError, match="temperature=-1"):
        speculative_generate(model, prompt, 2, temperature=-1)
    with pytest.raises(ValueError, match="out of range"):
        speculative_generate(model, torch.tensor([3, 99]), 2)
