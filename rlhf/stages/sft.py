"""Stage 1: supervised fine-tuning of the policy on human demonstrations (InstructGPT §3.5).

Loss on response tokens only. The data order is a pure function of (seed, sample index), and each optimiser
step's loss is normalised by the number of response tokens in the whole step (all processes, all accumulation
micro-batches), so 2 processes × batch b, 1 process × 2b, and b with 2 accumulation steps train identically,
and a resumed run continues exactly where the checkpoint left it.
"""

from __future__ import annotations

import contextlib
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from tqdm.auto import tqdm

from rlhf.config import SFTConfig, to_dict
from rlhf.data.chat import PromptTooLong, TokenizedDemo, tokenize_demonstration
from rlhf.data.collate import IGNORE_INDEX, collate_sft
from rlhf.data.jsonl import DataError
from rlhf.data.records import Demonstration, read_demonstrations
from rlhf.models.load import load_causal_lm
from rlhf.models.lora import plain_model, wrap_lora
from rlhf.runtime.checkpoint import save_final
from rlhf.runtime.metrics import MetricsLogger
from rlhf.runtime.order import sample_indices
from rlhf.runtime.stage import begin, optimise, step_optimizer

STAGE = "sft"


def split_heldout(demos: list[Demonstration], fraction: float, seed: int) -> tuple[list, list]:
    """(train, held-out): a seeded random `fraction` of the demonstrations is held out."""
    if fraction == 0 or len(demos) < 2:
        return demos, []
    k = max(1, round(len(demos) * fraction))
    order = torch.randperm(len(demos), generator=torch.Generator().manual_seed(seed)).tolist()
    held = set(order[:k])
    return [d for i, d in enumerate(demos) if i not in held], [d for i, d in enumerate(demos) if i in held]


def response_nll(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """(sum of −log p over response tokens, number of response tokens) for one micro-batch.

    The LM head runs only from the first position at which some row predicts a response token (`logits_to_keep`):
    the prompts' columns before it predict nothing that is trained."""
    labels = batch["labels"][:, 1:]  # (B, T-1): token t+1 is predicted at position t
    trained = labels != IGNORE_INDEX
    first = int(trained.any(0).int().argmax()) if bool(trained.any()) else labels.shape[1] - 1
    keep = torch.arange(first, labels.shape[1], device=labels.device)  # positions first … T-2
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], logits_to_keep=keep).logits
    nll = F.cross_entropy(  # logits (B, T-1-first, V)
        logits.flatten(0, 1).float(), labels[:, first:].flatten(), ignore_index=IGNORE_INDEX, reduction="sum"
    )
    return nll, int(trained.sum())


@torch.no_grad()
def heldout_loss(model, accelerator: Accelerator, examples: list[TokenizedDemo], micro: int, pad_id: int) -> float:
    """Mean response-token NLL over all held-out examples, each process taking every W-th example."""
    model.eval()
    mine = examples[accelerator.process_index :: accelerator.num_processes]
    total = torch.zeros(2, dtype=torch.float64, device=accelerator.device)  # (nll sum, token count)
    for i in range(0, len(mine), micro):
        batch = {k: v.to(accelerator.device) for k, v in collate_sft(mine[i : i + micro], pad_id).items()}
        with accelerator.autocast():
            nll, count = response_nll(model, batch)
        total += torch.tensor([nll.item(), count], dtype=torch.float64, device=accelerator.device)
    total = accelerator.reduce(total, "sum")
    model.train()
    return (total[0] / total[1].clamp(min=1)).item()


def tokenize_all(tokenizer, demos: list[Demonstration], max_seq_len: int, say) -> list[TokenizedDemo]:
    """Token ids of every demonstration; those cut or left out for length are counted and named, never hidden."""
    examples, too_long = [], []
    for d in demos:
        try:
            examples.append(tokenize_demonstration(tokenizer, d, max_seq_len))
        except PromptTooLong as e:
            too_long.append(str(e))
    n_cut = sum(e.truncated for e in examples)
    if n_cut:
        say(
            f"sft: {n_cut} of {len(demos)} responses were longer than fits in max_seq_len={max_seq_len} and were "
            "cut (raise --max-seq-len to keep them whole)"
        )
    if too_long:
        shown = "\n  ".join(too_long[:5]) + (f"\n  ... and {len(too_long) - 5} more" if len(too_long) > 5 else "")
        say(
            f"sft: left out {len(too_long)} of {len(demos)} demonstrations whose prompt alone fills "
            f"max_seq_len={max_seq_len}:\n  {shown}"
        )
    if demos and not examples:
        raise DataError(f"every demonstration's prompt is longer than max_seq_len={max_seq_len}")
    return examples


