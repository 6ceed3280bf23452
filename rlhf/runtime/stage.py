"""What every training stage does around its own math: start or resume, optimiser and schedule, checkpoints.

A stage's `run(cfg)` reads: `st = begin(cfg, "rm")`, load data and model, `opt = optimise(st, cfg, model, n)`,
then its loop calling `st.checkpoint(...)`, then `save_final`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from rlhf.runtime.checkpoint import is_complete, resume_point, save_checkpoint
from rlhf.runtime.distributed import make_accelerator, native_gqa_attention, resolve_mixed_precision
from rlhf.runtime.run_folder import record_config
from rlhf.runtime.schedule import make_scheduler
from rlhf.runtime.seed import seed_everything
from rlhf.runtime.working_weights import WorkingWeights


@dataclass
class Stage:
    name: str
    cfg: object
    accelerator: object
    stage_dir: Path
    checkpoint: Path | None  # to resume from
    trainer_state: dict | None

    @property
    def main(self) -> bool:
        return self.accelerator.is_main_process

    def say(self, text: str) -> None:
        self.accelerator.print(f"{self.name}: {text}")

    def checkpoint_if_due(self, done: int, end: int, total_steps: int) -> None:
        """Every save_every steps, and when stopping early (stop_after_steps)."""
        if done % self.cfg.save_every == 0 or (done == end and end < total_steps):
            state = {
                "step": done,
                "total_steps": total_steps,
                "world_size": self.accelerator.num_processes,
                "fingerprint": self.cfg.fingerprint(),
            }
            save_checkpoint(self.accelerator, self.stage_dir, done, state, self.cfg.keep_checkpoints)


def begin(cfg, name: str) -> Stage | None:
    """Validate, make the accelerator, decide fresh start or resume (before expensive work), record the config.

    None when OUT/NAME/final is already complete."""
    cfg.validate()
    # `auto` is decided here, once, and written into cfg: the recorded config and the checkpoints' fingerprint say
    # what ran, and the stage reads the concrete value
    cfg.mixed_precision, precision_note = resolve_mixed_precision(cfg.mixed_precision)
    accelerator = make_accelerator(cfg.mixed_precision)
    native_gqa_attention(accelerator.device)
    if precision_note:
        accelerator.print(f"{name}: {precision_note}")
    stage_dir = Path(cfg.out) / name
    if is_complete(stage_dir):
        accelerator.print(f"{name}: {stage_dir / 'final'} is already complete; nothing to do")
        return None
    checkpoint, state = resume_point(stage_dir, cfg, accelerator)
    if accelerator.is_main_process:
        stage_dir.mkdir(parents=True, exist_ok=True)
        record_config(cfg.out, name, cfg)
    seed_everything(cfg.seed)
    return Stage(name, cfg, accelerator, stage_dir, checkpoint, state)


@dataclass
class Optimisation:
    model: torch.nn.Module  # prepared (DDP-wrapped when distributed)
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    params: list[torch.nn.Parameter]  # the trainable ones
    total_steps: int  # of the whole run: the schedule spans them
    start: int  # first step to run (after a resume)
    end: int  # last step this invocation runs (stop_after_steps)
    per_rank: int  # examples per step on each process
    accumulation: int  # micro-batches per step on each process
    working: WorkingWeights | None = None  # bf16 working copies of trained weights, stepped by a fused kernel


def optimise(st: Stage, model, n_train: int, updates_per_step: int = 1) -> Optimisation:
    """AdamW over the trainable parameters, warm-up + decay schedule, Accelerate prepare, and the resume.

    A step is ceil(epochs · n_train / batch_size) of the run; the schedule spans total_steps · updates_per_step
    optimiser updates (PPO makes several per step)."""
    cfg, accelerator = st.cfg, st.accelerator
    world = accelerator.num_processes
    if cfg.batch_size % (cfg.micro_batch_size * world):
        raise ValueError(
            f"batch_size ({cfg.batch_size}) must be a multiple of micro_batch_size ({cfg.micro_batch_size}) "
            f"× processes ({world})"
        )
    if getattr(model, "config", None) is not None:
        model.config.use_cache = False
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    # fused: one vectorised pass over each parameter instead of several (6× faster steps on a CPU, measured in
    # benchmarks/ppo_vs_trl.py); CPU and CUDA have it, other devices take the plain loop
    fused = all(p.device.type in ("cpu", "cuda") for p in params) or None
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, betas=cfg.adam_betas, weight_decay=cfg.weight_decay, fused=fused)
    total_steps = math.ceil(cfg.epochs * n_train / cfg.batch_size)
    updates = total_steps * updates_per_step
    scheduler = make_scheduler(optimizer, round(cfg.warmup_ratio * updates), updates, cfg.schedule)
    model, optimizer = accelerator.prepare(model, optimizer)
    accelerator.register_for_checkpointing(scheduler)  # not prepared: a prepared one steps once per process
    start = 0
    if st.checkpoint is not None:
        accelerator.load_state(str(st.checkpoint))
        start = st.trainer_state["step"]
        st.say(f"resumed from {st.checkpoint} at step {start} of {total_steps}")
    end = min(total_steps, cfg.stop_after_steps or total_steps)
    per_rank = cfg.batch_size // world
    return Optimisation(
        model, optimizer, scheduler, params, total_steps, start, end, per_rank, per_rank // cfg.micro_batch_size
    )


def step_optimizer(
    st: Stage, opt: Optimisation, skip_non_finite: bool = False, earlier: Sequence[float] = ()
) -> float:
    """Clip, step, schedule, zero; returns the gradient norm before clipping.

    With skip_non_finite, a non-finite gradient norm leaves the weights (and Adam's moments) untouched. `earlier`:
    the norms of parts of this update's gradient already stepped (unclipped: PPO's `step_part`); the norm returned
    is the whole gradient's, and a non-finite earlier part skips this step too."""
    max_norm = st.cfg.max_grad_norm if st.cfg.max_grad_norm > 0 else math.inf
    grad_norm = clip_and_step(st, opt, max_norm, skip_non_finite, earlier)
    opt.scheduler.step()
    return grad_norm


