"""Stage 2c: aggregate each task's evaluators into consensus comparisons and select what the reward model learns.

Nothing is deleted from the library: the kept comparisons are written as a named selection (table
`comparisons`), and `filter_report.json` says what was dropped and why. The unit of account is the response
pair: a task with K responses offers C(K, 2) candidate pairs, and each pair is kept or dropped by the FIRST rule
that applies, so `kept + Σ dropped == candidates`:

1. `low_quality_evaluator`: evaluators whose agreement with the leave-one-out consensus of the others is below
   `min_evaluator_agreement` lose all their labels; a task left with no labels drops all its pairs.
2. `all_bad`: a task most of whose evaluators flagged every response as bad.
3. `degenerate_response`: pairs with an empty response, one whose share of repeated word 3-grams exceeds
   `max_repetition`, or (with `require_eos`) one cut at max_new_tokens.
4. `tie`: the consensus (Bradley–Terry over the remaining evaluators, rlhf/algos/aggregate.py) ties the pair.
5. `near_identical`: the two responses are identical or nearly so (difflib ratio ≥ `near_duplicate`).
6. `low_agreement`: fewer than `min_pair_agreement` of the evaluators (ties half) agree with the consensus order.
"""

from __future__ import annotations

import difflib
import json
import math
import re
from collections import Counter, defaultdict
from itertools import combinations
from pathlib import Path

from sqlalchemy import delete

from rlhf.algos.aggregate import agreement_report, consensus, leave_one_out_agreement
from rlhf.annotators.criteria import no_repetition
from rlhf.config import FilterConfig
from rlhf.store.library import ComparisonRow, Library, RankingRow, SampleRow

RULES = ("low_quality_evaluator", "all_bad", "degenerate_response", "tie", "near_identical", "low_agreement")


def degenerate_reason(sample: SampleRow, cfg: FilterConfig) -> str | None:
    if not sample.text.strip():
        return "empty"
    if 1.0 - no_repetition(sample.text) > cfg.max_repetition:
        return "repetition"
    if cfg.require_eos and sample.finish_reason == "length":
        return "no_eos"
    return None


def similarity(a: str, b: str) -> float:
    """difflib ratio of lower-cased, whitespace-collapsed texts: 1.0 for identical."""
    a, b = (" ".join(re.findall(r"\S+", x.lower())) for x in (a, b))
    return 1.0 if a == b else difflib.SequenceMatcher(None, a, b, autojunk=False).ratio()


def task_labels(rankings: list[RankingRow]) -> tuple[list[int], dict[str, list[list[int]]], dict[str, bool]]:
    """(sample ids of the task, {annotator: tiers over indices into them}, {annotator: all_bad})."""
    ids = sorted({sid for r in rankings for sid in r.sample_ids})
    index = {sid: i for i, sid in enumerate(ids)}
    labels = {r.annotator: [sorted(index[r.sample_ids[i]] for i in tier) for tier in r.tiers] for r in rankings}
    return ids, labels, {r.annotator: r.all_bad for r in rankings}


