"""What every annotator returns: a ranking of a prompt's K responses, with ties, an "all bad" flag and a reason.

A ranking is a list of tiers, best first, each a sorted list of response indices 0..K-1; tied responses share a
tier: `[[2], [0, 3], [1]]`.
"""

from __future__ import annotations

from dataclasses import dataclass

from rlhf.algos.aggregate import rank_positions


class RankingError(ValueError):
    """An annotator's answer is not a ranking of exactly the task's responses."""


@dataclass(frozen=True)
class RankResult:
    tiers: list[list[int]]  # best first; every index 0..K-1 exactly once
    all_bad: bool = False  # the evaluator finds every response unacceptable (the order still says which is least bad)
    rationale: str | None = None  # optional free text: why


def check_tiers(tiers: object, k: int) -> list[list[int]]:
    """`tiers` as a canonical ranking of exactly responses 0..k-1 (tiers sorted inside), or RankingError."""
    if not isinstance(tiers, (list, tuple)) or not all(isinstance(t, (list, tuple)) for t in tiers):
        raise RankingError(f"a ranking must be a list of tiers (lists of response indices), got {tiers!r}")
    if not all(isinstance(i, int) and not isinstance(i, bool) for t in tiers for i in t):
        raise RankingError(f"response indices must be integers, got {tiers!r}")
    try:
        positions = rank_positions([list(t) for t in tiers], k)
    except ValueError as e:
        raise RankingError(str(e)) from None
    if sorted(positions) != list(range(k)):
        missing = sorted(set(range(k)) - set(positions))
        raise RankingError(f"ranking {tiers!r} leaves out response(s) {missing} of 0..{k - 1}")
    return [sorted(t) for t in tiers]


def from_user_value(value: object, k: int) -> RankResult:
    """Accept what a user function may return: tiers, a flat best-first list of indices, or a RankResult/dict."""
    if isinstance(value, RankResult):
        return RankResult(check_tiers(value.tiers, k), value.all_bad, value.rationale)
    if isinstance(value, dict):
        if "tiers" not in value and "ranking" not in value:
            raise RankingError('a ranking dict needs "tiers" (or "ranking")')
        inner = from_user_value(value.get("tiers", value.get("ranking")), k)
        return RankResult(inner.tiers, bool(value.get("all_bad", False)), value.get("rationale"))
    if isinstance(value, (list, tuple)) and all(isinstance(i, int) and not isinstance(i, bool) for i in value):
        return RankResult(check_tiers([[i] for i in value], k))
    return RankResult(check_tiers(value, k))
