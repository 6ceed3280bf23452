"""Stage 3: PPO from human feedback: the policy is trained against the reward model with a KL penalty to the SFT
policy (InstructGPT §3.5; Ziegler et al. 2019; Huang et al. 2024, "The N+ implementation details of RLHF with PPO").

Each PPO step: 1. roll out on a batch of prompts (sampling, stopped at EOS); 2. one forward pass of the policy,
reference, value model and reward model over the rollouts; 3. scores (EOS penalty, normalisation, clipping);
4. per-token rewards −β·KL_t plus the score at the last response token; 5. GAE advantages, whitened; 6. several
epochs of clipped policy + value updates on minibatches (+ PPO-ptx); 7. the KL controller, logs, checkpoint.
Policy and value model are one module with one optimiser and one loss, as in N+ details.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from rlhf.algos.ppo import (
    AdaptiveKLController,
    FixedKLController,
    RunningMoments,
    entropy_from_logits,
    eos_penalized_scores,
    explained_variance,
    gae,
    kl_penalty,
    masked_mean,
    masked_whiten,
    policy_loss,
    shape_rewards,
    value_loss,
)
from rlhf.config import PPOConfig, to_dict
from rlhf.data.chat import encode_prompt, tokenize_demonstration
from rlhf.data.collate import collate_sft
from rlhf.data.jsonl import DataError
from rlhf.data.records import Demonstration, read_demonstrations, read_prompts
from rlhf.models import thin
from rlhf.models.freeze import decoder_layers, frozen_depth
from rlhf.models.generation import (
    inference_copy,
    refresh_inference_copy,
    release_inference_copy,
    sample_responses,
)
from rlhf.models.llama_decoder import ConstantProducts, LlamaDecoder
from rlhf.models.logprobs import label_logprobs
from rlhf.models.lora import plain_model
from rlhf.models.policy_value import (
    PolicyAndValue,
    lm_response_logits,
    load_models,
    replay_frozen_bottoms,
    score_from_bottom,
    value_trainable_layers,
    with_eos_column,
)
from rlhf.models.reward import pad_batch, position_ids, score
from rlhf.models.unpadded import shared_tokens, token_keys
from rlhf.runtime.allocator import keep_freed_memory
from rlhf.runtime.checkpoint import save_final
from rlhf.runtime.metrics import MetricsLogger
from rlhf.runtime.order import sample_indices
from rlhf.runtime.stage import begin, clip_and_step, optimise, step_optimizer
from rlhf.runtime.working_weights import WorkingWeights
from rlhf.stages.reward import response_sequences
from rlhf.stages.sft import response_nll

STAGE = "ppo"


class PPOState:
    """What PPO carries from step to step beyond the weights; checkpointed with them (exact resume)."""

    def __init__(self, cfg: PPOConfig):
        if cfg.adaptive_kl:
            self.kl_ctl = AdaptiveKLController(cfg.kl_coef, cfg.kl_target, cfg.kl_horizon)
        else:
            self.kl_ctl = FixedKLController(cfg.kl_coef)
        self.moments = RunningMoments()
        self.non_finite_in_a_row = 0
        self.non_finite_total = 0

    def state_dict(self) -> dict:
        return {
            "kl_ctl": self.kl_ctl.state_dict(),
            "moments": self.moments.state_dict(),
            "non_finite_in_a_row": self.non_finite_in_a_row,
            "non_finite_total": self.non_finite_total,
        }

    def load_state_dict(self, d: dict) -> None:
        self.kl_ctl.load_state_dict(d["kl_ctl"])
        self.moments.load_state_dict(d["moments"])
        self.non_finite_in_a_row = d["non_finite_in_a_row"]
        self.non_finite_total = d["non_finite_total"]


@dataclass
class Rollouts:
    """One process's rollouts of a step. T = longest response; tensors are on the training device."""

    input_ids: torch.Tensor  # (B, P + T): left-padded prompt, then the response padded after its EOS
    attention_mask: torch.Tensor  # (B, P + T): 1 on prompt and response tokens (EOS included)
    response_mask: torch.Tensor  # (B, T) bool: response tokens up to and including the first EOS
    finished: torch.Tensor  # (B,) bool: the response emitted EOS
    context: int  # P
    texts: list[str]
    prompt_ids: list[str]
    logprobs: torch.Tensor | None  # (B, T) float32 under the sampling distribution; undefined where ~response_mask
    # what the policy's frozen bottom gives for these rows, kept from decoding (B, P + T [+ 1 with an EOS column for
    # the reward model]) float32, zero at padding; None: the scoring forward computes it
    bottom: torch.Tensor | None = None


def logprobs_from_sampling(cfg: PPOConfig, accelerator) -> bool:
    if cfg.rollout_logprobs == "auto":
        return accelerator.mixed_precision != "bf16"
    return cfg.rollout_logprobs == "sampling"


