"""Atomic checkpoints under STAGE_DIR/checkpoints/step-N/, with a `latest` pointer written last.

Saving: every process writes into `.tmp-step-N/` (Accelerate's save_state: model, optimiser, registered
scheduler, each process's RNG states), the main process adds trainer_state.json, fsyncs the folder and renames
it to `step-N`, then replaces `latest`, and only then deletes older checkpoints. A kill at any moment leaves the
previous checkpoint and pointer intact.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path

from rlhf.runtime.files import atomic_write_text, fsync_dir, fsync_tree

LATEST = "latest"
STATE_FILE = "trainer_state.json"
DONE_FILE = "rlhf_stage.json"  # written into final/ last: its presence means the stage is complete
_STEP_DIR = re.compile(r"^step-(\d+)$")


class ResumeError(RuntimeError):
    """The checkpoint cannot continue this run (missing, or written with a different config)."""


def checkpoint_root(stage_dir: str | Path) -> Path:
    return Path(stage_dir) / "checkpoints"


def save_checkpoint(accelerator, stage_dir: str | Path, step: int, trainer_state: dict, keep: int) -> Path:
    root = checkpoint_root(stage_dir)
    final = root / f"step-{step}"
    tmp = root / f".tmp-step-{step}"
    if accelerator.is_main_process:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)  # debris of a save that was killed
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp), safe_serialization=True)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (tmp / STATE_FILE).write_text(json.dumps(trainer_state, indent=1))
        fsync_tree(tmp)
        if final.exists():  # the same step saved again after a resume
            shutil.rmtree(final)
        os.rename(tmp, final)
        fsync_dir(root)
        atomic_write_text(root / LATEST, final.name + "\n")
        _prune(root, keep)
    accelerator.wait_for_everyone()
    return final


def _steps(root: Path) -> list[tuple[int, Path]]:
    found = []
    for p in root.iterdir() if root.is_dir() else []:
        m = _STEP_DIR.match(p.name)
        if m and (p / STATE_FILE).is_file():
            found.append((int(m.group(1)), p))
    return sorted(found)


def _prune(root: Path, keep: int) -> None:
    for _, path in _steps(root)[: -max(keep, 1)]:
        shutil.rmtree(path)


def latest_checkpoint(stage_dir: str | Path) -> Path | None:
    """The checkpoint `latest` names; if the pointer is missing or stale, the newest complete step folder."""
    root = checkpoint_root(stage_dir)
    pointer = root / LATEST
    if pointer.is_file():
        candidate = root / pointer.read_text().strip()
        if (candidate / STATE_FILE).is_file():
            return candidate
    steps = _steps(root)
    return steps[-1][1] if steps else None


def read_trainer_state(checkpoint: Path) -> dict:
    return json.loads((checkpoint / STATE_FILE).read_text())


def check_same_config(saved: dict, current: dict, checkpoint: Path) -> None:
    """Refuse to resume when a field that shapes the training trajectory changed since the checkpoint."""
    changed = [k for k in sorted(set(saved) | set(current)) if saved.get(k) != current.get(k)]
    if changed:
        lines = [f"  {k}: checkpoint has {saved.get(k)!r}, this run has {current.get(k)!r}" for k in changed]
        raise ResumeError(
            f"cannot resume from {checkpoint}: it was written with a different config:\n"
            + "\n".join(lines)
            + "\nRun again with the checkpoint's settings, or write to a new --out folder."
        )


def resume_point(stage_dir: Path, cfg, accelerator) -> tuple[Path | None, dict | None]:
    """(checkpoint, its trainer state) to continue from, or (None, None) for a fresh start.

    Refuses existing checkpoints without `resume`, a checkpoint written with a different config, or by a
    different number of processes; all before any expensive work.
    """
    checkpoint = latest_checkpoint(stage_dir)
    if checkpoint is not None and not cfg.resume:
        raise ResumeError(
            f"{stage_dir} already holds checkpoints (latest: {checkpoint.name}); "
            "pass --resume to continue that run, or choose another --out"
        )
    if checkpoint is None:
        return None, None
    state = read_trainer_state(checkpoint)
    check_same_config(state["fingerprint"], cfg.fingerprint(), checkpoint)
    if state["world_size"] != accelerator.num_processes:
        raise ResumeError(
            f"cannot resume from {checkpoint}: it was written by {state['world_size']} processes, "
            f"this run has {accelerator.num_processes}; launch with the same number"
        )
    return checkpoint, state


def is_complete(stage_dir: Path) -> bool:
    return (Path(stage_dir) / "final" / DONE_FILE).exists()


def save_final(accelerator, model, tokenizer, stage_dir: Path, summary: dict) -> Path:
    """Write stage_dir/final/ as a plain save_pretrained folder, atomically; DONE_FILE (the summary) marks it done.

    `model` must already be a plain transformers model (LoRA merged)."""
    final = Path(stage_dir) / "final"
    if accelerator.is_main_process:
        tmp = Path(tempfile.mkdtemp(prefix=".final-", dir=stage_dir))
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / DONE_FILE).write_text(json.dumps(summary, indent=1))
        fsync_tree(tmp)
        shutil.rmtree(final, ignore_errors=True)
        os.rename(tmp, final)
    accelerator.wait_for_everyone()
    return final
