"""Metrics to run_dir/metrics.jsonl (one JSON object per logged step, every stage) and to TensorBoard."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path


class MetricsLogger:
    """Append-only: a run resumed from a checkpoint older than its last logged step logs those steps again;
    readers keep the last line for a (stage, step)."""

    def __init__(self, run_dir: str | Path, stage: str, enabled: bool = True):
        self.stage = stage
        self.enabled = enabled
        self._file = None
        self._tb = None
        if not enabled:
            return
        run_dir = Path(run_dir)
        self._file = open(run_dir / "metrics.jsonl", "a", encoding="utf-8")
        try:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(log_dir=str(run_dir / "tb" / stage))
        except ImportError:  # tensorboard is a dependency, but a broken install should not stop training
            self._tb = None

    def log(self, step: int, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        row = {"stage": self.stage, "step": step, "time": round(time.time(), 3)}
        row.update({k: (float(v) if math.isfinite(float(v)) else None) for k, v in metrics.items()})
        self._file.write(json.dumps(row) + "\n")
        self._file.flush()
        if self._tb is not None:
            for k, v in metrics.items():
                self._tb.add_scalar(f"{self.stage}/{k}", float(v), step)

    def close(self) -> None:
        if self._file:
            self._file.close()
        if self._tb:
            self._tb.close()
