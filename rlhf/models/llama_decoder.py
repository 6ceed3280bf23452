"""A lean decoding forward for Llama-shaped models on a CPU, for sampling.

Decoding a few rows a token at a time is bound by two things on a CPU: reading the weights once per token, and
eager PyTorch's fixed cost per operation. The transformers forward spends ~40 operations a layer on one token
(three q/k/v products, a `cat` per rotary half and per cache update, a mask built per token, SDPA's flash kernel
for a single query) and on a 2-core CPU that overhead came to as much time as the products themselves: 8 rows of
the embedded 135M model in bf16 took ~85 ms a token, of which the weight products were ~40 ms.

`LlamaDecoder` runs the same arithmetic with about 20 operations a layer: q, k and v from one product and gate and
up from another (weights concatenated once, packed in oneDNN's blocked layout for the batch's rows as
`generation.packed_linears` does; in float32 on an AVX2 CPU without AVX-512, in the panels of `thin.ThinProduct`,
whose kernel streams them ~1.6× faster), the rotary embedding as `x·cos + roll(x)·sin±` on queries and keys together, a
key/value cache allocated once for the whole response, the attention mask built once per token for every layer,
and attention as two batched products over the grouped heads with a float32 softmax (transformers' eager
attention). Logits equal the transformers forward's to rounding (tests/integration/test_llama_decoder.py).

It applies where `LlamaDecoder.supports(model)`: a plain `LlamaForCausalLM` on a CPU (no LoRA wrapper, no biases,
SiLU), outside autocast; everything else decodes through the transformers forward.

Given a `dtype`, it multiplies a model of another precision in that one: each weight is cast as it is packed, so PPO
samples its float32 policy in bf16 without a bf16 copy of the whole model beside it. The residual stream and the
norms keep the model's precision, as under autocast: the frozen bottom's output of the embedded model decoded in
bf16 is within 0.25% (relative L2) of the autocast forward's, against 0.95% with a bf16 residual stream. With
`ConstantProducts` the packed products of blocks that never change (a policy's frozen bottom, a frozen LM head) are
kept from one call to the next: cast and packed once a run instead of once a PPO step. The prefill leaves the
prompts' left padding out of the products and norms, and computes the first tokens that prompts have in common (a
chat template's system prompt) once (`unpadded.shared_tokens`): the benchmark's 8 prompts are 351 real tokens, of
which 8 × 24 are SmolLM2's default system prompt, so its prefill multiplies 183.

Given `record` = k, it also keeps what leaves block k − 1 at every position it computes (`recorded`), and
`extend_bottom` runs those k blocks alone on tokens after the last sampled one: the hidden states of a frozen
bottom of k blocks over prompt and response, which PPO would otherwise compute again in a forward of its own.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from transformers import LlamaForCausalLM
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from rlhf.models import thin
from rlhf.models.packing import linear_product
from rlhf.models.unpadded import shared_tokens, token_keys


@dataclass
class ConstantProducts:
    """The packed products of a model's bottom `blocks` blocks (and of its LM head, if `head`), which the caller
    promises do not change between the `LlamaDecoder`s built with this object: each is made once and then reused.
    Packing depends on the number of rows, so a call with other rows starts again."""

    blocks: int
    head: bool
    rows: int | None = None
    products: dict = field(default_factory=dict)

    def get(self, key, rows: int, make):
        if rows != self.rows:
            self.products.clear()
            self.rows = rows
        if key not in self.products:
            self.products[key] = make()
        return self.products[key]


class LlamaDecoder:
    """Prefill, then one token per call, for `rows` sequences of at most `length` tokens (prompt + response), in
    `dtype` (default: the model's). With `record` = k, the hidden states leaving block k − 1 at every position
    computed are kept in `recorded` (rows, length, hidden), float32."""

    @staticmethod
    def supports(model) -> bool:
        if type(model) is not LlamaForCausalLM or model.device.type != "cpu" or torch.is_autocast_enabled("cpu"):
            return False
        cfg = model.config
        if cfg.hidden_act != "silu" or getattr(cfg, "pretraining_tp", 1) != 1:
            return False
        for layer in model.model.layers:
            a, m = layer.self_attn, layer.mlp
            projections = (a.q_proj, a.k_proj, a.v_proj, a.o_proj, m.gate_proj, m.up_proj, m.down_proj)
            if any(type(p) is not torch.nn.Linear or p.bias is not None for p in projections):
                return False
            if (
                type(layer.input_layernorm) is not LlamaRMSNorm
                or type(layer.post_attention_layernorm) is not LlamaRMSNorm
            ):
                return False
        return type(model.lm_head) is torch.nn.Linear and model.lm_head.bias is None

    @torch.no_grad()
    def __init__(
        self,
        model,
        rows: int,
        length: int,
        dtype: torch.dtype | None = None,
        constant: ConstantProducts | None = None,
        record: int = 0,
    ):
        cfg, inner = model.config, model.model
        self.device = model.device
        self.heads, self.kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.scale = self.head_dim**-0.5
        self.dtype = dtype or inner.embed_tokens.weight.dtype
        self.embed = inner.embed_tokens.weight.detach()  # the rows looked up are cast, not the table

        def product(*weights, key=None):
            """x -> x·Wᵀ for W the weights stacked, in self.dtype; kept in `constant` under `key` (if given)."""

            def make():
                if thin.serves(self.dtype):
                    return thin.ThinProduct(list(weights))
                cast = [w.detach().to(self.dtype) for w in weights]
                return linear_product(cast[0] if len(cast) == 1 else torch.cat(cast), rows)

            return make() if constant is None or key is None else constant.get(key, rows, make)

        def norm(module):  # in the residual stream's precision, as the model's own norms are
            return module.weight.detach(), module.variance_epsilon

        self.rotary = inner.rotary_emb
        self.norm = norm(inner.norm)
        self.head = product(model.lm_head.weight, key="head" if constant is not None and constant.head else None)
        self.layers = []
        for i, layer in enumerate(inner.layers[: cfg.num_hidden_layers]):
            a, m = layer.self_attn, layer.mlp
            kept = constant is not None and i < constant.blocks
            self.layers.append(
                (
                    norm(layer.input_layernorm),
                    product(a.q_proj.weight, a.k_proj.weight, a.v_proj.weight, key=(i, "qkv") if kept else None),
                    product(a.o_proj.weight, key=(i, "o") if kept else None),
                    norm(layer.post_attention_layernorm),
                    product(m.gate_proj.weight, m.up_proj.weight, key=(i, "gate_up") if kept else None),
                    product(m.down_proj.weight, key=(i, "down") if kept else None),
                )
            )
        self.intermediate = cfg.intermediate_size
        # float32 cache, keys stored transposed: batched products of a few rows with a short cache are 2-5× faster
        # in float32 than in bf16 on a CPU (24 × 3 × 64 by 64 × 90: 25 µs against 140 µs), and need no copy of K
        cache = (len(self.layers), rows * self.kv_heads)
        self.keys_t = torch.empty(*cache, self.head_dim, length)  # (layers, B·nkv, d, length)
        self.values = torch.empty(*cache, length, self.head_dim)  # (layers, B·nkv, length, d)
        self.key_mask = torch.zeros(rows, length, dtype=torch.bool)  # which cached positions hold real tokens
        # rotate_half(x)·sin = roll(x, d/2)·(sin with its first half negated): one roll instead of two slices and a cat
        self.sign = torch.cat([-torch.ones(self.head_dim // 2), torch.ones(self.head_dim // 2)])
        self.filled = 0
        if not 0 <= record <= len(self.layers):
            raise ValueError(f"record ({record}) must be between 0 and the model's {len(self.layers)} blocks")
        self.record = record
        self.recorded = torch.zeros(rows, length, cfg.hidden_size) if record else None
        # a step's blocks in one call of the AVX2 kernel's library where every product is its own
        self.thin_layers = None
        fused = os.environ.get("RLHF_THIN_LAYERS", "1") != "0" and self.embed.dtype == torch.float32
        if fused and thin.ThinLayers.serves(self.layers, self.head_dim):
            shape = (self.heads, self.kv_heads, self.head_dim, self.intermediate)
            self.thin_layers = thin.ThinLayers(self.layers, *shape, self.keys_t, self.values)

    def prefill(self, ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """ids, mask, positions (B, P): the left-padded prompts -> logits of their last position (B, V)."""
        self.filled = 0
        self.key_mask.zero_()
        self.key_mask[:, : ids.shape[1]] = mask.bool()
        return self.forward(ids, positions)

    def step(self, token: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
        """token (B,), position (B, 1): one more token per row -> its logits (B, V)."""
        self.key_mask[:, self.filled] = True
        if self.thin_layers is not None:
            return self.thin_step(token, position)
        return self.forward(token[:, None], position)

    @torch.no_grad()
    def thin_step(self, token: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
        """`step` with every block in one call of the kernel library (`thin.ThinLayers`): the same arithmetic."""
        start = self.filled
        x = F.embedding(token, self.embed).contiguous()  # (B, H) float32
        cos, sin = (t.float() for t in self.rotary(x[:, None], position))  # (B, 1, d) each
        cos, sin = cos[:, 0].contiguous(), (sin * self.sign)[:, 0].contiguous()
        bias = torch.zeros(self.key_mask.shape[0], start + 1)
        bias.masked_fill_(~self.key_mask[:, : start + 1], torch.finfo(torch.float32).min)
        self.thin_layers(x, cos, sin, bias, start, self.recorded, self.record)
        self.filled = start + 1
        return self.head(rms_norm(x[:, None], *self.norm).to(self.dtype))[:, 0]  # (B, V)

    def extend_bottom(self, ids: torch.Tensor, positions: torch.Tensor) -> None:
        """ids, positions (B, n): more tokens per row (the last sampled one, which no step fed, and any after it)
        through the recorded bottom blocks only, recording their hidden states; no logits, and no steps after."""
        if not self.record:
            raise ValueError("extend_bottom needs a decoder built with record > 0")
        self.key_mask[:, self.filled : self.filled + ids.shape[1]] = True
        self.forward(ids, positions, stop=self.record)

    @torch.no_grad()
    def forward(self, ids: torch.Tensor, positions: torch.Tensor, stop: int | None = None) -> torch.Tensor | None:
        """The new tokens' logits at their last position (B, V); with `stop`, blocks [0, stop) only and None."""
        b, n = ids.shape  # n new tokens per row, at cache positions [start, end)
        start, end = self.filled, self.filled + n
        nh, nkv, d = self.heads, self.kv_heads, self.head_dim
        g = nh // nkv  # query heads per key/value head
        # the residual stream keeps the model's precision, the products run in self.dtype: a float32 model decoded
        # in bf16 computes what it computes under bf16 autocast
        x = F.embedding(ids, self.embed)  # (B, n, H)
        cos, sin = (t.float() for t in self.rotary(x, positions))  # (B, n, d) each
        cos, sin = cos[:, :, None], (sin * self.sign)[:, :, None]  # (B, n, 1, d)
        # additive mask, the same for every layer: a query sees the real tokens up to its own position
        causal = torch.arange(end)[None, :] <= torch.arange(start, end)[:, None]  # (n, end)
        seen = self.key_mask[:, None, :end] & causal  # (B, n, end)
        bias = torch.zeros(seen.shape).masked_fill_(~seen, torch.finfo(torch.float32).min)
        bias = bias[:, None, None].expand(b, nkv, g, n, end).reshape(b * nkv, g * n, end)
        # the prompts' left padding: products and norms run on the real tokens only, (N, H), and a prompt's first
        # tokens that an earlier row begins with too (a chat template's system prompt) once (`shared_tokens`);
        # attention on the rows
        real = self.key_mask[:, start:end]  # (B, n)
        index = source = None
        if n > 1:  # the prefill starts every row here, so rows that begin alike share; later tokens follow caches
            # that differ, so they stand for themselves (keys unique to each row and column)
            keys = token_keys(ids, positions) if start == 0 else torch.arange(b * n).view(b, n)
            index, source = shared_tokens(real, keys)
        packed = index is not None and len(index) < b * n

        def spread(y):  # (N, …) → (B, n, …): each real position gets its token, zeros at the padding
            return torch.cat([y.new_zeros(1, *y.shape[1:]), y]).index_select(0, source).view(b, n, *y.shape[1:])

        if packed:
            x = x.flatten(0, 1).index_select(0, index)  # (N, H)
        for i, (norm1, qkv_proj, o_proj, norm2, gate_up_proj, down_proj) in enumerate(self.layers[:stop]):
            qkv = qkv_proj(rms_norm(x, *norm1).to(self.dtype)).float()  # (B, n, (nh + 2·nkv)·d)
            if packed:  # zeros at the padding, whose keys no query sees
                qkv = spread(qkv)
            qk = qkv[..., : (nh + nkv) * d].unflatten(-1, (nh + nkv, d))  # (B, n, nh + nkv, d)
            qk = torch.addcmul(qk * cos, qk.roll(d // 2, -1), sin)
            q = qk[:, :, :nh].unflatten(2, (nkv, g)).permute(0, 2, 3, 1, 4).reshape(b * nkv, g * n, d)
            self.keys_t[i].view(b, nkv, d, -1)[..., start:end] = qk[:, :, nh:].permute(0, 2, 3, 1)
            v = qkv[..., (nh + nkv) * d :].unflatten(-1, (nkv, d))  # (B, n, nkv, d)
            self.values[i].view(b, nkv, -1, d)[:, :, start:end] = v.transpose(1, 2)
            scores = torch.baddbmm(bias, q, self.keys_t[i][..., :end], alpha=self.scale)  # (B·nkv, g·n, end)
            out = torch.bmm(torch.softmax(scores, -1), self.values[i][:, :end])  # (B·nkv, g·n, d)
            out = out.view(b, nkv, g, n, d).permute(0, 3, 1, 2, 4).reshape(b, n, nh * d).to(self.dtype)
            x = x + o_proj(out.flatten(0, 1).index_select(0, index) if packed else out)
            gate_up = gate_up_proj(rms_norm(x, *norm2).to(self.dtype))  # (B, n, 2·F)
            x = x + down_proj(F.silu(gate_up[..., : self.intermediate]) * gate_up[..., self.intermediate :])
            if i + 1 == self.record and packed:
                self.recorded[:, start:end] = spread(x.float())
            elif i + 1 == self.record:
                self.recorded[:, start:end].copy_(x)
        self.filled = end
        if stop is not None:
            return None
        if packed:
            x = spread(x)  # (B, n, H)
        return self.head(rms_norm(x[:, -1:], *self.norm).to(self.dtype))[:, 0]  # (B, V)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """LlamaRMSNorm: normalised in float32, cast back, then scaled."""
    if x.dtype == torch.float32:
        return F.rms_norm(x, weight.shape, weight, eps)
    return weight * F.rms_norm(x.float(), weight.shape, eps=eps).to(x.dtype)
