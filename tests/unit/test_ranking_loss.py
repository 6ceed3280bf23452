"""The K-wise reward loss against a naive double loop over pairs, the K = 2 case, ties, and one forward per response."""

import math

import torch
import torch.nn.functional as F

from rlhf.algos.aggregate import pairs_from_ranking
from rlhf.algos.ranking_loss import kwise_loss


def naive(scores: list[torch.Tensor], rankings: list[list[list[int]]], margins=None) -> torch.Tensor:
    """InstructGPT eq. 1 as written: per prompt, −1/C·Σ over its ranked pairs; then the mean over prompts."""
    total = 0.0
    for t, (s, tiers) in enumerate(zip(scores, rankings, strict=True)):
        pairs = pairs_from_ranking(tiers)
        task = 0.0
        for p, (b, w) in enumerate(pairs):
            m = margins[t][p] if margins else 0.0
            task = task - torch.log(torch.sigmoid(s[b] - s[w] - m))
        total = total + task / len(pairs)
    return total / len(scores)


def flatten(rankings):
    pairs, pair_task, base = [], [], 0
    for t, tiers in enumerate(rankings):
        k = sum(len(tier) for tier in tiers)
        pairs += [(base + b, base + w) for b, w in pairs_from_ranking(tiers)]
        pair_task += [t] * len(pairs_from_ranking(tiers))
        base += k
    return torch.tensor(pairs), torch.tensor(pair_task)


def test_kwise_equals_naive_loop_in_value_and_gradient():
    torch.manual_seed(0)
    rankings = [[[2], [0], [3], [1]], [[0], [1]], [[4], [1, 2], [0], [3]], [[1], [0], [2]]]  # K = 4, 2, 5, 3; a tie
    sizes = [4, 2, 5, 3]
    flat = torch.randn(sum(sizes), dtype=torch.float64, requires_grad=True)
    pairs, pair_task = flatten(rankings)
    margins_flat = torch.rand(len(pairs), dtype=torch.float64)
    ours = kwise_loss(flat, pairs, pair_task, len(rankings), margins_flat)
    (g_ours,) = torch.autograd.grad(ours, flat)

    per_task = list(torch.split(flat, sizes))
    margins, i = [], 0
    for tiers in rankings:
        n = len(pairs_from_ranking(tiers))
        margins.append(margins_flat[i : i + n].tolist())
        i += n
    reference = naive(per_task, rankings, margins)
    (g_ref,) = torch.autograd.grad(reference, flat)
    assert torch.allclose(ours, reference, atol=1e-12) and torch.allclose(g_ours, g_ref, atol=1e-12)


def test_k2_is_the_pairwise_loss():
    torch.manual_seed(1)
    chosen, rejected = torch.randn(6), torch.randn(6)
    flat = torch.stack([chosen, rejected], dim=1).flatten()  # [c0, r0, c1, r1, ...]
    pairs = torch.tensor([(2 * i, 2 * i + 1) for i in range(6)])
    loss = kwise_loss(flat, pairs, torch.arange(6), 6)
    assert torch.allclose(loss, -F.logsigmoid(chosen - rejected).mean())


def test_ties_contribute_no_pair():
    assert pairs_from_ranking([[0], [1, 2]]) == [(0, 1), (0, 2)]
    pairs, pair_task = flatten([[[0], [1, 2]]])
    s = torch.tensor([1.0, 0.3, -0.2], requires_grad=True)
    loss = kwise_loss(s, pairs, pair_task, 1)
    (g,) = torch.autograd.grad(loss, s)
    # moving the tied responses against each other only acts through their pairs with response 0
    expected = -(F.logsigmoid(s[0] - s[1]) + F.logsigmoid(s[0] - s[2])) / 2
    assert (
        torch.allclose(loss, expected)
        and g[0] < 0 < min(g[1], g[2])
        and math.isclose(float(g.sum()), 0.0, abs_tol=1e-7)
    )
