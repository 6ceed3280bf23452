"""The run folder: `runs/NAME/` with config.yaml (resolved config of every stage run there), metrics, outputs."""

from __future__ import annotations

import dataclasses
import subprocess
from pathlib import Path

import yaml

import rlhf
from rlhf.runtime.files import atomic_write_text


def git_sha() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=Path(rlhf.__file__).parent, capture_output=True, text=True, timeout=5
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def record_config(run_dir: str | Path, stage: str, cfg) -> None:
    """Save `cfg` under `stage:` in run_dir/config.yaml, keeping the other stages' sections."""
    path = Path(run_dir) / "config.yaml"
    doc = yaml.safe_load(path.read_text()) if path.exists() else {}
    doc = doc or {}
    doc["rlhf_version"] = rlhf.__version__
    doc["git_sha"] = git_sha()
    doc[stage] = dataclasses.asdict(cfg)
    atomic_write_text(path, yaml.safe_dump(doc, sort_keys=False))