def rollout_seed(seed: int, step: int, rank: int) -> int:
    """Sampling is seeded per (seed, step, process): a resumed run draws the rollouts an uninterrupted one did."""
    digest = hashlib.sha256(f"{seed}|{step}|{rank}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & 0x7FFF_FFFF_FFFF_FFFF


def response_logprobs(resp_logits: torch.Tensor, input_ids: torch.Tensor, context: int) -> torch.Tensor:
    """Log-probabilities of the response tokens under resp_logits (already divided by the temperature:
    `lm_response_logits`), (B, T)."""
    return label_logprobs(resp_logits, input_ids[:, context:])


def rollout(
    st, cfg, policy, tokenizer, prompts, encoded, indices, step, autocast: bool = True, decoding: dict | None = None
) -> Rollouts:
    """Sample one response per prompt; the response mask ends at the first EOS (padding after it is not trained).
    `policy` is the policy itself (autocast, or `decoding`: the lean decoder's dtype, constant products, and the
    frozen bottom whose output to keep, `bottom` and `append`), or its inference copy (already in the precision to
    sample in)."""
    torch.manual_seed(rollout_seed(cfg.seed, step, st.accelerator.process_index))
    policy.eval()
    with st.accelerator.autocast() if autocast else contextlib.nullcontext():
        prompt_ids, prompt_mask, responses, *rest = sample_responses(
            policy,
            [encoded[i] for i in indices],
            tokenizer.pad_token_id,
            tokenizer.eos_token_id,
            cfg.max_new_tokens,
            cfg.temperature,
            with_logprobs=logprobs_from_sampling(cfg, st.accelerator),
            **(decoding or {}),
        )
    is_eos = responses == tokenizer.eos_token_id  # (B, T)
    finished = is_eos.any(dim=1)
    first_eos = torch.where(finished, is_eos.int().argmax(dim=1), torch.full_like(finished, 10**9, dtype=torch.long))
    t = torch.arange(responses.shape[1])
    response_mask = t[None, :] <= first_eos[:, None]  # (B, T)
    device = st.accelerator.device
    lengths = response_mask.sum(1).tolist()
    texts = [
        tokenizer.decode(r[:n], skip_special_tokens=True).strip() for r, n in zip(responses, lengths, strict=True)
    ]
    attention_mask = torch.cat([prompt_mask, response_mask.long()], 1)  # (B, P + T)
    bottom = None
    if (decoding or {}).get("bottom"):
        bottom, real = rest[1], attention_mask  # (B, P + T [+ 1], hidden), (B, P + T)
        if bottom.shape[1] > real.shape[1]:  # the EOS column is real after a cut response only
            real = torch.cat([real, (~finished).long()[:, None]], 1)
        bottom = (bottom * real[..., None]).to(device)
    return Rollouts(
        torch.cat([prompt_ids, responses], 1).to(device),
        attention_mask.to(device),
        response_mask.to(device),
        finished.to(device),
        prompt_ids.shape[1],
        texts,
        [prompts[i].id for i in indices],
        rest[0].to(device) if rest and rest[0] is not None else None,
        bottom,
    )


def first_update_reuses(cfg: PPOConfig, accelerator, logprobs_from_sampling: bool) -> str | None:
    """Which model's scoring forward the first update can back-propagate instead of running it again: when that
    update is one micro-batch of all the step's rollouts on one process, its forward is the scoring forward (same
    weights, same rows). The policy's when scoring runs it (log-probs recomputed), else the value model's; one
    only, so the two models' activations are still never held together. None: no reuse."""
    one_pass = cfg.mini_batch_size == cfg.batch_size and cfg.micro_batch_size >= cfg.batch_size
    if accelerator.num_processes > 1 or not one_pass:
        return None
    return "value" if logprobs_from_sampling else "policy"


def forward_rollouts(
    st, cfg, model, ref_policy, ro: Rollouts, ref_replays: bool = False, keep: str | None = None, rm_eos=None
) -> dict[str, torch.Tensor]:
    """Log-probs under the policy (unless sampling gave them) and the reference, and values, in micro-batches; and
    the frozen bottoms' output, which the updates replay. `ref_replays`: the reference shares the policy's bottom.
    `keep` ("policy" or "value", `first_update_reuses`): that model's forward records its graph, and its outputs
    with the graph are returned under "kept" for the first update; everything else is detached. `rm_eos` (the
    EOS id, when the reward model holds the value model's bottom, `replay_frozen_bottoms`): the bottoms run on the
    rows with one more column, EOS after each response that was cut (`with_eos_column`), and the value model's
    is also returned whole as "bottom_rm" for `reward_scores`; the other forwards read the rows' own columns."""
    unwrapped = st.accelerator.unwrap_model(model)
    out = {"logprobs": [], "ref_logprobs": [], "values": [], "bottom_policy": [], "bottom_value": [], "bottom_rm": []}
    kept = {}
    for i in range(0, len(ro.texts), cfg.micro_batch_size):
        ids, mask = ro.input_ids[i : i + cfg.micro_batch_size], ro.attention_mask[i : i + cfg.micro_batch_size]
        decoded = None if ro.bottom is None else ro.bottom[i : i + cfg.micro_batch_size]  # the policy's, if kept
        with st.accelerator.autocast():
            with torch.no_grad():
                if rm_eos is None:
                    bottoms = unwrapped.bottoms(ids, mask, decoded)
                else:  # causal: the extra column changes nothing before it
                    finished = ro.finished[i : i + cfg.micro_batch_size]
                    bottoms = unwrapped.bottoms(*with_eos_column(ids, mask, finished, rm_eos), decoded)
                    out["bottom_rm"].append(bottoms[1])
                    own = {id(b): b[:, :-1].contiguous() for b in bottoms if b is not None}  # one for a shared one
                    bottoms = tuple(own[id(b)] if b is not None else None for b in bottoms)
            if ro.logprobs is None:
                with torch.set_grad_enabled(keep == "policy"):
                    logits = unwrapped.logits(ids, mask, ro.context, bottoms[0], cfg.temperature)
                    logprobs = response_logprobs(logits, ids, ro.context)
                    if keep == "policy":
                        kept["logprobs"] = logprobs
                        if cfg.entropy_coef:
                            kept["entropy"] = entropy_from_logits(logits)
                    del logits
                out["logprobs"].append(logprobs.detach())
            with torch.set_grad_enabled(keep == "value"):
                values = unwrapped.values(ids, mask, ro.context, bottoms[1])
            if keep == "value":
                kept["values"] = values
            out["values"].append(values.detach())
            with torch.no_grad():
                if ref_policy is None:  # LoRA: the reference is the same weights with the adapters switched off
                    with unwrapped.policy.disable_adapter():
                        ref_logits = lm_response_logits(
                            unwrapped.policy, ids, mask, ro.context, temperature=cfg.temperature
                        )
                else:
                    ref_bottom = bottoms[0] if ref_replays else None
                    depth = unwrapped.policy_depth
                    ref_logits = lm_response_logits(
                        ref_policy, ids, mask, ro.context, ref_bottom, depth, cfg.temperature
                    )
                out["ref_logprobs"].append(response_logprobs(ref_logits, ids, ro.context))
        for key, bottom in zip(("bottom_policy", "bottom_value"), bottoms, strict=True):
            if bottom is not None and not (key == "bottom_value" and unwrapped.value_bottom_is_policys):
                out[key].append(bottom)
    if ro.logprobs is not None:
        out["logprobs"] = [ro.logprobs]
    result = {k: torch.cat(v) for k, v in out.items() if v}
    if unwrapped.value_bottom_is_policys:  # one tensor for both, not a second copy
        result["bottom_value"] = result["bottom_policy"]
    if kept:
        result["kept"] = kept
    return result


@torch.no_grad()
def reward_scores(st, cfg, reward_model, rm_tokenizer, messages, ro: Rollouts, model, fwd=None, rm_depth=0):
    """The reward model's score of each response, (B,). The text is re-tokenised with the reward model's tokenizer
    exactly as it was in reward-model training, so any reward model scores any policy. reward_model None: the
    value model's LoRA adapters switched off are the reward model (it started as a copy of it).

    With fwd["bottom_rm"] (`forward_rollouts`; the reward model holds the value model's bottom `rm_depth` blocks),
    a row whose re-tokenised sequence is the rollout's own tokens (plus the EOS a cut response is scored with) is
    scored by the reward model's blocks above that bottom, on the rollout's padding: its 20 bottom blocks of 30 are
    not run again. The score is the same up to float rounding (other padding, other summation order); rows that
    re-tokenise differently run the whole reward model as before."""
    demos = [Demonstration(pid, messages[pid], text) for pid, text in zip(ro.prompt_ids, ro.texts, strict=True)]
    sequences = response_sequences(rm_tokenizer, demos, cfg.max_seq_len)
    device = st.accelerator.device
    scores = torch.zeros(len(sequences), device=device)
    rest = list(range(len(sequences)))
    if fwd is not None and "bottom_rm" in fwd:
        ids, mask = with_eos_column(ro.input_ids, ro.attention_mask, ro.finished, rm_tokenizer.eos_token_id)
        same = [i for i in rest if sequences[i] == ids[i][mask[i].bool()].tolist()]
        rest = [i for i in rest if i not in same]
        for k in range(0, len(same), cfg.micro_batch_size):
            rows = same[k : k + cfg.micro_batch_size]
            with st.accelerator.autocast():
                scores[rows] = score_from_bottom(reward_model, fwd["bottom_rm"][rows], mask[rows], rm_depth)
    value_model = st.accelerator.unwrap_model(model).value_model
    for k in range(0, len(rest), cfg.micro_batch_size):
        rows = rest[k : k + cfg.micro_batch_size]
        ids, mask = pad_batch([sequences[i] for i in rows], rm_tokenizer.pad_token_id)
        ids, mask = ids.to(device), mask.to(device)
        with st.accelerator.autocast():
            if reward_model is None:
                with value_model.disable_adapter():
                    scores[rows] = score(value_model, ids, mask)
            else:
                scores[rows] = score(reward_model, ids, mask)
    return scores


def gold_rewards(messages, ro: Rollouts) -> torch.Tensor:
    from rlhf.annotators.simulated import SimulatedPanel

    panel = SimulatedPanel()
    finished = ro.finished.tolist()
    return torch.tensor(
        [
            float(panel.gold(messages[pid][-1]["content"], [text], [done])[0])
            for pid, text, done in zip(ro.prompt_ids, ro.texts, finished, strict=True)
        ]
    )


def encode_prompts(cfg: PPOConfig, tokenizer, say):
    prompts = read_prompts(cfg.prompts)
    kept, encoded, too_long = [], [], []
    for p in prompts:
        ids = encode_prompt(tokenizer, p.messages)
        if len(ids) > cfg.max_prompt_len:
            too_long.append(f"{p.id} ({len(ids)} tokens)")
            continue
        kept.append(p)
        encoded.append(ids)
    if too_long:
        say(f"left out {len(too_long)} prompts longer than max_prompt_len={cfg.max_prompt_len}: {too_long[:5]}")
    if not kept:
        raise DataError(f"{cfg.prompts}: no prompt fits in max_prompt_len={cfg.max_prompt_len}")
    return kept, encoded


def ptx_examples(cfg: PPOConfig, tokenizer):
    if not cfg.ptx_coef:
        return []
    demos = read_demonstrations(cfg.ptx_data)
    return [tokenize_demonstration(tokenizer, d, cfg.max_seq_len) for d in demos]


def advantages_and_returns(cfg, state: PPOState, fwd, scores_used, ro: Rollouts):
    """Steps 4–5: per-token rewards with the KL penalty, GAE, whitened advantages; all (B, T)."""
    mask = ro.response_mask
    kl = kl_penalty(fwd["logprobs"], fwd["ref_logprobs"], cfg.kl_estimator)  # (B, T), undefined where ~mask
    rewards = shape_rewards(scores_used, kl, mask, state.kl_ctl.value)
    advantages, returns = gae(rewards, fwd["values"], mask, cfg.gamma, cfg.lam)
    if cfg.whiten_advantages:
        advantages = masked_whiten(advantages, mask)
    return kl, rewards, advantages, returns


def run(cfg: PPOConfig) -> Path:
    # 0. fresh start or resume, decided before any expensive work
    st = begin(cfg, cfg.stage_name or STAGE)
    if st is None:
        return Path(cfg.out) / (cfg.stage_name or STAGE) / "final"
    accelerator, world = st.accelerator, st.accelerator.num_processes
    if cfg.mini_batch_size % (cfg.micro_batch_size * world) or cfg.batch_size % world:
        raise ValueError(
            f"mini_batch_size ({cfg.mini_batch_size}) must be a multiple of micro_batch_size "
            f"({cfg.micro_batch_size}) × processes ({world})"
        )

    # 1. models and prompts
    policy, tokenizer, ref_policy, value_model, reward_model, rm_tokenizer = load_models(cfg, st.say)
    prompts, encoded = encode_prompts(cfg, tokenizer, st.say)
    messages = {p.id: list(p.messages) for p in prompts}
    ptx = ptx_examples(cfg, tokenizer)
    model = PolicyAndValue(policy, value_model)
    state = PPOState(cfg)
    accelerator.register_for_checkpointing(state)
    minibatches = cfg.batch_size // cfg.mini_batch_size
    opt = optimise(st, model, len(prompts), updates_per_step=cfg.ppo_epochs * minibatches)
    model = opt.model
    if working_copies_apply(cfg, accelerator):
        pv = accelerator.unwrap_model(model)
        opt.working = WorkingWeights.install(
            [*decoder_layers(pv.policy), *decoder_layers(pv.value_model)], opt.optimizer
        )
        if opt.working is not None:
            st.say(
                f"{len(opt.working.copies)} trained weights multiply by bf16 working copies; AdamW steps their "
                "float32 masters in one fused pass"
            )
    model.eval()  # no dropout anywhere: log-probs of rollouts and updates must come from the same function (N+)
    device = accelerator.device
    for m in (reward_model, ref_policy):
        if m is not None:
            m.to(device)
    ref_replays = rm_replays = False
    if value_trainable_layers(cfg) is not None:  # some frozen bottom to replay
        probe = [encoded[0][:24], encoded[-1][:12]]  # rows of two lengths, left-padded as rollouts are
        with accelerator.autocast():  # as every forward runs (frozen models may hold bf16 weights)
            pv = accelerator.unwrap_model(model)
            ref_replays, rm_replays = replay_frozen_bottoms(
                pv, ref_policy, probe, tokenizer.pad_token_id, device, st.say, reward_model
            )
    rm_eos = rm_tokenizer.eos_token_id if rm_replays else None
    # rollouts come from a plain copy of the policy, refreshed every step, when that saves work: LoRA merged in
    # (no adapter cost per token) and/or in bf16 (decoding is bound by reading the weights). A plain Llama policy is
    # decoded by the lean decoder with no copy (in bf16 it casts each weight as it packs it), which keeps the frozen
    # bottom's and head's packed products from step to step: packing all 30 blocks and the head took 0.3–0.65 s a
    # step in float32 on a 2-core AVX2 CPU, ~0.1 s with the 20 frozen blocks and the head kept
    sampler_copy, decoding = None, None
    policy_module = accelerator.unwrap_model(model).policy
    if cfg.mixed_precision in ("bf16", "no") and not cfg.lora and LlamaDecoder.supports(policy_module):
        head_frozen = not policy_module.get_output_embeddings().weight.requires_grad
        constant = ConstantProducts(frozen_depth(policy_module), head_frozen)
        decoding = {"constant": constant}
        if cfg.mixed_precision == "bf16":
            decoding["dtype"] = torch.bfloat16
        kept = [f"{constant.blocks} frozen blocks"] * bool(constant.blocks) + ["the head"] * head_frozen
        kernel = thin.serves(decoding.get("dtype", policy_module.dtype))  # as the decoder decides
        st.say(
            f"rollouts decoded from the policy itself in {'bf16' if 'dtype' in decoding else 'its precision'} "
            f"(no copy{', float32 products by the AVX2 kernel' if kernel else ''}); packed once for the run: "
            f"{' and '.join(kept) or 'nothing'}"
        )
    elif cfg.lora or cfg.mixed_precision == "bf16":
        dtype = torch.bfloat16 if cfg.mixed_precision == "bf16" else torch.float32
        sampler_copy = inference_copy(policy_module, dtype)
    depth = accelerator.unwrap_model(model).policy_depth
    if depth and sampler_copy is None and LlamaDecoder.supports(policy_module):
        # decoding computes the frozen bottom's output at every position anyway: kept, scoring does not run it again
        decoding = {**(decoding or {}), "bottom": depth, "append": rm_eos}
        st.say(f"the frozen bottom's output ({depth} blocks) kept from decoding, not computed again for scoring")
    per_rank, mini_rank = cfg.batch_size // world, cfg.mini_batch_size // world
    st.say(
        f"{len(prompts)} prompts, {opt.total_steps} PPO steps of {cfg.batch_size} rollouts, {cfg.ppo_epochs} epochs × "
        f"{minibatches} minibatches of {cfg.mini_batch_size}; training {sum(p.numel() for p in opt.params) / 1e6:.1f}M "
        "parameters (policy and value model)"
    )

    # the decay times back and the kept pages released after the last step, or when a step raises
    with contextlib.ExitStack() as memory:
        if memory.enter_context(keep_freed_memory(cfg.keep_freed_memory)):
            st.say("freed memory kept for the next tensors while PPO runs (jemalloc's decay off): fewer page faults")
        elif cfg.keep_freed_memory:
            st.say(
                "keep_freed_memory asked for, but this process does not run under jemalloc: memory is freed as usual"
            )
        logger = memory.enter_context(contextlib.closing(MetricsLogger(cfg.out, st.name, enabled=st.main)))
        bar = tqdm(
            total=opt.total_steps, initial=opt.start, disable=not (st.main and cfg.progress), desc=st.name, unit="step"
        )
        memory.callback(bar.close)
        for step in range(opt.start, opt.end):
            # 1. roll out on this process's share of the step's prompts
            t0 = time.perf_counter()
            indices = sample_indices(step * cfg.batch_size, cfg.batch_size, len(prompts), cfg.seed)
            mine = indices[accelerator.process_index * per_rank : (accelerator.process_index + 1) * per_rank]
            sampler = policy_module
            if sampler_copy is not None:
                refresh_inference_copy(sampler_copy, sampler)
                sampler = sampler_copy
            autocast = sampler_copy is None and decoding is None
            ro = rollout(st, cfg, sampler, tokenizer, prompts, encoded, mine, step, autocast, decoding)
            if sampler_copy is not None:
                release_inference_copy(sampler_copy)  # its memory serves the update until the next rollout
            t1 = time.perf_counter()

            # 2. log-probs, reference log-probs, values, entropy; 3. scores
            keep = first_update_reuses(cfg, accelerator, ro.logprobs is not None)
            fwd = forward_rollouts(st, cfg, model, ref_policy, ro, ref_replays, keep, rm_eos)
            rm_depth = accelerator.unwrap_model(model).value_depth
            rm_scores = reward_scores(st, cfg, reward_model, rm_tokenizer, messages, ro, model, fwd, rm_depth)
            fwd.pop("bottom_rm", None)  # the updates replay the rows' own columns
            scores = (
                rm_scores if cfg.eos_penalty is None else eos_penalized_scores(rm_scores, ro.finished, cfg.eos_penalty)
            )
            if cfg.reward_normalize:
                state.moments.update(accelerator.gather(scores))
                scores = (scores - state.moments.mean) / state.moments.std
            if cfg.reward_clip is not None:
                scores = scores.clamp(-cfg.reward_clip, cfg.reward_clip)
            t2 = time.perf_counter()

            # 4.–5. per-token rewards with the KL penalty, advantages and returns
            kl, rewards, advantages, returns = advantages_and_returns(cfg, state, fwd, scores, ro)
            finite = all(bool(torch.isfinite(x[ro.response_mask]).all()) for x in (kl, rewards, fwd["values"]))
            finite = bool(accelerator.gather(torch.tensor([float(finite)], device=device)).min() > 0)  # all agree

            # 6. PPO epochs over minibatches
            stats = []
            if finite:
                stats = ppo_updates(st, cfg, opt, state, ro, fwd, advantages, returns, ptx, step, mini_rank)
            else:
                note_non_finite(st, cfg, state, f"step {step + 1}: non-finite reward, KL or value; rollouts skipped")
            t3 = time.perf_counter()

            # 7. KL controller, logs, checkpoint
            mask = ro.response_mask
            kl_sum = accelerator.gather((kl * mask).sum(1)).mean()  # nats per response
            if finite:
                state.kl_ctl.update(float(kl_sum), cfg.batch_size)
            metrics = step_metrics(accelerator, ro, fwd, rm_scores, kl_sum, returns, stats, state, messages, cfg)
            metrics.update(
                {
                    "score": float(accelerator.gather(scores.float()).mean()),  # after EOS penalty and normalisation
                    "lr": opt.scheduler.get_last_lr()[0],
                    "seconds_generate": t1 - t0,
                    "seconds_score": t2 - t1,
                    "seconds_train": t3 - t2,
                    "tokens_prompt": float(accelerator.gather(ro.attention_mask[:, : ro.context].sum(1)).sum()),
                    "tokens_response": float(accelerator.gather(ro.response_mask.sum(1)).sum()),
                    # real tokens the blocks compute once for several rows (a common start: rlhf/models/unpadded.py)
                    "tokens_shared": float(accelerator.gather(shared_token_count(ro)).sum()),
                    "attention_pairs": float(accelerator.gather(attention_pairs(ro)).sum()),
                    "seconds_step": time.perf_counter() - t0,
                }
            )
            done = step + 1
            if done % cfg.log_every == 0 or done == opt.end:
                logger.log(done, metrics)
            bar.update(1)
            bar.set_postfix(
                reward=f"{metrics['reward']:.2f}", kl=f"{metrics['kl']:.2f}", eos=f"{metrics['eos_rate']:.0%}"
            )
            st.checkpoint_if_due(done, opt.end, opt.total_steps)
    if opt.end < opt.total_steps:
        st.say(f"stopped at step {opt.end} of {opt.total_steps} (stop_after_steps); continue with --resume")
        return st.stage_dir

    # 8. the result: the policy as a plain transformers folder (the value model is a by-product and not kept)
    summary = {"stage": st.name, "steps": opt.total_steps, "config": to_dict(cfg), "kl_coef": state.kl_ctl.value}
    final_policy = plain_model(accelerator.unwrap_model(model).policy)
    final = save_final(accelerator, final_policy, tokenizer, st.stage_dir, summary)
    st.say(f"done; policy saved to {final}")
    return final


def shared_token_count(ro: Rollouts) -> torch.Tensor:
    """How many real tokens of the rollouts stand for the same token of an earlier row (`unpadded.shared_tokens`:
    the rows agree on every token up to it), so the prefill and every skip-padding forward compute them once."""
    real = ro.attention_mask.bool()
    index, _ = shared_tokens(real, token_keys(ro.input_ids, position_ids(ro.attention_mask)))
    return (real.sum() - len(index)).reshape(1).to(ro.attention_mask.device)


def attention_pairs(ro: Rollouts) -> torch.Tensor:
    """(1,) the query–key pairs causal attention relates within the rollouts' rows, n(n + 1) / 2 for a row of n real
    tokens: what the attention's products multiply per layer (benchmarks/ppo_vs_trl.py counts their FLOPs)."""
    n = ro.attention_mask.sum(1).double()
    return (n * (n + 1) / 2).sum().reshape(1)


def note_non_finite(st, cfg: PPOConfig, state: PPOState, what: str) -> None:
    state.non_finite_in_a_row += 1
    state.non_finite_total += 1
    st.say(f"skipped: {what} ({state.non_finite_in_a_row} in a row)")
    if state.non_finite_in_a_row >= cfg.max_non_finite:
        raise FloatingPointError(
            f"ppo: {state.non_finite_in_a_row} updates in a row were skipped for non-finite values ({what}); "
            "lower --lr, raise --kl-coef, or check the reward model (`rlhf rm score`)"
        )


def ppo_updates(st, cfg, opt, state, ro, fwd, advantages, returns, ptx, step, mini_rank) -> list[dict]:
    """Step 6: ppo_epochs passes over the rollouts in shuffled minibatches; returns one stats dict per update."""
    accelerator, device = st.accelerator, st.accelerator.device
    model = opt.model
    split = accelerator.num_processes == 1  # see backward_losses
    n = len(ro.texts)
    stats = []
    gen = torch.Generator().manual_seed(rollout_seed(cfg.seed + 1, step, accelerator.process_index))
    for epoch in range(cfg.ppo_epochs):
        order = torch.randperm(n, generator=gen).tolist()
        epoch_stats = []
        for m in range(0, n, mini_rank):
            mb = order[m : m + mini_rank]
            sums = torch.zeros(8, dtype=torch.float64, device=device)
            micro = [mb[k : k + cfg.micro_batch_size] for k in range(0, len(mb), cfg.micro_batch_size)]
            # without clipping each weight's step needs only its own gradient: with one micro-batch, the model
            # back-propagated first steps before the other's forward, so the two models' gradients are never held
            # at once (full fine-tuning: 0.5 GB less peak memory for the embedded model's pair)
            first: list[float] = []
            between = functools.partial(step_part, st, opt, first) if steps_apart(cfg, split, micro) else None
            for k, idx in enumerate(micro):
                sync = k == len(micro) - 1
                with contextlib.nullcontext() if sync else accelerator.no_sync(model), accelerator.autocast():
                    ptx_of = None
                    if ptx:
                        ptx_of = functools.partial(ptx_batch_loss, model, ptx, cfg, step, epoch, m, k, accelerator)
                    # each micro-batch's loss is a mean over its tokens; average the micro-batches of the minibatch
                    parts = (advantages, returns, idx, len(micro))
                    kept = fwd.pop("kept", None)  # the scoring forward, for the very first micro-batch only
                    losses, pg, vf = backward_losses(
                        accelerator, model, cfg, ro, fwd, *parts, split, ptx_of, kept, between
                    )
                    loss, pg_loss, vf_loss, ptx_loss = losses
                sums += torch.tensor(
                    [
                        float(loss.detach()),
                        float(pg_loss.detach()),
                        float(vf_loss.detach()),
                        float(pg["clipfrac"]),
                        float(vf["clipfrac"]),
                        float(pg["approx_kl"]),
                        float(ptx_loss.detach()),
                        1.0,
                    ],
                    dtype=torch.float64,
                    device=device,
                )
            sums = accelerator.reduce(sums, "sum")
            mean = (sums[:7] / sums[7]).tolist()
            if not all(math.isfinite(v) for v in mean):
                opt.optimizer.zero_grad(set_to_none=True)
                note_non_finite(st, cfg, state, f"step {step + 1}: non-finite loss{kept_step(first)}")
                continue
            grad_norm = step_optimizer(st, opt, skip_non_finite=True, earlier=first)
            if not math.isfinite(grad_norm):
                note_non_finite(st, cfg, state, f"step {step + 1}: non-finite gradient{kept_step(first)}")
                continue
            state.non_finite_in_a_row = 0
            keys = ("loss", "policy_loss", "value_loss", "policy_clipfrac", "value_clipfrac", "approx_kl", "ptx_loss")
            epoch_stats.append({**dict(zip(keys, mean, strict=True)), "grad_norm": grad_norm})
        stats += epoch_stats
        if cfg.target_approx_kl is not None and epoch_stats:
            if sum(s["approx_kl"] for s in epoch_stats) / len(epoch_stats) > cfg.target_approx_kl:
                break  # the policy moved far enough from the rollouts' policy for this step
    return stats


def working_copies_apply(cfg: PPOConfig, accelerator) -> bool:
    """Whether the trained weights can multiply by bf16 working copies (`rlhf.runtime.working_weights`): bf16 on one
    CPU process, plain weights (no LoRA), and one micro-batch per update (gradients would accumulate in bf16)."""
    one_micro_batch = cfg.mini_batch_size == cfg.micro_batch_size * accelerator.num_processes
    single_cpu = accelerator.num_processes == 1 and accelerator.device.type == "cpu"
    return cfg.mixed_precision == "bf16" and single_cpu and not cfg.lora and one_micro_batch


def steps_apart(cfg: PPOConfig, split: bool, micro: list) -> bool:
    """Whether the policy and the value model take their optimiser steps one after the other within an update: the
    same step as one for both when no gradient is clipped and nothing accumulates over micro-batches."""
    return split and len(micro) == 1 and cfg.max_grad_norm <= 0


def kept_step(norms: list[float]) -> str:
    """What a skipped update's message adds when the model stepped first (`step_part`) had a finite gradient: its
    step was taken before the other model's loss or gradient turned out non-finite, and stays."""
    if norms and math.isfinite(norms[0]):
        return " (the model back-propagated first had already stepped; only the other's step is skipped)"
    return ""


def step_part(st, opt, norms: list[float]) -> None:
    """The optimiser's step for the weights that have a gradient so far (Adam skips the rest), unless that gradient
    is not finite; its norm is appended to `norms` for `step_optimizer` to fold into the update's norm."""
    norms.append(clip_and_step(st, opt, math.inf, skip_non_finite=True))


def backward_losses(
    accelerator,
    model,
    cfg,
    ro,
    fwd,
    advantages,
    returns,
    idx,
    parts: int,
    split: bool,
    ptx=None,
    kept=None,
    between=None,
):
    """Forward and backward of one micro-batch (rows `idx`) of pg_loss + vf_coef · vf_loss (− the entropy bonus,
    + ptx_coef · ptx(), the PPO-ptx loss), divided by `parts`. Returns (loss, pg_loss, vf_loss, ptx_loss), detached,
    and the policy and value losses' statistics.

    `split` (one process): one model's loss is back-propagated before the other model's forward runs, so the two
    models' activations are never held at once (the policy's first, its LM head making them the larger; the value
    model's first when its forward is `kept` from scoring). The gradients are the same, since the two share no
    trainable weight. Under DDP the wrapped module's one forward and one backward keep its gradient
    synchronisation. `kept`: outputs of the scoring forward with their graph, for all rows (`forward_rollouts`),
    used instead of running that forward again. `between` (split only): called after the first model's backward,
    before the second model's forward (`step_part`)."""
    pv = accelerator.unwrap_model(model)
    between = between or (lambda: None)
    kept = kept or {}
    bottoms = tuple(fwd[k][idx] if k in fwd else None for k in ("bottom_policy", "bottom_value"))
    ids, attention, mask = ro.input_ids[idx], ro.attention_mask[idx], ro.response_mask[idx]
    values = logits = None
    if not split:
        logits, values = model(ids, attention, ro.context, bottoms, cfg.temperature)

    def value_part():
        v = kept["values"][idx] if "values" in kept else values
        if v is None:
            v = pv.values(ids, attention, ro.context, bottoms[1])
        return value_loss(v, fwd["values"][idx], returns[idx], mask, cfg.cliprange_value)

    def policy_part():
        if "logprobs" in kept:
            logprobs, entropy = kept["logprobs"][idx], kept["entropy"][idx] if "entropy" in kept else None
        else:
            out = logits if logits is not None else pv.logits(ids, attention, ro.context, bottoms[0], cfg.temperature)
            logprobs = response_logprobs(out, ids, ro.context)
            entropy = entropy_from_logits(out) if cfg.entropy_coef else None
            del out  # (B, T, V): not kept through the backward pass
        pg_loss, pg = policy_loss(logprobs, fwd["logprobs"][idx], advantages[idx], mask, cfg.cliprange)
        total = pg_loss
        if cfg.entropy_coef:
            total = total - cfg.entropy_coef * masked_mean(entropy, mask)
        ptx_loss = ptx() if ptx is not None else None
        if ptx_loss is not None:
            total = total + cfg.ptx_coef * ptx_loss
        return total, pg_loss, pg, ptx_loss

    if split and "values" in kept:
        vf_loss, vf = value_part()
        accelerator.backward(cfg.vf_coef * vf_loss / parts)
        between()
        total, pg_loss, pg, ptx_loss = policy_part()
        accelerator.backward(total / parts)
    elif split:
        total, pg_loss, pg, ptx_loss = policy_part()
        accelerator.backward(total / parts)
        between()
        vf_loss, vf = value_part()
        accelerator.backward(cfg.vf_coef * vf_loss / parts)
    else:
        total, pg_loss, pg, ptx_loss = policy_part()
        vf_loss, vf = value_part()
        del logits
        accelerator.backward((total + cfg.vf_coef * vf_loss) / parts)
    loss = total.detach() + cfg.vf_coef * vf_loss.detach()
    ptx_loss = torch.zeros((), device=loss.device) if ptx_loss is None else ptx_loss.detach()
    return (loss, pg_loss.detach(), vf_loss.detach(), ptx_loss), pg, vf


def ptx_batch_loss(model, ptx, cfg, step, epoch, m, k, accelerator) -> torch.Tensor:
    """PPO-ptx: mean response-token NLL of the policy on a micro-batch of demonstrations (InstructGPT eq. 2)."""
    updates_before = ((step * cfg.ppo_epochs + epoch) * cfg.batch_size + m) // accelerator.num_processes
    start = (updates_before + k * cfg.micro_batch_size) * accelerator.num_processes
    start += accelerator.process_index * cfg.micro_batch_size
    idx = sample_indices(start, cfg.micro_batch_size, len(ptx), cfg.seed)
    batch = {k: v.to(accelerator.device) for k, v in collate_sft([ptx[i] for i in idx], 0).items()}
    nll, count = response_nll(accelerator.unwrap_model(model).policy, batch)
    return nll / max(count, 1)


def step_metrics(accelerator, ro, fwd, rm_scores, kl_sum, returns, stats, state, messages, cfg) -> dict:
    mask = ro.response_mask
    lengths = mask.sum(1).float()

    def mean_all(x: torch.Tensor) -> float:
        return float(accelerator.gather(x.float()).mean())

    out = {
        "reward": mean_all(rm_scores),  # the reward model's score, before the EOS penalty
        "kl": float(kl_sum),
        "kl_coef": state.kl_ctl.value,
        # −log π of the sampled tokens: an unbiased estimate of the policy's entropy per token, with no pass over
        # the vocabulary
        "entropy": mean_all(-(fwd["logprobs"] * mask).sum(1) / lengths.clamp(min=1)),
        "response_length": mean_all(lengths),
        "eos_rate": mean_all(ro.finished),
        "explained_variance": float(explained_variance(fwd["values"], returns, mask)),
        "non_finite_skips": state.non_finite_total,
    }
    if cfg.gold:
        out["gold_reward"] = mean_all(gold_rewards(messages, ro).to(accelerator.device))
    for key in ("loss", "policy_loss", "value_loss", "policy_clipfrac", "value_clipfrac", "approx_kl", "grad_norm"):
        if stats:
            out[key] = sum(s[key] for s in stats) / len(stats)
    if stats and cfg.ptx_coef:
        out["ptx_loss"] = sum(s["ptx_loss"] for s in stats) / len(stats)
    return out
