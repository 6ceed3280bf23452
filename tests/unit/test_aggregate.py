"""Aggregating evaluators' rankings: pairs, Bradley–Terry consensus, agreement statistics, and the seed claim."""

import math
from itertools import combinations

import numpy as np
import pytest

from rlhf.algos.aggregate import (
    agreement_report,
    bradley_terry,
    consensus,
    krippendorff_alpha,
    leave_one_out_agreement,
    pairs_from_ranking,
    pairwise_agreement,
    rank_positions,
)

# --- pairs_from_ranking ---------------------------------------------------------------------------------------------


def test_pairs_from_ranking_with_ties():
    assert pairs_from_ranking([[2], [0, 3], [1]]) == [(2, 0), (2, 3), (2, 1), (0, 1), (3, 1)]
    assert pairs_from_ranking([[0, 1]]) == []
    assert pairs_from_ranking([[1, 2], [0]]) == [(1, 0), (2, 0)]
    assert pairs_from_ranking([]) == []


@pytest.mark.parametrize("k", [1, 2, 4, 7])
def test_pairs_from_ranking_strict_gives_all_pairs(k):
    order = list(np.random.default_rng(k).permutation(k))
    pairs = pairs_from_ranking([[int(r)] for r in order])
    assert len(pairs) == math.comb(k, 2)
    assert {frozenset(p) for p in pairs} == {frozenset(p) for p in combinations(range(k), 2)}
    assert all(order.index(b) < order.index(w) for b, w in pairs)


@pytest.mark.parametrize("bad", [[[0], [0]], [[0], []], [[-1]]])
def test_malformed_ranking_is_refused(bad):
    with pytest.raises(ValueError, match="ranking"):
        pairs_from_ranking(bad)


# --- Bradley–Terry and consensus ------------------------------------------------------------------------------------


def test_bradley_terry_closed_form_and_stationarity():
    # K = 2: the MLE is θ0 − θ1 = log(w01 / w10).
    theta = bradley_terry(np.array([[0.0, 3.0], [1.0, 0.0]]))
    assert theta[0] - theta[1] == pytest.approx(math.log(3.0))
    # K = 6, arbitrary wins: the likelihood equations W_i = Σ_j n_ij σ(θ_i − θ_j) hold.
    wins = np.random.default_rng(0).uniform(0.1, 5.0, (6, 6)) * (1 - np.eye(6))
    theta = bradley_terry(wins)
    p = 1 / (1 + np.exp(-(theta[:, None] - theta[None, :])))
    np.testing.assert_allclose(wins.sum(1), ((wins + wins.T) * p * (1 - np.eye(6))).sum(1), atol=1e-9)
    assert theta.mean() == pytest.approx(0.0, abs=1e-12)


def test_consensus_of_identical_rankings_is_that_ranking():
    ranking = [[2], [0, 3], [1]]
    c = consensus([ranking] * 4, k=4)
    assert c.tiers == ranking
    assert c.pair_strength == {(2, 0): 1.0, (2, 3): 1.0, (2, 1): 1.0, (0, 1): 1.0, (3, 1): 1.0, (0, 3): 0.5}
    assert c.pair_votes[(0, 3)] == (0, 0, 4) and c.pair_votes[(1, 2)] == (0, 4, 0)


def test_consensus_of_one_strict_ranking_and_of_many_unanimous():
    assert consensus([[[3], [1], [0], [2]]], k=4).tiers == [[3], [1], [0], [2]]
    c = consensus([[[0], [1], [2]]] * 10_000, k=3)  # the prior keeps the MLE finite
    assert c.tiers == [[0], [1], [2]] and set(c.pair_strength.values()) == {1.0}


def test_two_against_one_split():
    c = consensus([[[0], [1]], [[0], [1]], [[1], [0]]], k=2)
    assert c.tiers == [[0], [1]]
    assert c.pair_strength == {(0, 1): pytest.approx(2 / 3)}
    assert c.pair_votes == {(0, 1): (2, 1, 0)}


