"""Reward model on real human preferences: Anthropic HH-RLHF harmless-base (test split, 2312 pairs).

    .venv/bin/python benchmarks/rm_hh.py [--heldout 500] [--epochs 1] [--lr 2e-5] [--out runs/bench-rm-hh]

The last `--heldout` pairs of the file are held out: never trained on, never used to choose settings. The rest
trains a reward model on the embedded SmolLM2-135M-Instruct through the product's own `rm` stage (pairwise data
is the K = 2 case of the K-wise loss). Prints held-out accuracy with a 95% Wilson interval, before and after
training. Published reference: reward models of about 435M parameters reach roughly 0.56–0.59 on this split.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

from rlhf.config import RewardConfig
from rlhf.data.preferences import read_preferences
from rlhf.runtime.allocator import use_jemalloc
from rlhf.runtime.checkpoint import DONE_FILE
from rlhf.stages import reward

HH = Path(__file__).resolve().parents[2] / "shared" / "data" / "hh-rlhf-harmless-base-test.jsonl.gz"


def wilson(p: float, n: int, z: float = 1.96) -> tuple[float, float]:
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return centre - half, centre + half


def write_pairs(records, path: Path) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            b, w = r.tiers[0][0], r.tiers[1][0]
            row = {"id": r.source, "messages": list(r.messages), "chosen": r.responses[b], "rejected": r.responses[w]}
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--heldout", type=int, default=500)
    parser.add_argument("--epochs", type=float, default=1.0)
    parser.add_argument("--lr", type=float, default=2e-5)
    parser.add_argument("--max-seq-len", type=int, default=320)
    parser.add_argument("--mixed-precision", default="auto", choices=["no", "bf16", "auto"])
    parser.add_argument("--out", default="runs/bench-rm-hh")
    parser.add_argument("--model", default="embedded")
    args = parser.parse_args()
    use_jemalloc()  # as the `rlhf` command does (rlhf/runtime/allocator.py)

    result = read_preferences(HH)
    first_heldout_line = result.rows - args.heldout + 1  # non-blank rows are numbered 1..rows in this file

    def line(r) -> int:
        return int(r.source.rsplit(":", 1)[1])

    train = [r for r in result.records if line(r) < first_heldout_line]
    held = [r for r in result.records if line(r) >= first_heldout_line]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_pairs(train, out / "train.jsonl")
    write_pairs(held, out / "heldout.jsonl")
    print(
        f"HH harmless-base test: {result.rows} rows, {len(result.errors)} unreadable; training on {len(train)} pairs, "
        f"holding out the last {args.heldout} rows ({len(held)} readable pairs)"
    )
    cfg = RewardConfig(
        model=args.model,
        data=str(out / "train.jsonl"),
        eval_data=str(out / "heldout.jsonl"),
        out=str(out),
        epochs=args.epochs,
        lr=args.lr,
        batch_size=16,
        micro_batch_size=8,
        max_seq_len=args.max_seq_len,
        mixed_precision=args.mixed_precision,
        eval_every=10**6,
        save_every=25,  # a killed run resumes (resume=True) instead of starting an hour over
        resume=True,
    )
    t0 = time.time()
    final = reward.run(cfg)
    summary = json.loads((Path(final) / DONE_FILE).read_text())
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    before = next(m for m in metrics if m.get("step") == 0 and "heldout_accuracy" in m)
    after = summary["heldout"]
    n = int(after["heldout_pairs"])
    print("\n| reward model | train pairs | held-out pairs | accuracy | 95% interval |\n|---|---:|---:|---:|---|")
    for name, m in (("untrained head (before)", before), ("trained, 1 run", after)):
        lo, hi = wilson(m["heldout_accuracy"], n)
        print(f"| {name} | {len(train)} | {n} | {m['heldout_accuracy']:.3f} | [{lo:.3f}, {hi:.3f}] |")
    print(
        f"\nwall time {time.time() - t0:.0f} s (mixed precision {cfg.mixed_precision}, max_seq_len {args.max_seq_len})"
    )


if __name__ == "__main__":
    main()
