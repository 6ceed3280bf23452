"""Several evaluators' rankings of one prompt's K responses → one consensus ranking, and how far they agree.

A ranking is a list of tiers, best first, each tier a sorted list of response indices 0..K-1; tied responses
share a tier: `[[2], [0, 3], [1]]` puts 2 first, 0 and 3 level, 1 last. A prompt's labels are one such ranking
per evaluator (a list, or a dict keyed by evaluator name where the name matters).

Stdlib + numpy only, so the filter stage, the web app's agreement dashboard and their tests import it without
torch; `krippendorff` is imported inside the one function that needs it.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass
from itertools import combinations

import numpy as np

Tiers = list[list[int]]

TIE_TOL = 1e-9
"""Log-strengths this close count as equal: the consensus puts those responses in one tier."""


def rank_positions(tiers: Tiers, k: int | None = None) -> dict[int, int]:
    """{response: tier index} for one ranking, checking that it is a ranking of distinct responses (< k)."""
    positions: dict[int, int] = {}
    for t, tier in enumerate(tiers):
        if not tier:
            raise ValueError(f"ranking {tiers}: tier {t} is empty (drop it; tier indices are rank positions)")
        for r in tier:
            if r in positions:
                raise ValueError(f"ranking {tiers}: response {r} appears more than once")
            if r < 0 or (k is not None and r >= k):
                raise ValueError(f"ranking {tiers}: response {r} is outside 0..{'K-1' if k is None else k - 1}")
            positions[r] = t
    return positions


def pairs_from_ranking(tiers: Tiers) -> list[tuple[int, int]]:
    """All (better, worse) pairs one ranking implies, tier by tier; responses in one tier give no pair.

    With K responses and no ties that is C(K, 2) pairs: the comparisons InstructGPT's K-wise reward loss
    trains on (Ouyang et al. 2022, eq. 1).
    """
    rank_positions(tiers)  # validate
    return [(b, w) for t, tier in enumerate(tiers) for worse in tiers[t + 1 :] for b in tier for w in worse]


@dataclass
class Consensus:
    """One prompt's aggregated ranking and the evidence behind each of its pairs."""

    tiers: Tiers
    """Consensus ranking, best first; responses with equal Bradley–Terry strength share a tier."""
    pair_strength: dict[tuple[int, int], float]
    """(better, worse) → share of votes (ties half) agreeing with the consensus, < 0.5 only where BT overrules
    that pair's majority; (min, max) → 0.5 for a pair the consensus ties."""
    pair_votes: dict[tuple[int, int], tuple[int, int, int]]
    """(i, j) with i < j → (evaluators putting i above j, j above i, tying them)."""


def bradley_terry(wins: np.ndarray, max_iters: int = 100) -> np.ndarray:
    """Maximum-likelihood Bradley–Terry log-strengths θ (mean 0) from a (K, K) matrix of (fractional) wins.

    wins[i, j] = how often i beat j. Model: P(i beats j) = σ(θ_i − θ_j) (Bradley & Terry 1952), the same
    model the reward model's pairwise loss −log σ(r_w − r_l) assumes. The log-likelihood
    Σ_{i≠j} wins[i, j]·log σ(θ_i − θ_j) is concave, so Newton's method with step halving reaches its maximum
    in a handful of steps, to machine precision (which the 1e-9 tie test needs; the MM/Zermelo iteration of
    Hunter 2004 gets there too, but only linearly). The MLE exists when every response has both a win and a
    loss against a connected comparison graph; callers guarantee that with a symmetric prior.
    """
    k = wins.shape[0]
    if k < 2:
        return np.zeros(k)
    wins = wins * (1 - np.eye(k))
    n = wins + wins.T  # (K, K) comparisons per pair

    def log_likelihood(theta: np.ndarray) -> float:
        diff = theta[:, None] - theta[None, :]  # (K, K): θ_i − θ_j
        return float(-(wins * np.logaddexp(0.0, -diff)).sum())  # log σ(x) = −log(1 + e^{−x})

    theta = np.zeros(k)
    for _ in range(max_iters):
        p = 1.0 / (1.0 + np.exp(-(theta[:, None] - theta[None, :])))  # (K, K): P(i beats j)
        # grad_i = Σ_j (wins[i, j] − n[i, j]·p[i, j]);  −Hessian = weighted graph Laplacian L
        grad = (wins - n * p).sum(axis=1)
        c = n * p * (1 - p)
        laplacian = np.diag(c.sum(axis=1)) - c
        # L is singular along 1 (only differences of θ matter) and grad ⟂ 1: adding 11ᵀ pins the mean.
        step = np.linalg.solve(laplacian + np.ones((k, k)), grad)
        t, ll = 1.0, log_likelihood(theta)
        while log_likelihood(theta + t * step) < ll - 1e-12 and t > 1e-8:
            t /= 2
        theta = theta + t * step
        theta -= theta.mean()
        if np.abs(t * step).max() < 1e-13:
            break
    return theta