def test_symmetric_condorcet_cycle_is_one_tier_every_time():
    cycle = [[[0], [1], [2]], [[1], [2], [0]], [[2], [0], [1]]]
    for rankings in (cycle, cycle[::-1], cycle[1:] + cycle[:1]):
        c = consensus(rankings, k=3)
        assert c.tiers == [[0, 1, 2]]
        assert c.pair_strength == {(0, 1): 0.5, (0, 2): 0.5, (1, 2): 0.5}


def test_asymmetric_cycle_resolves_deterministically():
    # 2 × (0>1>2), 2 × (1>2>0), 1 × (2>0>1): majorities cycle 0>1 (3-2), 1>2 (4-1), 2>0 (3-2).
    # BT follows total wins, 0: 3+2 = 5, 1: 2+4 = 6, 2: 1+3 = 4 → 1 > 0 > 2, every time, in any evaluator order.
    rankings = [[[0], [1], [2]]] * 2 + [[[1], [2], [0]]] * 2 + [[[2], [0], [1]]]
    c = consensus(rankings, k=3)
    assert c.pair_votes == {(0, 1): (3, 2, 0), (0, 2): (2, 3, 0), (1, 2): (4, 1, 0)}
    assert c.tiers == [[1], [0], [2]]
    assert c == consensus(rankings[::-1], k=3) == consensus(rankings[2:] + rankings[:2], k=3)
    # A cycle must overrule some majority: those pairs show strength < 0.5.
    assert c.pair_strength == {(1, 0): pytest.approx(0.4), (0, 2): pytest.approx(0.4), (1, 2): pytest.approx(0.8)}


def test_borda_overrules_a_narrow_majority_and_strength_flags_it():
    # 3 × (0>1>2), 2 × (1>2>0): 0 beats 1 by 3-2, but 1 has more total wins (7 vs 6); BT follows the wins.
    c = consensus([[[0], [1], [2]]] * 3 + [[[1], [2], [0]]] * 2, k=3)
    assert c.tiers == [[1], [0], [2]]
    assert c.pair_strength == {(1, 0): pytest.approx(0.4), (0, 2): pytest.approx(0.6), (1, 2): 1.0}


def test_consensus_with_ties_and_partial_rankings():
    # A tie is half a vote each way: 0 vs 1 gets (1 above, 0 below, 1 tie) → strength 0.75.
    c = consensus([[[0], [1]], [[0, 1]]], k=2)
    assert c.tiers == [[0], [1]] and c.pair_strength == {(0, 1): pytest.approx(0.75)}
    # All tie → one tier. An evaluator who skipped response 2 says nothing about its pairs.
    assert consensus([[[0, 1, 2]], [[0, 1, 2]]], k=3).tiers == [[0, 1, 2]]
    c = consensus([[[1], [0]], [[2], [1], [0]]], k=3)
    assert c.pair_votes == {(0, 1): (0, 2, 0), (0, 2): (0, 1, 0), (1, 2): (0, 1, 0)}
    assert c.tiers == [[2], [1], [0]]
    assert consensus([], k=3).tiers == [[0, 1, 2]]
    with pytest.raises(ValueError, match="outside"):
        consensus([[[0], [3]]], k=3)


# --- agreement ------------------------------------------------------------------------------------------------------


def test_pairwise_agreement_hand_computed():
    # A: 0>1>2, B: 0>2>1 → pairs (0,1) agree, (0,2) agree, (1,2) disagree → 2/3.
    assert pairwise_agreement([[[[0], [1], [2]], [[0], [2], [1]]]]) == pytest.approx(2 / 3)
    # Adding a prompt where the two are opposed on one pair and one tie (skipped): 2 / (3 + 1).
    prompts = [[[[0], [1], [2]], [[0], [2], [1]]], [[[0], [1], [2]], [[1], [0, 2]]]]
    # Second prompt: (0,1) disagree, (0,2) B ties → skip, (1,2) agree → 3 of 5 overall.
    assert pairwise_agreement(prompts) == pytest.approx(3 / 5)
    # Three evaluators: every pair of them counts.
    assert pairwise_agreement([[[[0], [1]], [[0], [1]], [[1], [0]]]]) == pytest.approx(1 / 3)
    assert math.isnan(pairwise_agreement([[[[0], [1]]], [[[0, 1]], [[1], [0]]]]))


