"""The models PPO trains and reads, and how they share work: the policy and value model as one module, loading
the four models (with LoRA, two), and the frozen bottom blocks they hold in common, computed once per step and
replayed (`--trainable-layers`). Used by `rlhf/stages/ppo.py`."""

from __future__ import annotations

import torch

from rlhf.config import PPOConfig
from rlhf.data.jsonl import DataError
from rlhf.models.freeze import (
    blocks_output,
    bottom_output,
    cast_frozen_heads_once,
    decoder_layers,
    forward_from,
    frozen_depth,
    release_file_map,
    replays_exactly,
    share_frozen_layers,
    store_frozen_blocks_in,
    train_top_layers,
    trunk_of,
)
from rlhf.models.lean import lean_backward
from rlhf.models.load import load_causal_lm
from rlhf.models.lora import wrap_lora
from rlhf.models.reward import last_positions, last_token, load_reward_model, pad_batch, position_ids
from rlhf.models.unpadded import reading


class PolicyAndValue(torch.nn.Module):
    """The policy (a causal LM) and the value model (a trunk with a scalar head read at every token) as one module:
    one forward, one optimiser, one backward of pg_loss + vf_coef · vf_loss (N+ details)."""

    def __init__(self, policy, value_model):
        super().__init__()
        self.policy = policy
        self.value_model = value_model
        # frozen bottom blocks whose output is computed once per step and replayed into later forwards (0: none)
        self.policy_depth = self.value_depth = 0
        self.value_bottom_is_policys = False  # the value model's frozen bottom is the policy's (shared, same output)
        # the value model's frozen bottom is deeper than the policy's and starts with it (the same modules): its
        # output is the policy's carried through the value model's blocks policy_depth … value_depth − 1
        self.value_bottom_continues_policys = False

    def value_parts(self):
        inner = self.value_model.get_base_model() if hasattr(self.value_model, "get_base_model") else self.value_model
        return getattr(inner, inner.base_model_prefix), inner.score

    def values(self, input_ids, attention_mask, context: int, bottom=None) -> torch.Tensor:
        """The value of the state each response token follows (positions context−1 … L−2), (B, T) float32.
        `bottom`: what the value model's frozen bottom gives for these rows (`bottoms`), to start from."""
        trunk, head = self.value_parts()
        with reading(response_positions(attention_mask, context)):
            out = forward_from(trunk, input_ids, bottom, self.value_depth, **forward_kwargs(attention_mask))
        return head(out.last_hidden_state[:, context - 1 : -1]).squeeze(-1).float()

    def bottoms(self, input_ids, attention_mask, policy=None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """The hidden states leaving the frozen bottom of the policy and of the value model (None where nothing is
        replayed): computed once per step, they stand in for those blocks in every later forward of the same rows.
        `policy`: the policy's, already known (kept from decoding these rows), so only the value model's runs."""
        kwargs = forward_kwargs(attention_mask)
        if policy is None and self.policy_depth:
            policy = bottom_output(self.policy, self.policy_depth, input_ids, **kwargs)
        if self.value_bottom_is_policys:
            return policy, policy
        trunk = self.value_parts()[0]
        if self.value_bottom_continues_policys and policy is not None:
            return policy, blocks_output(trunk, self.policy_depth, self.value_depth, policy, **kwargs)
        value = bottom_output(trunk, self.value_depth, input_ids, **kwargs) if self.value_depth else None
        return policy, value

    def logits(self, input_ids, attention_mask, context: int, bottom=None, temperature: float = 1.0) -> torch.Tensor:
        """The policy's logits that predict the response tokens, divided by `temperature`, (B, T, V)
        (`lm_response_logits`)."""
        return lm_response_logits(
            self.policy, input_ids, attention_mask, context, bottom, self.policy_depth, temperature
        )

    def forward(self, input_ids, attention_mask, context: int, bottoms=(None, None), temperature: float = 1.0):
        """Response logits (B, T, V) of the policy at `temperature` and values (B, T), for rows of prompt
        (P = context) + response."""
        logits = self.logits(input_ids, attention_mask, context, bottoms[0], temperature)
        return logits, self.values(input_ids, attention_mask, context, bottoms[1])


def lm_response_logits(
    lm, input_ids, attention_mask, context: int, bottom=None, depth: int = 0, temperature: float = 1.0
) -> torch.Tensor:
    """The logits that predict the response tokens, divided by `temperature`, (B, T, V): position t predicts token
    t + 1, so positions
    context−1 … L−2. The LM head runs on those T positions only (`logits_to_keep` as their indices): on the prompt it
    would cost a fifth of a small model's FLOPs per token for nothing. Their hidden states are gathered into one
    contiguous (B, T, hidden) block, so the head is one matrix product; a strided slice of the last T + 1 positions
    made the CPU multiply the head's weight once per row (a batched product with the weight broadcast, at about half
    the rate: 234 against ~120 ms forward for 8 × 32 tokens of a 49k vocabulary), and its backward filled a
    (B, T + 1, V) zero gradient for the one position not kept. With `bottom` (what `lm`'s `depth` frozen bottom
    blocks give for these rows) only the blocks above run.

    The temperature divides the head's input, (B, T, hidden), not its output: logits / τ = (hidden / τ) · Wᵀ, and
    the output is the vocabulary's width (49k for the embedded model's 576), so dividing it, and back-propagating the
    division, were two more passes over B·T·V floats (~25 ms each for 8 × 32 positions on a 2-core CPU). A model
    that caps its logits (`final_logit_softcapping`, Gemma 2) has its output divided."""
    keep = torch.arange(context - 1, input_ids.shape[1] - 1, device=input_ids.device)
    capped = getattr(getattr(lm, "config", None), "final_logit_softcapping", None)
    scale = None
    if temperature != 1.0 and not capped:
        scale = lm.get_output_embeddings().register_forward_pre_hook(lambda _, args: (args[0] / temperature,))
    try:
        with reading(response_positions(attention_mask, context)):
            out = forward_from(lm, input_ids, bottom, depth, logits_to_keep=keep, **forward_kwargs(attention_mask))
    finally:
        if scale is not None:
            scale.remove()
    if scale is None and temperature != 1.0:  # capped logits: divided after the cap, as sampling does
        return out.logits / temperature
    return out.logits


def response_positions(attention_mask: torch.Tensor, context: int) -> torch.Tensor:
    """(B, L) bool: the positions whose output predicts or values a response token, context − 1 … L − 2: the only
    ones a trunk's last block computes whole (`unpadded.reading`)."""
    reads = torch.zeros(attention_mask.shape, dtype=torch.bool, device=attention_mask.device)
    reads[:, context - 1 : -1] = True
    return reads


def forward_kwargs(attention_mask: torch.Tensor) -> dict:
    """What every PPO forward passes besides the tokens: explicit positions (padding never shifts them) and no KV
    cache (nothing decodes after it)."""
    return {"attention_mask": attention_mask, "position_ids": position_ids(attention_mask), "use_cache": False}


def value_trainable_layers(cfg: PPOConfig) -> int | None:
    """How many top layers of the value model train (None: all). By default as many as the policy's, so this is
    None only when no model has a frozen bottom to share or replay."""
    return cfg.value_trainable_layers or cfg.trainable_layers


def load_models(cfg: PPOConfig, say):
    """(policy, tokenizer, reference, value model, reward model, reward tokenizer). With LoRA the reference is None
    (the policy with its adapters off) and, when the value model starts from the reward model, so is the reward
    model (the value model with its adapters off): two models in memory instead of four."""
    policy, tokenizer = load_causal_lm(cfg.policy)
    value_model, value_tokenizer = load_reward_model(cfg.reward if cfg.value_init == "reward" else cfg.policy)
    if cfg.lora and cfg.value_init == "reward":
        reward_model, rm_tokenizer = None, value_tokenizer
    else:
        reward_model, rm_tokenizer = load_reward_model(cfg.reward)
        reward_model.eval().requires_grad_(False)
    probe = "Check: the value model reads the policy's tokens 123 ✓"
    if value_tokenizer(probe)["input_ids"] != tokenizer(probe)["input_ids"]:
        raise DataError(
            f"the value model ({cfg.value_init}: {cfg.reward}) does not share the policy's tokenizer, so it cannot "
            "value the policy's tokens; use --value-init policy"
        )
    ref_policy = None
    if cfg.trainable_layers is not None:
        train_top_layers(policy, cfg.trainable_layers)
    value_layers = value_trainable_layers(cfg)
    if value_layers is not None:
        train_top_layers(value_model, value_layers)
    if cfg.lora:
        policy = wrap_lora(policy, cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, cfg.lora_target_modules)
        value_model = wrap_lora(
            value_model, cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, cfg.lora_target_modules, "SEQ_CLS"
        )
    # the trained blocks' MLPs and norms keep less for their backward (rlhf/models/lean.py): ~40% less activation
    # memory, the same outputs
    lean = lean_backward(policy) + lean_backward(value_model)
    if not cfg.lora or (cfg.reference and cfg.reference != cfg.policy):
        ref_policy, _ = load_causal_lm(cfg.reference or cfg.policy)
        ref_policy.eval().requires_grad_(False)
    shared = 0
    pairs = [(f, t) for f, t in ((ref_policy, policy), (reward_model, value_model)) if f is not None]
    if value_layers is not None:  # one copy of each frozen bottom, whichever models hold the same weights
        shared = share_frozen_layers(value_model, policy)  # the value model's first: the reward model's then follow
        if shared:
            release_file_map(value_model, keep=policy)  # its own copy of the bottom is gone: let its file's map go
        shared += sum(share_frozen_layers(frozen, trained) for frozen, trained in pairs)
    if shared or cfg.mixed_precision == "bf16":
        for frozen, trained in pairs:
            if cfg.mixed_precision == "bf16":  # the frozen models' own blocks in what autocast multiplies in anyway
                store_frozen_blocks_in(frozen, torch.bfloat16, keep=trained)
            release_file_map(frozen, keep=trained)  # else the whole loaded file stays mapped for the rest
    if cfg.mixed_precision == "bf16":  # a frozen head would be cast to bf16 again in every forward
        cast_frozen_heads_once([policy, ref_policy], torch.bfloat16)
    say(
        f"policy {cfg.policy}, reference {cfg.reference or cfg.policy}"
        f"{' (adapters off)' if ref_policy is None else ''}, value model from {cfg.value_init}, reward {cfg.reward}"
        f"{' (the value model with adapters off)' if reward_model is None else ''}"
        f"{f'; {shared / 1e6:.1f}M frozen parameters shared, not copied' if shared else ''}"
        f"{f'; {lean} MLPs and norms with the lean backward' if lean else ''}"
    )
    return policy, tokenizer, ref_policy, value_model, reward_model, rm_tokenizer


def replay_frozen_bottoms(
    pv: PolicyAndValue, ref_policy, probe: list[list[int]], pad_id: int, device, say, reward_model=None
) -> tuple[bool, bool]:
    """With --trainable-layers, the frozen bottom of the policy (and of the reference, which shares it) and of the
    value model gives the same output for the step's rollouts in every forward, so it runs once per step and its
    output is replayed (PPO would otherwise run it for the log-probs, the reference and every update epoch). Each
    model replays only if splitting its forward there gives bit-identical outputs on a probe batch. Sets the depths
    on `pv`; returns whether the reference replays the policy's bottom and whether the reward model replays the
    value model's (each holds the very same modules)."""
    ids, mask = (t.to(device) for t in pad_batch(probe, pad_id, side="left"))
    kwargs = forward_kwargs(mask)
    for name, model in (("policy", pv.policy), ("value", pv.value_parts()[0])):
        depth = frozen_depth(model)
        if depth and replays_exactly(model, depth, ids, **kwargs):
            setattr(pv, f"{name}_depth", depth)
    depth = pv.policy_depth
    ref_replays = ref_policy is not None and holds_bottom_of(ref_policy, pv.policy, depth)
    ref_replays = ref_replays and replays_exactly(ref_policy, depth, ids, **kwargs)
    value_trunk = pv.value_parts()[0]
    rm_replays = reward_model is not None and holds_bottom_of(reward_model, value_trunk, pv.value_depth)
    rm_replays = rm_replays and replays_exactly(trunk_of(reward_model), pv.value_depth, ids, **kwargs)
    if depth and pv.value_depth >= depth and holds_bottom_of(value_trunk, pv.policy, depth):
        with torch.no_grad():  # one output serves both only if both trunks compute it alike
            own = bottom_output(value_trunk, pv.value_depth, ids, **kwargs)
            policys = bottom_output(pv.policy, depth, ids, **kwargs)
            if pv.value_depth == depth:
                pv.value_bottom_is_policys = torch.equal(own, policys)
            else:
                carried = blocks_output(value_trunk, depth, pv.value_depth, policys, **kwargs)
                pv.value_bottom_continues_policys = torch.equal(own, carried)
    same = " (the policy's own: computed once for both)" if pv.value_bottom_is_policys else ""
    if pv.value_bottom_continues_policys:
        same = f" (its bottom {depth} the policy's: computed once for both)"
    say(
        f"frozen bottom computed once per step and replayed: policy {pv.policy_depth} blocks"
        f"{' (shared by the reference)' if ref_replays else ''}, value model {pv.value_depth} blocks{same}"
        f"{' (shared by the reward model)' if rm_replays else ''}"
    )
    return ref_replays, rm_replays


def holds_bottom_of(model, other, depth: int) -> bool:
    """Whether `model`'s input embeddings and bottom `depth` blocks are `other`'s very modules (shared)."""
    if not depth or model.get_input_embeddings() is not other.get_input_embeddings():
        return False
    mine, theirs = decoder_layers(model)[:depth], decoder_layers(other)[:depth]
    return len(mine) == depth and all(a is b for a, b in zip(mine, theirs, strict=True))


def with_eos_column(ids: torch.Tensor, mask: torch.Tensor, finished: torch.Tensor, eos_id: int):
    """Rollout rows (B, L) with one more column: EOS after each response that did not finish (it ran to the last
    column, as the longest response sets L), which is where the reward model reads a cut response; padding after
    the others. Returns (ids, attention_mask), (B, L + 1)."""
    ids = torch.cat([ids, torch.full_like(ids[:, :1], eos_id)], 1)
    mask = torch.cat([mask, (~finished).long()[:, None].to(mask.dtype)], 1)
    return ids, mask


def score_from_bottom(reward_model, bottom: torch.Tensor, attention_mask: torch.Tensor, depth: int) -> torch.Tensor:
    """The reward model's score of each row, (B,), from `bottom` (what its bottom `depth` blocks give for these
    rows, (B, L, hidden)), read at each row's last real token."""
    trunk = trunk_of(reward_model)
    with reading(last_positions(attention_mask)):
        hidden = forward_from(trunk, None, bottom, depth, **forward_kwargs(attention_mask)).last_hidden_state
    last = last_token(attention_mask)  # (B,)
    return reward_model.score(hidden[torch.arange(len(hidden)), last]).squeeze(-1).float()