def nan_to_none(obj):
    """JSON has no NaN: undefined statistics (agreement with a single evaluator) are written as null."""
    if isinstance(obj, float) and math.isnan(obj):
        return None
    if isinstance(obj, dict):
        return {k: nan_to_none(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [nan_to_none(v) for v in obj]
    return obj


def run(cfg: FilterConfig) -> dict:
    cfg.validate()
    library = Library(cfg.library)
    samples = {s.id: s for s in library.samples()}
    by_task: dict[tuple[str, str], list[RankingRow]] = defaultdict(list)
    for r in library.rankings():
        by_task[(r.prompt_id, r.task_key)].append(r)
    tasks = {key: task_labels(rs) for key, rs in sorted(by_task.items())}

    # 1. evaluator quality, from every task with at least two evaluators
    agreement = agreement_report([labels for _, labels, _ in tasks.values() if len(labels) >= 2])
    loo = leave_one_out_agreement([labels for _, labels, _ in tasks.values() if len(labels) >= 2])
    low_quality = sorted(n for n, a in loo.items() if not math.isnan(a) and a < cfg.min_evaluator_agreement)

    dropped: Counter[str] = Counter()
    degenerate: dict[int, str] = {}
    kept_rows: list[ComparisonRow] = []
    candidates = 0
    for (prompt_id, task_key), (ids, labels, all_bad) in tasks.items():
        k = len(ids)
        candidates += k * (k - 1) // 2
        labels = {n: t for n, t in labels.items() if n not in low_quality}
        if not labels:
            dropped["low_quality_evaluator"] += k * (k - 1) // 2
            continue
        # 2. all bad
        if cfg.drop_all_bad and sum(all_bad[n] for n in labels) * 2 > len(labels):
            dropped["all_bad"] += k * (k - 1) // 2
            continue
        # 3. degenerate responses leave the task with their pairs
        bad = set()
        for i, sid in enumerate(ids):
            reason = degenerate_reason(samples[sid], cfg)
            if reason:
                degenerate[sid] = reason
                bad.add(i)
        # 4.-6. the consensus of the remaining evaluators, pair by pair
        agg = consensus(list(labels.values()), k)
        pairs = []
        for i, j in combinations(range(k), 2):
            if i in bad or j in bad:
                dropped["degenerate_response"] += 1
                continue
            if _tied(agg.tiers, i, j):
                dropped["tie"] += 1
                continue
            key = (i, j) if (i, j) in agg.pair_strength else (j, i)  # (better, worse)
            strength = agg.pair_strength[key]
            if similarity(samples[ids[i]].text, samples[ids[j]].text) >= cfg.near_duplicate:
                dropped["near_identical"] += 1
            elif strength < cfg.min_pair_agreement:
                dropped["low_agreement"] += 1
            else:
                pairs.append([key[0], key[1], round(strength, 6)])
        if pairs:
            kept_rows.append(
                ComparisonRow(
                    selection=cfg.selection,
                    prompt_id=prompt_id,
                    task_key=task_key,
                    sample_ids=ids,
                    pairs=pairs,
                    n_evaluators=len(labels),
                )
            )

    # 7. write the selection (replacing an earlier one of the same name) and the report
    with library.write() as s:
        s.execute(delete(ComparisonRow).where(ComparisonRow.selection == cfg.selection))
        s.add_all(kept_rows)
    kept = sum(len(r.pairs) for r in kept_rows)
    assert kept + sum(dropped.values()) == candidates, "every candidate pair is kept or dropped by one rule"
    report = {
        "library": str(cfg.library),
        "selection": cfg.selection,
        "config": vars(cfg),
        "input": {
            "tasks": len(tasks),
            "rankings": sum(len(t[1]) for t in tasks.values()),
            "evaluators": len({n for t in tasks.values() for n in t[1]}),
            "candidate_pairs": candidates,
        },
        "dropped_pairs": {rule: dropped[rule] for rule in RULES},
        "kept": {"tasks": len(kept_rows), "pairs": kept},
        "low_quality_evaluators": low_quality,
        "degenerate_responses": dict(Counter(degenerate.values())),
        "agreement": nan_to_none(agreement),
    }
    path = Path(cfg.report) if cfg.report else _beside(cfg.library)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=1, allow_nan=False))
    print_report(report, path)
    return report


def _tied(tiers: list[list[int]], i: int, j: int) -> bool:
    return any(i in tier and j in tier for tier in tiers)


def _beside(library: str) -> Path:
    return (Path(library).parent if "://" not in library else Path(".")) / "filter_report.json"


def print_report(report: dict, path: Path) -> None:
    inp = report["input"]
    print(
        f"filter: {inp['tasks']} tasks, {inp['rankings']} rankings by {inp['evaluators']} evaluators, "
        f"{inp['candidate_pairs']} candidate pairs"
    )
    print(f"{'rule':<24}{'pairs dropped':>14}")
    for rule, n in report["dropped_pairs"].items():
        print(f"{rule:<24}{n:>14}")
    print(f"{'kept':<24}{report['kept']['pairs']:>14}   in {report['kept']['tasks']} tasks")
    agreement = report["agreement"]
    if agreement.get("pairwise_agreement") is not None:
        alpha = agreement.get("krippendorff_alpha")
        print(
            f"agreement: {agreement['pairwise_agreement']:.1%} of pairs between evaluators; Krippendorff's alpha "
            f"{alpha if alpha is None else round(alpha, 3)}"
        )
    if report["low_quality_evaluators"]:
        print(f"evaluators below the quality threshold: {', '.join(report['low_quality_evaluators'])}")
    if report["degenerate_responses"]:
        print(f"degenerate responses: {report['degenerate_responses']}")
    print(f"filter: report written to {path}")
