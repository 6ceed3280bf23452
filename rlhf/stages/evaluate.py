"""Evaluation: two policies answer the same held-out prompts; how often does B beat A?

Win rate by the reward model, by gold (the simulated panel's utility, when it labelled the data) and by an AI judge
(when configured), each with a 95% percentile-bootstrap interval over prompts (ties count half). Also each
model's mean response length, EOS rate, and log-ratio to the reference policy on its own responses: Σ_t log π(y_t) −
log π_ref(y_t), the k1 estimate of KL(π‖π_ref) when responses are sampled at temperature 1 (at other temperatures
an indicator of how far the model moved, not an unbiased KL). Writes OUT/summary.json and OUT/generations.jsonl.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from rlhf.algos.aggregate import win_rate
from rlhf.config import EvalConfig, to_dict
from rlhf.data.chat import encode_prompt
from rlhf.data.records import Demonstration, read_prompts
from rlhf.models.generation import sample_responses
from rlhf.models.load import load_causal_lm
from rlhf.models.reward import load_reward_model, pad_batch, position_ids, score
from rlhf.runtime.files import atomic_write_text
from rlhf.stages.sample import batch_seed


def compare(a: float, b: float) -> float:
    return 1.0 if b > a else 0.0 if b < a else 0.5


@torch.no_grad()
def generate_all(model, tokenizer, prompts, cfg: EvalConfig, desc: str) -> list[dict]:
    """One response per prompt; batch i is seeded the same for every model, so the comparison is paired."""
    out = []
    eos = tokenizer.eos_token_id
    for i in tqdm(range(0, len(prompts), cfg.batch_size), desc=desc, unit="batch", disable=not cfg.progress):
        batch = prompts[i : i + cfg.batch_size]
        torch.manual_seed(batch_seed(cfg.seed, [p.id for p in batch]))
        encoded = [encode_prompt(tokenizer, p.messages) for p in batch]
        _, _, responses = sample_responses(
            model, encoded, tokenizer.pad_token_id, eos, cfg.max_new_tokens, cfg.temperature, cfg.top_p
        )
        for prompt_ids, r in zip(encoded, responses.tolist(), strict=True):
            n = r.index(eos) + 1 if eos in r else len(r)
            out.append(
                {
                    "prompt_ids": prompt_ids,
                    "ids": r[:n],
                    "text": tokenizer.decode(r[:n], skip_special_tokens=True).strip(),
                    "tokens": n,
                    "finished": eos in r,
                }
            )
    return out


@torch.no_grad()
def summed_logprobs(model, generations: list[dict], pad_id: int, batch_size: int) -> list[float]:
    """Σ_t log π(y_t | prompt, y_<t) of each response at temperature 1."""
    model.eval()
    sums = []
    for i in range(0, len(generations), batch_size):
        chunk = generations[i : i + batch_size]
        ids, mask = pad_batch([g["prompt_ids"] + g["ids"] for g in chunk], pad_id)
        out = model(input_ids=ids, attention_mask=mask, position_ids=position_ids(mask), use_cache=False)
        logits = out.logits.float()
        logp = torch.log_softmax(logits[:, :-1], -1).gather(-1, ids[:, 1:, None])[..., 0]  # (B, L-1)
        for row, g in zip(logp, chunk, strict=True):
            start = len(g["prompt_ids"]) - 1  # position start predicts the first response token
            sums.append(float(row[start : start + len(g["ids"])].sum()))
    return sums


@torch.no_grad()
def reward_scores(model, tokenizer, prompts, generations: list[dict], batch_size: int) -> list[float]:
    from rlhf.stages.reward import response_sequences

    model.eval()
    demos = [Demonstration(p.id, p.messages, g["text"]) for p, g in zip(prompts, generations, strict=True)]
    sequences = response_sequences(tokenizer, demos, 1024)
    out = []
    for i in range(0, len(sequences), batch_size):
        ids, mask = pad_batch(sequences[i : i + batch_size], tokenizer.pad_token_id)
        out += score(model, ids, mask).tolist()
    return out


def judge_outcomes(cfg: EvalConfig, prompts, gen_a, gen_b) -> list[str]:
    """The judge's verdict per prompt: "a", "b" or "tie". The order shown alternates to cancel position bias."""
    from rlhf.annotators.judge import Judge, JudgeConfig

    judge = Judge(JudgeConfig(base_url=cfg.judge_base_url or "", model=cfg.judge_model or ""))
    verdicts = []
    for i, (p, a, b) in enumerate(
        tqdm(list(zip(prompts, gen_a, gen_b, strict=True)), desc="judge", disable=not cfg.progress)
    ):
        shown = [a["text"], b["text"]] if i % 2 == 0 else [b["text"], a["text"]]
        tiers = judge.rank(list(p.messages), shown).tiers
        if len(tiers) == 1:
            verdicts.append("tie")
        else:
            best_shown = tiers[0][0]
            verdicts.append(("a" if best_shown == 0 else "b") if i % 2 == 0 else ("b" if best_shown == 0 else "a"))
    return verdicts


