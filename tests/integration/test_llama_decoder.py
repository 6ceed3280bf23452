"""The lean Llama decoding forward computes the transformers forward's logits, and sampling takes it only where it
applies (tiny model)."""

import pytest
import torch
from peft import LoraConfig, get_peft_model

from rlhf.models import generation
from rlhf.models.generation import TransformersDecoder, sample_responses
from rlhf.models.llama_decoder import ConstantProducts, LlamaDecoder
from rlhf.models.tiny import tiny_model, tiny_tokenizer


def left_padded(rows: list[list[int]], pad: int):
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), pad)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, width - len(r) :], mask[i, width - len(r) :] = torch.tensor(r), 1
    return ids, mask, (mask.cumsum(1) - 1).clamp(min=0)


PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [12, 13], [15, 16, 17, 18]]
BEGIN_ALIKE = [[5, 6, 7, 8, 9, 10, 11], [5, 6, 7, 12], [5, 6, 15, 16, 17]]  # a shared start, as a system prompt


@pytest.mark.parametrize("prompts", [PROMPTS, BEGIN_ALIKE])
@pytest.mark.parametrize(("dtype", "tol"), [(torch.float32, 1e-5), (torch.bfloat16, 3e-2)])
def test_prefill_and_steps_give_the_transformers_logits(dtype, tol, prompts):
    tok = tiny_tokenizer()
    model = tiny_model(tok).to(dtype).eval()  # 4 query heads on 2 key/value heads: grouped attention
    ids, mask, positions = left_padded(prompts, tok.pad_token_id)
    steps = 6
    lean = LlamaDecoder(model, len(ids), ids.shape[1] + steps)
    plain = TransformersDecoder(model)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        got, want = lean.prefill(ids, mask, positions), plain.prefill(ids, mask, positions)
        pairs = [(got, want)]
        position = positions[:, -1:]
        for _ in range(steps):  # the same tokens fed to both
            token, position = torch.randint(3, 200, (len(ids),), generator=gen), position + 1
            pairs.append((lean.step(token, position), plain.step(token, position)))
    for got, want in pairs:
        assert got.shape == want.shape == (3, len(tok))
        scale = want.float().abs().max()
        assert (got.float() - want.float()).abs().max() <= tol * scale


def rows_multiplied(lean: LlamaDecoder) -> list:
    """The leading shapes of what block 0's q/k/v product multiplies, call by call (patched in)."""
    rows = []
    norm1, qkv, *rest = lean.layers[0]
    lean.layers[0] = (norm1, lambda x: rows.append(x.shape[:-1]) or qkv(x), *rest)
    return rows


def test_the_prefill_multiplies_the_real_tokens_only(monkeypatch):
    """Left padding of the prompts is left out of the products (and the logits are still the transformers')."""
    monkeypatch.setenv("RLHF_THIN_LAYERS", "0")  # steps through the products seen here (one-call steps: test_thin)
    tok = tiny_tokenizer()
    model = tiny_model(tok).eval()
    ids, mask, positions = left_padded([[5, 6, 7, 8, 9, 10, 11], [12, 13], [15, 16, 17, 18]], tok.pad_token_id)
    lean = LlamaDecoder(model, len(ids), ids.shape[1] + 2)
    rows = rows_multiplied(lean)
    with torch.no_grad():
        got = lean.prefill(ids, mask, positions)
        want = TransformersDecoder(model).prefill(ids, mask, positions)
        lean.step(torch.tensor([3, 4, 5]), positions[:, -1:] + 1)
    assert rows == [(13,), (3, 1)]  # 7 + 2 + 4 real prompt tokens, then one token per row
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_the_prefill_computes_the_tokens_prompts_begin_with_once():
    tok = tiny_tokenizer()
    model = tiny_model(tok).eval()
    ids, mask, positions = left_padded(BEGIN_ALIKE, tok.pad_token_id)
    lean = LlamaDecoder(model, len(ids), ids.shape[1] + 2)
    rows = rows_multiplied(lean)
    with torch.no_grad():
        got = lean.prefill(ids, mask, positions)
        want = TransformersDecoder(model).prefill(ids, mask, positions)
    assert rows == [(7 + 4 + 5 - 3 - 2,)]  # the second prompt's 5, 6, 7 and the third's 5, 6 are the first's
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    ids, mask, positions = left_padded([[5, 6, 7], [9, 5, 6, 7]], tok.pad_token_id)  # alike, but not at the start
    lean = LlamaDecoder(model, 2, 6)
    rows = rows_multiplied(lean)
    with torch.no_grad():
        lean.prefill(ids, mask, positions)
    assert rows == [(7,)]  # nothing shared


def test_sampling_takes_the_lean_forward_for_llama_and_draws_what_the_transformers_forward_would(monkeypatch):
    tok = tiny_tokenizer()
    model = tiny_model(tok)
    prompts = [[5, 6, 7, 8, 9, 10, 11], [12, 13, 14], [15, 16, 17, 18]] * 2
    calls = []
    for name in ("forward", "thin_step"):  # a step in one kernel call where the AVX2 kernel applies
        counted = getattr(LlamaDecoder, name)
        monkeypatch.setattr(LlamaDecoder, name, lambda self, *a, f=counted: calls.append(1) or f(self, *a))

    def sample():
        torch.manual_seed(0)
        return sample_responses(model, prompts, tok.pad_token_id, tok.eos_token_id, 12, 0.9, with_logprobs=True)

    _, _, lean_tokens, lean_logprobs = sample()
    assert len(calls) == lean_tokens.shape[1]  # the prefill and every step but the last token's
    monkeypatch.setattr(LlamaDecoder, "supports", staticmethod(lambda model: False))
    _, _, plain_tokens, plain_logprobs = sample()
    assert len(calls) == lean_tokens.shape[1]
    assert torch.equal(lean_tokens, plain_tokens)
    torch.testing.assert_close(lean_logprobs, plain_logprobs, rtol=1e-5, atol=1e-5)


