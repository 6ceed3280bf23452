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


@torch.no_grad()
def generate(model, tokenizer, conversations: list, sampling: SamplingConfig, seed: int | None = None) -> list[str]:
    """One response per conversation (a list of {"role", "content"} turns ending with the user's)."""
    if seed is not None:
        torch.manual_seed(seed)
    model.eval()
    side, tokenizer.padding_side = tokenizer.padding_side, "left"  # new tokens follow every prompt directly
    try:
        out = []
        for i in range(0, len(conversations), sampling.batch_size):
            texts = [render_prompt(tokenizer, c) for c in conversations[i : i + sampling.batch_size]]
            enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
            kwargs = (
                {"do_sample": False}
                if sampling.temperature <= 0
                else {"do_sample": True, "temperature": sampling.temperature, "top_p": sampling.top_p, "top_k": 0}
            )
            ids = model.generate(
                **enc,
                max_new_tokens=sampling.max_new_tokens,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id,
                **kwargs,
            )
            new = ids[:, enc["input_ids"].shape[1] :]  # (B, T_new)
            out += [t.strip() for t in tokenizer.batch_decode(new, skip_special_tokens=True)]
        return out
    finally:
        tokenizer.padding_side = side