def naive_ordinal_alpha(data: np.ndarray) -> float:
    """Krippendorff 2011, "Computing Krippendorff's alpha-reliability", §C, written out loop by loop."""
    values = sorted({v for v in data.flat if not np.isnan(v)})
    index = {v: a for a, v in enumerate(values)}
    o = np.zeros((len(values), len(values)))  # coincidence matrix
    for unit in data.T:
        vals = [v for v in unit if not np.isnan(v)]
        if len(vals) < 2:
            continue
        for a, b in ((a, b) for i, a in enumerate(vals) for j, b in enumerate(vals) if i != j):
            o[index[a], index[b]] += 1 / (len(vals) - 1)
    n_c = o.sum(1)
    n = n_c.sum()

    def delta2(c: int, k: int) -> float:
        lo, hi = min(c, k), max(c, k)
        return (n_c[lo : hi + 1].sum() - (n_c[c] + n_c[k]) / 2) ** 2

    d_o = sum(o[c, k] * delta2(c, k) for c in range(len(values)) for k in range(len(values)))
    d_e = sum(n_c[c] * n_c[k] * delta2(c, k) for c in range(len(values)) for k in range(len(values)))
    return 1 - (n - 1) * d_o / d_e


def test_krippendorff_alpha_perfect_opposed_hand_checked_and_random():
    assert krippendorff_alpha([{"a": [[0], [1], [2]], "b": [[0], [1], [2]]}] * 3) == pytest.approx(1.0)
    # Hand-checked: two evaluators, K = 2, opposed. Units (resp 0: 0,1), (resp 1: 1,0); o_01 = o_10 = 2,
    # n_0 = n_1 = 2, n = 4, δ²_01 = (2 + 2 − 2)² = 4 → α = 1 − 3·16 / (2·2·4·2) = −0.5.
    assert krippendorff_alpha([{"a": [[0], [1]], "b": [[1], [0]]}]) == pytest.approx(-0.5)
    assert krippendorff_alpha([{"a": [[0], [1], [2], [3]], "b": [[3], [2], [1], [0]]}] * 5) < -0.5
    rng = np.random.default_rng(0)
    random = [{name: [[int(r)] for r in rng.permutation(4)] for name in "abc"} for _ in range(200)]
    assert abs(krippendorff_alpha(random)) < 0.1


def test_krippendorff_alpha_matches_naive_reference_with_missing_labels():
    labels = [
        {"a": [[0], [1], [2]], "b": [[1], [0], [2]], "c": [[0], [1, 2]]},
        {"a": [[2], [0, 1]], "c": [[2], [1], [0]]},
        {"b": [[0], [1], [2]]},  # one evaluator: no pairable unit, still in the data
        {"a": [[1], [2], [0]], "b": [[1], [0], [2]]},
    ]
    names = ["a", "b", "c"]
    units = []
    for prompt in labels:
        pos = {n: {r: t for t, tier in enumerate(tiers) for r in tier} for n, tiers in prompt.items()}
        for r in range(3):
            units.append([pos[n][r] if n in pos else np.nan for n in names])
    assert krippendorff_alpha(labels) == pytest.approx(naive_ordinal_alpha(np.array(units).T))


def test_krippendorff_alpha_undefined_is_nan():
    assert math.isnan(krippendorff_alpha([{"a": [[0], [1]]}]))  # nobody to agree with
    assert math.isnan(krippendorff_alpha([{"a": [[0, 1]], "b": [[0, 1]]}]))  # a single value
    assert math.isnan(krippendorff_alpha([]))


