"""Batching tokenised demonstrations into tensors with the SFT label mask."""

from __future__ import annotations

import torch

from rlhf.data.chat import TokenizedDemo

IGNORE_INDEX = -100  # labels at prompt and padding positions: no loss there


def collate_sft(examples: list[TokenizedDemo], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a batch. Labels equal input_ids on response tokens and IGNORE_INDEX on prompt and padding.

    Padding is told apart by the attention mask, not by comparing with pad_token_id: many chat models use EOS
    as padding, and the response's own EOS must be trained.
    """
    width = max(len(e.input_ids) for e in examples)
    input_ids = torch.full((len(examples), width), pad_token_id, dtype=torch.long)  # (B, T)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.long)  # (B, T), 1 on real tokens
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)  # (B, T)
    for i, e in enumerate(examples):
        n = len(e.input_ids)
        input_ids[i, :n] = torch.tensor(e.input_ids)
        attention_mask[i, :n] = 1
        labels[i, e.prompt_len : n] = input_ids[i, e.prompt_len : n]
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
