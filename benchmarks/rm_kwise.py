"""K-wise reward-model training vs the same comparisons shuffled as independent pairs; and more evaluators.

    .venv/bin/python benchmarks/rm_kwise.py [--model tiny] [--epochs 4] [--out runs/bench-rm-kwise]

Data: K = 4 responses of known quality per prompt (rlhf/annotators/synthetic.py, 2 draws of the 100 example
demonstrations), ranked by the simulated panel, filtered by `rlhf filter`; 20% of the prompts are held out.
1. K-wise (one batch element per prompt, each response forwarded once) vs shuffled pairs (every consensus pair
   its own batch element, as InstructGPT warns against: each response then gets K−1 updates per epoch), trained on
   the same comparisons with the same number of pairs per step: held-out accuracy after each epoch.
2. K-wise with 1, 3 and 5 evaluators per prompt: held-out accuracy against the panel's gold.
Run it alone: the seconds column is wall time of the training steps.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
from pathlib import Path

import torch

from rlhf.annotators.synthetic import write_synthetic_library
from rlhf.config import AnnotateConfig, FilterConfig, RewardConfig
from rlhf.models.reward import load_reward_model
from rlhf.runtime.allocator import use_jemalloc
from rlhf.stages import annotate, reward
from rlhf.stages import filter as filter_stage
from rlhf.store.library import ComparisonRow, Library


def build_library(path: Path, evaluators: int) -> None:
    write_synthetic_library(path, draws=2, seed=0)
    annotate.run(AnnotateConfig(library=str(path), evaluators=evaluators, progress=False))
    filter_stage.run(
        FilterConfig(
            library=str(path), report=str(path.with_suffix(".filter.json")), require_eos=False, max_repetition=1.0
        )
    )


def add_pairs_selection(path: Path) -> None:
    """The same consensus pairs, each its own comparison (K = 2): the "shuffled pairs" dataset."""
    lib = Library(path)
    rows = lib.comparisons("default")
    with lib.write() as s:
        for r in rows:
            for b, w, strength in r.pairs:
                s.add(
                    ComparisonRow(
                        selection="pairs",
                        prompt_id=r.prompt_id,
                        task_key=r.task_key,
                        sample_ids=[r.sample_ids[b], r.sample_ids[w]],
                        pairs=[[0, 1, strength]],
                        n_evaluators=r.n_evaluators,
                    )
                )


def train(library: Path, selection: str, out: Path, args, batch_size: int) -> list[dict]:
    shutil.rmtree(out, ignore_errors=True)
    cfg = RewardConfig(
        model=args.model,
        library=str(library),
        selection=selection,
        out=str(out),
        epochs=args.epochs,
        lr=args.lr,
        batch_size=batch_size,
        micro_batch_size=batch_size // 2,
        eval_fraction=0.2,
        max_seq_len=args.max_seq_len,
        eval_every=10**6,
        save_every=10**6,
        progress=False,
    )
    reward.run(cfg)
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@torch.no_grad()
def gold_accuracy(model_dir: Path, library: Path, args) -> dict:
    """Held-out accuracy (consensus pairs) and gold accuracy (all pairs gold orders) on the K-wise held-out tasks."""
    model, tok = load_reward_model(str(model_dir))
    _, held = reward.split_by_prompt(reward.tasks_from_library(str(library), "default"), 0.2, 0)
    held = reward.tokenize_tasks(tok, held, args.max_seq_len, lambda *_: None)
    return reward.summarize(reward.evaluate(model, held, tok.pad_token_id, 8, torch.device("cpu")))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--max-seq-len", type=int, default=384)
    parser.add_argument("--out", default="runs/bench-rm-kwise")
    args = parser.parse_args()
    use_jemalloc()  # as the `rlhf` command does (rlhf/runtime/allocator.py)
    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    libraries = {}
    for n in (1, 3, 5):
        libraries[n] = out / f"library-{n}.db"
        build_library(libraries[n], n)
    add_pairs_selection(libraries[3])

    # 1. K-wise vs shuffled pairs, 3 evaluators, the same pairs per optimiser step (K = 4 gives ≤ 6 pairs a prompt)
    kwise = train(libraries[3], "default", out / "kwise-3", args, batch_size=4)
    pairs = train(libraries[3], "pairs", out / "pairs-3", args, batch_size=24)
    print("\n1. K-wise vs shuffled pairs (3 evaluators, held-out prompts)\n")
    print(
        "| training | steps/epoch | "
        + " | ".join(f"epoch {e} acc." for e in range(1, args.epochs + 1))
        + " | final gold acc. |"
    )
    print("|---|---:|" + "---:|" * (args.epochs + 1))
    for name, metrics, run in (
        ("K-wise (prompt = 1 element)", kwise, "kwise-3"),
        ("shuffled pairs (pair = 1 element)", pairs, "pairs-3"),
    ):
        steps = max(m["step"] for m in metrics)
        per_epoch = math.ceil(steps / args.epochs)
        train_acc = [m for m in metrics if "train_accuracy" in m]
        epoch_acc = [
            sum(m["train_accuracy"] for m in train_acc[e * per_epoch : (e + 1) * per_epoch])
            / len(train_acc[e * per_epoch : (e + 1) * per_epoch])
            for e in range(args.epochs)
        ]
        final = gold_accuracy(out / run / "rm" / "final", libraries[3], args)
        print(
            f"| {name} | {per_epoch} | "
            + " | ".join(f"train {a:.3f}" for a in epoch_acc)
            + f" | held-out {final['heldout_accuracy']:.3f}, gold {final['gold_accuracy']:.3f} |"
        )

    # 2. more evaluators per prompt
    print("\n2. Evaluators per prompt (K-wise)\n")
    print("| evaluators | kept pairs | held-out acc. (consensus) | held-out acc. (gold) |\n|---:|---:|---:|---:|")
    for n in (1, 3, 5):
        run = out / f"kwise-{n}"
        if n != 3:
            train(libraries[n], "default", run, args, batch_size=4)
        result = gold_accuracy(run / "rm" / "final", libraries[n], args)
        kept = json.loads(libraries[n].with_suffix(".filter.json").read_text())["kept"]["pairs"]
        print(f"| {n} | {kept} | {result['heldout_accuracy']:.3f} | {result['gold_accuracy']:.3f} |")


if __name__ == "__main__":
    main()
