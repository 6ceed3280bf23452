"""Attention for the short bf16 sequences of RLHF on a CPU: plain matrix products instead of torch's fused kernel.

Torch's CPU SDPA kernel (flash attention) is built for long sequences. For the shapes of a PPO step of a small model
in bf16 or under bf16 autocast (8 rows × 90 tokens, 9 query heads over 3 key/value heads, head size 64) its forward
takes 2.6 ms a layer and forward + backward 13 ms, where the plain products take 1.6 ms and 4.8 ms: a fifth of a PPO
update's time went to it (benchmarks/ppo_vs_trl.py). So `rlhf` models use `small_attention`, which runs the plain
products where they pay, and transformers' own SDPA attention everywhere else: float32 (where the fused kernel is as
fast), decoding one token at a time (likewise), a GPU, and long sequences (from about 250 tokens at 8 rows the fused
kernel is faster, and the score matrix, kept for the backward pass, grows with the square of the length). On a CPU
with AVX512-BF16 the same products run in one C kernel (`attention_kernel`: 8 × 90 tokens forward + backward
2.4 → 1.1 ms a layer).

Registered with transformers under the name `ATTENTION` (`use_small_attention`); saved models do not record it.
"""

from __future__ import annotations

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from rlhf.models import attention_kernel
from rlhf.models.lean import compute_dtype
from rlhf.models.rotary import use_rotary_kernel
from rlhf.models.unpadded import Layout, padded_attention, skip_padding

ATTENTION = "rlhf_small"
MAX_SCORES = 1 << 22
"""the largest score matrix (rows × heads × queries × keys) computed by plain products, 4M scores (8 rows × 9 heads
× 240 × 240 tokens; 17 MB of float32 probabilities kept for the backward pass); bigger ones go to SDPA"""


def small_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None, **kwargs):
    """transformers' attention interface: query (B, H, Tq, D), key and value (B, Hkv, Tk, D), the boolean mask SDPA
    gets ((B, 1, Tq, Tk), True = attend) or None; returns ((B, Tq, H, D), None).

    The plain version, one query head h of group size g = H / Hkv (transformers' eager attention):
        scores = query[:, h] @ key[:, h // g].T * scaling, masked, softmax in float32, @ value[:, h // g]
    Here the g query heads of each key/value head are stacked into one product, so grouped keys and values are
    never repeated; and the probabilities multiply the values in float32 (rounding them to bf16 first, as eager
    attention does, made the gradients of a bf16 forward 1.3× further from float32's than the fused kernel's;
    this is 1.15×). Masked scores get float32's lowest value rather than −inf, so a row with nothing to attend to
    (a left-padding position) averages instead of giving NaN; its output is never read.

    Given a `Layout` as the mask (a forward that skips the padding, rlhf/models/unpadded.py), query, key and value
    hold the real tokens only, (1, H, N, D): they are computed in the padded layout and the output packed again."""
    if isinstance(attention_mask, Layout):
        dtype = compute_dtype(query) or query.dtype
        return padded_attention(
            small_attention, module, query, key, value, attention_mask, dtype, dropout, scaling, is_causal, **kwargs
        )
    b, h, tq, d = query.shape
    hkv, tk = key.shape[1], key.shape[2]
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    # under autocast a float32 model's queries and keys come out of the rotary embedding in float32 (its cos and sin
    # are the residual stream's dtype); SDPA would cast them to the autocast dtype, and so does this
    dtype = compute_dtype(query) or query.dtype
    if (
        query.device.type != "cpu"
        or dtype not in (torch.bfloat16, torch.float16)
        or tq == 1
        or b * h * tq * tk > MAX_SCORES
        or dropout
        or (attention_mask is None and causal and tq != tk)
        or any(kwargs.get(k) is not None for k in ("position_bias", "softcap", "s_aux"))
    ):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout, scaling, is_causal, **kwargs)
    query, key, value = query.to(dtype), key.to(dtype), value.to(dtype)
    g = h // hkv
    scaling = d**-0.5 if scaling is None else scaling
    if attention_kernel.applies(query, key, attention_mask, causal):  # the same products in one C kernel
        return attention_kernel.attention(query, key, value, attention_mask, causal, scaling), None
    q = query.reshape(b, hkv, g * tq, d)  # query heads h = j·g … j·g + g − 1 read key/value head j
    scores = torch.matmul(q, key.transpose(-1, -2)).view(b, hkv, g, tq, tk)  # (B, Hkv, g, Tq, Tk), in dtype
    lowest = torch.finfo(torch.float32).min
    bias = None  # float32, added to the scaled scores: 0 where a query attends, the lowest float where it does not
    if attention_mask is not None and attention_mask.dtype == torch.bool:
        bias = torch.zeros(attention_mask.shape, device=query.device).masked_fill_(~attention_mask, lowest)
    elif attention_mask is not None:  # an additive mask
        bias = attention_mask.float()
    elif causal:  # tq == tk: the plain causal mask
        future = torch.ones(tq, tk, dtype=torch.bool, device=query.device).triu(1)
        bias = torch.zeros(1, 1, tq, tk, device=query.device).masked_fill_(future, lowest)
    # bias + scaling · scores in one pass, in float32 (type promotion); its backward is one multiply. Casting,
    # scaling and masking apart took four passes over the scores forward and two more backward: ~20% of the
    # attention's time for 8 rows of 90 tokens. A masked score stays the lowest float (scaling · score is far
    # below its precision)
    scores = scores.float() * scaling if bias is None else torch.add(bias[:, :, None], scores, alpha=scaling)
    probs = torch.softmax(scores, dim=-1).view(b, hkv, g * tq, tk)  # float32
    with torch.autocast(query.device.type, enabled=False):  # autocast would multiply in bf16
        out = torch.matmul(probs, value.float()).to(value.dtype).view(b, h, tq, d)  # (B, H, Tq, D)
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register(ATTENTION, small_attention)
AttentionMaskInterface.register(ATTENTION, sdpa_mask)


def use_small_attention(model) -> bool:
    """Switch a transformers model that uses SDPA attention to `small_attention` (the same masks; the same results
    to rounding, and SDPA itself wherever the plain products do not pay), and make its blocks skip the padding of
    padded batches where that computes the same (`skip_padding`); other attention implementations (eager, flash
    attention on a GPU) are left alone. Returns whether it switched."""
    if getattr(model.config, "_attn_implementation", None) != "sdpa":
        return False
    model.set_attn_implementation(ATTENTION)
    skip_padding(model)
    use_rotary_kernel(model)  # its queries and keys rotated and rounded to bf16 at once where this rounds them
    return True