def run(cfg: SFTConfig) -> Path:
    # 1. fresh start or resume, decided before any expensive work
    st = begin(cfg, cfg.stage_name or STAGE)
    if st is None:
        return Path(cfg.out) / (cfg.stage_name or STAGE) / "final"
    accelerator = st.accelerator

    # 2. data: demonstrations → held-out split → token ids with the response located
    demos = read_demonstrations(cfg.data, cfg.data_format)
    if cfg.eval_data:
        train_demos, eval_demos = demos, read_demonstrations(cfg.eval_data, cfg.data_format)
    else:
        train_demos, eval_demos = split_heldout(demos, cfg.eval_fraction, cfg.seed)
    model, tokenizer = load_causal_lm(cfg.model)
    train = tokenize_all(tokenizer, train_demos, cfg.max_seq_len, accelerator.print)
    held = tokenize_all(tokenizer, eval_demos, cfg.max_seq_len, accelerator.print)

    # 3. model, optimiser, schedule
    if cfg.lora:
        model = wrap_lora(model, cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, cfg.lora_target_modules)
    opt = optimise(st, model, len(train))
    model, world = opt.model, accelerator.num_processes
    st.say(
        f"{len(train)} training and {len(held)} held-out demonstrations, {opt.total_steps} steps of "
        f"{cfg.batch_size} ({world} process(es) × {opt.accumulation} accumulation × {cfg.micro_batch_size}); "
        f"training {sum(p.numel() for p in opt.params) / 1e6:.2f}M parameters{' (LoRA)' if cfg.lora else ''}"
    )

    # 4. train
    logger = MetricsLogger(cfg.out, st.name, enabled=st.main)
    pad_id = tokenizer.pad_token_id
    if opt.start == 0 and held:
        loss = heldout_loss(model, accelerator, held, cfg.micro_batch_size, pad_id)
        logger.log(0, {"heldout_loss": loss})
        st.say(f"held-out loss before training {loss:.4f}")
    bar = tqdm(
        total=opt.total_steps, initial=opt.start, disable=not (st.main and cfg.progress), desc=st.name, unit="step"
    )
    for step in range(opt.start, opt.end):
        t0 = time.perf_counter()
        # 4a. this process's share of the step's batch, as micro-batches
        indices = sample_indices(step * cfg.batch_size, cfg.batch_size, len(train), cfg.seed)
        mine = indices[accelerator.process_index * opt.per_rank : (accelerator.process_index + 1) * opt.per_rank]
        mine.sort(key=lambda i: len(train[i].input_ids))  # the step's loss is order-free; similar lengths pad less
        micro_batches = [
            collate_sft([train[i] for i in mine[k : k + cfg.micro_batch_size]], pad_id)
            for k in range(0, opt.per_rank, cfg.micro_batch_size)
        ]
        local_tokens = sum(int((mb["labels"] != IGNORE_INDEX).sum()) for mb in micro_batches)
        seen_tokens = sum(int(mb["attention_mask"].sum()) for mb in micro_batches)
        counts = accelerator.reduce(torch.tensor([local_tokens, seen_tokens], device=accelerator.device), "sum")
        n_response_tokens = int(counts[0])
        # 4b. forward/backward; DDP averages gradients over processes, hence × world
        step_nll = torch.zeros((), dtype=torch.float64, device=accelerator.device)
        for k, mb in enumerate(micro_batches):
            mb = {key: v.to(accelerator.device) for key, v in mb.items()}
            sync = k == len(micro_batches) - 1
            with accelerator.no_sync(model) if not sync else contextlib.nullcontext(), accelerator.autocast():
                nll, _ = response_nll(model, mb)
                accelerator.backward(nll / max(n_response_tokens, 1) * world)
            step_nll += nll.detach().double()
        loss = (accelerator.reduce(step_nll, "sum") / max(n_response_tokens, 1)).item()
        if not math.isfinite(loss):
            raise FloatingPointError(f"sft: the loss became {loss} at step {step + 1}; lower --lr or check the data")
        # 4c. clip, update, schedule
        grad_norm = step_optimizer(st, opt)
        done = step + 1
        metrics = {
            "loss": loss,
            "lr": opt.scheduler.get_last_lr()[0],
            "grad_norm": grad_norm,
            "tokens_per_s": int(counts[1]) / (time.perf_counter() - t0),
            "response_tokens": n_response_tokens,
            "epoch": done * cfg.batch_size / len(train),
        }
        if done % cfg.log_every == 0 or done == opt.end:
            logger.log(done, metrics)
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.3f}", lr=f"{metrics['lr']:.1e}", tok_s=f"{metrics['tokens_per_s']:.0f}")
        # 4d. evaluate and checkpoint
        if held and (done % cfg.eval_every == 0 or done == opt.total_steps):
            heldout = heldout_loss(model, accelerator, held, cfg.micro_batch_size, pad_id)
            logger.log(done, {"heldout_loss": heldout})
            if st.main:
                bar.write(f"sft: step {done}: held-out loss {heldout:.4f}")
        st.checkpoint_if_due(done, opt.end, opt.total_steps)
    bar.close()
    logger.close()
    if opt.end < opt.total_steps:
        st.say(f"stopped at step {opt.end} of {opt.total_steps} (stop_after_steps); continue with --resume")
        return st.stage_dir
    # 5. the result: a plain transformers folder
    summary = {"stage": st.name, "steps": opt.total_steps, "config": to_dict(cfg)}
    final = save_final(accelerator, plain_model(accelerator.unwrap_model(model)), tokenizer, st.stage_dir, summary)
    st.say(f"done; model saved to {final}")
    return final
