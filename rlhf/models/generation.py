"""Batched chat generation with left padding and the KV cache."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rlhf.data.chat import render_prompt


@dataclass
class SamplingConfig:
    max_new_tokens: int = 128
    """the longest response, in tokens"""
    temperature: float = 0.7
    """softmax temperature; 0 means greedy decoding"""
    top_p: float = 0.9
    """nucleus sampling: keep the smallest set of tokens whose probability reaches top_p"""
    batch_size: int = 8
    """prompts generated together"""


@dataclass(frozen=True)
class Generated:
    text: str  # decoded, special tokens removed, stripped
    n_tokens: int  # generated tokens, counting the EOS when there is one
    finished: bool  # True if the model emitted EOS; False if it was cut at max_new_tokens


@torch.no_grad()
def generate_batch(model, tokenizer, conversations: list, sampling: SamplingConfig, n: int = 1) -> list[Generated]:
    """`n` responses to each conversation, in one batch: [conv0 × n, conv1 × n, ...]."""
    model.eval()
    side, tokenizer.padding_side = tokenizer.padding_side, "left"  # new tokens follow every prompt directly
    try:
        texts = [render_prompt(tokenizer, c) for c in conversations]
        enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
    finally:
        tokenizer.padding_side = side
    if sampling.temperature <= 0:
        kwargs = {"do_sample": False}
    else:
        kwargs = {"do_sample": True, "temperature": sampling.temperature, "top_p": sampling.top_p, "top_k": 0}
    ids = model.generate(
        **enc,
        max_new_tokens=sampling.max_new_tokens,
        num_return_sequences=n,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        **kwargs,
    )
    new = ids[:, enc["input_ids"].shape[1] :]  # (B·n, T_new), padded after EOS
    is_eos = new == tokenizer.eos_token_id  # (B·n, T_new)
    finished = is_eos.any(dim=1)
    # tokens up to and including the first EOS; every token when there is none
    n_tokens = torch.where(
        finished, is_eos.int().argmax(dim=1) + 1, torch.full_like(finished, new.shape[1], dtype=torch.long)
    )
    decoded = tokenizer.batch_decode(new, skip_special_tokens=True)
    return [Generated(t.strip(), int(c), bool(f)) for t, c, f in zip(decoded, n_tokens, finished, strict=True)]


@torch.no_grad()
def sample_responses(
    model,
    prompts: list[list[int]],
    pad_id: int,
    eos_id: int,
    max_new_tokens: int,
    temperature: float,
    top_p: float = 1.0,
    with_logprobs: bool = False,
):
    """Sample one response per tokenised prompt, as token ids for training on.

    Returns (prompt_ids (B, P) left-padded with pad_id, prompt_mask (B, P), responses (B, T)); each response
    is padded with pad_id after its first EOS, and T ≤ max_new_tokens. Temperature 0 decodes greedily.
    With `with_logprobs` (temperature > 0, top_p = 1), also the log-probability of each response token under the
    distribution it was sampled from, softmax(logits / temperature), (B, T) float32: the sampling pass computed the
    logits already, so a PPO step needs no second forward pass of the policy for them.
    """
    if with_logprobs and (temperature <= 0 or top_p < 1):
        raise ValueError("log-probs of the sampling distribution need temperature > 0 and top_p = 1")
    width = max(len(p) for p in prompts)
    prompt_ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    prompt_mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):  # left padding: every response starts right after its prompt
        prompt_ids[i, width - len(p) :], prompt_mask[i, width - len(p) :] = torch.tensor(p), 1
    sampling = {"do_sample": True, "temperature": temperature, "top_p": top_p, "top_k": 0}
    out = model.generate(
        input_ids=prompt_ids.to(model.device),
        attention_mask=prompt_mask.to(model.device),
        max_new_tokens=max_new_tokens,
        **(sampling if temperature > 0 else {"do_sample": False}),
        pad_token_id=pad_id,
        eos_token_id=eos_id,
        use_cache=True,
        return_dict_in_generate=True,
        output_logits=with_logprobs,
    )
    responses = out.sequences[:, width:].cpu()
    if not with_logprobs:
        return prompt_ids, prompt_mask, responses
    # raw logits of every sampling step, before temperature: T × (B, V); one step at a time keeps memory at (B, V)
    logprobs = torch.stack(
        [
            torch.log_softmax(step.float() / temperature, dim=-1).gather(-1, responses[:, t, None].to(step.device))[
                :, 0
            ]
            for t, step in enumerate(out.logits)
        ],
        dim=1,
    ).cpu()  # (B, T), meaningless after a response's EOS
    return prompt_ids, prompt_mask, responses, logprobs


def generate(model, tokenizer, conversations: list, sampling: SamplingConfig, seed: int | None = None) -> list[str]:
    """One response per conversation (a list of {"role", "content"} turns ending with the user's)."""
    if seed is not None:
        torch.manual_seed(seed)
    out = []
    for i in range(0, len(conversations), sampling.batch_size):
        out += [g.text for g in generate_batch(model, tokenizer, conversations[i : i + sampling.batch_size], sampling)]
    return out


def inference_copy(policy, dtype: torch.dtype):
    """A plain model of the policy's architecture in `dtype`, to sample rollouts from; fill it with
    `refresh_inference_copy`. Decoding a small model on a CPU is bound by reading the weights once per token, so a
    bf16 copy halves that traffic, and LoRA adapters merged into it cost nothing per token."""
    base = policy.get_base_model() if hasattr(policy, "get_base_model") else policy
    copy = type(base)._from_config(base.config, dtype=dtype)
    copy.generation_config = base.generation_config
    return copy.to(base.device).eval().requires_grad_(False)


@torch.no_grad()
def refresh_inference_copy(copy, policy) -> None:
    """copy ← the policy's current weights with any LoRA adapters merged in (W + s·BA), cast to the copy's dtype."""
    base = policy.get_base_model() if hasattr(policy, "get_base_model") else policy
    deltas = {}
    for name, module in base.named_modules():
        if hasattr(module, "base_layer") and hasattr(module, "get_delta_weight"):  # a peft LoRA layer
            deltas[f"{name}.weight"] = sum(module.get_delta_weight(a) for a in module.active_adapters)
    target = dict(copy.named_parameters())
    for name, p in base.named_parameters():
        if ".lora_" in name:
            continue
        name = name.replace(".base_layer.", ".")  # a LoRA layer keeps the original Linear as base_layer
        target.pop(name).copy_(p + deltas[name] if name in deltas else p)
    if target:
        raise ValueError(f"inference copy: no weights for {sorted(target)[:3]}")