def clip_and_step(
    st: Stage, opt: Optimisation, max_norm: float, skip_non_finite: bool, earlier: Sequence[float] = ()
) -> float:
    """Clip the gradients that exist to `max_norm`, take the optimiser's step for their weights (unless
    skip_non_finite and the norm, with the `earlier` parts', is not finite), zero them; returns hypot(norm,
    *earlier). Weights with bf16 working copies (`opt.working`) are stepped by its fused kernel, clipped by the same
    factor as the rest: what clip_grad_norm_ and AdamW compute over all gradients at once."""
    pending = opt.working.pending() if opt.working is not None else []
    if not pending:
        norm = math.hypot(float(st.accelerator.clip_grad_norm_(opt.params, max_norm)), *earlier)
        if not (skip_non_finite and not math.isfinite(norm)):
            opt.optimizer.step()
    else:
        rest = [p for p in opt.params if p.grad is not None]  # norms, heads: float32 gradients
        rest_norm = float(torch.nn.utils.clip_grad_norm_(rest, math.inf)) if rest else 0.0
        total = math.sqrt(opt.working.square_sum(pending) + rest_norm**2)
        norm = math.hypot(total, *earlier)
        if not (skip_non_finite and not math.isfinite(norm)):
            scale = min(max_norm / (total + 1e-6), 1.0)  # clip_grad_norm_'s factor
            if scale < 1.0:
                for p in rest:
                    p.grad.mul_(scale)
            opt.optimizer.step()  # the rest: the masters of the working copies hold no gradient, so AdamW skips them
            opt.working.step(pending, scale)
        opt.working.zero_grad()
    opt.optimizer.zero_grad(set_to_none=True)
    return norm