def test_leave_one_out_flags_the_contrarian():
    rng = np.random.default_rng(1)
    labels = []
    for _ in range(20):
        order = [int(r) for r in rng.permutation(4)]
        agree = [[r] for r in order]
        labels.append({"ann": agree, "bob": agree, "cat": agree, "zed": agree[::-1]})
    scores = leave_one_out_agreement(labels)
    assert scores["zed"] == pytest.approx(0.0)
    assert scores["ann"] == scores["bob"] == scores["cat"] == pytest.approx(1.0)
    # Alone on a prompt: nothing to compare against.
    assert math.isnan(leave_one_out_agreement([{"solo": [[0], [1]]}])["solo"])


def test_agreement_report_fields():
    labels = [{"a": [[0], [1], [2]], "b": [[0], [2], [1]]}, {"a": [[1], [0], [2]]}]
    report = agreement_report(labels)
    assert report["pairwise_agreement"] == pytest.approx(2 / 3)
    assert report["n_prompts"] == 2 and report["n_labels"] == 3
    assert report["per_evaluator"]["a"]["n_prompts"] == 2 and report["per_evaluator"]["b"]["n_prompts"] == 1
    # Each sees the other as the consensus on prompt 0: agree on 2 of 3 pairs.
    assert report["per_evaluator"]["b"]["loo_agreement"] == pytest.approx(2 / 3)
    assert -1.0 <= report["krippendorff_alpha"] <= 1.0


# --- the seed claim: more evaluators recover the truth more often ---------------------------------------------------


def simulate(n_prompts: int, k: int, n_evaluators: int, noise: float, seed: int) -> tuple[list, list]:
    """True utilities per prompt; each evaluator ranks by utility + Gumbel noise (a Plackett–Luce labeller)."""
    rng = np.random.default_rng(seed)
    utility = rng.normal(size=(n_prompts, k))  # (P, K)
    truths = [[[int(r)] for r in np.argsort(-u)] for u in utility]
    perceived = utility[:, None, :] + noise * rng.gumbel(size=(n_prompts, n_evaluators, k))  # (P, E, K)
    rankings = [[[[int(r)] for r in np.argsort(-p)] for p in prompt] for prompt in perceived]
    return truths, rankings


def test_more_evaluators_recover_the_true_ranking_more_often():
    # Gumbel scale 0.5 against unit-variance utilities: one evaluator gets about 82% of pairs right, in the
    # range of the 73% inter-labeler agreement InstructGPT reports (Ouyang et al. 2022, §3.4).
    truths, rankings = simulate(n_prompts=300, k=4, n_evaluators=5, noise=0.5, seed=0)

    def recovery(n_evaluators: int) -> tuple[float, float]:
        """(exact-order recovery rate, pairwise accuracy vs truth with consensus ties as half right)."""
        exact = pairs_right = 0.0
        for truth, prompt in zip(truths, rankings, strict=True):
            tiers = consensus(prompt[:n_evaluators], k=4).tiers
            exact += tiers == truth
            true_pos, pos = rank_positions(truth), rank_positions(tiers)
            for i, j in combinations(range(4), 2):
                # A tie is what a coin flip would break: half right on average, so no metric favours ties.
                pairs_right += 0.5 if pos[i] == pos[j] else float((pos[i] < pos[j]) == (true_pos[i] < true_pos[j]))
        return exact / len(truths), pairs_right / (len(truths) * math.comb(4, 2))

    (exact1, pairs1), (exact3, pairs3), (exact5, pairs5) = recovery(1), recovery(3), recovery(5)
    assert exact5 > exact3 > exact1
    assert exact5 - exact1 > 0.1  # 0.34 → 0.51 with this seed
    assert pairs5 - pairs3 > 0.02 and pairs3 - pairs1 > 0.02  # 0.82 → 0.87 → 0.90
