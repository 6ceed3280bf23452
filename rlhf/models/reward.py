"""Reward models: a transformer trunk with a scalar head, read at the last real token of prompt + response.

The model is a plain `AutoModelForSequenceClassification` (num_labels=1), so what we train is what
`from_pretrained` gives back. Its forward reads the score at the rightmost token that is not the pad token; many
chat tokenizers pad with EOS, which would move that read one token left of a response's EOS. So a reward model
gets a pad token that never occurs in text (the tokenizer's unknown token, or a new `<|pad|>`), and the score is
read at the last real token, EOS included, for left- and right-padded batches alike.
"""

from __future__ import annotations

import torch
from transformers import AutoModelForSequenceClassification, LlamaForSequenceClassification

from rlhf.models.attention import use_small_attention
from rlhf.models.load import TINY, ModelLoadError, load_tokenizer, resolve
from rlhf.models.unpadded import reading

PAD = "<|pad|>"


def distinct_pad(tokenizer) -> bool:
    """Give the tokenizer a pad token distinct from EOS; True if a new token was added (embeddings must grow)."""
    if tokenizer.pad_token_id is not None and tokenizer.pad_token_id != tokenizer.eos_token_id:
        return False
    unk = tokenizer.unk_token_id
    if unk is not None and unk not in (tokenizer.eos_token_id, tokenizer.bos_token_id):
        tokenizer.pad_token = tokenizer.unk_token
        return False
    tokenizer.add_special_tokens({"pad_token": PAD})
    return True


def load_reward_model(name: str | None, dtype: torch.dtype = torch.float32):
    """(reward model, tokenizer) from a causal LM (a new head is initialised) or a saved reward model."""
    path = resolve(name)
    tokenizer = load_tokenizer(path)
    grew = distinct_pad(tokenizer)
    if path == TINY:
        from rlhf.models.tiny import tiny_model

        lm = tiny_model(tokenizer)
        config = lm.config
        config.num_labels = 1
        with torch.random.fork_rng():
            torch.manual_seed(0)
            model = LlamaForSequenceClassification(config)
        model.model.load_state_dict(lm.model.state_dict())
    else:
        try:
            # no hub kernels (a download; and they take the lean norms' forward away): rlhf/models/load.py
            model = AutoModelForSequenceClassification.from_pretrained(
                path, num_labels=1, dtype=dtype, use_kernels=False
            )
        except (OSError, ValueError) as e:
            raise ModelLoadError(f"could not load {path!r} as a reward model: {e}") from e
    if grew:
        model.resize_token_embeddings(len(tokenizer))
    model.config.pad_token_id = tokenizer.pad_token_id
    use_small_attention(model)  # plain products where they beat SDPA's kernel on a CPU (rlhf/models/attention.py)
    return model.to(dtype), tokenizer


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """0, 1, 2, ... over the real tokens whatever the padding side; (B, T)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def score(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """One scalar per sequence, (B,), read at its last real token."""
    kwargs = {"attention_mask": attention_mask, "position_ids": position_ids(attention_mask), "use_cache": False}
    with reading(last_positions(attention_mask)):  # the last block computes the last tokens whole, the rest as keys
        out = model(input_ids=input_ids, **kwargs)  # no cache: the blocks skip the padding (rlhf/models/unpadded.py)
    return out.logits[:, 0].float()


def last_token(attention_mask: torch.Tensor) -> torch.Tensor:
    """(B,): the column of each row's last real token, where a reward model reads its score (any padding side)."""
    return attention_mask.shape[1] - 1 - attention_mask.flip(1).argmax(1)


def last_positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, T) bool: True at each row's last real token (`last_token`)."""
    reads = torch.zeros(attention_mask.shape, dtype=torch.bool, device=attention_mask.device)
    reads[torch.arange(len(reads), device=reads.device), last_token(attention_mask)] = True
    return reads


def pad_batch(sequences: list[list[int]], pad_id: int, side: str = "right") -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask), (B, T), padded with pad_id on `side`."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for i, s in enumerate(sequences):
        if side == "right":
            ids[i, : len(s)], mask[i, : len(s)] = torch.tensor(s), 1
        else:
            ids[i, width - len(s) :], mask[i, width - len(s) :] = torch.tensor(s), 1
    return ids, mask


@torch.no_grad()
def center_on_reference(model, sequences: list[list[int]], pad_id: int, batch_size: int = 16) -> dict:
    """Shift the head so that `sequences` (reference responses) score 0 on average; returns what was done.

    With a bias in the head, the bias moves. Most HF heads have none (`score = Linear(d, 1, bias=False)`); then
    the weight moves along μ, the mean last-token hidden state of the references, by −mean·μ/|μ|²: the one
    change of a bias-free linear head that brings the references' mean score to exactly 0. Every other score moves
    by −mean·(μ·h)/|μ|², nearly the same constant because final-norm outputs share a large common direction;
    the caller reports accuracy before and after, so any change in ranking is visible.
    """
    model.eval()
    head = model.score
    hidden = []
    for i in range(0, len(sequences), batch_size):
        ids, mask = pad_batch(sequences[i : i + batch_size], pad_id)
        ids, mask = ids.to(model.device), mask.to(model.device)
        h = model.model(input_ids=ids, attention_mask=mask, position_ids=position_ids(mask), use_cache=False)
        h = h.last_hidden_state
        last = mask.sum(-1) - 1  # right padding: the last real token
        hidden.append(h[torch.arange(len(ids)), last].float())  # (b, d)
    mu = torch.cat(hidden).mean(0)  # (d,)
    mean_before = float(head.weight.float()[0] @ mu + (head.bias.float()[0] if head.bias is not None else 0.0))
    if head.bias is not None:
        head.bias.data -= mean_before
        method = "bias"
    else:
        head.weight.data[0] -= (mean_before / (mu @ mu)) * mu.to(head.weight.dtype)
        method = "projection"
    mean_after = float(head.weight.float()[0] @ mu + (head.bias.float()[0] if head.bias is not None else 0.0))
    return {
        "method": method,
        "reference_mean_before": mean_before,
        "reference_mean_after": mean_after,
        "n_reference": len(sequences),
        "shift": -mean_before,
    }
