"""SFT throughput of the embedded model on this machine: tokens/s and seconds per step, float32 vs bf16 autocast.

    .venv/bin/python benchmarks/sft_throughput.py [--steps 5] [--data examples/demos.jsonl]

Runs the real stage for a few optimiser steps per setting (the first step is a warm-up and is not counted) and
prints a table. Numbers depend on the machine: run it where you will train.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

from rlhf.config import SFTConfig
from rlhf.runtime.allocator import use_jemalloc
from rlhf.stages import sft


def measure(precision: str, steps: int, data: str, lora: bool) -> dict:
    with tempfile.TemporaryDirectory() as out:
        cfg = SFTConfig(
            data=data,
            out=out,
            mixed_precision=precision,
            lora=lora,
            stop_after_steps=steps,
            eval_fraction=0.0,
            save_every=10_000,
            keep_checkpoints=1,
            progress=False,
        )
        sft.run(cfg)
        rows = [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "loss" in r][1:]  # drop the warm-up step
    tok_s = [r["tokens_per_s"] for r in rows]
    return {
        "precision": precision,
        "lora": lora,
        "tokens/s (median)": statistics.median(tok_s),
        "tokens/s (min)": min(tok_s),
        "tokens/s (max)": max(tok_s),
        "steps": len(rows),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--data", default="examples/demos.jsonl")
    args = parser.parse_args()
    use_jemalloc()  # as the `rlhf` command does (rlhf/runtime/allocator.py)
    results = [measure(p, args.steps, args.data, lora) for p, lora in (("no", False), ("bf16", False), ("no", True))]
    header = list(results[0])
    print("\n| " + " | ".join(header) + " |\n|" + "---|" * len(header))
    for r in results:
        print("| " + " | ".join(f"{v:.0f}" if isinstance(v, float) else str(v) for v in r.values()) + " |")


if __name__ == "__main__":
    main()