def test_the_lean_forward_declines_models_it_would_compute_wrongly():
    tok = tiny_tokenizer()
    assert LlamaDecoder.supports(tiny_model(tok))
    with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast casts inside each product: the plain forward's job
        assert not LlamaDecoder.supports(tiny_model(tok))
    lora = get_peft_model(tiny_model(tok), LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    assert not LlamaDecoder.supports(lora)
    assert not LlamaDecoder.supports(lora.get_base_model())  # its q/v projections are LoRA layers now
    biased = tiny_model(tok)
    biased.model.layers[1].mlp.down_proj = torch.nn.Linear(128, 64, bias=True)
    assert not LlamaDecoder.supports(biased)
    # and a declined model still samples, through the transformers forward
    _, _, responses = generation.sample_responses(lora, [[5, 6, 7]], tok.pad_token_id, tok.eos_token_id, 4, 0.0)
    assert responses.shape == (1, 4) or responses[0, -1] == tok.eos_token_id


def test_a_float32_policy_decoded_in_bf16_draws_what_autocast_would_and_keeps_only_constant_blocks():
    from rlhf.models.freeze import bottom_output

    tok = tiny_tokenizer()
    policy = tiny_model(tok)  # float32, 2 blocks: block 0 and the tied head frozen, block 1 trains
    constant = ConstantProducts(blocks=1, head=True)
    prompts = [[5, 6, 7, 8, 9, 10, 11], [12, 13, 14], [15, 16, 17, 18]]

    def sample(**decoding):
        torch.manual_seed(0)
        return sample_responses(policy, prompts, tok.pad_token_id, tok.eos_token_id, 12, 0.9, True, True, **decoding)

    # the hidden states too: within 0.35% of autocast's here (a bf16 residual stream: 0.64%)
    prompt_ids, prompt_mask, responses, _, hidden = sample_responses(
        policy, prompts, tok.pad_token_id, tok.eos_token_id, 6, 0.9, bottom=2, dtype=torch.bfloat16
    )
    ids, mask = torch.cat([prompt_ids, responses], 1), torch.cat([prompt_mask, torch.ones_like(responses)], 1)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        want = bottom_output(policy, 2, ids, attention_mask=mask, position_ids=(mask.cumsum(1) - 1).clamp(min=0))
    real = mask.bool()
    assert ((hidden - want)[real].norm(dim=-1) / want[real].norm(dim=-1)).max() < 0.005

    draws = []
    for _ in range(2):
        with torch.autocast("cpu", dtype=torch.bfloat16):  # the transformers forward, products in bf16
            _, _, want_tokens, want_logprobs = sample()
        _, _, tokens, logprobs = sample(dtype=torch.bfloat16, constant=constant)
        assert torch.equal(tokens, want_tokens)
        # bf16 products, float32 residual stream and norms, as autocast: the same to bf16 rounding
        torch.testing.assert_close(logprobs, want_logprobs, rtol=0, atol=0.02)
        draws.append(logprobs)
        with torch.no_grad():  # a PPO update moves the block that trains
            policy.model.layers[1].mlp.down_proj.weight.mul_(3.0)
    assert not torch.equal(draws[0], draws[1])  # the update changed the draw: the trained block was packed again
    assert set(constant.products) == {"head", (0, "qkv"), (0, "o"), (0, "gate_up"), (0, "down")}


@pytest.mark.parametrize("prompts", [[[5, 6, 7, 8, 9, 10, 11], [12, 13, 14], [15, 16, 17, 18]], BEGIN_ALIKE])
def test_the_decoder_keeps_the_bottom_blocks_output_at_every_position(prompts):
    """`record`: what leaves block k − 1 for the prompt and every sampled token (the last one through the bottom
    alone, with one more token after it), as the transformers forward of those blocks computes it."""
    from rlhf.models.freeze import bottom_output

    tok = tiny_tokenizer()
    model = tiny_model(tok).eval()
    torch.manual_seed(0)
    prompt_ids, prompt_mask, responses, _, hidden = sample_responses(
        model, prompts, tok.pad_token_id, tok.eos_token_id, 8, 0.9, bottom=1, append=7
    )
    ids = torch.cat([prompt_ids, responses, torch.full((3, 1), 7)], 1)  # no EOS drawn: every column is real
    assert not (responses == tok.eos_token_id).any() and hidden.shape == (*ids.shape, 64)
    mask = torch.cat([prompt_mask, torch.ones_like(ids[:, prompt_ids.shape[1] :])], 1)
    with torch.no_grad():
        want = bottom_output(model, 1, ids, attention_mask=mask, position_ids=(mask.cumsum(1) - 1).clamp(min=0))
    real = mask.bool()
    torch.testing.assert_close(hidden[real], want[real], rtol=1e-5, atol=1e-5)
    lora = get_peft_model(tiny_model(tok), LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    with pytest.raises(ValueError, match="lean Llama decoder"):  # only the lean decoder keeps it
        sample_responses(lora, prompts, tok.pad_token_id, tok.eos_token_id, 2, 0.9, bottom=1)


def test_decoding_in_another_dtype_is_refused_where_the_lean_decoder_does_not_apply():
    tok = tiny_tokenizer()
    lora = get_peft_model(tiny_model(tok), LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    with pytest.raises(ValueError, match="lean Llama decoder"):
        sample_responses(lora, [[5, 6]], tok.pad_token_id, tok.eos_token_id, 2, 0.9, dtype=torch.bfloat16)
