"""The shortcuts PPO takes for speed compute what the slow way computes (tiny model)."""

import copy

import torch

from rlhf.models.generation import inference_copy, refresh_inference_copy, sample_responses
from rlhf.models.load import load_causal_lm
from rlhf.models.lora import plain_model, wrap_lora
from rlhf.models.reward import load_reward_model, score
from rlhf.stages.ppo import lm_response_logits, response_logprobs


def perturbed_lora(model, task_type="CAUSAL_LM"):
    """LoRA adapters (and any trainable head copy) moved away from zero, as training would."""
    model = wrap_lora(model, 4, 8, 0.0, "all-linear", task_type)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.3)
    return model


def test_sampling_logprobs_equal_a_forward_pass():
    torch.manual_seed(0)
    policy, tok = load_causal_lm("tiny")
    prompts = [[5, 6, 7, 8, 9], [11, 12, 13]]  # different lengths: left padding
    prompt_ids, prompt_mask, responses, logprobs = sample_responses(
        policy, prompts, tok.pad_token_id, tok.eos_token_id, 12, 0.7, with_logprobs=True
    )
    ids = torch.cat([prompt_ids, responses], 1)
    mask = torch.cat([prompt_mask, torch.ones_like(responses)], 1)
    context = prompt_ids.shape[1]
    with torch.no_grad():
        recomputed, _ = response_logprobs(lm_response_logits(policy, ids, mask, context), ids, context, 0.7)
    is_eos = (responses == tok.eos_token_id).int()
    before_eos = (is_eos.cumsum(1) - is_eos) == 0  # tokens up to and including the first EOS
    assert before_eos.sum() > 10
    torch.testing.assert_close(logprobs[before_eos], recomputed[before_eos], rtol=0, atol=1e-4)


def test_inference_copy_is_the_policy_with_lora_merged():
    torch.manual_seed(0)
    base, _ = load_causal_lm("tiny")
    policy = perturbed_lora(base)
    merged = plain_model(copy.deepcopy(policy))
    sampler = inference_copy(policy, torch.float32)
    refresh_inference_copy(sampler, policy)
    ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
    with torch.no_grad():
        expected = merged(input_ids=ids).logits
        torch.testing.assert_close(sampler(input_ids=ids).logits, expected, rtol=0, atol=1e-5)
        torch.testing.assert_close(policy(input_ids=ids).logits, expected, rtol=0, atol=1e-5)
    # a bf16 copy samples from (nearly) the same distribution
    low = inference_copy(policy, torch.bfloat16)
    refresh_inference_copy(low, policy)
    with torch.no_grad():
        p_low = torch.softmax(low(input_ids=ids).logits.float(), -1)
    assert (p_low - torch.softmax(expected, -1)).abs().max() < 0.02


def test_value_model_with_adapters_off_is_the_reward_model():
    torch.manual_seed(0)
    reward_model, tok = load_reward_model("tiny")
    ids = torch.tensor([[5, 6, 7, 8, 9, 10], [11, 12, 13, 14, 15, 16]])
    mask = torch.ones_like(ids)
    with torch.no_grad():
        expected = score(reward_model, ids, mask)
    value_model = perturbed_lora(copy.deepcopy(reward_model), "SEQ_CLS")
    with torch.no_grad():
        assert (score(value_model, ids, mask) - expected).abs().min() > 1e-3  # the value model has moved
        with value_model.disable_adapter():
            torch.testing.assert_close(score(value_model, ids, mask), expected, rtol=0, atol=1e-6)