def run(cfg: EvalConfig) -> dict:
    cfg.validate()
    prompts = read_prompts(cfg.prompts)[: cfg.limit]
    reference = cfg.reference or cfg.a

    # 1. each model answers every prompt (same seeds); its log-probs of its own answers
    gens, own, kept = {}, {}, None
    for side, name in (("a", cfg.a), ("b", cfg.b)):
        model, tokenizer = load_causal_lm(name)
        gens[side] = generate_all(
            model, tokenizer, prompts, cfg, f"eval {cfg.a_label if side == 'a' else cfg.b_label}"
        )
        own[side] = summed_logprobs(model, gens[side], tokenizer.pad_token_id, cfg.batch_size)
        if name == reference and kept is None:
            kept = (model, tokenizer)  # the reference: no second load, and its log-ratio on its own answers is 0
        del model

    # 2. the reference's log-probs of both models' answers
    ref_model, ref_tok = kept or load_causal_lm(reference)
    kl = {}
    for side, name in (("a", cfg.a), ("b", cfg.b)):
        if name == reference:
            kl[side] = 0.0
        else:
            ref_logprobs = summed_logprobs(ref_model, gens[side], ref_tok.pad_token_id, cfg.batch_size)
            kl[side] = float(np.mean(np.subtract(own[side], ref_logprobs)))
    del ref_model, kept

    # 3. judges of quality: reward model, gold, AI judge
    rows = [
        {
            "prompt_id": p.id,
            "prompt": p.text,
            **{f"{s}": gens[s][i]["text"] for s in ("a", "b")},
            **{f"{s}_tokens": gens[s][i]["tokens"] for s in ("a", "b")},
            **{f"{s}_finished": gens[s][i]["finished"] for s in ("a", "b")},
        }
        for i, p in enumerate(prompts)
    ]
    win_rates = {}
    if cfg.reward:
        reward_model, rm_tokenizer = load_reward_model(cfg.reward)
        for s in ("a", "b"):
            scores = reward_scores(reward_model, rm_tokenizer, prompts, gens[s], cfg.batch_size)
            for row, v in zip(rows, scores, strict=True):
                row[f"{s}_rm"] = v
        del reward_model
        win_rates["rm"] = win_rate([compare(r["a_rm"], r["b_rm"]) for r in rows], cfg.seed)
    if cfg.gold:
        from rlhf.annotators.simulated import SimulatedPanel

        panel = SimulatedPanel()
        for row in rows:
            g = panel.gold(row["prompt"], [row["a"], row["b"]], [row["a_finished"], row["b_finished"]])
            row["a_gold"], row["b_gold"] = float(g[0]), float(g[1])
        win_rates["gold"] = win_rate([compare(r["a_gold"], r["b_gold"]) for r in rows], cfg.seed)
    if cfg.judge_base_url or cfg.judge_model:
        for row, verdict in zip(rows, judge_outcomes(cfg, prompts, gens["a"], gens["b"]), strict=True):
            row["judge"] = verdict
        win_rates["judge"] = win_rate([{"a": 0.0, "b": 1.0, "tie": 0.5}[r["judge"]] for r in rows], cfg.seed)

    # 4. summary.json and generations.jsonl
    def mean(key: str) -> dict | None:
        if key.format("a") not in rows[0]:
            return None
        return {s: float(np.mean([r[key.format(s)] for r in rows])) for s in ("a", "b")}

    summary = {
        "a": cfg.a,
        "b": cfg.b,
        "a_label": cfg.a_label,
        "b_label": cfg.b_label,
        "reference": reference,
        "n_prompts": len(prompts),
        "win_rates": win_rates,
        "mean_length": mean("{}_tokens"),
        "eos_rate": mean("{}_finished"),
        "kl_to_reference": kl,
        "mean_reward": mean("{}_rm"),
        "mean_gold": mean("{}_gold"),
        "config": to_dict(cfg),
    }
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "generations.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=1))
    for kind, w in win_rates.items():
        print(
            f"eval: {cfg.b_label} beats {cfg.a_label} by {kind}: {w['rate']:.1%} [{w['low']:.1%}, {w['high']:.1%}] "
            f"({w['wins']} wins, {w['ties']} ties, {w['losses']} losses)"
        )
    print(
        f"eval: mean length {summary['mean_length']['a']:.1f} vs {summary['mean_length']['b']:.1f} tokens; "
        f"log-ratio to the reference {kl['a']:.2f} vs {kl['b']:.2f} nats; written to {out}"
    )
    return summary