def tiers_from_scores(scores, tol: float = TIE_TOL) -> Tiers:
    """Sort responses by score, best first; a response within tol of its tier's first (highest) score joins it."""
    order = sorted(range(len(scores)), key=lambda i: (-scores[i], i))
    tiers: Tiers = []
    for i in order:
        if tiers and scores[tiers[-1][0]] - scores[i] <= tol:
            tiers[-1].append(i)
        else:
            tiers.append([i])
    return [sorted(tier) for tier in tiers]


def consensus(rankings: list[Tiers], k: int, prior: float = 0.5) -> Consensus:
    """Aggregate several evaluators' rankings of K responses into one ranking by Bradley–Terry maximum likelihood.

    Method: for every pair i < j count the evaluators that put i above j, j above i, or tie them (an evaluator
    who did not rank both says nothing about the pair). Each tie counts as half a win each way, as a draw does
    in Elo ratings; `prior` pseudo-wins in each direction of every pair keep the MLE finite when votes are
    unanimous and shrink pairs with few votes towards a tie. Fit the log-strengths with `bradley_terry`; responses whose strengths are equal within 1e-9
    share a tier (indices sorted inside it). Every step is deterministic: same votes, same consensus.

    Why Bradley–Terry rather than per-pair majority: majorities can cycle (A>B, B>C, C>A across evaluators,
    Condorcet) and ignore margins, whereas the BT fit weighs every pairwise vote by its strength and always
    yields one transitive order; and it is the model the reward model is trained under (its loss is the BT
    negative log-likelihood), so the consensus is the order a reward model would fit to exactly these votes.
    With complete rankings every pair has the same number of votes, and then the BT order is the order of
    total wins, i.e. the Borda count (the likelihood equations read W_i = Σ_j n·σ(θ_i − θ_j), increasing in
    θ_i), so a narrow majority on one pair can be overruled by the rest of the votes (always so in a Condorcet
    cycle). pair_strength is in [0.5, 1] except on such a pair, where it drops below 0.5 and flags it as
    contested; the filter stage can drop or down-weight those pairs.
    """
    votes = np.zeros((k, k))  # (K, K): votes[i, j] = evaluators putting i strictly above j
    ties = np.zeros((k, k))  # (K, K), symmetric: evaluators tying i and j
    for tiers in rankings:
        pos = rank_positions(tiers, k)
        for i, j in combinations(sorted(pos), 2):
            if pos[i] < pos[j]:
                votes[i, j] += 1
            elif pos[i] > pos[j]:
                votes[j, i] += 1
            else:
                ties[i, j] += 1
                ties[j, i] += 1
    theta = bradley_terry(votes + 0.5 * ties + prior)
    tiers = tiers_from_scores(theta)
    pos = rank_positions(tiers, k)

    pair_strength: dict[tuple[int, int], float] = {}
    pair_votes: dict[tuple[int, int], tuple[int, int, int]] = {}
    for i, j in combinations(range(k), 2):
        above, below, tied = int(votes[i, j]), int(votes[j, i]), int(ties[i, j])
        pair_votes[(i, j)] = (above, below, tied)
        n = above + below + tied
        share_i = (above + 0.5 * tied) / n if n else 0.5  # share of votes for "i above j"
        if pos[i] < pos[j]:
            pair_strength[(i, j)] = share_i
        elif pos[i] > pos[j]:
            pair_strength[(j, i)] = 1.0 - share_i
        else:
            pair_strength[(i, j)] = 0.5
    return Consensus(tiers=tiers, pair_strength=pair_strength, pair_votes=pair_votes)


def _num_responses(rankings: list[Tiers]) -> int:
    """K for a prompt, as 1 + the highest response index any evaluator ranked."""
    return 1 + max((r for tiers in rankings for tier in tiers for r in tier), default=-1)


def _sign(x: int) -> int:
    return (x > 0) - (x < 0)


def pairwise_agreement(labels_by_prompt: list[list[Tiers]]) -> float:
    """Fraction of comparisons on which two evaluators agree, pooled over prompts, evaluator pairs, response pairs.

    A comparison is one prompt, one pair of its evaluators and one pair of responses that both evaluators order
    strictly (a tie on either side is skipped: it neither agrees nor disagrees). nan when nothing is comparable.
    This is the "inter-annotator agreement" of InstructGPT (Ouyang et al. 2022, §3.4: 72.6 ± 1.5% among
    labelers), unlike Krippendorff's alpha not corrected for chance (which is 50% here).
    """
    agree = total = 0
    for rankings in labels_by_prompt:
        positions = [rank_positions(tiers) for tiers in rankings]
        for pa, pb in combinations(positions, 2):
            for i, j in combinations(sorted(pa.keys() & pb.keys()), 2):
                da, db = _sign(pa[i] - pa[j]), _sign(pb[i] - pb[j])
                if da and db:
                    total += 1
                    agree += da == db
    return agree / total if total else math.nan


