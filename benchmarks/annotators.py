"""How much more reliable is the consensus of more evaluators? Consensus accuracy against gold, and agreement.

    .venv/bin/python benchmarks/annotators.py [--seeds 5] [--library runs/NAME/library.db]

For 1, 3, 5 and 7 simulated evaluators per prompt, each prompt's rankings are aggregated into a Bradley–Terry
consensus (rlhf/algos/aggregate.py) and compared with the panel's gold preference (mean utility under the mean
weights, never seen by the evaluators' noisy choices):
- pair accuracy: share of response pairs that gold orders strictly where the consensus agrees (a consensus tie
  counts half);
- exact order: share of prompts whose consensus order equals gold's;
and the evaluators' own agreement: pairwise agreement %, Krippendorff's alpha, mean leave-one-out agreement.
Data: by default the synthetic set (K=4 responses per demonstration prompt, 3 draws: the demo and degraded
copies of it; rlhf/annotators/synthetic.py); with --library, the sampled responses in a response library.
"""

from __future__ import annotations

import argparse
import math
import statistics
from collections import defaultdict
from itertools import combinations

import numpy as np

from rlhf.algos.aggregate import agreement_report, consensus, rank_positions
from rlhf.annotators.simulated import PanelConfig, SimulatedPanel
from rlhf.annotators.synthetic import synthetic_set


def library_set(path: str) -> list[tuple[str, str, list[str], list[bool]]]:
    from rlhf.store.library import Library

    lib = Library(path)
    messages = lib.prompt_messages()
    groups = defaultdict(list)
    for s in lib.samples():
        if s.finish_reason != "imported":
            groups[(s.prompt_id, s.round)].append(s)
    return [
        (f"{pid}|r{r}", messages[pid][-1]["content"], [s.text for s in ss], [s.finish_reason == "eos" for s in ss])
        for (pid, r), ss in sorted(groups.items())
        if len(ss) >= 2
    ]


def evaluate(data, n: int, seed: int) -> dict:
    panel = SimulatedPanel(PanelConfig(n_evaluators=n, seed=seed))
    right = total = exact = 0.0
    labels = []
    for key, prompt, responses, finished in data:
        ranked = panel.rank(prompt, responses, finished, prompt_key=key)
        labels.append(dict(ranked))
        agg = consensus([tiers for _, tiers in ranked], len(responses))
        gold = panel.gold(prompt, responses, finished)
        pos = rank_positions(agg.tiers)
        strict = [(i, j) for i, j in combinations(range(len(responses)), 2) if gold[i] != gold[j]]
        for i, j in strict:
            total += 1
            right += 0.5 if pos[i] == pos[j] else float((pos[i] < pos[j]) == (gold[i] > gold[j]))
        exact += all((pos[i] < pos[j]) == (gold[i] > gold[j]) and pos[i] != pos[j] for i, j in strict)
    report = agreement_report(labels) if n > 1 else {}
    loo = [v["loo_agreement"] for v in report.get("per_evaluator", {}).values()]
    return {
        "pair_accuracy": right / total,
        "exact_order": exact / len(data),
        "pairwise_agreement": report.get("pairwise_agreement", math.nan),
        "krippendorff_alpha": report.get("krippendorff_alpha", math.nan),
        "loo_agreement": float(np.mean(loo)) if loo else math.nan,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=5, help="panels with different hidden weights and noise")
    parser.add_argument("--library", help="use the sampled responses of this response library")
    parser.add_argument("--evaluators", type=int, nargs="+", default=[1, 3, 5, 7])
    args = parser.parse_args()
    data = library_set(args.library) if args.library else synthetic_set()
    print(f"{len(data)} prompts × K={len(data[0][2])} responses; mean ± sd over {args.seeds} seeds\n")
    cols = ["pair_accuracy", "exact_order", "pairwise_agreement", "krippendorff_alpha", "loo_agreement"]
    print("| evaluators | " + " | ".join(c.replace("_", " ") for c in cols) + " |")
    print("|---:|" + "---:|" * len(cols))
    for n in args.evaluators:
        runs = [evaluate(data, n, seed) for seed in range(args.seeds)]
        cells = []
        for c in cols:
            values = [r[c] for r in runs]
            if any(math.isnan(v) for v in values):
                cells.append("–")
            else:
                sd = statistics.stdev(values) if len(values) > 1 else 0.0
                cells.append(f"{statistics.mean(values):.3f} ± {sd:.3f}")
        print(f"| {n} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
