"""Stage 2d: the reward model, trained on whole K-way rankings with InstructGPT's loss (algos/ranking_loss.py).

A batch element is one prompt with its K responses and its ranked pairs; each response is forwarded once and the
loss averages −log σ(r_better − r_worse) over the prompt's pairs, then over prompts. Pairwise data is K = 2.
Training data: a filtered selection of the response library (`rlhf filter`), or a pairwise / ranked / HH file.
Held-out prompts (never trained on) give pairwise accuracy, accuracy against the simulated panel's gold where the
library has it, and the score distribution. After training the head is shifted so that reference responses
(demonstrations) score 0 on average, and the shift is recorded.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass
from itertools import combinations
from pathlib import Path

import torch
from tqdm.auto import tqdm

from rlhf.algos.aggregate import pairs_from_ranking
from rlhf.algos.ranking_loss import kwise_loss
from rlhf.config import RewardConfig, to_dict
from rlhf.data.chat import PromptTooLong, tokenize_demonstration
from rlhf.data.jsonl import DataError
from rlhf.data.preferences import read_preferences
from rlhf.data.records import Demonstration, read_demonstrations
from rlhf.models.lora import plain_model, wrap_lora
from rlhf.models.reward import center_on_reference, load_reward_model, pad_batch, score
from rlhf.runtime.checkpoint import save_final
from rlhf.runtime.metrics import MetricsLogger
from rlhf.runtime.order import sample_indices
from rlhf.runtime.stage import begin, optimise, step_optimizer

STAGE = "rm"


@dataclass
class RankedTask:
    prompt_id: str
    messages: tuple[dict, ...]
    responses: list[str]
    pairs: list[tuple[int, int, float]]  # (better, worse, agreement strength) over responses
    gold: list[float] | None = None  # the simulated panel's utility of each response, for evaluation only
    sequences: list[list[int]] | None = None  # token ids of prompt + response, filled by tokenize_tasks


def tasks_from_library(library: str, selection: str) -> list[RankedTask]:
    from rlhf.store.library import Library

    lib = Library(library)
    rows = lib.comparisons(selection)
    if not rows:
        raise DataError(f"{library}: no comparisons in selection {selection!r}; run `rlhf filter` first")
    samples = {s.id: s for s in lib.samples()}
    gold = lib.gold()
    messages = lib.prompt_messages()
    out = []
    for r in rows:
        has_gold = all(sid in gold for sid in r.sample_ids)
        out.append(
            RankedTask(
                r.prompt_id,
                tuple(messages[r.prompt_id]),
                [samples[sid].text for sid in r.sample_ids],
                [(b, w, s) for b, w, s in r.pairs],
                [gold[sid] for sid in r.sample_ids] if has_gold else None,
            )
        )
    return out


def tasks_from_file(path: str, fmt: str, say) -> list[RankedTask]:
    result = read_preferences(path, fmt)
    if result.errors:
        shown = "\n  ".join(result.errors[:5])
        say(f"rm: {len(result.errors)} of {result.rows} rows in {path} could not be read and are not used:\n  {shown}")
    tasks = []
    for rec in result.records:
        pairs = [(b, w, 1.0) for b, w in pairs_from_ranking(rec.tiers)]
        if pairs:  # a row whose responses are all tied has nothing to learn from
            tasks.append(RankedTask(rec.prompt_id, rec.messages, list(rec.responses), pairs))
    if not tasks:
        raise DataError(f"{path}: no usable comparisons")
    return tasks


def split_by_prompt(tasks: list[RankedTask], fraction: float, seed: int) -> tuple[list, list]:
    """(train, held-out): a seeded `fraction` of the prompts, with all their tasks, is held out."""
    prompts = sorted({t.prompt_id for t in tasks})
    if fraction == 0 or len(prompts) < 2:
        return tasks, []
    order = torch.randperm(len(prompts), generator=torch.Generator().manual_seed(seed)).tolist()
    held = {prompts[i] for i in order[: max(1, round(len(prompts) * fraction))]}
    return [t for t in tasks if t.prompt_id not in held], [t for t in tasks if t.prompt_id in held]


def tokenize_tasks(tokenizer, tasks: list[RankedTask], max_seq_len: int, say) -> list[RankedTask]:
    """Token ids of every response of every task; too-long conversations keep their last max_seq_len tokens."""
    cut = 0
    for t in tasks:
        t.sequences = response_sequences(
            tokenizer, [Demonstration(t.prompt_id, t.messages, r) for r in t.responses], max_seq_len
        )
        cut += sum(len(s) == max_seq_len for s in t.sequences)
    if cut:
        say(f"rm: {cut} conversations were longer than max_seq_len={max_seq_len} and keep only their last tokens")
    return tasks


def response_sequences(tokenizer, demos: list[Demonstration], max_seq_len: int) -> list[list[int]]:
    """Token ids of prompt + response for scoring. When a conversation is longer than max_seq_len, its end matters
    most (the response and the turns just before it), so it keeps its last max_seq_len tokens."""
    out = []
    for d in demos:
        try:
            out.append(tokenize_demonstration(tokenizer, d, max_seq_len).input_ids)
        except PromptTooLong:
            out.append(tokenize_demonstration(tokenizer, d, 10**9).input_ids[-max_seq_len:])
            continue
        if out[-1] and len(out[-1]) == max_seq_len and out[-1][-1] != tokenizer.eos_token_id:
            # tokenize_demonstration cut the response's end; keep the end instead (it holds the EOS and the verdict)
            out[-1] = tokenize_demonstration(tokenizer, d, 10**9).input_ids[-max_seq_len:]
    return out


@torch.no_grad()
def score_file(cfg_model: str, data: str, fmt: str, max_seq_len: int, batch_size: int) -> list[dict]:
    """`rlhf rm score`: the reward of every prompt/response row of a file."""
    model, tokenizer = load_reward_model(cfg_model)
    model.eval()
    demos = read_demonstrations(data, fmt)
    sequences = response_sequences(tokenizer, demos, max_seq_len)
    rows = []
    for i in tqdm(range(0, len(demos), batch_size), desc="rm score", unit="batch"):
        ids, mask = pad_batch(sequences[i : i + batch_size], tokenizer.pad_token_id)
        for d, s in zip(demos[i : i + batch_size], score(model, ids, mask).tolist(), strict=True):
            rows.append({"id": d.id, "score": s, "messages": list(d.messages), "response": d.response})
    return rows


def batch_of(tasks: list[RankedTask], pad_id: int, margin_scale: float, device) -> dict:
    """All responses of `tasks` as one right-padded batch, and their pairs as indices into it."""
    seqs, pairs, pair_task, margins = [], [], [], []
    for k, t in enumerate(tasks):
        base = len(seqs)
        seqs += t.sequences
        for b, w, strength in t.pairs:
            pairs.append((base + b, base + w))
            pair_task.append(k)
            margins.append(margin_scale * (2 * strength - 1))
    ids, mask = pad_batch(seqs, pad_id)
    return {
        "input_ids": ids.to(device),
        "attention_mask": mask.to(device),
        "pairs": torch.tensor(pairs, device=device),
        "pair_task": torch.tensor(pair_task, device=device),
        "margins": torch.tensor(margins, device=device) if margin_scale else None,
        "n_tasks": len(tasks),
    }


@torch.no_grad()
def evaluate(model, tasks: list[RankedTask], pad_id: int, micro: int, device) -> torch.Tensor:
    """Sums over tasks: (right pairs, pairs, right gold pairs, gold pairs, Σ score, Σ score², n scores)."""
    model.eval()
    totals = torch.zeros(7, dtype=torch.float64, device=device)
    for i in range(0, len(tasks), micro):
        chunk = tasks[i : i + micro]
        batch = batch_of(chunk, pad_id, 0.0, device)
        scores = score(model, batch["input_ids"], batch["attention_mask"])  # (N,)
        diff = scores[batch["pairs"][:, 0]] - scores[batch["pairs"][:, 1]]
        totals[0] += ((diff > 0).double() + 0.5 * (diff == 0).double()).sum()
        totals[1] += len(diff)
        base = 0
        for t in chunk:
            if t.gold is not None:
                for a, b in combinations(range(len(t.responses)), 2):
                    if t.gold[a] != t.gold[b]:
                        better, worse = (a, b) if t.gold[a] > t.gold[b] else (b, a)
                        d = float(scores[base + better] - scores[base + worse])
                        totals[2] += 1.0 if d > 0 else 0.5 if d == 0 else 0.0
                        totals[3] += 1
            base += len(t.responses)
        totals[4] += scores.double().sum()
        totals[5] += (scores.double() ** 2).sum()
        totals[6] += len(scores)
    model.train()
    return totals


def summarize(totals: torch.Tensor) -> dict:
    t = totals.tolist()
    mean = t[4] / max(t[6], 1)
    out = {
        "heldout_accuracy": t[0] / max(t[1], 1),
        "heldout_pairs": t[1],
        "score_mean": mean,
        "score_std": math.sqrt(max(t[5] / max(t[6], 1) - mean**2, 0.0)),
    }
    if t[3]:
        out["gold_accuracy"] = t[2] / t[3]
        out["gold_pairs"] = t[3]
    return out


def run(cfg: RewardConfig) -> Path:
    # 1. fresh start or resume, decided before any expensive work
    st = begin(cfg, cfg.stage_name or STAGE)
    if st is None:
        return Path(cfg.out) / (cfg.stage_name or STAGE) / "final"
    accelerator, main, say = st.accelerator, st.main, st.accelerator.print  # `say` for helpers that add "rm:"

    # 2. ranked tasks → held-out split by prompt → token ids
    if cfg.library:
        tasks = tasks_from_library(cfg.library, cfg.selection)
    else:
        tasks = tasks_from_file(cfg.data, cfg.data_format, say)
    if cfg.eval_data:
        train, held = tasks, tasks_from_file(cfg.eval_data, cfg.data_format, say)
    else:
        train, held = split_by_prompt(tasks, cfg.eval_fraction, cfg.seed)
    model, tokenizer = load_reward_model(cfg.model)
    pad_id = tokenizer.pad_token_id
    train = tokenize_tasks(tokenizer, train, cfg.max_seq_len, say)
    held = tokenize_tasks(tokenizer, held, cfg.max_seq_len, say)

    # 3. model, optimiser, schedule
    if cfg.lora:
        # SEQ_CLS: peft trains the new score head in full beside the adapters
        model = wrap_lora(model, cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, cfg.lora_target_modules, "SEQ_CLS")
    opt = optimise(st, model, len(train))
    model, world = opt.model, accelerator.num_processes
    start, end, total_steps, per_rank = opt.start, opt.end, opt.total_steps, opt.per_rank
    stage_dir = st.stage_dir
    n_pairs = sum(len(t.pairs) for t in train)
    st.say(
        f"{len(train)} training prompts ({n_pairs} pairs, K={min(len(t.responses) for t in train)}–"
        f"{max(len(t.responses) for t in train)}), {len(held)} held-out prompts; {total_steps} steps of "
        f"{cfg.batch_size} prompts"
    )

    def heldout(m=None) -> dict:
        # sums over tasks: any order gives the same totals, and length order wastes the least padding
        mine = sorted(held[accelerator.process_index :: world], key=lambda t: max(len(s) for s in t.sequences))
        with accelerator.autocast():  # the training precision; no gradients, so twice the micro-batch fits
            totals = evaluate(m or model, mine, pad_id, 2 * cfg.micro_batch_size, accelerator.device)
        return summarize(accelerator.reduce(totals))

    # 4. train
    logger = MetricsLogger(cfg.out, st.name, enabled=main)
    if start == 0 and held:
        metrics = heldout()
        logger.log(0, metrics)
        st.say(f"before training: held-out accuracy {metrics['heldout_accuracy']:.3f}")
    bar = tqdm(total=total_steps, initial=start, disable=not (main and cfg.progress), desc="rm", unit="step")
    ev = None  # the latest held-out evaluation; the last step always has one
    for step in range(start, end):
        t0 = time.perf_counter()
        indices = sample_indices(step * cfg.batch_size, cfg.batch_size, len(train), cfg.seed)
        mine = indices[accelerator.process_index * per_rank : (accelerator.process_index + 1) * per_rank]
        # The step's loss is a sum over its prompts, so their order within the step is free: grouping prompts of
        # similar length into the same micro-batch cuts padding without changing the update.
        mine.sort(key=lambda i: max(len(s) for s in train[i].sequences))
        step_loss = torch.zeros((), dtype=torch.float64, device=accelerator.device)
        right = torch.zeros(2, dtype=torch.float64, device=accelerator.device)
        for k in range(0, per_rank, cfg.micro_batch_size):
            batch = batch_of(
                [train[i] for i in mine[k : k + cfg.micro_batch_size]], pad_id, cfg.margin_scale, accelerator.device
            )
            sync = k + cfg.micro_batch_size >= per_rank
            with contextlib.nullcontext() if sync else accelerator.no_sync(model), accelerator.autocast():
                scores = score(model, batch["input_ids"], batch["attention_mask"])  # (N,): each response once
                loss = kwise_loss(scores, batch["pairs"], batch["pair_task"], batch["n_tasks"], batch["margins"])
                # the step's loss is the mean over its batch_size prompts; DDP averages over processes, hence × world
                accelerator.backward(loss * batch["n_tasks"] / cfg.batch_size * world)
            step_loss += loss.detach().double() * batch["n_tasks"] / cfg.batch_size
            diff = (scores[batch["pairs"][:, 0]] - scores[batch["pairs"][:, 1]]).detach()
            right += torch.tensor([float((diff > 0).sum()), len(diff)], dtype=torch.float64, device=accelerator.device)
        step_loss = accelerator.reduce(step_loss, "sum").item()
        right = accelerator.reduce(right, "sum")
        if not math.isfinite(step_loss):
            raise FloatingPointError(f"rm: the loss became {step_loss} at step {step + 1}; lower --lr")
        grad_norm = step_optimizer(st, opt)
        done = step + 1
        metrics = {
            "loss": step_loss,
            "train_accuracy": float(right[0] / right[1]),
            "lr": opt.scheduler.get_last_lr()[0],
            "grad_norm": grad_norm,
            "seconds": time.perf_counter() - t0,
        }
        if done % cfg.log_every == 0 or done == end:
            logger.log(done, metrics)
        bar.update(1)
        bar.set_postfix(loss=f"{step_loss:.3f}", acc=f"{metrics['train_accuracy']:.2f}")
        if held and (done % cfg.eval_every == 0 or done == total_steps):
            ev = heldout()
            logger.log(done, ev)
            if main:
                bar.write(
                    f"rm: step {done}: held-out accuracy {ev['heldout_accuracy']:.3f}"
                    + (f", gold accuracy {ev['gold_accuracy']:.3f}" if "gold_accuracy" in ev else "")
                )
        st.checkpoint_if_due(done, end, total_steps)
    bar.close()
    if end < total_steps:
        logger.close()
        st.say(f"stopped at step {end} of {total_steps} (stop_after_steps); continue with --resume")
        return stage_dir

    # 5. centre the scores on the reference responses, then save a plain transformers model
    final_model = plain_model(accelerator.unwrap_model(model))
    summary = {"stage": st.name, "steps": total_steps, "config": to_dict(cfg)}
    if held:
        summary["heldout"] = ev if ev is not None else heldout(final_model)
    if cfg.reference:
        refs = read_demonstrations(cfg.reference)
        sequences = response_sequences(tokenizer, refs, cfg.max_seq_len)
        summary["reference_shift"] = center_on_reference(final_model, sequences, pad_id, cfg.micro_batch_size * 4)
        if held:
            summary["heldout_after_shift"] = heldout(final_model)
            logger.log(total_steps, {f"{k}_after_shift": v for k, v in summary["heldout_after_shift"].items()})
        st.say(
            f"shifted the head ({summary['reference_shift']['method']}) so the {len(refs)} reference responses "
            f"score {summary['reference_shift']['reference_mean_after']:.2e} on average "
            f"(was {summary['reference_shift']['reference_mean_before']:.3f})"
        )
    logger.close()
    final = save_final(accelerator, final_model, tokenizer, stage_dir, summary)
    if held:
        h = summary.get("heldout_after_shift", summary["heldout"])
        st.say(
            f"held-out accuracy {h['heldout_accuracy']:.3f} on {int(h['heldout_pairs'])} pairs"
            + (f", gold accuracy {h['gold_accuracy']:.3f}" if "gold_accuracy" in h else "")
        )
    st.say(f"done; reward model saved to {final}")
    return final