def krippendorff_alpha(labels_by_prompt: list[dict[str, Tiers]]) -> float:
    """Ordinal Krippendorff's alpha of the evaluators' rank positions, via the `krippendorff` package.

    Reliability data: one row per evaluator, one column (unit) per (prompt, response) that anyone ranked; the
    value is the tier index the evaluator gave that response, np.nan where they did not rank the prompt. Why
    this coding: alpha needs every unit to be one thing each coder assigns a value to, and a response's rank
    position is exactly that; the level is ordinal because positions are ordered but their gaps mean nothing
    (1st→2nd need not be as large a step as 2nd→3rd). Alpha corrects for chance (0 = agreement at chance,
    1 = perfect, < 0 = systematic disagreement) and tolerates missing labels (Krippendorff 2011, "Computing
    Krippendorff's alpha-reliability"). Positions pool across prompts, which is sound for a fixed K. nan when
    alpha is undefined: fewer than two distinct values, or no unit ranked by two evaluators.
    """
    try:
        import krippendorff  # lazy: only the agreement report needs it
    except ImportError as e:
        raise ImportError("krippendorff_alpha needs the `krippendorff` package: pip install krippendorff") from e

    names = sorted({name for labels in labels_by_prompt for name in labels})
    units: list[list[float]] = []  # one per (prompt, response): each evaluator's tier index or nan
    for labels in labels_by_prompt:
        positions = {name: rank_positions(tiers) for name, tiers in labels.items()}
        for r in sorted(set().union(*(p.keys() for p in positions.values()))):
            units.append([positions[n].get(r, math.nan) if n in positions else math.nan for n in names])
    data = np.array(units, dtype=float).T.reshape(len(names), len(units))  # (evaluators, units)
    seen = data[~np.isnan(data)]
    if np.unique(seen).size < 2 or not ((~np.isnan(data)).sum(axis=0) >= 2).any():
        return math.nan
    return float(krippendorff.alpha(reliability_data=data, level_of_measurement="ordinal"))


def leave_one_out_agreement(labels_by_prompt: list[dict[str, Tiers]]) -> dict[str, float]:
    """Each evaluator's agreement with the consensus of everyone else: their quality score.

    For every prompt an evaluator labelled together with at least one other evaluator, take the `consensus` of
    the OTHER evaluators' rankings and count the response pairs that both the evaluator and that consensus
    order strictly; the score is the fraction on which they agree (nan if there is none). Leaving the evaluator
    out keeps their own vote from pulling the reference towards them, which matters most with few evaluators
    per prompt. 1 = always sides with the others, 0.5 = chance, 0 = always against them.
    """
    agree: Counter[str] = Counter()
    total: Counter[str] = Counter()
    names = sorted({name for labels in labels_by_prompt for name in labels})
    for labels in labels_by_prompt:
        if len(labels) < 2:
            continue
        k = _num_responses(list(labels.values()))
        for name, tiers in labels.items():
            others = [t for other, t in labels.items() if other != name]
            ref = rank_positions(consensus(others, k).tiers)
            own = rank_positions(tiers, k)
            for i, j in combinations(sorted(own), 2):
                d_own, d_ref = _sign(own[i] - own[j]), _sign(ref[i] - ref[j])
                if d_own and d_ref:
                    total[name] += 1
                    agree[name] += d_own == d_ref
    return {name: agree[name] / total[name] if total[name] else math.nan for name in names}


def agreement_report(labels_by_prompt: list[dict[str, Tiers]]) -> dict:
    """The numbers the filter stage logs and the web app's agreement dashboard shows (nan where undefined).

    {"pairwise_agreement", "krippendorff_alpha", "per_evaluator": {name: {"loo_agreement", "n_prompts"}},
    "n_prompts", "n_labels"}; n_labels counts rankings (one per evaluator per prompt).
    """
    loo = leave_one_out_agreement(labels_by_prompt)
    prompts_per_evaluator = Counter(name for labels in labels_by_prompt for name in labels)
    return {
        "pairwise_agreement": pairwise_agreement([list(labels.values()) for labels in labels_by_prompt]),
        "krippendorff_alpha": krippendorff_alpha(labels_by_prompt),
        "per_evaluator": {
            name: {"loo_agreement": loo[name], "n_prompts": prompts_per_evaluator[name]} for name in sorted(loo)
        },
        "n_prompts": len(labels_by_prompt),
        "n_labels": sum(len(labels) for labels in labels_by_prompt),
    }


def win_rate(outcomes: list[float], seed: int, resamples: int = 2000) -> dict:
    """How often B beats A, with a 95% percentile-bootstrap interval over prompts.

    outcomes: one per prompt: 1 when B wins, 0.5 for a tie, 0 when A wins, or the mean of several evaluators'
    votes on that prompt (people judging side by side). Resampling prompts, not votes, keeps the interval honest
    when several votes share a prompt. wins / ties / losses count prompts above, at and below 0.5.
    """
    x = np.asarray(outcomes, dtype=float)
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, len(x), size=(resamples, len(x)))].mean(1) if len(x) else np.array([np.nan])
    return {
        "wins": int((x > 0.5).sum()),
        "ties": int((x == 0.5).sum()),
        "losses": int((x < 0.5).sum()),
        "n": len(x),
        "rate": float(x.mean()) if len(x) else float("nan"),
        "low": float(np.quantile(means, 0.025)),
        "high": float(np.quantile(means, 0.975)),
    }
