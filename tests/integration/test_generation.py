"""The decoding loop samples what `model.generate` would, from the distribution it should (tiny model)."""

import math

import pytest
import torch

from rlhf.models.generation import (
    CDF_BLOCK,
    inverse_cdf,
    next_token,
    sample_responses,
)
from rlhf.models.load import load_causal_lm
from rlhf.models.packing import packed_linears, packing_works

PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [12, 13, 14], [15, 16, 17, 18]]  # different lengths: left padding


def hf_greedy(model, tok, prompts, max_new_tokens):
    width = max(map(len, prompts))
    ids = torch.full((len(prompts), width), tok.pad_token_id)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :], mask[i, width - len(p) :] = torch.tensor(p), 1
    out = model.generate(
        input_ids=ids,
        attention_mask=mask,
        max_new_tokens=max_new_tokens,
        do_sample=False,
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
    )
    return out[:, width:]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_greedy_decoding_equals_transformers_generate(dtype):
    policy, tok = load_causal_lm("tiny")
    policy = policy.to(dtype)
    expected = hf_greedy(policy, tok, PROMPTS, 16)
    _, _, responses = sample_responses(policy, PROMPTS, tok.pad_token_id, tok.eos_token_id, 16, 0.0)
    assert responses.shape == expected.shape
    assert torch.equal(responses, expected)


def test_responses_stop_at_eos_and_are_padded_after_it():
    policy, tok = load_causal_lm("tiny")
    eos = tok.eos_token_id
    with torch.no_grad():  # make EOS likely, so some rows end early and others go on
        policy.lm_head.weight[eos] *= 0  # (tied: the EOS embedding too)
        policy.lm_head.weight[eos] += 0.6 * policy.model.norm.weight.sign()
    torch.manual_seed(0)
    _, _, responses = sample_responses(policy, PROMPTS * 4, 99, eos, 24, 1.0)
    is_eos = responses == eos
    finished = is_eos.any(1)
    assert 0 < finished.sum() < len(responses) or responses.shape[1] < 24
    for row, done in zip(responses.tolist(), finished.tolist(), strict=True):
        if done:
            first = row.index(eos)
            assert all(t == 99 for t in row[first + 1 :])  # pad after the first EOS
    assert finished.any()


def test_sampled_tokens_follow_the_temperature_softmax():
    torch.manual_seed(0)
    logits = torch.tensor([2.0, 1.0, 0.0, -1.0, -math.inf, 0.5]).repeat(20_000, 1)  # (N, V)
    token, logprob = next_token(logits, 0.7, 1.0, with_logprobs=True)
    expected = torch.softmax(logits[0] / 0.7, -1)
    freq = torch.bincount(token, minlength=6).float() / len(token)
    assert freq[4] == 0  # probability 0 is never drawn
    assert (freq - expected).abs().max() < 0.01  # 3.5 standard errors at N = 20k
    torch.testing.assert_close(logprob, expected.log()[token])


@pytest.mark.parametrize("vocab", [CDF_BLOCK * 3, 1000, 7])
def test_inverse_cdf_in_blocks_draws_what_one_cumulative_sum_does(vocab):
    gen = torch.Generator().manual_seed(0)
    probs = torch.rand(64, vocab, generator=gen, dtype=torch.float64) ** 4 + 1e-3
    probs[:, ::5] = 0  # zeros inside blocks
    probs[:32, : min(CDF_BLOCK, vocab - 1)] = 0  # and a whole block of them in half the rows
    u = 1.0 - torch.rand(64, 1, generator=gen, dtype=torch.float64)
    cdf = probs.cumsum(-1)
    plain = torch.searchsorted(cdf, u * cdf[:, -1:]).squeeze(1)
    assert torch.equal(inverse_cdf(probs, u), plain)
    # u = 1 (the largest draw): the last token that has probability, never a zero after it (in float32, where
    # the sums in two orders round apart, a token with probability all the same)
    last = inverse_cdf(probs, torch.ones(64, 1, dtype=torch.float64))
    assert (last == vocab - 1 - probs.flip(-1).ne(0).int().argmax(-1)).all()
    assert (probs[torch.arange(64), inverse_cdf(probs.float(), torch.ones(64, 1))] > 0).all()


def test_nucleus_keeps_the_smallest_set_reaching_top_p():
    torch.manual_seed(0)
    probs = torch.tensor([0.05, 0.5, 0.3, 0.1, 0.05])
    token, _ = next_token(probs.log().repeat(20_000, 1), 1.0, 0.75, with_logprobs=False)
    freq = torch.bincount(token, minlength=5).float() / len(token)
    # 0.5 + 0.3 reaches 0.75: only tokens 1 and 2 remain, renormalised
    assert freq[[0, 3, 4]].sum() == 0
    assert abs(freq[1] - 0.5 / 0.8) < 0.01


def test_greedy_picks_the_argmax():
    logits = torch.tensor([[0.1, 3.0, 2.9], [5.0, -1.0, 4.0]])
    token, logprob = next_token(logits, 0.0, 1.0, with_logprobs=False)
    assert token.tolist() == [1, 0] and logprob is None


@pytest.mark.skipif(not packing_works(torch.float32), reason="this torch build cannot pack weights for oneDNN")
def test_packed_linears_compute_the_plain_products_and_are_undone():
    policy, _ = load_causal_lm("tiny")
    ids = torch.tensor([[5, 6, 7, 8, 9, 10], [11, 12, 13, 14, 15, 16]])
    with torch.no_grad():
        plain = policy(input_ids=ids).logits
        with packed_linears(policy, 2):
            linears = [m for m in policy.modules() if isinstance(m, torch.nn.Linear)]
            assert linears and all("forward" in m.__dict__ for m in linears)  # really packed
            packed = policy(input_ids=ids).logits
        assert all("forward" not in m.__dict__ for m in linears)  # undone
        torch.testing.assert_close(packed, plain, rtol=0, atol=1e-5)
        with torch.autocast("cpu", dtype=torch.bfloat16), packed_linears(policy, 2):
            assert not any("forward" in m.__dict__ for m in linears)  # autocast casts inside the plain product
